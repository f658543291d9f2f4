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

    The scale is stored as its logarithm so that optimisation is unconstrained.
    """

    task = "regression"

    def __init__(self, noise_scale: float = 0.5):
        super().__init__()
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, numbers.Real) or not 0 < noise_scale < math.inf:
            raise ValueError(f"noise scale must be a positive finite number, got {noise_scale!r}")
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
