"""The flat Gaussian prior: independent ``N(0, scale^2)`` on every weight and bias."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .likelihoods import check_scale
from .networks import Network


class GaussianPrior(nn.Module):
    """``w ~ N(0, scale^2)`` independently for every weight of ``net``.

    The scale is a fixed hyperparameter (``scale_value``, a Python number, so reading it never
    synchronises a device); ``scale`` is the same as a tensor on the prior's device, kept in a
    non-persistent buffer so that ``prior.to("cuda")`` moves it (Pyro's ``PyroSample`` priors would
    not move with the module).
    """

    def __init__(self, net: Network, scale: float = 1.0):
        super().__init__()
        scale = check_scale("prior_scale", scale)  # a ConfigError outside float32's usable range
        self.net = net
        self.scale_value = float(scale)
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def site_distribution(self, site: str) -> dist.Distribution:
        """The prior of one weight site (a batched ``Normal`` with the site's shape as event)."""
        shape = self.net.sites()[site]
        return dist.Normal(torch.zeros((), device=self.scale.device), self.scale).expand(shape).to_event(len(shape))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every weight site under Pyro; returns site name -> value."""
        return {site: pyro.sample(site, self.site_distribution(site)) for site in self.net.sites()}

    def extra_repr(self) -> str:
        return f"scale={self.scale_value:g}"
