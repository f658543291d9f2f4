"""The fast mean-field Gaussian guide: local reparameterisation and analytic KL."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .bmr import GaussianSite, Reduction, prior_variance, write_reduction
from .local_reparam import local_reparam_dense
from .sites import get_site, site_parameters
from .weight_guide import PRUNED_SCALE, WeightGuide


def kl_normal_zero_mean(loc: torch.Tensor, var: torch.Tensor, log_scale: torch.Tensor,
                        prior_scale: torch.Tensor) -> torch.Tensor:
    """``sum KL(N(loc, var) || N(0, prior_scale^2))``, ``log_scale = log(sqrt(var))`` given to save a log."""
    prior_var = prior_scale * prior_scale
    n = loc.numel()
    return 0.5 * (var.sum() + loc.pow(2).sum()) / prior_var - log_scale.sum() + n * (torch.log(prior_scale) - 0.5)


class MeanFieldNormal(WeightGuide):
    """``q(w) = prod_i N(w_i; loc_i, scale_i^2)`` over every weight site of the model.

    Called as a Pyro guide it samples each weight site from its Normal (so ``Predictive`` and
    ``TraceMeanField_ELBO`` work unchanged). For training, :meth:`sample_outputs_and_kl` uses the
    local reparameterisation trick (Kingma, Salimans & Welling 2015): a dense layer's pre-activation
    given input ``h`` is Gaussian with mean ``h @ loc.T`` and variance ``h^2 @ scale^2.T``, so one
    output draw per example replaces a weight draw (for a conv layer, the same per output
    location). The KL to a zero-mean Gaussian prior is analytic.

    Parameters: ``locs.<site>`` (initialised as PyTorch initialises the layer) and
    ``log_scales.<site>`` (initialised to ``log(init_scale)``).

    Implements :class:`~bnnzoo.guides.bmr.GaussianWeights`: every site's ``N(loc, scale^2)`` under
    the model's zero-mean Gaussian prior, so Bayesian model reduction applies as it is.
    """

    def __init__(self, model, init_scale: float = 1e-3, init_locs: dict | None = None):
        super().__init__(model)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        locs = init_locs if init_locs is not None else self.net.init_params()
        self.locs = site_parameters(locs)
        self.log_scales = site_parameters({s: torch.full_like(v, math.log(init_scale)) for s, v in locs.items()})
        self._prior = [model.prior]  # kept out of the module tree: the model owns it

    @property
    def prior(self):
        """The model's prior over the weights (read by :meth:`gaussian_weights`)."""
        return self._prior[0]

    # ---- the Pyro guide -----------------------------------------------------------------------
    def site_distribution(self, site: str) -> dist.Distribution:
        """``q`` of one site. A pruned weight is a point mass at zero: its entries sample zero (up to
        a negligible scale, :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`, that keeps the
        distribution valid) and are masked out of the guide's log density."""
        loc, scale = get_site(self.locs, site), get_site(self.log_scales, site).exp()
        keep = self.mask(site)
        if keep is None:
            return dist.Normal(loc, scale).to_event(loc.dim())
        loc = loc * keep
        scale = torch.where(keep, scale, torch.full_like(scale, PRUNED_SCALE))
        return dist.Normal(loc, scale).mask(keep).to_event(loc.dim())

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        return {site: pyro.sample(site, self.site_distribution(site)) for site in self.net.sites()}

    # ---- plain-torch access -------------------------------------------------------------------
    def draw(self) -> dict[str, torch.Tensor]:
        out = {}
        for site in self.net.sites():
            loc, log_scale = get_site(self.locs, site), get_site(self.log_scales, site)
            out[site] = loc + log_scale.exp() * torch.randn_like(loc)
        return self.apply_masks(out)

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return self.apply_masks({site: get_site(self.locs, site) for site in self.net.sites()})

    def posterior_scale(self) -> dict[str, torch.Tensor]:
        return self.apply_masks({site: get_site(self.log_scales, site).exp() for site in self.net.sites()})

    # ---- Bayesian model reduction (the GaussianWeights protocol) -------------------------------
    @torch.no_grad()
    def gaussian_weights(self, level: str = "weight") -> dict[str, GaussianSite]:
        """``N(loc, scale^2)`` of every site under the prior ``N(0, prior_variance)`` (any level)."""
        return {site: GaussianSite(get_site(self.locs, site).detach(),
                                   torch.exp(2 * get_site(self.log_scales, site).detach()),
                                   prior_variance(self.prior, site)) for site in self.net.sites()}

    @torch.no_grad()
    def apply_reduction(self, reduction: Reduction) -> None:
        """Set the reduction's masks and its reduced posteriors (pruned weights: loc 0, scale
        :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`, frozen there by the mask)."""
        self.set_masks(reduction.masks)
        write_reduction(self.locs, self.log_scales, reduction)

    # ---- training -----------------------------------------------------------------------------
    def sample_outputs_and_kl(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One local-reparameterised draw of the network outputs for ``x`` and ``KL(q || prior)``."""
        kl = torch.zeros((), device=x.device)
        prior = model.prior
        fused_scale = getattr(prior, "scale_value", None)

        def linear(layer, h):
            nonlocal kl
            if fused_scale is not None and layer.kind == "dense" and len(self.masks) == 0:
                out, layer_kl = local_reparam_dense(
                    h, self.locs[layer.name]["weight"], self.log_scales[layer.name]["weight"],
                    self.locs[layer.name]["bias"], self.log_scales[layer.name]["bias"], fused_scale)
                kl = kl + layer_kl
                return out
            moments = []
            for param in ("weight", "bias"):
                site = f"{layer.name}.{param}"
                loc, log_scale = self.locs[layer.name][param], self.log_scales[layer.name][param]
                var = torch.exp(2 * log_scale)
                keep = self.mask(site)
                if keep is not None:
                    loc, var, log_scale = loc * keep, var * keep, log_scale * keep
                kl = kl + self._kl(prior, site, loc, var, log_scale, keep)
                moments.append((loc, var))
            (w_loc, w_var), (b_loc, b_var) = moments
            mean = layer.op(h, w_loc, b_loc)
            var = layer.op(h * h, w_var, b_var)
            return torch.addcmul(mean, var.clamp_min(1e-16).sqrt(), torch.randn_like(mean))

        f = self.net.apply(x, linear)
        return f, kl

    def kl_divergence(self, model) -> torch.Tensor:
        """``KL(q || p)`` summed over every weight site."""
        total = torch.zeros((), device=self._device())
        for site in self.net.sites():
            loc, log_scale = get_site(self.locs, site), get_site(self.log_scales, site)
            var, keep = torch.exp(2 * log_scale), self.mask(site)
            if keep is not None:
                loc, var, log_scale = loc * keep, var * keep, log_scale * keep
            total = total + self._kl(model.prior, site, loc, var, log_scale, keep)
        return total

    @staticmethod
    def _kl(prior, site, loc, var, log_scale, keep) -> torch.Tensor:
        scale = getattr(prior, "scale", None)
        if keep is not None:
            # a pruned weight is a point mass of the reduced model: it carries no KL term
            n_pruned = (~keep).sum()
        if isinstance(scale, torch.Tensor) and scale.dim() == 0:
            kl = kl_normal_zero_mean(loc, var, log_scale, scale)
            if keep is not None:
                kl = kl - n_pruned * (torch.log(scale) - 0.5)
            return kl
        # any other prior: torch's registry of closed-form KLs, elementwise, pruned weights left out
        p = prior.site_distribution(site)
        p = p.base_dist if isinstance(p, dist.Independent) else p
        kl = kl_divergence(dist.Normal(loc, var.clamp_min(1e-30).sqrt()), p)
        return (kl * keep).sum() if keep is not None else kl.sum()
