"""Network architectures as functional descriptions.

A :class:`Network` holds no weights: it says which weight sites exist (``"fc1.weight"``,
``"fc1.bias"``, ...), how an input flows through the layers given a dict of weights, and which
weights form a structured *group* (one output neuron of a dense layer, one output filter of a
conv layer: a row of the weight tensor plus its bias entry). Models put priors on these sites,
guides and kernels find their posteriors, and every sparse method prunes the same groups.

``Network.to_torch`` exports plain, smaller :class:`torch.nn.Module` s once groups are pruned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import MODULE_ARCHITECTURES
from .errors import ConfigError
from .module_network import ModuleNetwork
from .site_layout import SiteLayout

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "swish": F.silu,
    "identity": lambda h: h,
}


@dataclass(frozen=True)
class Dense:
    name: str
    in_features: int
    out_features: int
    kind: str = "dense"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def num_groups(self) -> int:
        return self.out_features

    @property
    def fan_in(self) -> int:
        return self.in_features

    def op(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(h, weight, bias)

    def out_mask_shape(self) -> tuple[int, ...]:
        return (-1,)


@dataclass(frozen=True)
class Conv2d:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    kind: str = "conv2d"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    @property
    def num_groups(self) -> int:
        return self.out_channels

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size**2

    def op(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(h, weight, bias, stride=self.stride, padding=self.padding)

    def out_mask_shape(self) -> tuple[int, ...]:
        return (-1, 1, 1)


@dataclass(frozen=True)
class Activation:
    fn: str
    kind: str = "activation"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.fn](h)


@dataclass(frozen=True)
class Pool2d:
    size: int
    mode: str = "max"
    kind: str = "pool2d"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return F.max_pool2d(h, self.size)
        return F.avg_pool2d(h, self.size)


@dataclass(frozen=True)
class Flatten:
    kind: str = "flatten"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h.flatten(start_dim=-3) if h.dim() >= 4 else h.flatten(start_dim=1)


_LAYER_KINDS = {"dense": Dense, "conv2d": Conv2d, "activation": Activation, "pool2d": Pool2d, "flatten": Flatten}
ParamLayer = Dense | Conv2d


class Network(SiteLayout):
    """A feed-forward architecture: layers in order, the input shape and a name.

    Sites are named ``"<layer>.weight"`` and ``"<layer>.bias"``, as PyTorch names the parameters
    of the matching :class:`torch.nn.Module`.
    """

    #: each parametric layer reads the previous one's groups (:func:`~bnnzoo.models.sparsity.input_groups`)
    is_chain = True

    def __init__(self, layers: list, input_shape: tuple[int, ...], name: str = "network"):
        self.layers = list(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name
        self.param_layers: list[ParamLayer] = [l for l in self.layers if isinstance(l, (Dense, Conv2d))]
        names = [l.name for l in self.param_layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"layer names must be unique, got {names}")
        for layer in self.layers:
            if isinstance(layer, Activation) and layer.fn not in ACTIVATIONS:
                raise ConfigError(f"unknown activation {layer.fn!r}; choose one of {sorted(ACTIVATIONS)}")

    # ---- forward -----------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, linear: Callable[[ParamLayer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the network, letting ``linear(layer, h)`` compute each parametric layer."""
        h = x
        for layer in self.layers:
            h = linear(layer, h) if isinstance(layer, (Dense, Conv2d)) else layer(h)
        return h

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Outputs for one set of weights ``params`` (site name -> tensor)."""
        return self.apply(x, lambda layer, h: layer.op(h, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]))

    __call__ = forward

    # ---- serialisation -----------------------------------------------------------------------
    def spec(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape), "layers": [asdict(l) for l in self.layers]}

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Network":
        layers = []
        for d in spec["layers"]:
            d = dict(d)
            layers.append(_LAYER_KINDS[d.pop("kind")](**d))
        return cls(layers, tuple(spec["input_shape"]), spec.get("name", "network"))

    def __repr__(self) -> str:
        widths = [str(self.input_shape[0] if len(self.input_shape) == 1 else "x".join(map(str, self.input_shape)))]
        widths += [str(l.num_groups) for l in self.param_layers]
        return f"Network({self.name}: {'-'.join(widths)})"

    # ---- export ------------------------------------------------------------------------------
    def to_torch(
        self,
        params: Mapping[str, torch.Tensor] | None = None,
        keep: Mapping[str, torch.Tensor] | None = None,
    ) -> nn.Sequential:
        """A plain PyTorch module with this architecture.

        ``params`` fills in the weights (PyTorch's default initialisation otherwise); ``keep`` maps a
        layer name to a boolean vector over its output groups, and the exported module is the smaller
        network with the other groups (and the inputs of the next layer that they fed) removed.
        """
        keep = dict(keep or {})
        modules: list[nn.Module] = []
        in_idx: torch.Tensor | None = None  # kept input features/channels of the next param layer
        shape = self.input_shape  # current feature shape (without batch)
        for layer in self.layers:
            if isinstance(layer, (Dense, Conv2d)):
                k = keep.get(layer.name)
                out_idx = torch.arange(layer.num_groups) if k is None else torch.nonzero(k.cpu()).flatten()
                n_in = layer.in_features if isinstance(layer, Dense) else layer.in_channels
                cols = torch.arange(n_in) if in_idx is None else in_idx
                if isinstance(layer, Dense):
                    mod = nn.Linear(len(cols), len(out_idx))
                    shape = (layer.out_features,)
                else:
                    mod = nn.Conv2d(len(cols), len(out_idx), layer.kernel_size, layer.stride, layer.padding)
                    h, w = shape[1], shape[2]
                    h = (h + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                    w = (w + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                    shape = (layer.out_channels, h, w)
                if params is not None:
                    weight = params[f"{layer.name}.weight"].detach().cpu()
                    bias = params[f"{layer.name}.bias"].detach().cpu()
                    with torch.no_grad():
                        mod.weight.copy_(weight[out_idx][:, cols])
                        mod.bias.copy_(bias[out_idx])
                modules.append(mod)
                in_idx = out_idx
            elif isinstance(layer, Flatten):
                if len(shape) == 3 and in_idx is not None:
                    per = shape[1] * shape[2]
                    in_idx = (in_idx[:, None] * per + torch.arange(per)[None, :]).flatten()
                shape = (math.prod(shape),)
                modules.append(nn.Flatten())
            elif isinstance(layer, Pool2d):
                modules.append(nn.MaxPool2d(layer.size) if layer.mode == "max" else nn.AvgPool2d(layer.size))
                shape = (shape[0], shape[1] // layer.size, shape[2] // layer.size)
            elif isinstance(layer, Activation):
                modules.append({"relu": nn.ReLU, "tanh": nn.Tanh, "swish": nn.SiLU, "identity": nn.Identity}[layer.fn]())
        return nn.Sequential(*modules)

    def init_params(self, generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """PyTorch's default initialisation of every site (Kaiming-uniform weights, uniform biases)."""
        out = {}
        for layer in self.param_layers:
            bound = 1.0 / math.sqrt(layer.fan_in)
            w = torch.empty(layer.weight_shape, device=device).uniform_(-bound, bound, generator=generator)
            b = torch.empty((layer.num_groups,), device=device).uniform_(-bound, bound, generator=generator)
            out[f"{layer.name}.weight"], out[f"{layer.name}.bias"] = w, b
        return out


def chain_from_sequential(module: nn.Module, input_shape: tuple[int, ...]) -> Network | None:
    """The chain a plain ``nn.Sequential`` describes, or ``None`` where it is not one: every child
    an ``nn.Linear`` or a square ``nn.Conv2d`` with a bias (integer stride and padding, zero padding,
    no dilation or groups), ``nn.ReLU`` / ``nn.Tanh`` / ``nn.SiLU`` / ``nn.Identity``, a
    ``nn.MaxPool2d`` / ``nn.AvgPool2d`` whose stride is its kernel, or ``nn.Flatten``. Layers are
    named by their index in the sequence, as PyTorch names their parameters (``"0.weight"``). Such a
    module runs as a :class:`Network` (the fused fast paths and closed-form predictives apply)."""
    if type(module) is not nn.Sequential:
        return None
    activations = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "swish", nn.Identity: "identity"}
    layers: list = []
    for name, child in module.named_children():
        kind = type(child)
        if kind is nn.Linear and child.bias is not None:
            layers.append(Dense(name, child.in_features, child.out_features))
        elif (kind is nn.Conv2d and child.bias is not None and child.groups == 1 and child.padding_mode == "zeros"
              and len(set(child.kernel_size)) == 1 and len(set(child.stride)) == 1 and child.dilation == (1, 1)
              and isinstance(child.padding, tuple) and len(set(child.padding)) == 1):
            layers.append(Conv2d(name, child.in_channels, child.out_channels, child.kernel_size[0], child.stride[0],
                                 child.padding[0]))
        elif kind in activations:
            layers.append(Activation(activations[kind]))
        elif kind in (nn.MaxPool2d, nn.AvgPool2d) and isinstance(child.kernel_size, int) and \
                child.stride == child.kernel_size and child.padding == 0:
            layers.append(Pool2d(child.kernel_size, "max" if kind is nn.MaxPool2d else "avg"))
        elif kind is nn.Flatten and child.start_dim == 1 and child.end_dim == -1:
            layers.append(Flatten())
        else:
            return None
    if not any(isinstance(layer, (Dense, Conv2d)) for layer in layers):
        return None
    return Network(layers, tuple(input_shape), name="sequential")


# ---- the catalog's architectures ----------------------------------------------------------------
def mlp(in_features: int, hidden: list[int] | tuple[int, ...], out_features: int, activation: str = "relu",
        name: str | None = None) -> Network:
    """A fully connected network ``in - hidden... - out`` with ``activation`` between layers."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in hidden):
        raise ConfigError(f"hidden must be a list of layer widths (positive integers), got {hidden!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    if in_features < 1 or out_features < 1 or any(int(h) < 1 for h in hidden):
        raise ConfigError(f"layer widths must be positive, got {in_features}, {list(hidden)}, {out_features}")
    widths = [int(in_features), *map(int, hidden), int(out_features)]
    layers: list = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(Dense(f"fc{i + 1}", a, b))
        if i < len(widths) - 2:
            layers.append(Activation(activation))
    return Network(layers, (in_features,), name or f"mlp-{'-'.join(map(str, widths))}")


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> Network:
    """LeNet-300-100 (LeCun et al. 1998): the dense 784-300-100-10 network."""
    return mlp(in_features, [300, 100], num_classes, "relu", name="lenet-300-100")


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> Network:
    """LeNet-5 as in the Caffe model used by the compression literature: conv 20 (5x5), max-pool,
    conv 50 (5x5), max-pool, dense 500, dense ``num_classes``; ReLU."""
    side = ((image_size - 4) // 2 - 4) // 2
    layers = [
        Conv2d("conv1", in_channels, 20, 5), Activation("relu"), Pool2d(2),
        Conv2d("conv2", 20, 50, 5), Activation("relu"), Pool2d(2),
        Flatten(),
        Dense("fc1", 50 * side * side, 500), Activation("relu"),
        Dense("fc2", 500, num_classes),
    ]
    return Network(layers, (in_channels, image_size, image_size), name="lenet5")


ARCHITECTURES = {"mlp": mlp, "lenet-300-100": lenet_300_100, "lenet5": lenet5, **MODULE_ARCHITECTURES}


def build_network(arch: str, input_shape: tuple[int, ...], output_dim: int, hidden: list[int] | None = None,
                  activation: str = "relu") -> Network | ModuleNetwork:
    """Build a catalog architecture by name for data of ``input_shape`` and ``output_dim`` outputs;
    a :class:`~bnnzoo.models.errors.ConfigError` names what is wrong with a bad description. The
    residual, attention and mixer architectures (:mod:`~bnnzoo.models.architectures`) are modules,
    returned as a :class:`~bnnzoo.models.module_network.ModuleNetwork` named after the architecture."""
    if not isinstance(arch, str):
        raise ConfigError(f"the network's arch must be a name, one of {sorted(ARCHITECTURES)}; got {arch!r}")
    if arch in ("mlp", "lenet-300-100"):
        in_features = math.prod(input_shape)
        if arch == "mlp":
            net = mlp(in_features, hidden if hidden is not None else [50], output_dim, activation)
        else:
            net = lenet_300_100(in_features, output_dim)
        if len(input_shape) > 1:  # images into a dense network: flatten first
            net = Network([Flatten(), *net.layers], tuple(input_shape), net.name)
        return net
    if arch in MODULE_ARCHITECTURES:
        return ModuleNetwork(MODULE_ARCHITECTURES[arch](tuple(input_shape), output_dim), tuple(input_shape), name=arch)
    if arch == "lenet5":
        if len(input_shape) != 3:
            raise ConfigError(f"lenet5 needs image inputs (channels, height, width), got shape {input_shape}")
        return lenet5(input_shape[0], output_dim, input_shape[1])
    raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
