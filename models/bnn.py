"""The Bayesian neural network: a prior over a network's weights and a likelihood of its outputs."""

from __future__ import annotations

import pyro
import torch
from pyro.params import param_with_module_name
from torch import nn

from .likelihoods import Likelihood
from .networks import Network


def register_with_pyro(name: str, module: nn.Module) -> None:
    """Register ``module``'s parameters in Pyro's param store as ``pyro.module(name, module)`` does,
    with the module as the owner of its values.

    Each trainable parameter ``p`` becomes the param site ``"{name}$$$<path>"`` holding ``p`` itself, so
    a ``pyro.optim`` optimiser run by ``pyro.infer.SVI`` updates the module in place. Where the store
    already holds another tensor under that name (a module of the same name registered earlier in the
    process, without ``pyro.clear_param_store()``), the entry is replaced by this module's parameter:
    the module is never overwritten from the store (that would change a fitted model behind its
    owner's back), and the optimiser never trains a stale tensor the module does not read.

    Under Pyro's module-local parameters (``pyro.settings`` ``module_local_params=True``) nothing
    is registered: there, parameters live on their modules and are trained through ``parameters()``
    (``elbo(model, guide)`` with a torch optimiser), as Pyro prescribes for that mode.
    """
    if pyro.settings.get("module_local_params"):
        return
    store = pyro.get_param_store()
    for param_name, value in module.named_parameters():
        full_name = param_with_module_name(name, param_name)
        if value.requires_grad and full_name in store and store[full_name] is not value:
            del store[full_name]
    pyro.module(name, module)


class BayesianNeuralNetwork(nn.Module):
    """The Pyro model ``p(y, w | x) = p(w) prod_n p(y_n | f(x_n; w))``.

    Calling it, ``model(x, y=None, num_data=None)``, samples every weight site from the prior,
    records the network outputs as the deterministic site ``"f"`` and observes ``y`` at ``"obs"``
    in a ``"data"`` plate scaled to ``num_data`` points (minibatches).

    The model's learned parameters (a Gaussian likelihood's ``log_noise_scale``) are registered
    with Pyro under the name :attr:`pyro_name` on every call (:func:`register_with_pyro`), so
    ``pyro.infer.SVI`` with a ``pyro.optim`` optimiser trains them as point estimates (type II
    maximum likelihood), and ``Predictive``, ``poutine`` handlers and autoguides see an ordinary
    Pyro model.
    """

    #: the prefix of the model's parameters in Pyro's param store
    pyro_name = "model"

    def __init__(self, net: Network, prior: nn.Module, likelihood: Likelihood):
        super().__init__()
        self.net = net
        self.prior = prior
        self.likelihood = likelihood

    @property
    def task(self) -> str:
        return self.likelihood.task

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        register_with_pyro(self.pyro_name, self)
        params = self.prior()
        f = pyro.deterministic("f", self.net(x, params))
        return self.likelihood(f, y, num_data)
