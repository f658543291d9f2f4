"""The catalog's residual, attention and mixer architectures, as ``torch.nn.Module`` s.

Each builder takes the input shape ``(channels, height, width)`` of one image and the number of
outputs, and returns a plain module; the catalog wraps it as a
:class:`~bnnzoo.models.module_network.ModuleNetwork` (every ``nn.Linear`` / ``nn.Conv2d`` a weight
site, normalisation layers and embeddings point estimates). The same builder serves MNIST-sized
(1x28x28) and CIFAR-sized (3x32x32) inputs: the patch size 4 divides both sides, and the ResNets
pool globally.

* ``resnet-8``, ``resnet-20``: the CIFAR ResNets of He, Zhang, Ren & Sun 2016 (depth ``6n + 2``: a
  3x3 stem of 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels, the last
  two starting with stride 2, global average pooling, a linear head), with BatchNorm and 1x1
  projection shortcuts where the shape changes (their option B).
* ``resnet-18``: the four-stage ResNet-18 (64 to 512 channels, two basic blocks per stage) with the
  3x3 stride-1 stem and no max-pooling used for 32x32 inputs.
* ``vit-tiny``: a Vision Transformer (Dosovitskiy et al. 2021) in the small-data setting: patch 4,
  width 192, depth 6, 3 heads, MLP width 384, pre-norm blocks, learned position embeddings, mean
  pooling over tokens instead of a class token.
* ``mixer-small``: an MLP-Mixer (Tolstikhin et al. 2021) scaled to these inputs: patch 4, width
  128, depth 6, token-mixing MLP width 64, channel-mixing MLP width 256, mean pooling.

Structured pruning removes groups (output neurons and channels) of every layer but the head. In an
exported pruned network the hidden units of the transformer and mixer MLPs are removed physically
(:class:`MLP`'s ``prunable_pairs``), and so are a residual block's pruned inner channels whose
BatchNorm maps their zero output to a constant the ReLU clips to 0 (:class:`BasicBlock`'s
``prunable_channels``); the other groups are masked. A pruned inner channel whose constant survives
the ReLU stays, masked: the next convolution, with its zero padding, does not turn a constant image
into a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (identity, or 1x1 conv + BN when the stride or
    the width changes), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    #: inner channels a pruned export may remove (:meth:`~bnnzoo.models.ModuleNetwork.to_torch`):
    #: conv1's output channels, with bn1's entries and conv2's input channels
    prunable_channels = (("conv1", "bn1", "conv2"),)


class ResNet(nn.Module):
    """A stem conv3x3 + BN + ReLU, stages of :class:`BasicBlock` (the first block of every stage but
    the first has stride 2), global average pooling and a linear head."""

    def __init__(self, in_channels: int, num_outputs: int, widths: tuple[int, ...], blocks: int, stem: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, width = [], stem
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(width, w, 2 if (i > 0 and j == 0) else 1))
                width = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(h.mean(dim=(-2, -1)))


def _image_shape(arch: str, input_shape: tuple[int, ...], patch: int | None = None) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"{arch} needs image inputs (channels, height, width), got shape {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    if patch is not None and (h % patch or w % patch):
        raise ConfigError(f"{arch} cuts {h}x{w} images into {patch}x{patch} patches: the sides must be multiples of {patch}")
    return c, h, w


def resnet(depth: int, input_shape: tuple[int, ...], num_outputs: int) -> ResNet:
    """The CIFAR ResNet of ``depth = 6n + 2`` layers (``resnet(20, ...)`` is ResNet-20)."""
    if (depth - 2) % 6 or depth < 8:
        raise ConfigError(f"a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, ...), got {depth}")
    c, _, _ = _image_shape(f"resnet-{depth}", input_shape)
    return ResNet(c, num_outputs, (16, 32, 64), (depth - 2) // 6, 16)


def resnet18(input_shape: tuple[int, ...], num_outputs: int) -> ResNet:
    c, _, _ = _image_shape("resnet-18", input_shape)
    return ResNet(c, num_outputs, (64, 128, 256, 512), 2, 64)


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, scaled dot-product attention, ``proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``. Its hidden units can be removed exactly (``gelu(0) = 0``): an exported
    pruned network drops them (``prunable_pairs``)."""

    prunable_pairs = (("fc1", "fc2"),)

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each projected to ``width`` (a strided conv), as tokens."""

    def __init__(self, channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, patch: int = 4, width: int = 192,
                 depth: int = 6, heads: int = 3, hidden: int = 384):
        super().__init__()
        c, h, w = _image_shape("vit-tiny", input_shape, patch)
        self.patches = PatchEmbedding(c, width, patch)
        self.position = nn.Parameter(0.02 * torch.randn(1, (h // patch) * (w // patch), width))
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.blocks(self.patches(x) + self.position)
        return self.head(self.norm(tokens).mean(dim=1))


class MixerBlock(nn.Module):
    """Token mixing (an MLP across the tokens of each channel) and channel mixing (an MLP across the
    channels of each token), each pre-normed and residual."""

    def __init__(self, tokens: int, width: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.token_mlp = MLP(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(width)
        self.channel_mlp = MLP(width, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, patch: int = 4, width: int = 128,
                 depth: int = 6, token_hidden: int = 64, channel_hidden: int = 256):
        super().__init__()
        c, h, w = _image_shape("mixer-small", input_shape, patch)
        tokens = (h // patch) * (w // patch)
        self.patches = PatchEmbedding(c, width, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, width, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.patches(x))).mean(dim=1))


#: catalog name -> builder ``(input_shape, num_outputs) -> nn.Module``
MODULE_ARCHITECTURES = {
    "resnet-8": lambda shape, k: resnet(8, shape, k),
    "resnet-20": lambda shape, k: resnet(20, shape, k),
    "resnet-18": resnet18,
    "vit-tiny": VisionTransformer,
    "mixer-small": MLPMixer,
}
