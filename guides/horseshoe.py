"""The structured guide of the node-wise horseshoe: Gaussian decentred weights, LogNormal scales.

    q(beta_kj) = N(mu_kj, sigma_kj^2)                     every weight of hidden layers (decentred)
    q(v)       = LogNormal(m_v, r_v^2)                    v in tau_a, tau_b, lambda_a[k], lambda_b[k], c2
    q(w_out)   = N(mu, sigma^2)                           output layer (plain Gaussian prior)

Every KL term is closed form (Normal-Normal, LogNormal-Gamma, LogNormal-InverseGamma; see
:mod:`bnnzoo.guides.closed_form_kl`), so Pyro's ``TraceMeanField_ELBO`` uses no Monte Carlo KL.

Training (:meth:`HorseshoeGuide.sample_outputs_and_kl`) uses local reparameterisation: the
pre-activation of group ``k`` of a dense layer is ``s_k * (h beta_k + beta_bias_k)``; the bracket is
Gaussian given ``h`` (mean ``h mu_k``, variance ``h^2 sigma_k^2``: two matrix products), drawn once
per example, and the scales ``s_k`` are drawn once per minibatch from their LogNormal factors (a
per-example draw costs more than it saves: the regularised scale is a few transcendental functions
over a batch-by-neurons array). Conv layers draw their (few, shared) weights once per minibatch.
Every example thus sees an exact joint draw of all weights, so the loss is an unbiased estimate of
the negative ELBO that ``TraceMeanField_ELBO`` estimates by sampling weights. A small network's step
is dominated by per-operation overhead, so the step is a handful of autograd nodes with hand-written
backward passes: the scale block (every scale variable's KL and the draw of every ``s_k``,
:mod:`~bnnzoo.guides.horseshoe_scales`), one per dense layer (:mod:`~bnnzoo.guides.scaled_dense`)
and, in :class:`~bnnzoo.guides.TemperedLocalReparamELBO`, the Gaussian likelihood term. A small
dense ReLU network (up to ``FUSED_NETWORK_MAX_WEIGHTS`` weights, unpruned) runs the whole step,
likelihood included for regression, as one node (:mod:`~bnnzoo.guides.horseshoe_mlp`,
:meth:`HorseshoeGuide.gaussian_loss`).

A pruned guide's masks are closed over removed groups (:meth:`HorseshoeGuide.close_masks`: every
weight fed by a removed group is removed too), and a pruned dense chain trains on the smaller
network its masks keep: each layer's kept rows and columns are gathered from the parameters and
the remaining single-weight masks applied inside that block
(:class:`~bnnzoo.guides.scaled_dense.MaskedScaledLocalReparamDense`), the same draw, KL and
gradients as the masked full-size layers at the cost of the smaller ones.

Parameterisation: the decentred weights of a layer with fan-in ``n`` start as PyTorch's initial
weights times ``sqrt(n)`` and the layer's scale at ``1/sqrt(n)`` (local scales at 1, the global
scale carrying the layer's size), so the effective weights start where PyTorch starts them and
every variational parameter lives on a scale of order one: a single Adam learning rate then suits
the weights and the log-scales, which must travel several units for a neuron to be switched off.
The output layer's Gaussian parameters are stored in the same units (``w = mu / sqrt(n)``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..models.horseshoe import SCALE_VARIABLES, HorseshoePrior, regularised_log_scale
from ..models.sparsity import input_groups
from . import closed_form_kl  # noqa: F401  (registers the LogNormal-Gamma / -InverseGamma KLs with torch)
from .bmr import GaussianSite, Reduction, write_reduction
from .closed_form_kl import kl_lognormal_gamma, kl_lognormal_inverse_gamma
from .data_parallel import example_noise, example_noise_flat
from .horseshoe_mlp import HorseshoeMLP
from .horseshoe_scales import HorseshoeScales
from .local_reparam import local_reparam_dense
from .scaled_dense import masked_scaled_local_reparam_dense, scaled_local_reparam_dense
from .sites import get_site, site_parameters
from .tempered_elbo import untempered_variance
from .weight_guide import PRUNED_SCALE, WeightGuide

_QUADRATURE_POINTS = 40  # Gauss-Hermite points per Gaussian dimension for E_q[f(s_k)]
#: Dense ReLU networks up to this many weights (unpruned) take the one-node training step of
#: :class:`~bnnzoo.guides.horseshoe_mlp.HorseshoeMLP`; larger ones the per-layer nodes.
FUSED_NETWORK_MAX_WEIGHTS = 2**14


def layer_spread(sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """The ``(G, L)`` 0/1 matrix whose row ``k`` marks the hidden layer of group ``k``, for hidden
    layers of ``sizes`` groups, in ``like``'s dtype and on its device: the scale block spreads each
    layer's draw over its groups with it (:mod:`~bnnzoo.guides.horseshoe_scales`)."""
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    return torch.nn.functional.one_hot(layer_of, len(sizes)).to(dtype=like.dtype, device=like.device)


def gaussian_kl(loc: torch.Tensor, log_scale: torch.Tensor, prior_scale: float,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """``sum KL(N(loc, exp(log_scale)^2) || N(0, prior_scale^2))`` over the kept entries."""
    kl = (0.5 * (torch.exp(2 * log_scale) + loc * loc) / prior_scale**2 - log_scale
          + (math.log(prior_scale) - 0.5))
    return (kl * keep).sum() if keep is not None else kl.sum()


def weight_scaled_local_reparam_dense(h, mu, rho, b_mu, b_rho, s, prior_scale: float):
    """The draw and KL of :func:`~bnnzoo.guides.scaled_dense.scaled_local_reparam_dense` with the
    scale ``s`` folded into the Gaussian's parameters instead of applied to the outputs:
    ``s_k z_k`` with ``z_k ~ N(m_k, v_k)`` is ``N(s_k m_k, s_k^2 v_k)``, the local-reparameterised
    draw of weights ``N(s_k mu_k, s_k^2 sigma_k^2)`` (log-scales ``rho_k + ln s_k``), the same draw
    for the same noise. It costs passes over the weights instead of over the outputs, which is
    cheaper where a layer has more output rows than inputs (a transformer's or a mixer's tokens:
    batch x tokens rows). The KL is that of the decentred weights, as there."""
    log_s = s.log()
    out, _ = local_reparam_dense(h, mu * s.unsqueeze(-1), rho + log_s.unsqueeze(-1), b_mu * s, b_rho + log_s,
                                 prior_scale)
    return out, gaussian_kl(mu, rho, prior_scale) + gaussian_kl(b_mu, b_rho, prior_scale)


class HorseshoeGuide(WeightGuide):
    """Mean-field guide over a :class:`~bnnzoo.models.HorseshoePrior` model (module docstring).

    Parameters: ``locs.<site>`` / ``log_scales.<site>``, the Gaussian over each network site's
    decentred weights (the output layer's weights in units of ``1/sqrt(fan_in)``), and
    the mean (divided by ``scale_gain``) and log standard deviation of ``ln v`` for every scale
    variable ``v`` of every hidden layer, packed so that the closed-form KL and the draws of all
    scales take a handful of tensor operations per step: ``scale_params`` of shape ``(2, V)`` holds
    the means (row 0) and log standard deviations (row 1) of all ``V = 2 (L + G) + L`` of them,
    ``[tau_a (L), lambda_a (G) | tau_b (L), lambda_b (G) | c^2 (L)]`` for the ``L`` hidden layers
    and their ``G`` groups in all (:mod:`~bnnzoo.guides.horseshoe_scales`);
    :meth:`scale_parameters` gives one site's. ``init_scale`` is the initial
    standard deviation of every Gaussian (decentred units), ``init_log_scale_sd`` that of every ``ln v``.

    ``scale_gain``: Adam moves every stored parameter by about the learning rate per step, but a
    group is only switched off once its log-scale has travelled several units; storing the log-scale
    means divided by ``scale_gain`` makes them move ``scale_gain`` times faster than the weights, so
    one learning rate serves both (the model and the optimum are unchanged).

    Implements :class:`~bnnzoo.guides.bmr.GaussianWeights` through the decentred weights (see
    :meth:`gaussian_weights`): Bayesian model reduction prunes single weights inside the groups the
    horseshoe keeps, and leaves the scales' factors as they are.
    """

    def __init__(self, model, init_scale: float = 1e-2, init_log_scale_sd: float = 0.1, scale_gain: float = 10.0,
                 init_locs: dict | None = None):
        super().__init__(model)
        prior = model.prior
        if not isinstance(prior, HorseshoePrior):
            raise TypeError(f"HorseshoeGuide needs a model with a HorseshoePrior, got {type(prior).__name__}")
        for name, value in (("init_scale", init_scale), ("init_log_scale_sd", init_log_scale_sd),
                            ("scale_gain", scale_gain)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.hidden = list(prior.hidden)
        self.output = prior.output
        self.output_unit = 1.0 / math.sqrt(self.net.layer(self.output).fan_in)
        self.output_prior_scale = prior.output_scale_value / self.output_unit  # in stored units
        init = init_locs if init_locs is not None else self.net.init_params()
        locs = {site: v * math.sqrt(self.net.layer(site.rpartition(".")[0]).fan_in) for site, v in init.items()}
        self.locs = site_parameters(locs)
        self.log_scales = site_parameters({s: torch.full_like(v, math.log(init_scale)) for s, v in locs.items()})
        self._prior = [prior]  # kept out of the module tree: the model owns it
        self.register_buffer("output_units", torch.full((self.net.layer(self.output).num_groups,), self.output_unit),
                             persistent=False)
        self.scale_gain = float(scale_gain)
        self._init_scales(prior, init_log_scale_sd)

    def _init_scales(self, prior: HorseshoePrior, init_log_scale_sd: float) -> None:
        sizes = [self.net.layer(name).num_groups for name in self.hidden]
        n_layers, n_groups = len(sizes), sum(sizes)
        self.group_offsets = [0] + [int(v) for v in np.cumsum(sizes)]
        # every scale variable in one vector: [tau_a (L), lambda_a (G) | tau_b (L), lambda_b (G) | c^2 (L)];
        # the Gamma(1/2, rate b) factors (b = tau0^-2 for tau, 1 for lambda), the InverseGamma(1/2, 1)
        # factors, the slabs InverseGamma(slab_shape, slab_scale)
        tau0, slab_a, slab_b = float(prior.tau0), float(prior.slab_shape), float(prior.slab_scale)
        width = n_layers + n_groups
        self.scale_width = width
        size = 2 * width + n_layers
        shape = torch.cat([torch.full((2 * width,), 0.5), torch.full((n_layers,), slab_a)])
        rate = torch.ones(size)
        rate[:n_layers] = tau0**-2
        rate[2 * width:] = slab_b
        sign = torch.cat([-torch.ones(width), torch.ones(width + n_layers)])
        const = (torch.lgamma(shape) - shape * rate.log()).sum() - size * 0.5 * math.log(2 * math.pi * math.e)
        # the group-to-layer matrix of the scale block: layer_spread, built by step_plan
        for name, value in (("scale_sign", sign), ("scale_shape_sign", shape * sign), ("scale_rate", rate),
                            ("kl_const", torch.tensor(float(const))),
                            ("gain", torch.tensor(self.scale_gain)), ("one_half", torch.tensor(0.5)),
                            ("minus_one", torch.tensor(-1.0))):
            self.register_buffer(name, value, persistent=False)
        # start the effective weights at PyTorch's scale s = 1/sqrt(fan_in), with s^2 = c^2 u / (c^2 + u):
        # local scales at 1, the global scale carrying the layer's size, c^2 at 1 / E_p[1/c^2]
        c2 = slab_b / slab_a
        loc = torch.zeros(size)
        for i, name in enumerate(self.hidden):
            s2 = 1.0 / self.net.layer(name).fan_in
            loc[i] = loc[width + i] = 0.5 * (math.log(s2 * c2 / (c2 - s2)) if c2 > 2 * s2 else math.log(s2))
        loc[2 * width:] = math.log(c2)
        self.scale_params = nn.Parameter(torch.stack([loc / self.scale_gain,
                                                      torch.full((size,), math.log(init_log_scale_sd))]))

    @property
    def prior(self) -> HorseshoePrior:
        return self._prior[0]

    # ---- scale variables ----------------------------------------------------------------------
    def _scale_index(self, layer: str, var: str):
        i, n, width = self.hidden.index(layer), len(self.hidden), self.scale_width
        if var == "c2":
            return 2 * width + i
        start = 0 if var.endswith("_a") else width
        if var.startswith("tau"):
            return start + i
        return slice(start + n + self.group_offsets[i], start + n + self.group_offsets[i + 1])

    def scale_parameters(self, layer: str, var: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log standard deviation of ``ln v`` under q for scale variable ``var`` of ``layer``."""
        where = self._scale_index(layer, var)
        return self.gain * self.scale_params[0, where], self.scale_params[1, where]

    def log_moments(self, kl_weight: float = 1.0):
        """Means and standard deviations under q of ``ln tau^2`` and ``ln lambda_k^2`` (one vector:
        ``L`` layers, then the groups of all layers) and of ``ln c^2`` (per layer). ``kl_weight < 1``
        widens the standard deviations to the untempered posterior's (flat prior on the log scale:
        the variance grows by ``1 / kl_weight``)."""
        width = self.scale_width
        m, log_sd = self.gain * self.scale_params[0], self.scale_params[1]
        var = torch.exp(2 * log_sd)
        m_z = torch.cat([m[:width] + m[width:2 * width], m[2 * width:]])
        var_z = torch.cat([var[:width] + var[width:2 * width], var[2 * width:]])
        sd_z = (var_z if kl_weight == 1.0 else untempered_variance(var_z, kl_weight)).sqrt()
        return (m_z[:width], sd_z[:width]), (m_z[width:], sd_z[width:])

    def sample_log_scales(self, batch_shape: tuple[int, ...] = (), kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Draws of ``ln s_k`` for every hidden layer, each of shape ``batch_shape + (K,)``: one draw of a
        layer's ``tau`` and ``c`` per batch entry, shared by its groups, and one ``lambda_k`` per group.
        ``kl_weight < 1`` widens the draws to the untempered posterior (see :meth:`draw`)."""
        (m, sd), (m_c, sd_c) = self.log_moments(kl_weight)
        n = len(self.hidden)
        eps = torch.randn(batch_shape + (len(m) + n,), device=m.device, dtype=m.dtype)
        z = torch.addcmul(m, sd, eps[..., :len(m)])
        log_c2 = torch.addcmul(m_c, sd_c, eps[..., len(m):])
        out = {}
        for i, layer in enumerate(self.hidden):
            groups = slice(n + self.group_offsets[i], n + self.group_offsets[i + 1])
            out[layer] = regularised_log_scale(z[..., i:i + 1] + z[..., groups], log_c2[..., i:i + 1])
        return out

    def expect_scale(self, layer: str, fn, kl_weight: float = 1.0) -> torch.Tensor:
        """``E_q[fn(ln s_k)]`` for every group ``k`` of ``layer`` by Gauss-Hermite quadrature over
        ``ln(tau^2 lambda_k^2)`` and ``ln c^2`` (independent Gaussians under q; widened to the
        untempered posterior's as :meth:`log_moments` widens them for ``kl_weight < 1``)."""
        (m, sd), (m_c, sd_c) = self.log_moments(kl_weight)
        i, n = self.hidden.index(layer), len(self.hidden)
        groups = slice(n + self.group_offsets[i], n + self.group_offsets[i + 1])
        nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE_POINTS)
        x = torch.as_tensor(nodes, dtype=m.dtype, device=m.device)
        w = torch.as_tensor(weights / weights.sum(), dtype=m.dtype, device=m.device)
        m_u, sd_u = m[i] + m[groups], (sd[i] ** 2 + sd[groups] ** 2).sqrt()
        log_u = m_u[:, None, None] + sd_u[:, None, None] * x[None, :, None]
        log_c2 = m_c[i] + sd_c[i] * x[None, None, :]
        values = fn(regularised_log_scale(log_u, log_c2))
        return (values * (w[:, None] * w[None, :])).sum((-2, -1))

    def scale_mean(self, layer: str) -> torch.Tensor:
        """``E_q[s_k]`` for every group of hidden ``layer``."""
        return self.expect_scale(layer, torch.exp)

    def log_scale_mean(self, layer: str) -> torch.Tensor:
        """``E_q[ln s_k]`` for every group of hidden ``layer``."""
        return self.expect_scale(layer, lambda v: v)

    # ---- closed-form KL ---------------------------------------------------------------------
    def scale_kl(self) -> torch.Tensor:
        """``KL(q || p)`` of every scale variable: the closed forms of
        :mod:`~bnnzoo.guides.closed_form_kl` for each LogNormal factor against its Gamma or
        inverse-Gamma prior."""
        n, width = len(self.hidden), self.scale_width
        m, log_sd = self.gain * self.scale_params[0], self.scale_params[1]
        prior = self.prior
        tau_rate = prior.tau0.pow(-2).to(m)
        gamma_rate = torch.cat([tau_rate.expand(n), torch.ones(width - n, dtype=m.dtype, device=m.device)])
        return (kl_lognormal_gamma(m[:width], log_sd[:width], 0.5, gamma_rate).sum()
                + kl_lognormal_inverse_gamma(m[width:2 * width], log_sd[width:2 * width], 0.5, 1.0).sum()
                + kl_lognormal_inverse_gamma(m[2 * width:], log_sd[2 * width:], prior.slab_shape.to(m),
                                             prior.slab_scale.to(m)).sum())

    def _prior_scale(self, layer: str) -> float:
        return self.output_prior_scale if layer == self.output else 1.0

    def kl_divergence(self, model=None) -> torch.Tensor:
        """``KL(q || p)`` over every latent site (pruned weights carry none: they are not in the
        reduced model)."""
        total = self.scale_kl()
        for site in self.net.sites():
            layer = site.rpartition(".")[0]
            total = total + gaussian_kl(get_site(self.locs, site), get_site(self.log_scales, site),
                                        self._prior_scale(layer), self.mask(site))
        return total

    # ---- the Pyro guide -----------------------------------------------------------------------
    def site_distribution(self, site: str) -> dist.Distribution:
        """The guide's distribution at Pyro site ``site`` (a site of the model's prior)."""
        layer, _, var = site.rpartition(".")
        if var in SCALE_VARIABLES:
            loc, log_sd = self.scale_parameters(layer, var)
            return dist.LogNormal(loc, log_sd.exp()).to_event(loc.dim())
        net_site = site.removesuffix("_decentered")
        loc, scale = get_site(self.locs, net_site), get_site(self.log_scales, net_site).exp()
        if layer == self.output:
            loc, scale = loc * self.output_unit, scale * self.output_unit
        keep = self.mask(net_site)
        if keep is not None:
            loc = loc * keep
            scale = torch.where(keep, scale, torch.full_like(scale, PRUNED_SCALE))
        return dist.Normal(loc, scale).to_event(loc.dim())

    def forward(self, x=None, y=None, num_data=None) -> dict[str, torch.Tensor]:
        """Sample every latent site of the model; returns the effective weights."""
        values = {site: pyro.sample(site, self.site_distribution(site)) for site in self.prior.sites()}
        return self.apply_masks(self.prior.weights(values))

    # ---- Bayesian model reduction (the GaussianWeights protocol) -------------------------------
    @torch.no_grad()
    def gaussian_weights(self, level: str = "weight") -> dict[str, GaussianSite]:
        """The decentred weights: ``w = s_k beta`` with ``beta ~ N(0, 1)`` in hidden layers (the
        scales ``s_k`` have their own factors of q), so BMR acts on ``q(beta) = N(mu, sigma^2)``
        under the prior ``N(0, 1)``, as Markovic et al. reduce the standardised weights of their
        non-centred models; the output layer's prior is ``N(0, output_prior_scale^2)`` in the
        guide's stored units. The same at either level."""
        return {site: GaussianSite(get_site(self.locs, site).detach(),
                                   torch.exp(2 * get_site(self.log_scales, site).detach()),
                                   self._prior_scale(site.rpartition(".")[0]) ** 2) for site in self.net.sites()}

    @torch.no_grad()
    def apply_reduction(self, reduction: Reduction) -> None:
        """Set the reduction's masks and its reduced posteriors of the decentred weights (pruned
        weights: loc 0, scale :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`); the scales'
        factors are left as they are."""
        self.set_masks(reduction.masks)
        write_reduction(self.locs, self.log_scales, reduction)

    # ---- plain-torch access -------------------------------------------------------------------
    def draw(self, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """One posterior draw of the effective weights ``w = s * beta`` (pruned weights zero).

        ``kl_weight``: the KL weight ``T`` q was fitted with. With ``T < 1`` (a tempered ELBO, whose q
        is about ``T`` times too narrow where the data dominate) every Gaussian factor is widened to
        the untempered posterior's variance, :func:`~bnnzoo.guides.untempered_variance`: the
        decentred weights with their ``N(0, 1)`` prior (the output layer's with its own), the log
        scales with a flat prior (the half-Cauchy's log density is nearly flat over their range).
        The means stay those of q.
        """
        scales = {layer: v.exp() for layer, v in self.sample_log_scales(kl_weight=kl_weight).items()}
        out = {}
        for site in self.net.sites():
            layer = site.rpartition(".")[0]
            loc = get_site(self.locs, site)
            sd = get_site(self.log_scales, site).exp()
            if kl_weight != 1.0:
                sd = untempered_variance(sd * sd, kl_weight, self._prior_scale(layer) ** 2).sqrt()
            out[site] = self._to_weights(layer, loc + sd * torch.randn_like(loc), scales.get(layer))
        return self.apply_masks(out)

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``E_q[w] = E_q[s_k] * mu`` (scales and decentred weights are independent under q)."""
        scales = {layer: self.scale_mean(layer) for layer in self.hidden}
        out = {site: self._to_weights(site.rpartition(".")[0], get_site(self.locs, site),
                                      scales.get(site.rpartition(".")[0])) for site in self.net.sites()}
        return self.apply_masks(out)

    @torch.no_grad()
    def moment_weights(self, kl_weight: float = 1.0) -> dict[str, tuple]:
        """The moments of :meth:`draw`'s weights for the moment-propagated predictive
        (:func:`~bnnzoo.guides.predictive_moments.output_moments`): per layer ``((mean, var), (b_mean,
        b_var), scale)`` of the decentred weights ``beta`` (widened as :meth:`draw` widens them for
        ``kl_weight < 1``; pruned entries 0 in both) and, for a hidden layer, ``scale = (E[s_k],
        E[s_k^2])`` of its groups' scales by quadrature (``None`` for the output layer, whose weights
        are ``beta / sqrt(fan_in)``, folded into its moments here). The pre-activation of group
        ``k`` is ``s_k z_k`` with ``s_k`` independent of ``z_k = beta_k h + beta_bias_k``."""
        out = {}
        for layer in self.net.param_layers:
            pair = []
            for param in ("weight", "bias"):
                site = f"{layer.name}.{param}"
                loc, var = get_site(self.locs, site), torch.exp(2 * get_site(self.log_scales, site))
                if kl_weight != 1.0:
                    var = untempered_variance(var, kl_weight, self._prior_scale(layer.name) ** 2)
                if layer.name == self.output:
                    loc, var = loc * self.output_unit, var * self.output_unit**2
                keep = self.mask(site)
                if keep is not None:
                    loc, var = loc * keep, var * keep
                pair.append((loc, var))
            scale = None
            if layer.name != self.output:
                scale = (self.expect_scale(layer.name, torch.exp, kl_weight),
                         self.expect_scale(layer.name, lambda v: torch.exp(2 * v), kl_weight))
            out[layer.name] = (*pair, scale)
        return out

    def _to_weights(self, layer: str, value: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if layer == self.output:
            return value * self.output_unit
        return scale.reshape(scale.shape + (1,) * (value.dim() - 1)) * value

    # ---- training -----------------------------------------------------------------------------
    def _gaussian_layer(self, layer, h: torch.Tensor, prior_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``h beta + beta_bias`` for one draw and the Gaussian KL of the kept weights, for layers off
        the fused dense path: a masked dense layer by local reparameterisation (one draw per example
        from the Gaussian moments), a conv layer with one draw of its (few, shared) weights per batch,
        which costs one convolution and no per-position noise instead of two convolutions."""
        values, kl = [], 0.0
        for param in ("weight", "bias"):
            loc, log_scale = self.locs[layer.name][param], self.log_scales[layer.name][param]
            var, keep = torch.exp(2 * log_scale), self.mask(f"{layer.name}.{param}")
            term = 0.5 * (var + loc * loc) / prior_scale**2 - log_scale + (math.log(prior_scale) - 0.5)
            if keep is not None:
                loc, var, term = loc * keep, var * keep, term * keep
            kl = kl + term.sum()
            values.append((loc, var, log_scale))
        (w_loc, w_var, w_ls), (b_loc, b_var, b_ls) = values
        if layer.kind == "conv2d":
            w = torch.addcmul(w_loc, w_ls.exp(), torch.randn_like(w_loc))
            b = torch.addcmul(b_loc, b_ls.exp(), torch.randn_like(b_loc))
            keep_w, keep_b = self.mask(f"{layer.name}.weight"), self.mask(f"{layer.name}.bias")
            return layer.op(h, w if keep_w is None else w * keep_w, b if keep_b is None else b * keep_b), kl
        mean = layer.op(h, w_loc, b_loc)
        sd = layer.op(h * h, w_var, b_var + 1e-16).sqrt()
        return torch.addcmul(mean, sd, example_noise(mean.shape, device=mean.device, dtype=mean.dtype)), kl

    def __getstate__(self):
        # copies and pickles rebuild the cached references on first use
        return {**super().__getstate__(), "_fast": None}

    def set_masks(self, masks) -> None:
        """Prune (:meth:`WeightGuide.set_masks`), then remove every weight fed by a removed group
        (:meth:`close_masks`)."""
        super().set_masks(masks)
        self.close_masks()
        self.clear_step_plan()  # the plan records whether the guide is pruned

    @torch.no_grad()
    def close_masks(self) -> None:
        """In a chain network, remove every weight that a removed group feeds: a hidden group whose
        incoming weights and bias are all removed outputs 0, so the weights that read it leave the
        network's function unchanged, and removing them raises the ELBO by their KL (Bayesian model
        reduction with ``dF`` equal to that KL; they then hold the reduced posterior, loc 0 and
        :data:`~bnnzoo.guides.weight_guide.PRUNED_SCALE`, as a reduction writes it). The masks then hold exactly the weights of the
        physically smaller network (:func:`~bnnzoo.models.sparsity.sparsity_report` counts the
        same), which lets a training step run on that smaller network (:meth:`step_plan`).
        Nothing happens for a network that is not a chain (a user's module)."""
        if not self.masks or not getattr(self.net, "is_chain", True):
            return
        feeds, layers = input_groups(self.net), self.net.param_layers
        kept_before = None  # the previous layer's kept groups (None: all of them)
        for layer in layers:
            w_site, b_site = f"{layer.name}.weight", f"{layer.name}.bias"
            if kept_before is not None and feeds[layer.name] is not None and not bool(kept_before.all()):
                shape = layer.weight_shape
                cols = kept_before[feeds[layer.name].to(kept_before.device)]
                cols = cols.view(1, -1, *([1] * (len(shape) - 2))).expand(shape)
                w = self.masks.get(w_site)
                closed = cols.clone() if w is None else w & cols
                removed = ~closed if w is None else w & ~closed
                self.masks[w_site] = closed
                # the removed weights hold the reduced posterior, as a reduction writes it
                get_site(self.locs, w_site).masked_fill_(removed, 0.0)
                get_site(self.log_scales, w_site).masked_fill_(removed, math.log(PRUNED_SCALE))
            w, b = self.masks.get(w_site), self.masks.get(b_site)
            kept_before = None
            if layer is not layers[-1] and w is not None and b is not None:
                kept_before = w.reshape(layer.num_groups, -1).any(1) | b

    def _apply(self, fn, recurse=True):
        self.clear_step_plan()  # buffers are replaced by .to(): rebuild the plan
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_step_plan()  # ``assign=True`` replaces the parameters
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.close_masks()  # a guide saved before masks were closed
        return out

    def clear_step_plan(self) -> None:
        """Drop the cached :meth:`step_plan`; the next training step gathers it again."""
        self._fast = None

    def step_plan(self) -> SimpleNamespace:
        """The references every training step uses, gathered once and cached (module attribute
        lookups are slow next to the small tensor operations of a small network's step):
        ``scales`` (the scale block's constants:
        :class:`~bnnzoo.guides.horseshoe_scales.HorseshoeScales`), ``layers`` (per layer its Gaussian
        parameters and prior scale), ``params``, ``output_units``, ``sizes`` (groups per hidden layer), ``pruned`` and
        ``mlp`` (the plan of :class:`~bnnzoo.guides.horseshoe_mlp.HorseshoeMLP`, or ``None`` where
        the one-node step does not apply)."""
        if getattr(self, "_fast", None) is None:
            sizes = [b - a for a, b in zip(self.group_offsets[:-1], self.group_offsets[1:])]
            spread = layer_spread(sizes, like=self.scale_sign)
            scales = SimpleNamespace(gain=self.gain, half=self.one_half, minus_one=self.minus_one,
                                     kl_const=self.kl_const, sign=self.scale_sign, shape_sign=self.scale_shape_sign,
                                     log_rate=self.scale_rate.log(),  # in the buffers' dtype (ln 6 is not a float32)
                                     spread=spread, spread_t=spread.t().contiguous(),
                                     width=self.scale_width, n_layers=len(sizes))
            names = [layer.name for layer in self.net.param_layers]
            layers = {name: (self.locs[name]["weight"], self.log_scales[name]["weight"], self.locs[name]["bias"],
                             self.log_scales[name]["bias"], self._prior_scale(name)) for name in names}
            params = (self.scale_params,)
            pruned = len(self.masks) > 0
            self._fast = SimpleNamespace(scales=scales, layers=layers, params=params, output_units=self.output_units,
                                         sizes=sizes, mlp=None, pruned=pruned,
                                         kept=self._kept_blocks() if pruned and self._is_dense_chain() else None)
            if self._is_relu_mlp() and self.net.num_weights() <= FUSED_NETWORK_MAX_WEIGHTS:
                # HorseshoeMLP's plan: per Gaussian tensor (mu, b_mu of each layer) 1/p^2, 1/(2 p^2), ln p - 1/2
                # (0-d tensors: a foreach operation wraps every Python number of a list into a tensor)
                prior_scales = [self._prior_scale(name) for name in names for _ in range(2)]
                like = self.scale_params
                const = lambda values: [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]
                self._fast.mlp = SimpleNamespace(
                    scales=scales, sizes=sizes, output_units=self.output_units,
                    scale_noise=self.scale_width + len(self.hidden),
                    inv_prior_var=const(p**-2 for p in prior_scales),
                    half_inv_prior_var=const(0.5 * p**-2 for p in prior_scales),
                    kl_offset=const(math.log(p) - 0.5 for p in prior_scales), ones=const([1.0] * len(prior_scales)),
                    params=params + tuple(t for name in names for t in layers[name][:4]),
                    widths=[self.net.layer(name).num_groups for name in names])
        return self._fast

    @torch.no_grad()
    def _kept_blocks(self) -> dict[str, SimpleNamespace]:
        """Per dense layer of a pruned dense chain, the block of the smaller network that its closed
        masks keep (:meth:`close_masks`): ``rows`` (the kept units) and ``cols`` (the kept inputs:
        the previous layer's kept units), each ``None`` where all are kept, ``shape`` and the
        block's masks ``keep`` / ``b_keep`` (float 0/1; ``None`` where the block keeps every entry)."""
        blocks, cols = {}, None
        for layer in self.net.param_layers:
            w, b = self.mask(f"{layer.name}.weight"), self.mask(f"{layer.name}.bias")
            out_dim, in_dim = layer.weight_shape
            alive = w.any(1) | b if (w is not None and b is not None and layer.name != self.output) else None
            rows = None if alive is None or bool(alive.all()) else alive.nonzero().squeeze(1)
            n_rows = out_dim if rows is None else len(rows)
            n_cols = in_dim if cols is None else len(cols)
            keep = w
            for dim, index in ((0, rows), (1, cols)):
                if index is not None and keep is not None:
                    keep = keep.index_select(dim, index)
            b_keep = None if b is None else (b if rows is None else b[rows])
            like = self.scale_params
            blocks[layer.name] = SimpleNamespace(
                rows=rows, cols=cols, shape=(n_rows, n_cols),
                keep=None if keep is None or bool(keep.all()) else keep.to(like.dtype),
                b_keep=None if b_keep is None or bool(b_keep.all()) else b_keep.to(like.dtype))
            cols = rows
        return blocks

    def _is_dense_chain(self) -> bool:
        """Whether the network is dense layers with elementwise activations between them (after an
        optional Flatten): a pruned one trains on the smaller network its masks keep."""
        kinds = [layer.kind for layer in self.net.layers]
        if kinds and kinds[0] == "flatten":
            kinds = kinds[1:]
        return (getattr(self.net, "is_chain", True) and bool(kinds) and kinds[-1] == "dense"
                and all(k in ("dense", "activation") for k in kinds))

    def _is_relu_mlp(self) -> bool:
        """Whether the network is dense layers with ReLU between them (after an optional Flatten),
        the architecture :class:`~bnnzoo.guides.horseshoe_mlp.HorseshoeMLP` computes in one node."""
        kinds = [(layer.kind, getattr(layer, "fn", None)) for layer in self.net.layers]
        if kinds and kinds[0][0] == "flatten":
            kinds = kinds[1:]
        expected = [("dense", None)]
        for _ in self.hidden:
            expected = [("dense", None), ("activation", "relu")] + expected
        return kinds == expected

    def _mlp_step(self, x: torch.Tensor, y: torch.Tensor | None, log_noise, weights=(1.0, 1.0)):
        plan = self._fast.mlp
        eps = example_noise_flat(plan.scale_noise, plan.widths, x.shape[0], device=x.device, dtype=x.dtype)
        return HorseshoeMLP.apply(x, y, log_noise, eps, plan, weights, *plan.params)

    def gaussian_loss(self, x: torch.Tensor, y: torch.Tensor, log_noise: torch.Tensor, nll_weight: float,
                      kl_weight: float) -> torch.Tensor | None:
        """``nll_weight * sum_n -log N(y_n | f_n, exp(log_noise)^2) + kl_weight * KL(q || p)`` for one
        local-reparameterised draw of the outputs ``f``, in one autograd node
        (:class:`~bnnzoo.guides.horseshoe_mlp.HorseshoeMLP`); ``None`` where that node does not apply
        (pruned, or not a dense ReLU network), and the caller computes the loss term by term."""
        fast = self.step_plan()
        if fast.mlp is None or fast.pruned:
            return None
        return self._mlp_step(x, y, log_noise, (float(nll_weight), float(kl_weight)))

    def sample_scales_and_kl(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One draw of every hidden layer's ``s_k`` (layer -> ``(K,)``) and ``KL(q || p)`` of every
        scale variable (the same quantities as :meth:`sample_log_scales` and :meth:`scale_kl`, in one
        autograd node: :class:`~bnnzoo.guides.horseshoe_scales.HorseshoeScales`)."""
        fast = self.step_plan()
        params = fast.params[0]
        eps = torch.randn(self.scale_width + len(self.hidden), device=params.device, dtype=params.dtype)
        s, kl = HorseshoeScales.apply(params, eps, fast.scales)
        if len(self.hidden) == 1:
            return {self.hidden[0]: s}, kl
        return dict(zip(self.hidden, s.split(fast.sizes))), kl

    def sample_outputs_and_kl(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One local-reparameterised draw of the network outputs for ``x`` and ``KL(q || p)``."""
        fast = self.step_plan()
        fused = not fast.pruned
        if fused and fast.mlp is not None:
            return self._mlp_step(x, None, None)
        scales, kl = self.sample_scales_and_kl()
        scales[self.output] = fast.output_units
        if fast.kept is not None:
            return self._kept_block_outputs(x, fast, scales, kl)

        def linear(layer, h):
            nonlocal kl
            s = scales[layer.name]
            if fused and layer.kind in ("dense", "linear"):  # a module's nn.Linear: on its last axis
                mu, rho, b_mu, b_rho, prior_scale = fast.layers[layer.name]
                rows = h.numel() // h.shape[-1]
                # token layers fold the scale into the weights; the output layer's fixed unit scale
                # stays on its outputs, where it costs one multiply
                tokens = rows > h.shape[-1] and layer.name != self.output
                fold = weight_scaled_local_reparam_dense if tokens else scaled_local_reparam_dense
                out, layer_kl = fold(h, mu, rho, b_mu, b_rho, s, prior_scale)
            else:
                out, layer_kl = self._gaussian_layer(layer, h, self._prior_scale(layer.name))
                out = out * s.view(layer.out_mask_shape())  # (K,) against (..., K) or (B, K, H, W)
            kl = kl + layer_kl
            return out

        return self.net.apply(x, linear), kl

    def _kept_block_outputs(self, x: torch.Tensor, fast: SimpleNamespace, scales: dict[str, torch.Tensor],
                            kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_outputs_and_kl` of a pruned dense chain on the smaller network its masks
        keep: each layer's kept block of units and inputs is gathered from the parameters (their
        gradient scattered back, 0 elsewhere), the hidden outputs carry only the kept units, and
        the draw and KL are those of the masked network (removed units output 0 there, and every
        weight they feed is removed: :meth:`close_masks`)."""

        def linear(layer, h):
            nonlocal kl
            block = fast.kept[layer.name]
            mu, rho, b_mu, b_rho, prior_scale = fast.layers[layer.name]
            for dim, index in ((0, block.rows), (1, block.cols)):
                if index is not None:
                    mu, rho = mu.index_select(dim, index), rho.index_select(dim, index)
            s = scales[layer.name]
            if block.rows is not None:
                b_mu, b_rho = b_mu.index_select(0, block.rows), b_rho.index_select(0, block.rows)
                s = s.index_select(0, block.rows)
            out, layer_kl = masked_scaled_local_reparam_dense(h.reshape(h.shape[0], -1), mu, rho, b_mu, b_rho, s,
                                                              block.keep, block.b_keep, prior_scale)
            kl = kl + layer_kl
            return out

        return self.net.apply(x, linear), kl
