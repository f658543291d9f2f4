"""Likelihoods of a network's outputs ``f`` (the last layer's pre-activations)."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

_TINY = torch.finfo(torch.float32).tiny
#: the scales (standard deviations) a float32 model can use: ``scale^2`` and ``1/scale^2`` both normal
#: float32 numbers, neither underflowing nor overflowing
FLOAT32_SCALE_RANGE = (math.sqrt(_TINY), 1.0 / math.sqrt(_TINY))


def check_scale(name: str, value) -> float:
    """``value`` as a float when it is a real number inside :data:`FLOAT32_SCALE_RANGE`; else a
    :class:`~bnnzoo.models.errors.ConfigError` naming option ``name``, its value and the range.

    A Gaussian scale outside that range gives a variance or a precision that float32 cannot hold
    (``1e-30 ** -2`` overflows to inf, and the fit's first loss is NaN), so it is refused before any work.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"option {name!r} must be a positive finite number, got {value!r}")
    lo, hi = FLOAT32_SCALE_RANGE
    if not lo <= value <= hi:
        raise ConfigError(
            f"option {name!r} = {value:g} is outside [{lo:.3g}, {hi:.3g}], the scales whose variance and "
            f"precision (1/{name}^2) float32 can hold: the fit would divide by zero or overflow")
    return float(value)


class Likelihood(nn.Module, ABC):
    """``p(y | f)``: observed under Pyro in :meth:`forward`, pointwise in :meth:`log_prob`."""

    task: str = ""

    @abstractmethod
    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        """The distribution of ``y`` given outputs ``f``."""

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y_n | f_n)``; ``f`` may carry leading sample dimensions."""
        return self.distribution(f).log_prob(y)

    def forward(self, f: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """Observe ``y`` (or sample it) inside a data plate scaled to ``num_data`` points."""
        batch = f.shape[0]
        num_data = batch if num_data is None else int(num_data)
        subsample = torch.arange(batch, device=f.device)
        with pyro.plate("data", size=num_data, subsample=subsample):
            return pyro.sample("obs", self.distribution(f), obs=y)


class GaussianLikelihood(Likelihood):
    """``y ~ N(f, noise_scale^2)`` with the noise scale learned as a point estimate.

    The scale is stored as its logarithm so that optimisation is unconstrained. The initial
    ``noise_scale`` must lie in :data:`FLOAT32_SCALE_RANGE` (:func:`check_scale`; a
    :class:`~bnnzoo.models.errors.ConfigError` otherwise).
    """

    task = "regression"

    def __init__(self, noise_scale: float = 0.5):
        super().__init__()
        noise_scale = check_scale("noise_scale", noise_scale)
        self.log_noise_scale = nn.Parameter(torch.tensor(math.log(noise_scale)))

    @property
    def noise_scale(self) -> torch.Tensor:
        return self.log_noise_scale.exp()

    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        return dist.Normal(f.squeeze(-1), self.noise_scale)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = f.squeeze(-1)
        return -0.5 * ((y - f) / self.noise_scale) ** 2 - self.log_noise_scale - 0.5 * math.log(2 * math.pi)


class CategoricalLikelihood(Likelihood):
    """``y ~ Categorical(softmax(f))``."""

    task = "classification"

    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=f)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if f.dim() == 2:
            return -F.cross_entropy(f, y, reduction="none")
        return torch.log_softmax(f, -1).gather(-1, y.expand(f.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def make_likelihood(task: str, **kwargs) -> Likelihood:
    if task == "regression":
        return GaussianLikelihood(**kwargs)
    if task == "classification":
        return CategoricalLikelihood()
    raise ValueError(f"unknown task {task!r}; expected 'regression' or 'classification'")



def noise_m_step(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The log noise scale that maximises ``E_q[sum_n log N(y_n | f_n, sigma^2)]`` for draws ``f``
    ``(S, N)`` of the network's output under ``q``: the EM M-step of a Gaussian likelihood's
    variance, ``sigma^2 = (1/(S N)) sum_{s,n} (y_n - f_sn)^2`` (residual plus the spread of ``q``).
    Accumulated in float64; returns a 0-d tensor on ``f``'s device (no host copy)."""
    return 0.5 * torch.log(((y.double() - f.double()) ** 2).mean())
