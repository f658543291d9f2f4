"""Per-site tensors stored in ``torch.nn`` containers under the model's site names.

A site ``"fc1.weight"`` is kept at ``container["fc1"]["weight"]``, so state-dict keys read
``locs.fc1.weight`` as in Pyro's ``AutoNormal``. A layer of a user's module is named by its dotted
path (``"blocks.0.conv1"``); :class:`LayerDict` keeps it nested (``container["blocks"]["0"]["conv1"]``),
so its state-dict keys read ``locs.blocks.0.conv1.weight``, the module's own parameter path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def split_site(site: str) -> tuple[str, str]:
    layer, _, param = site.rpartition(".")
    return layer, param


class LayerDict(nn.ModuleDict):
    """A ``ModuleDict`` of per-layer modules whose keys may be dotted paths: ``d["a.b"] = m`` stores
    ``m`` at ``d["a"]["b"]``. Indexing, ``in``, ``len`` and iteration (``keys``, ``values``, ``items``)
    are over the layers (the leaves), by their dotted names."""

    def _node(self, key: str) -> nn.Module:
        node: nn.Module = self
        for part in key.split("."):
            if not isinstance(node, LayerDict) or part not in node._modules:
                raise KeyError(key)
            node = node._modules[part]
        return node

    def __getitem__(self, key: str) -> nn.Module:
        return self._node(key)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        *path, last = key.split(".")
        node = self
        for part in path:
            if part not in node._modules:
                nn.ModuleDict.__setitem__(node, part, LayerDict())
            node = node._modules[part]
            if not isinstance(node, LayerDict):
                raise KeyError(f"{key}: {part} is a layer, not a path to one")
        nn.ModuleDict.__setitem__(node, last, module)

    def __contains__(self, key: object) -> bool:
        try:
            self._node(str(key))
        except KeyError:
            return False
        return True

    def items(self):
        for name, module in self._modules.items():
            if isinstance(module, LayerDict):
                for sub, leaf in module.items():
                    yield f"{name}.{sub}", leaf
            else:
                yield name, module

    def keys(self):
        return [name for name, _ in self.items()]

    def values(self):
        return [module for _, module in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def site_parameters(values: Mapping[str, torch.Tensor]) -> LayerDict:
    """Trainable parameters for each site."""
    out = LayerDict()
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
        self.layers = LayerDict()
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


def get_site(container: LayerDict, site: str) -> torch.Tensor:
    layer, param = split_site(site)
    return container[layer][param]
