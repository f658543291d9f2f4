"""What every network shares about its weight sites, given its parametric layers in forward order."""

from __future__ import annotations

import math

import torch


class SiteLayout:
    """The sites, layers and sizes of a network whose ``param_layers`` (each with ``name``,
    ``weight_shape`` and ``num_groups``) are listed in forward order: :class:`~bnnzoo.models.networks.Network`
    and :class:`~bnnzoo.models.module_network.ModuleNetwork`. Sites are ``"<layer>.weight"`` and
    ``"<layer>.bias"``, as PyTorch names the parameters; the last layer is the output layer."""

    param_layers: list

    @property
    def output_dim(self) -> int:
        return self.param_layers[-1].num_groups

    def sites(self) -> dict[str, tuple[int, ...]]:
        """Every weight site with its shape, in forward order."""
        out: dict[str, tuple[int, ...]] = {}
        for layer in self.param_layers:
            out[f"{layer.name}.weight"] = layer.weight_shape
            out[f"{layer.name}.bias"] = (layer.num_groups,)
        return out

    def layer(self, name: str):
        for layer in self.param_layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are {[l.name for l in self.param_layers]}")

    def num_weights(self) -> int:
        return sum(math.prod(s) for s in self.sites().values())

    def hidden_layers(self) -> list:
        """The layers whose groups may be pruned (all but the output layer)."""
        return self.param_layers[:-1]

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the state the network keeps besides its weights that depends on them (a
        module's normalisation statistics), by name; none for a chain of layers. A sampler records
        it with each stored draw, and :meth:`forward` uses a draw's own where its ``params`` hold
        them."""
        return {}
