"""Per-site tensors stored in ``torch.nn`` containers under the model's site names.

A site ``"fc1.weight"`` is kept at ``container["fc1"]["weight"]``, so state-dict keys read
``locs.fc1.weight`` as in Pyro's ``AutoNormal``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def split_site(site: str) -> tuple[str, str]:
    layer, _, param = site.rpartition(".")
    return layer, param


def site_parameters(values: Mapping[str, torch.Tensor]) -> nn.ModuleDict:
    """Trainable parameters for each site."""
    out = nn.ModuleDict()
    for site, value in values.items():
        layer, param = split_site(site)
        if layer not in out:
            out[layer] = nn.ParameterDict()
        out[layer][param] = nn.Parameter(value.detach().clone())
    return out


class SiteBuffers(nn.Module):
    """Non-trainable per-site tensors (masks, frozen values) that move with ``.to(device)``."""

    def __init__(self, values: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.layers = nn.ModuleDict()
        for site, value in (values or {}).items():
            self[site] = value

    def __setitem__(self, site: str, value: torch.Tensor) -> None:
        layer, param = split_site(site)
        if layer not in self.layers:
            self.layers[layer] = nn.Module()
        self.layers[layer].register_buffer(param, value.detach().clone())

    def __getitem__(self, site: str) -> torch.Tensor:
        layer, param = split_site(site)
        return getattr(self.layers[layer], param)

    def __contains__(self, site: str) -> bool:
        layer, param = split_site(site)
        return layer in self.layers and param in dict(self.layers[layer].named_buffers(recurse=False))

    def get(self, site: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tensor of ``site``, or ``default`` where the site has none."""
        if site not in self:
            return default
        return self[site]

    def items(self):
        for layer, mod in self.layers.items():
            for param, buf in mod.named_buffers(recurse=False):
                yield f"{layer}.{param}", buf

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


def get_site(container: nn.ModuleDict, site: str) -> torch.Tensor:
    layer, param = split_site(site)
    return container[layer][param]
