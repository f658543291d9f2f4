"""Closed-form KL divergences that torch and Pyro lack, registered with torch's KL registry.

For ``q = LogNormal(m, s^2)`` (``ln x ~ N(m, s^2)``): ``E[ln x] = m``, ``E[x] = exp(m + s^2/2)``,
``E[1/x] = exp(-m + s^2/2)`` and the entropy is ``m + 0.5 ln(2 pi e s^2)``. Hence

    KL(q || Gamma(a, rate r))         = -a m + r E[x]   - a ln r + lgamma(a) - 0.5 ln(2 pi e s^2)
    KL(q || InverseGamma(a, scale b)) =  a m + b E[1/x] - a ln b + lgamma(a) - 0.5 ln(2 pi e s^2)

Importing this module registers both with :func:`torch.distributions.kl.register_kl` (Pyro's
``Gamma`` and ``InverseGamma`` subclass torch's, so Pyro's ``TraceMeanField_ELBO`` uses them and
needs no Monte Carlo estimate). ``KL(LogNormal || HalfCauchy)`` has no closed form; the horseshoe
model writes each Half-Cauchy scale through a Gamma and an inverse-Gamma variable instead.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Gamma, InverseGamma, LogNormal, register_kl

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def _neg_entropy_rest(log_s: torch.Tensor) -> torch.Tensor:
    """``-(entropy of q) - m``: ``-ln s - 0.5 ln(2 pi e)`` (the ``m`` term is added by the caller)."""
    return -log_s - _HALF_LOG_2PI_E


def kl_lognormal_gamma(m: torch.Tensor, log_s: torch.Tensor, concentration, rate) -> torch.Tensor:
    """Elementwise ``KL(LogNormal(m, exp(log_s)^2) || Gamma(concentration, rate))``."""
    a = torch.as_tensor(concentration, dtype=m.dtype, device=m.device)
    r = torch.as_tensor(rate, dtype=m.dtype, device=m.device)
    mean = torch.exp(m + 0.5 * torch.exp(2 * log_s))
    return -a * m + r * mean - a * torch.log(r) + torch.lgamma(a) + _neg_entropy_rest(log_s)


def kl_lognormal_inverse_gamma(m: torch.Tensor, log_s: torch.Tensor, concentration, scale) -> torch.Tensor:
    """Elementwise ``KL(LogNormal(m, exp(log_s)^2) || InverseGamma(concentration, scale))``."""
    a = torch.as_tensor(concentration, dtype=m.dtype, device=m.device)
    b = torch.as_tensor(scale, dtype=m.dtype, device=m.device)
    inv_mean = torch.exp(-m + 0.5 * torch.exp(2 * log_s))
    return a * m + b * inv_mean - a * torch.log(b) + torch.lgamma(a) + _neg_entropy_rest(log_s)


@register_kl(LogNormal, Gamma)
def _kl_lognormal_gamma(q: LogNormal, p: Gamma) -> torch.Tensor:
    return kl_lognormal_gamma(q.loc, q.scale.log(), p.concentration, p.rate)


@register_kl(LogNormal, InverseGamma)
def _kl_lognormal_inverse_gamma(q: LogNormal, p: InverseGamma) -> torch.Tensor:
    base = p.base_dist  # InverseGamma(a, b) is 1 / Gamma(a, rate b)
    return kl_lognormal_inverse_gamma(q.loc, q.scale.log(), base.concentration, base.rate)


__all__ = ["kl_lognormal_gamma", "kl_lognormal_inverse_gamma"]
