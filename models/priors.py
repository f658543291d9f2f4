"""Gaussian weight priors: independent ``N(0, scale^2)`` on every weight and bias (per layer with
``scaling="fan_in"``), and the layer-scale prior of Markovic, Friston & Kiebel's code."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .errors import ConfigError
from .likelihoods import check_scale
from .networks import Network

#: how a prior's scales depend on the layer: the same in every layer, or divided by sqrt(fan_in)
SCALINGS = ("absolute", "fan_in")


class GaussianPrior(nn.Module):
    """``w ~ N(0, scale^2 f_l^2)`` independently for every weight and bias of layer ``l`` of ``net``.

    ``scaling`` sets the layer factor ``f_l``: ``"absolute"`` (the default), ``f_l = 1``, one scale
    for every site; ``"fan_in"``, ``f_l = 1/sqrt(fan_in_l)``, so that ``scale`` is the prior scale of
    a neuron's pre-activation for inputs of unit variance, the same whatever the layer's width (the
    scaling of :class:`~bnnzoo.models.spike_slab.SpikeSlabPrior`; weight decay ``fan_in / (2 scale^2)``).

    The scale is a fixed hyperparameter (``scale_value``, a Python number, so reading it never
    synchronises a device; :meth:`site_scale` gives a site's scale after the layer factor); ``scale``
    is the same as a tensor on the prior's device, kept in a non-persistent buffer so that
    ``prior.to("cuda")`` moves it (Pyro's ``PyroSample`` priors would not move with the module).
    """

    def __init__(self, net: Network, scale: float = 1.0, scaling: str = "absolute"):
        super().__init__()
        scale = check_scale("prior_scale", scale)  # a ConfigError outside float32's usable range
        if scaling not in SCALINGS:
            raise ConfigError(f"prior scaling {scaling!r} is not one of {SCALINGS}")
        self.net = net
        self.scale_value = float(scale)
        self.scaling = scaling
        self._factors = {f"{layer.name}.{kind}": (1.0 if scaling == "absolute" else layer.fan_in ** -0.5)
                         for layer in net.param_layers for kind in ("weight", "bias")}
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    @property
    def uniform(self) -> bool:
        """Whether every site has the same scale (``scale_value``)."""
        return self.scaling == "absolute"

    def site_scale(self, site: str) -> float:
        """The prior standard deviation of every weight of ``site``: ``scale f_l``."""
        return self.scale_value * self._factors[site]

    def site_distribution(self, site: str) -> dist.Distribution:
        """The prior of one weight site (a batched ``Normal`` with the site's shape as event)."""
        shape = self.net.sites()[site]
        scale = self.scale if self.uniform else self.scale * self._factors[site]
        return dist.Normal(torch.zeros((), device=self.scale.device), scale).expand(shape).to_event(len(shape))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every weight site under Pyro; returns site name -> value."""
        return {site: pyro.sample(site, self.site_distribution(site)) for site in self.net.sites()}

    def extra_repr(self) -> str:
        return f"scale={self.scale_value:g}" + ("" if self.uniform else f", scaling={self.scaling}")


class LayerScaleGaussianPrior(nn.Module):
    """The non-centred model of Markovic, Friston & Kiebel's code (``bmr4pml``): one learned scale
    per parametric layer.

    For every parametric layer ``l`` (weights and bias alike)::

        c_l^-2 ~ Gamma(concentration, rate)        (site "<layer>.c_inv_sqr"; Gamma(2, 2) by default)
        z      ~ N(0, 1) elementwise               (the standardised weights)
        w      = f_l c_l z                         (f_l = hidden_factor = 1/10 in hidden layers, 1 in the output layer)

    so given ``c_l`` the weights of the layer are ``N(0, (f_l c_l)^2)``. Under Pyro, :meth:`forward`
    samples every ``c_l^-2`` and then every weight site from its conditional Normal.
    """

    def __init__(self, net: Network, concentration: float = 2.0, rate: float = 2.0, hidden_factor: float = 0.1):
        super().__init__()
        concentration = check_scale("scale_concentration", concentration)
        rate = check_scale("scale_rate", rate)
        hidden_factor = check_scale("hidden_factor", hidden_factor)
        self.net = net
        self.concentration_value, self.rate_value = float(concentration), float(rate)
        self.hidden_factor = float(hidden_factor)
        self.register_buffer("concentration", torch.tensor(float(concentration)), persistent=False)
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.net.param_layers]

    def factor(self, layer: str) -> float:
        """``f_l``: 1 for the output layer, ``hidden_factor`` for every other parametric layer."""
        return 1.0 if layer == self.net.param_layers[-1].name else self.hidden_factor

    @staticmethod
    def scale_site(layer: str) -> str:
        """The name of the sample site of ``c_l^-2``."""
        return f"{layer}.c_inv_sqr"

    def scale_distribution(self) -> dist.Gamma:
        """The prior of every ``c_l^-2``."""
        return dist.Gamma(self.concentration, self.rate)

    def site_distribution(self, site: str, c_inv_sqr: torch.Tensor | None = None) -> dist.Distribution:
        """The prior of one weight site given its layer's ``c^-2`` (a batched ``Normal(0, f c)``)."""
        if c_inv_sqr is None:
            raise TypeError(f"the prior of {site} is Gaussian only given its layer's scale: pass c_inv_sqr")
        shape = self.net.sites()[site]
        scale = self.factor(site.rpartition(".")[0]) * torch.as_tensor(c_inv_sqr).rsqrt()
        return dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every ``c_l^-2`` and every weight site under Pyro; returns weight site -> value."""
        out = {}
        for layer in self.layer_names():
            c_inv_sqr = pyro.sample(self.scale_site(layer), self.scale_distribution())
            for param in ("weight", "bias"):
                site = f"{layer}.{param}"
                out[site] = pyro.sample(site, self.site_distribution(site, c_inv_sqr))
        return out

    def extra_repr(self) -> str:
        return (f"c^-2 ~ Gamma({self.concentration_value:g}, {self.rate_value:g}), "
                f"hidden_factor={self.hidden_factor:g}")
