"""The baseline: FedAvg (McMahan et al. 2017) of Adam-trained clients, on Flower's own ``FedAvg``.

Each client trains the plain PyTorch network (:meth:`~bnnzoo.models.networks.Network.to_torch`) on its local
data for ``epochs`` epochs of Adam (lr 1e-3, its optimiser state kept between rounds) from the
global weights, and returns its weights; Flower's ``FedAvg`` averages them weighted by the clients'
numbers of examples. Regression minimises the mean squared error of the standardised targets,
classification the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAvg

from bnnzoo.guides.training import minibatches

from .client import StandardizedClient


def get_weights(module: torch.nn.Module) -> list:
    return [t.detach().cpu().numpy() for t in module.state_dict().values()]


@torch.no_grad()
def set_weights(module: torch.nn.Module, arrays) -> None:
    state = module.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"expected {len(state)} weight arrays, got {len(arrays)}")
    for (name, t), a in zip(state.items(), arrays):
        t.copy_(torch.as_tensor(a, device=t.device).reshape(t.shape))


def loss_fn(task: str):
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y)
    return lambda out, y: F.mse_loss(out.squeeze(-1), y)


class AdamClient(StandardizedClient):
    """A FedAvg client training ``module`` (a plain ``nn.Module``) with Adam on its local data; it
    reports ``train_loss``, the mean loss of the round's last local epoch."""

    def __init__(self, module: torch.nn.Module, x, y, task: str, batch_size: int, lr: float = 1e-3, seed: int = 0,
                 device="cpu"):
        super().__init__(x, y, task, device)
        self.module = module.to(self.device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.batch_size, self.seed, self.loss = batch_size, seed, loss_fn(task)

    def local_fit(self, parameters, config):
        x, y = self.local_data(config)
        set_weights(self.module, parameters)
        torch.manual_seed(self.seed + int(config.get("round", 0)))
        loop = self.local_epochs(config, "FedAvg client")
        for _ in loop:
            total = torch.zeros((), device=self.device)
            for idx in minibatches(len(x), self.batch_size, self.device):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.module(x[idx]), y[idx])
                loss.backward()
                self.optimizer.step()
                total += loss.detach() * len(idx)
            loop.end_epoch(total / len(x))
        return get_weights(self.module), len(x), {"train_loss": self.history.loss[-1]}


def fedavg_strategy(module: torch.nn.Module, *, local_epochs: int = 1, evaluate_fn=None) -> FedAvg:
    """Flower's ``FedAvg`` over every connected client, tolerating failed clients; the round number
    and local epochs go to the clients in the fit configuration."""
    return FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=0,
                  min_available_clients=1, accept_failures=True, evaluate_fn=evaluate_fn,
                  on_fit_config_fn=lambda rnd: {"stage": "fedavg", "epochs": local_epochs, "round": rnd},
                  initial_parameters=ndarrays_to_parameters(get_weights(module)))
