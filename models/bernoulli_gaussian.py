"""The group-sparse Bernoulli-Gaussian (spike-and-slab) prior of EM-TDAMP (Xu, Liu, Zhang & Lau 2024).

One group per neuron of a dense layer: the weight row ``W_g`` and the bias entry ``b_g`` are either
all zero or all drawn from the slab,

    p(W_g, b_g) = rho_g N(W_g, b_g; 0, sigma_g^2 I) + (1 - rho_g) delta(W_g, b_g).

The output layer's neurons cannot be removed: its groups have ``rho = 1`` (a Gaussian prior).

Under Pyro each weight site is sampled from :class:`GroupBernoulliGaussian` (rows of the site are
the groups); the bias site is sampled *given* the weight site: its entry is on the slab exactly when
the group's weight row is (a slab draw is never exactly zero), which makes the pair of sites the
joint spike-and-slab above. Log densities are with respect to the mixed measure (a point mass at
the all-zero row plus Lebesgue measure), as usual for spike-and-slab models.

``rho`` and ``slab_var`` are per-group buffers (``prior.to("cuda")`` moves them); EM updates them.
"""

from __future__ import annotations

import math
import numbers

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn

from .networks import Network


class GroupBernoulliGaussian(TorchDistribution):
    """Rows of a tensor that are all zero with probability ``1 - probs[k]`` and otherwise have
    independent ``N(loc, scale^2)`` entries.

    ``probs`` has shape ``batch + (K,)``; ``loc`` and ``scale`` have shape ``batch + (K, ...)``; the
    event is ``(K, ...)`` (a whole weight site). ``log_prob`` is the density with respect to a point
    mass at the zero row plus Lebesgue measure on the rest.
    """

    arg_constraints = {"probs": constraints.unit_interval, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = False

    def __init__(self, probs: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        loc, scale = torch.broadcast_tensors(loc, scale)
        batch_dims = probs.dim() - 1
        if probs.dim() < 1 or loc.dim() < probs.dim() or loc.shape[:probs.dim()] != probs.shape:
            raise ValueError(f"probs of shape {tuple(probs.shape)} must match the leading dimensions of loc "
                             f"{tuple(loc.shape)} (one probability per row)")
        self.probs, self.loc, self.scale = probs, loc, scale
        self._row_dims = loc.dim() - probs.dim()  # entries per group beyond the group axis
        super().__init__(loc.shape[:batch_dims], loc.shape[batch_dims:], validate_args=validate_args)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape + (1,) * self._row_dims)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        probs = self.probs.expand(batch_shape + self.probs.shape[-1:])
        loc = self.loc.expand(batch_shape + self.event_shape)
        return type(self)(probs, loc, self.scale.expand(batch_shape + self.event_shape))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        included = torch.bernoulli(self.probs.expand(shape[:len(shape) - len(self.event_shape) + 1]))
        draw = self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return draw * self._rows(included)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        rest = tuple(range(-self._row_dims, 0))
        zero_row = (value == 0).all(dim=rest) if rest else value == 0
        slab = dist.Normal(self.loc, self.scale).log_prob(value)
        slab = slab.sum(rest) if rest else slab
        lp = torch.where(zero_row, _safe_log(1.0 - self.probs), _safe_log(self.probs) + slab)
        return lp.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self._rows(self.probs) * self.loc

    @property
    def variance(self) -> torch.Tensor:
        p = self._rows(self.probs)
        return p * (self.scale**2 + self.loc**2) - (p * self.loc) ** 2


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``log 0 = -inf`` and a finite gradient everywhere (no ``inf * 0`` in backward)."""
    positive = p > 0
    return torch.where(positive, torch.log(torch.where(positive, p, torch.ones_like(p))), -torch.inf)


def bias_given_weight(weight: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                      row_dims: int = 1) -> GroupBernoulliGaussian:
    """The distribution of a layer's bias given its sampled weight rows: entry ``k`` is on the slab
    ``N(loc_k, scale_k^2)`` exactly when row ``k`` of ``weight`` is not all zero (``row_dims``:
    trailing dimensions of one row, 1 for a dense layer)."""
    included = (weight != 0).flatten(start_dim=weight.dim() - row_dims).any(-1).to(loc.dtype)
    return GroupBernoulliGaussian(included, loc.expand(included.shape), scale.expand(included.shape))


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class BernoulliGaussianPrior(nn.Module):
    """Group-sparse spike-and-slab over the neurons of ``net`` (module docstring).

    ``rho`` is the initial inclusion rate of every hidden neuron; ``slab_scale`` sets the slab
    variance of a layer with fan-in ``n`` to ``slab_scale^2 / n`` (the variance of PyTorch's default
    initialisation is ``1 / (3n)``). Buffers ``groups.<layer>.logit_rho`` (``+inf`` for the output
    layer) and ``groups.<layer>.slab_var`` hold one value per group; the inclusion rate is kept as
    its logit so that rates extremely close to 0 or 1 stay exact. :meth:`set_group_parameters`
    changes them (the EM M-step).
    """

    def __init__(self, net: Network, rho: float = 0.5, slab_scale: float = 1.0):
        super().__init__()
        self.net = net
        rho = _check_fraction("rho", rho)
        self.rho_value = rho
        if isinstance(slab_scale, bool) or not isinstance(slab_scale, numbers.Real) or not 0 < slab_scale < math.inf:
            raise ValueError(f"slab_scale must be a positive finite number, got {slab_scale!r}")
        self.slab_scale_value = float(slab_scale)
        self.hidden = [layer.name for layer in net.hidden_layers()]
        self.groups = nn.ModuleDict()
        logit = math.log(rho) - math.log1p(-rho) if rho < 1 else math.inf
        for layer in net.param_layers:
            mod = nn.Module()
            k = layer.num_groups
            mod.register_buffer("logit_rho", torch.full((k,), logit if layer.name in self.hidden else math.inf))
            mod.register_buffer("slab_var", torch.full((k,), slab_scale**2 / layer.fan_in))
            self.groups[layer.name] = mod

    def rho(self, layer: str) -> torch.Tensor:
        """The prior inclusion rate of every group of ``layer``."""
        return torch.sigmoid(self.groups[layer].logit_rho)

    def logit_rho(self, layer: str) -> torch.Tensor:
        """``logit rho`` per group (``+inf`` for the output layer, whose neurons are always kept)."""
        return self.groups[layer].logit_rho

    def slab_var(self, layer: str) -> torch.Tensor:
        return self.groups[layer].slab_var

    @torch.no_grad()
    def set_group_parameters(self, layer: str, logit_rho: torch.Tensor | None = None,
                             slab_var: torch.Tensor | None = None) -> None:
        """Set ``logit rho`` (hidden layers only; finite) and/or ``slab_var`` (positive, finite) of
        ``layer``, per group or one value for the layer."""
        if layer not in self.groups:
            raise KeyError(f"unknown layer {layer!r}; layers are {list(self.groups)}")
        if logit_rho is not None:
            if layer not in self.hidden:
                raise ValueError(f"{layer} is the output layer: its neurons are always kept (rho = 1)")
            logit_rho = torch.as_tensor(logit_rho, dtype=torch.float32)
            if not bool(torch.isfinite(logit_rho).all()):
                raise ValueError(f"logit_rho of {layer} must be finite (rho strictly between 0 and 1)")
            self.groups[layer].logit_rho.copy_(logit_rho)
        if slab_var is not None:
            slab_var = torch.as_tensor(slab_var, dtype=torch.float32)
            if not bool((slab_var > 0).all() & torch.isfinite(slab_var).all()):
                raise ValueError(f"slab_var of {layer} must be positive and finite")
            self.groups[layer].slab_var.copy_(slab_var)

    def site_distribution(self, site: str, weight: torch.Tensor | None = None) -> GroupBernoulliGaussian:
        """The prior of a weight site, or of a bias site given its layer's sampled ``weight``."""
        layer, _, param = site.rpartition(".")
        shape = self.net.sites()[site]
        scale = self.slab_var(layer).sqrt()
        if param == "bias":
            if weight is None:
                raise ValueError(f"the prior of {site} is conditional on the sampled {layer}.weight")
            row_dims = len(self.net.sites()[f"{layer}.weight"]) - 1
            return bias_given_weight(weight, torch.zeros_like(scale), scale, row_dims)
        rows = scale.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)
        return GroupBernoulliGaussian(self.rho(layer), torch.zeros_like(rows), rows)

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample every weight site under Pyro (each layer's weight, then its bias given the weight)."""
        out = {}
        for layer in self.net.param_layers:
            w = pyro.sample(f"{layer.name}.weight", self.site_distribution(f"{layer.name}.weight"))
            out[f"{layer.name}.weight"] = w
            out[f"{layer.name}.bias"] = pyro.sample(f"{layer.name}.bias",
                                                    self.site_distribution(f"{layer.name}.bias", w))
        return out

    def extra_repr(self) -> str:
        return f"rho={self.rho_value:g}, slab_scale={self.slab_scale_value:g} (per fan-in)"
