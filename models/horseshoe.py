"""The node-wise regularised horseshoe prior (Ghosh, Yao & Doshi-Velez 2019; Louizos, Ullrich &
Welling 2017; Piironen & Vehtari 2017), non-centred.

For output neuron (dense) or filter (conv) ``k`` of hidden layer ``l``, every weight of its group (the
weight row and the bias entry) is ``w_kj = s_k * beta_kj`` with

    beta_kj  ~ N(0, 1)
    lambda_k ~ C+(0, 1)          local scale, one per group
    tau_l    ~ C+(0, tau0)       global scale, one per layer
    c_l^2    ~ InvGamma(slab_shape, slab_scale)    slab (default InvGamma(2, 6))
    s_k^2    = c^2 tau^2 lambda_k^2 / (c^2 + tau^2 lambda_k^2)

Each Half-Cauchy scale is written through two positive auxiliaries, ``a ~ C+(0, b)`` iff
``a^2 = a_a * a_b`` with ``a_a ~ Gamma(1/2, rate 1/b^2)`` and ``a_b ~ InvGamma(1/2, 1)``, so that a
LogNormal guide has a closed-form KL to every factor (see ``bnnzoo.guides.closed_form_kl``). The
output layer keeps a plain ``N(0, output_scale^2)`` prior on its weights.

Pyro sites, per hidden layer ``L``: ``L.tau_a``, ``L.tau_b``, ``L.lambda_a``, ``L.lambda_b``, ``L.c2``
(scale sites, sampled first), then ``L.weight_decentered`` and ``L.bias_decentered`` (the ``beta``,
named as Pyro's ``LocScaleReparam`` names a decentred site); the effective weights are recorded as
the deterministic sites ``L.weight`` and ``L.bias``. The output layer's weights are sampled at the
network's own site names.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .networks import Network

SCALE_VARIABLES = ("tau_a", "tau_b", "lambda_a", "lambda_b", "c2")
DECENTERED = "_decentered"


def regularised_log_scale(log_u: torch.Tensor, log_c2: torch.Tensor) -> torch.Tensor:
    """``ln s`` for ``s^2 = c^2 u / (c^2 + u)``, given ``ln u`` (``u = tau^2 lambda^2``) and ``ln c^2``."""
    return 0.5 * (log_c2 + log_u - torch.logaddexp(log_c2, log_u))


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class HorseshoePrior(nn.Module):
    """The node-wise regularised horseshoe over the hidden layers of ``net`` (module docstring).

    Constants live in registered buffers, so ``prior.to("cuda")`` moves every distribution it builds.
    ``forward()`` samples every latent site under Pyro and returns the effective weights (network
    site name -> tensor), as :class:`~bnnzoo.models.BayesianNeuralNetwork` expects of a prior.
    """

    def __init__(self, net: Network, tau0: float = 1.0, slab_shape: float = 2.0, slab_scale: float = 6.0,
                 output_scale: float = 1.0):
        super().__init__()
        if len(net.param_layers) < 2:
            raise ValueError(f"the horseshoe prior shrinks hidden neurons, but {net!r} has no hidden layer")
        self.net = net
        self.output_scale_value = _positive("output_scale", output_scale)
        self.tau0_value = _positive("tau0", tau0)
        for name, value in (("tau0", tau0), ("slab_shape", slab_shape), ("slab_scale", slab_scale),
                            ("output_scale", output_scale)):
            self.register_buffer(name, torch.tensor(_positive(name, value)))
        self.register_buffer("half_shape", torch.tensor(0.5))  # shape of the Half-Cauchy auxiliaries
        self.register_buffer("unit", torch.tensor(1.0))
        self.hidden = [layer.name for layer in net.hidden_layers()]
        self.output = net.param_layers[-1].name

    # ---- sites ------------------------------------------------------------------------------------
    def scale_sites(self) -> dict[str, tuple[int, ...]]:
        """The positive scale sites of every hidden layer, with their shapes."""
        out = {}
        for name in self.hidden:
            k = self.net.layer(name).num_groups
            shapes = {"tau_a": (), "tau_b": (), "lambda_a": (k,), "lambda_b": (k,), "c2": ()}
            out.update({f"{name}.{var}": shapes[var] for var in SCALE_VARIABLES})
        return out

    def weight_sites(self) -> dict[str, tuple[int, ...]]:
        """The Gaussian weight sites: decentred ``beta`` of hidden layers, plain weights of the output layer."""
        out = {}
        for site, shape in self.net.sites().items():
            out[self.latent_name(site)] = shape
        return out

    def sites(self) -> dict[str, tuple[int, ...]]:
        """Every latent site in sampling order: scale sites first, then weight sites."""
        return {**self.scale_sites(), **self.weight_sites()}

    def latent_name(self, site: str) -> str:
        """The Pyro site holding network site ``site`` (``fc1.weight`` -> ``fc1.weight_decentered``)."""
        layer = site.rpartition(".")[0]
        return site + DECENTERED if layer in self.hidden else site

    def site_distribution(self, site: str) -> dist.Distribution:
        """The prior of one latent site, with the site's shape as event shape."""
        layer, _, var = site.rpartition(".")
        if var == "tau_a":  # tau^2 = tau_a * tau_b, tau ~ C+(0, tau0)
            return dist.Gamma(self.half_shape, self.tau0.pow(-2))
        if var == "tau_b":
            return dist.InverseGamma(self.half_shape, self.unit)
        if var == "lambda_a":  # lambda^2 = lambda_a * lambda_b, lambda ~ C+(0, 1)
            return dist.Gamma(self.half_shape, self.unit).expand([self.net.layer(layer).num_groups]).to_event(1)
        if var == "lambda_b":
            return dist.InverseGamma(self.half_shape, self.unit).expand([self.net.layer(layer).num_groups]).to_event(1)
        if var == "c2":
            return dist.InverseGamma(self.slab_shape, self.slab_scale)
        shapes = self.weight_sites()
        if site not in shapes:
            raise KeyError(f"unknown site {site!r}; sites are {list(self.sites())}")
        shape = shapes[site]
        scale = self.unit if layer in self.hidden else self.output_scale
        return dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))

    # ---- effective weights --------------------------------------------------------------------------
    def log_scale(self, layer: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``ln s_k`` of every group of hidden ``layer`` from sampled scale values (shape ``(..., K)``)."""
        v = {var: values[f"{layer}.{var}"] for var in SCALE_VARIABLES}
        log_tau2 = (v["tau_a"].log() + v["tau_b"].log()).unsqueeze(-1)
        log_u = log_tau2 + v["lambda_a"].log() + v["lambda_b"].log()
        return regularised_log_scale(log_u, v["c2"].log().unsqueeze(-1))

    def weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The effective weights ``w = s * beta`` (network site -> tensor) from latent values."""
        scales = {layer: self.log_scale(layer, values).exp() for layer in self.hidden}
        out = {}
        for site in self.net.sites():
            layer = site.rpartition(".")[0]
            value = values[self.latent_name(site)]
            if layer in scales:
                s = scales[layer]
                value = s.reshape(s.shape + (1,) * (value.dim() - s.dim())) * value
            out[site] = value
        return out

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every latent site under Pyro (scales, then weights); record and return the weights."""
        values = {site: pyro.sample(site, self.site_distribution(site)) for site in self.sites()}
        weights = self.weights(values)
        for site, value in weights.items():
            if site.rpartition(".")[0] in self.hidden:
                pyro.deterministic(site, value)
        return weights

    def extra_repr(self) -> str:
        return (f"tau0={self.tau0_value:g}, slab=InvGamma({float(self.slab_shape):g}, {float(self.slab_scale):g}), "
                f"output_scale={self.output_scale_value:g}")
