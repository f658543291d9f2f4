"""What every guide over a network's weights shares: sites, pruning masks and weight draws."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from .sites import SiteBuffers

#: The scale a guide gives a pruned weight's Gaussian: exactly-zero scales are not valid Normal
#: distributions, and the square of a much smaller one underflows in float32.
PRUNED_SCALE = 1e-12


class WeightGuide(nn.Module, ABC):
    """Base of the guides over a :class:`~bnnzoo.models.BayesianNeuralNetwork`'s weights.

    Subclasses implement ``forward`` (a Pyro guide: samples every latent site of the model),
    :meth:`draw` (one posterior draw of every weight, plain torch), :meth:`posterior_mean` and, for
    fast training, :meth:`sample_outputs_and_kl` (see :class:`~bnnzoo.guides.LocalReparamELBO`).

    ``masks`` holds a boolean tensor per pruned site (``True`` = kept). A pruned weight is exactly
    zero in every draw and in the exported network.
    """

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        self.masks = SiteBuffers()

    # ---- pruning ----------------------------------------------------------------------------
    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Prune: keep only the weights whose mask is ``True`` (masks only ever shrink)."""
        sites = self.net.sites()
        for site, keep in masks.items():
            if site not in sites:
                raise KeyError(f"unknown site {site!r}; sites are {list(sites)}")
            if tuple(keep.shape) != tuple(sites[site]):
                raise ValueError(f"mask for {site} has shape {tuple(keep.shape)}, expected {sites[site]}")
            keep = keep.to(dtype=torch.bool, device=self._device())
            if site in self.masks:
                keep = keep & self.masks[site]
            self.masks[site] = keep

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a saved guide, pruning masks included (they exist only once a guide is pruned)."""
        prefix = "masks.layers."
        saved = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for site, keep in saved.items():
            self.masks[site] = keep.to(self._device())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def mask(self, site: str) -> torch.Tensor | None:
        return self.masks.get(site)

    def apply_masks(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: (v * self.masks[s] if s in self.masks else v) for s, v in params.items()}

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    # ---- draws ------------------------------------------------------------------------------
    @abstractmethod
    def draw(self) -> dict[str, torch.Tensor]:
        """One posterior draw of every weight site (pruned weights zero)."""

    @abstractmethod
    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """The posterior mean of every weight site (pruned weights zero)."""
