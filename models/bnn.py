"""The Bayesian neural network: a prior over a network's weights and a likelihood of its outputs."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from .likelihoods import Likelihood
from .networks import Network


class BayesianNeuralNetwork(nn.Module):
    """The Pyro model ``p(y, w | x) = p(w) prod_n p(y_n | f(x_n; w))``.

    Calling it, ``model(x, y=None, num_data=None)``, samples every weight site from the prior,
    records the network outputs as the deterministic site ``"f"`` and observes ``y`` at ``"obs"``
    in a ``"data"`` plate scaled to ``num_data`` points (minibatches).
    """

    def __init__(self, net: Network, prior: nn.Module, likelihood: Likelihood):
        super().__init__()
        self.net = net
        self.prior = prior
        self.likelihood = likelihood

    @property
    def task(self) -> str:
        return self.likelihood.task

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        params = self.prior()
        f = pyro.deterministic("f", self.net(x, params))
        return self.likelihood(f, y, num_data)
