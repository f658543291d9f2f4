"""The baseline: FedAvg (McMahan et al. 2017) of Adam-trained clients.

Each client trains the plain PyTorch network (:meth:`~bnnzoo.models.networks.Network.to_torch`) on its local
data for ``epochs`` epochs of Adam (lr 1e-3, its optimiser state kept between the rounds it takes
part in: :meth:`AdamClient.optimizer_state`, which the ``ClientApp`` keeps in the node's Flower
context) from the global weights, and returns its weights; the server averages them weighted by the
clients' numbers of examples (:func:`weighted_average`, FedAvg's aggregation). Regression minimises
the mean squared error of the standardised targets, classification the cross-entropy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bnnzoo.guides.training import minibatches

from .client import StandardizedClient


def get_weights(module: torch.nn.Module) -> list:
    """The module's state as numpy arrays, copies (never views of the live parameters)."""
    return [t.detach().cpu().numpy().copy() for t in module.state_dict().values()]


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

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Adam's state (step counts and moment estimates per parameter) as named CPU tensors,
        empty before the first step: what the node keeps between the rounds it takes part in."""
        out = {}
        for i, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{i}.{key}"] = torch.as_tensor(value).detach().cpu()
        return out

    def load_optimizer_state(self, tensors: dict) -> None:
        """Restore Adam's state from :meth:`optimizer_state` (nothing to do when empty)."""
        if not tensors:
            return
        state: dict = {}
        for name, value in tensors.items():
            i, _, key = name.partition(".")
            t = torch.as_tensor(value)
            state.setdefault(int(i), {})[key] = t if key == "step" else t.to(self.device)
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})

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


def weighted_average(results: list[tuple[list, int]]) -> list[np.ndarray]:
    """FedAvg's aggregation: the clients' weight arrays averaged with weights proportional to their
    numbers of examples (``results``: ``(arrays, num_examples)`` per client, at least one)."""
    if not results:
        raise ValueError("FedAvg needs at least one client's weights")
    total = float(sum(n for _, n in results))
    if not total > 0:
        raise ValueError("the clients reported no training examples")
    out = []
    for layer in zip(*(arrays for arrays, _ in results)):
        acc = np.zeros(np.shape(layer[0]), dtype=np.float64)
        for a, (_, n) in zip(layer, results):
            acc += np.asarray(a, dtype=np.float64) * (n / total)
        out.append(acc.astype(np.asarray(layer[0]).dtype))
    return out
