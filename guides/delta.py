"""The point-mass guide: maximum a posteriori (MAP) weights."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .sites import get_site, site_parameters
from .weight_guide import WeightGuide


class PointMass(WeightGuide):
    """``q(w) = delta(w - loc)``: fitting it maximises ``log p(y | w) + log p(w)`` (MAP).

    Parameters ``locs.<site>``, initialised as PyTorch initialises the layer.
    """

    def __init__(self, model, init_locs: dict | None = None):
        super().__init__(model)
        locs = init_locs if init_locs is not None else self.net.init_params()
        self.locs = site_parameters(locs)

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        params = self.posterior_mean()
        return {s: pyro.sample(s, dist.Delta(v, event_dim=v.dim())) for s, v in params.items()}

    def draw(self) -> dict[str, torch.Tensor]:
        return self.posterior_mean()

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return self.apply_masks({site: get_site(self.locs, site) for site in self.net.sites()})

    def sample_outputs_and_kl(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs at the point estimate and ``-log p(w)`` (the MAP objective's prior term;
        the point mass has no entropy, so this is the KL up to a constant)."""
        params = self.posterior_mean()
        neg_log_prior = torch.zeros((), device=x.device)
        for site, value in params.items():
            logp = model.prior.site_distribution(site).base_dist.log_prob(value)
            keep = self.mask(site)
            neg_log_prior = neg_log_prior - (logp * keep if keep is not None else logp).sum()
        return self.net(x, params), neg_log_prior
