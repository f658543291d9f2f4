"""The flat Gaussian prior: independent ``N(0, scale^2)`` on every weight and bias."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from bnnzoo.nets import Network


class GaussianPrior(nn.Module):
    """``w ~ N(0, scale^2)`` independently for every weight of ``net``.

    The scale lives in a registered buffer, so ``prior.to("cuda")`` moves it (Pyro's ``PyroSample``
    priors would not move with the module).
    """

    def __init__(self, net: Network, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"prior scale must be positive, got {scale}")
        self.net = net
        self.register_buffer("scale", torch.tensor(float(scale)))

    def site_distribution(self, site: str) -> dist.Distribution:
        """The prior of one weight site (a batched ``Normal`` with the site's shape as event)."""
        shape = self.net.sites()[site]
        return dist.Normal(torch.zeros((), device=self.scale.device), self.scale).expand(shape).to_event(len(shape))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every weight site under Pyro; returns site name -> value."""
        return {site: pyro.sample(site, self.site_distribution(site)) for site in self.net.sites()}

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):g}"
