"""Standard augmentation of image minibatches, on the device they live on: random crops of the
zero-padded image and horizontal flips, a fresh choice per image (the CIFAR recipe of He et al.
2016: pad 4, crop 32x32, flip with probability 1/2).

:func:`random_crop_flip` is the transform a training loop applies to each minibatch's inputs
(``augment=`` of the image data sets); it never leaves the device and draws from the generator it
is given, so a seeded fit reproduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DataError


def augmentation(name: str | None):
    """The transform of an ``augment`` option: ``None`` for none, or one of :data:`AUGMENTATIONS`."""
    if name is None:
        return None
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise DataError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}") from None


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Images ``x`` of shape ``(B, C, H, W)``, each zero-padded by ``padding`` pixels, cropped back to
    ``H x W`` at an offset drawn uniformly from ``{0, ..., 2 padding}^2`` and, with ``flip``, mirrored
    left-right with probability 1/2. Offsets and flips come from ``generator`` (on ``x``'s device)."""
    if x.dim() != 4:
        raise DataError(f"random_crop_flip needs images (B, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise DataError(f"random_crop_flip: padding must be a non-negative integer, got {padding!r}")
    b, _, h, w = x.shape
    out = x
    if padding:
        padded = F.pad(x, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, b), device=x.device, generator=generator)
        rows = (offsets[0, :, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offsets[1, :, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        out = padded[batch, channel, rows, cols]
    if flip:
        mirror = torch.rand(b, device=x.device, generator=generator) < 0.5
        out = torch.where(mirror.view(b, 1, 1, 1), out.flip(-1), out)
    return out


#: the ``augment`` option's values: name -> transform of a minibatch's images
AUGMENTATIONS = {"crop-flip": random_crop_flip}
