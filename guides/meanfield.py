"""The fast mean-field Gaussian guide: local reparameterisation and analytic KL."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .bmr import GaussianSite, Reduction, prior_variance, write_reduction
from .closed_form_kl import kl_lognormal_gamma
from .data_parallel import example_noise
from .local_reparam import local_reparam_dense
from .scaled_dense import masked_scaled_local_reparam_dense
from .sites import get_site, site_parameters, split_site
from .weight_guide import PRUNED_SCALE, WeightGuide


def kl_normal_zero_mean(loc: torch.Tensor, var: torch.Tensor, log_scale: torch.Tensor,
                        prior_scale: torch.Tensor) -> torch.Tensor:
    """``sum KL(N(loc, var) || N(0, prior_scale^2))``, ``log_scale = log(sqrt(var))`` given to save a log."""
    prior_var = prior_scale * prior_scale
    n = loc.numel()
    return 0.5 * (var.sum() + loc.pow(2).sum()) / prior_var - log_scale.sum() + n * (torch.log(prior_scale) - 0.5)



def masked_normal(loc: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor | None) -> dist.Distribution:
    """The mean-field ``q`` of one site, ``N(loc, scale^2)`` elementwise, with pruned entries
    (``keep`` false) a point mass at zero: they sample zero (up to a negligible scale,
    :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`, that keeps the distribution valid) and are
    masked out of the log density."""
    if keep is None:
        return dist.Normal(loc, scale).to_event(loc.dim())
    scale = torch.where(keep, scale, torch.full_like(scale, PRUNED_SCALE))
    return dist.Normal(loc * keep, scale).mask(keep).to_event(loc.dim())


def local_reparam_draw(layer, h: torch.Tensor, moments) -> torch.Tensor:
    """One local-reparameterisation draw of ``layer``'s output for inputs ``h``: Gaussian with mean
    ``op(h, E[w], E[b])`` and variance ``op(h^2, Var[w], Var[b])``, ``moments`` being
    ``((w_loc, w_var), (b_loc, b_var))``."""
    (w_loc, w_var), (b_loc, b_var) = moments
    mean = layer.op(h, w_loc, b_loc)
    var = layer.op(h * h, w_var, b_var)
    return torch.addcmul(mean, var.clamp_min(1e-16).sqrt(), example_noise(mean.shape, device=mean.device,
                                                                           dtype=mean.dtype))

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

    def masked_moments(self, layer: str, param: str):
        """``(site, loc, var, log_scale, keep)`` of ``q`` for ``layer``'s ``param`` (``"weight"`` or
        ``"bias"``), pruned entries zeroed in all three (``keep`` is ``None`` when nothing is pruned)."""
        site = f"{layer}.{param}"
        loc, log_scale = self.locs[layer][param], self.log_scales[layer][param]
        var = torch.exp(2 * log_scale)
        keep = self.mask(site)
        if keep is not None:
            loc, var, log_scale = loc * keep, var * keep, log_scale * keep
        return site, loc, var, log_scale, keep

    # ---- the Pyro guide -----------------------------------------------------------------------
    def site_distribution(self, site: str) -> dist.Distribution:
        """``q`` of one site. A pruned weight is a point mass at zero: its entries sample zero (up to
        a negligible scale, :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`, that keeps the
        distribution valid) and are masked out of the guide's log density."""
        return masked_normal(get_site(self.locs, site), get_site(self.log_scales, site).exp(), self.mask(site))

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
        site_scale = getattr(prior, "site_scale", None)  # a GaussianPrior: one scale per layer

        def linear(layer, h):
            nonlocal kl
            fused_scale = None if site_scale is None else site_scale(f"{layer.name}.weight")
            if fused_scale is not None and layer.kind in ("dense", "linear") and len(self.masks) == 0:
                out, layer_kl = local_reparam_dense(
                    h, self.locs[layer.name]["weight"], self.log_scales[layer.name]["weight"],
                    self.locs[layer.name]["bias"], self.log_scales[layer.name]["bias"], fused_scale)
                kl = kl + layer_kl
                return out
            if fused_scale is not None and layer.kind == "dense" and h.dim() == 2:
                # a pruned dense layer: the same draw and KL in one node (the masks as 0/1 floats)
                keep, b_keep, ones = self._dense_masks(layer)
                out, layer_kl = masked_scaled_local_reparam_dense(
                    h, self.locs[layer.name]["weight"], self.log_scales[layer.name]["weight"],
                    self.locs[layer.name]["bias"], self.log_scales[layer.name]["bias"], ones, keep, b_keep,
                    fused_scale)
                kl = kl + layer_kl
                return out
            moments = []
            for param in ("weight", "bias"):
                site, loc, var, log_scale, keep = self.masked_moments(layer.name, param)
                kl = kl + self._kl(prior, site, loc, var, log_scale, keep)
                moments.append((loc, var))
            return local_reparam_draw(layer, h, moments)

        f = self.net.apply(x, linear)
        return f, kl

    def _dense_masks(self, layer) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """A pruned dense layer's masks as 0/1 floats (``None``: nothing pruned) and a unit scale per
        output, cached until the masks, the device or the parameters change."""
        cache = self.__dict__.setdefault("_dense_mask_cache", {})
        if layer.name not in cache:
            like = self.locs[layer.name]["weight"]
            keep, b_keep = self.mask(f"{layer.name}.weight"), self.mask(f"{layer.name}.bias")
            cache[layer.name] = (None if keep is None else keep.to(like.dtype),
                                 None if b_keep is None else b_keep.to(like.dtype),
                                 torch.ones(like.shape[0], dtype=like.dtype, device=like.device))
        return cache[layer.name]

    def set_masks(self, masks) -> None:
        super().set_masks(masks)
        self.__dict__.pop("_dense_mask_cache", None)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_dense_mask_cache", None)  # .to() replaces the masks
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.__dict__.pop("_dense_mask_cache", None)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        # copies and pickles rebuild the cache on first use
        return {k: v for k, v in super().__getstate__().items() if k != "_dense_mask_cache"}

    def kl_divergence(self, model) -> torch.Tensor:
        """``KL(q || p)`` summed over every weight site."""
        total = torch.zeros((), device=self._device())
        for site in self.net.sites():
            _, loc, var, log_scale, keep = self.masked_moments(*split_site(site))
            total = total + self._kl(model.prior, site, loc, var, log_scale, keep)
        return total

    @staticmethod
    def _kl(prior, site, loc, var, log_scale, keep) -> torch.Tensor:
        # one scale for every site (a GaussianPrior whose scale is not per layer): the fused formula
        scale = getattr(prior, "scale", None) if getattr(prior, "uniform", True) else None
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


class LayerScaleMeanFieldNormal(MeanFieldNormal):
    """Mean-field Gaussian VI for :class:`~bnnzoo.models.priors.LayerScaleGaussianPrior`'s non-centred
    model ``w = f_l c_l z``, ``z ~ N(0, 1)``, ``c_l^-2 ~ Gamma(a, b)`` (Markovic et al.'s ``bmr4pml``):

        q(z)       = prod_i N(z_i; loc_i, scale_i^2)          (``locs`` / ``log_scales``: the standardised weights)
        q(c_l^-2)  = LogNormal(m_l, s_l^2) per layer          (``scale_locs`` / ``scale_log_scales``)

    ``KL(q || p) = sum KL(N(loc, scale^2) || N(0, 1)) + sum_l KL(LogNormal || Gamma)``, both closed
    form. Training (:meth:`sample_outputs_and_kl`) draws each layer's ``c_l`` once per step
    (reparameterised) and uses the local reparameterisation trick on ``z``: the layer's
    pre-activation is ``f_l c_l`` times that of the standardised layer.

    The weights as the network sees them are ``f_l c_l z``: :meth:`draw` draws ``c_l`` and ``z``,
    :meth:`posterior_mean` is ``f_l E[c_l] loc`` with ``E[c_l] = exp(-m_l / 2 + s_l^2 / 8)``.

    Bayesian model reduction (the :class:`~bnnzoo.guides.bmr.GaussianWeights` protocol) acts on
    ``q(z)`` under its prior ``N(0, 1)``, as in ``bmr4pml``: ``dF`` of removing ``z_i`` is the same
    as that of removing ``w_i`` under the prior ``N(0, (f_l c_l)^2)`` for any fixed ``c_l`` (dF is
    invariant to a common scale of prior and posterior), so the learned scale enters the decision
    through the fitted ``q(z)``. A reduction with ``reduced_var > 0`` is in the units of ``z``.

    ``init_scale`` is in the units of the weights (the initial posterior of ``w`` at ``c_l = 1`` is
    that of :class:`MeanFieldNormal` with the same ``init_locs`` and ``init_scale``).
    """

    def __init__(self, model, init_scale: float = 1e-3, init_locs: dict | None = None,
                 init_scale_log_scale: float = math.log(0.1)):
        prior = model.prior
        for attr in ("factor", "layer_names", "concentration", "rate"):
            if not hasattr(prior, attr):
                raise TypeError(f"LayerScaleMeanFieldNormal needs a LayerScaleGaussianPrior, the model has "
                                f"{type(prior).__name__}")
        locs = init_locs if init_locs is not None else model.net.init_params()
        z_locs = {s: v / prior.factor(split_site(s)[0]) for s, v in locs.items()}
        super().__init__(model, init_scale=init_scale, init_locs=z_locs)
        with torch.no_grad():
            for site in self.net.sites():
                get_site(self.log_scales, site).sub_(math.log(prior.factor(split_site(site)[0])))
        layers = prior.layer_names()
        self.scale_locs = torch.nn.ParameterDict({l: torch.nn.Parameter(torch.zeros(())) for l in layers})
        self.scale_log_scales = torch.nn.ParameterDict(
            {l: torch.nn.Parameter(torch.full((), float(init_scale_log_scale))) for l in layers})

    # ---- the layer scales --------------------------------------------------------------------
    def _factor(self, layer: str) -> float:
        return self.prior.factor(layer)

    def sample_scales(self) -> dict[str, torch.Tensor]:
        """One reparameterised draw of every layer's ``f_l c_l`` (``c_l = (c_l^-2)^(-1/2)``)."""
        return {l: self._factor(l) * torch.exp(-0.5 * (m + self.scale_log_scales[l].exp() * torch.randn_like(m)))
                for l, m in self.scale_locs.items()}

    def mean_scales(self) -> dict[str, torch.Tensor]:
        """``f_l E_q[c_l]`` per layer: ``f_l exp(-m_l / 2 + s_l^2 / 8)``."""
        return {l: self._factor(l) * torch.exp(-0.5 * m + torch.exp(2 * self.scale_log_scales[l]) / 8)
                for l, m in self.scale_locs.items()}

    def scale_kl(self) -> torch.Tensor:
        """``sum_l KL(LogNormal(m_l, s_l^2) || Gamma(a, b))`` (closed form)."""
        prior = self.prior
        return sum(kl_lognormal_gamma(m, self.scale_log_scales[l], prior.concentration, prior.rate)
                   for l, m in self.scale_locs.items())

    def scale_posterior(self) -> dict[str, dict[str, float]]:
        """Per layer: ``q(c^-2)``'s ``m`` and ``s`` and the posterior mean of the weights' prior
        scale ``f_l c_l`` (plain numbers, for reports)."""
        means = self.mean_scales()
        return {l: {"m": float(m.detach()), "s": float(self.scale_log_scales[l].detach().exp()),
                    "mean_scale": float(means[l].detach())}
                for l, m in self.scale_locs.items()}

    # ---- the Pyro guide -----------------------------------------------------------------------
    def site_distribution(self, site: str, scale: torch.Tensor | None = None) -> dist.Distribution:
        """``q`` of one weight site given its layer's ``f_l c_l`` (``scale``; default: its posterior
        mean), pruned weights a point mass at zero as in :class:`MeanFieldNormal`."""
        layer = split_site(site)[0]
        scale = self.mean_scales()[layer] if scale is None else scale
        return masked_normal(get_site(self.locs, site) * scale, get_site(self.log_scales, site).exp() * scale,
                             self.mask(site))

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        out = {}
        for layer, m in self.scale_locs.items():
            c_inv_sqr = pyro.sample(self.prior.scale_site(layer),
                                    dist.LogNormal(m, self.scale_log_scales[layer].exp()))
            scale = self._factor(layer) * c_inv_sqr.rsqrt()
            for param in ("weight", "bias"):
                site = f"{layer}.{param}"
                out[site] = pyro.sample(site, self.site_distribution(site, scale))
        return out

    # ---- plain-torch access -------------------------------------------------------------------
    def draw(self) -> dict[str, torch.Tensor]:
        scales = self.sample_scales()
        out = {}
        for site in self.net.sites():
            loc, log_scale = get_site(self.locs, site), get_site(self.log_scales, site)
            out[site] = scales[split_site(site)[0]] * (loc + log_scale.exp() * torch.randn_like(loc))
        return self.apply_masks(out)

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        scales = self.mean_scales()
        return self.apply_masks({site: scales[split_site(site)[0]] * get_site(self.locs, site)
                                 for site in self.net.sites()})

    def posterior_scale(self) -> dict[str, torch.Tensor]:
        """The marginal standard deviation of every weight: ``f_l^2 (E[c^2] (loc^2 + sd^2) - E[c]^2 loc^2)``
        under the square root, with ``E[c^2] = exp(-m + s^2 / 2)``."""
        out = {}
        for site in self.net.sites():
            layer = split_site(site)[0]
            m, s2 = self.scale_locs[layer], torch.exp(2 * self.scale_log_scales[layer])
            f = self._factor(layer)
            e_c, e_c2 = torch.exp(-0.5 * m + s2 / 8), torch.exp(-m + s2 / 2)
            loc, var = get_site(self.locs, site), torch.exp(2 * get_site(self.log_scales, site))
            out[site] = f * (e_c2 * (loc * loc + var) - e_c * e_c * loc * loc).clamp_min(0).sqrt()
        return self.apply_masks(out)

    # ---- Bayesian model reduction (the GaussianWeights protocol) -------------------------------
    @torch.no_grad()
    def gaussian_weights(self, level: str = "weight") -> dict[str, GaussianSite]:
        """``q(z) = N(loc, scale^2)`` of every site under the standardised prior ``N(0, 1)`` (any level)."""
        return {site: GaussianSite(get_site(self.locs, site).detach(),
                                   torch.exp(2 * get_site(self.log_scales, site).detach()), 1.0)
                for site in self.net.sites()}

    # ---- training -----------------------------------------------------------------------------
    def sample_outputs_and_kl(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One local-reparameterised draw of the network outputs for ``x`` (one draw of every
        ``c_l``) and ``KL(q || prior)`` over ``z`` and the scales."""
        kl = self.scale_kl().to(x.device)
        scales = self.sample_scales()
        one = torch.ones((), device=x.device)

        def linear(layer, h):
            nonlocal kl
            if layer.kind == "dense" and len(self.masks) == 0:
                out, layer_kl = local_reparam_dense(
                    h, self.locs[layer.name]["weight"], self.log_scales[layer.name]["weight"],
                    self.locs[layer.name]["bias"], self.log_scales[layer.name]["bias"], 1.0)
                kl = kl + layer_kl
                return out * scales[layer.name]
            moments = []
            for param in ("weight", "bias"):
                _, loc, var, log_scale, keep = self.masked_moments(layer.name, param)
                kl = kl + kl_normal_zero_mean(loc, var, log_scale, one)
                if keep is not None:  # a pruned weight is a point mass of the reduced model: no KL term
                    kl = kl + 0.5 * (~keep).sum()
                moments.append((loc, var))
            return local_reparam_draw(layer, h, moments) * scales[layer.name]

        f = self.net.apply(x, linear)
        return f, kl

    def kl_divergence(self, model) -> torch.Tensor:
        """``KL(q || p)``: the standardised weights' against ``N(0, 1)`` plus the layer scales'."""
        total = self.scale_kl().to(self._device())
        one = torch.ones((), device=self._device())
        for site in self.net.sites():
            _, loc, var, log_scale, keep = self.masked_moments(*split_site(site))
            total = total + kl_normal_zero_mean(loc, var, log_scale, one)
            if keep is not None:
                total = total + 0.5 * (~keep).sum()
        return total
