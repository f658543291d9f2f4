"""The baseline: FedAvg (McMahan et al. 2017) of Adam-trained clients, on Flower's ``FedAvg`` strategy.

Each client trains the plain PyTorch network (:meth:`~bnnzoo.models.networks.Network.to_torch`) on its local
data for ``epochs`` epochs of Adam (lr 1e-3, its optimiser state kept between the rounds it takes
part in: :meth:`AdamClient.optimizer_state`, which the ``ClientApp`` keeps in the node's Flower
context) from the global weights, and returns its weights (the network's state dict) and its
number of examples. Regression minimises the mean squared error of the standardised targets,
classification the cross-entropy.

The server is Flower's :class:`flwr.serverapp.strategy.FedAvg`: its round loop
(:meth:`~flwr.serverapp.strategy.Strategy.start`), its train messages (the global ``ArrayRecord``
and the run's ``ConfigRecord`` with Flower's ``"server-round"``), its aggregation
(:meth:`~flwr.serverapp.strategy.FedAvg.aggregate_train`: the clients' ``ArrayRecord`` averaged
with weights proportional to the ``"num-examples"`` of their ``MetricRecord``, and their metrics
alike) and its server-side evaluation hook (``evaluate_fn``). :class:`SeededFedAvg` changes only
how a round's clients are drawn: Flower's draw uses the ``random`` module's global generator over
the SuperLink's node ids, which are random numbers, so no seed could make it pick the same clients
twice; its draw is a seeded one over the run's clients in a fixed order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from bnnzoo.errors import ConfigError
from bnnzoo.guides.training import minibatches

from .client import StandardizedClient


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as CPU copies (never views of the live parameters)."""
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}


def loss_fn(task: str):
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y)
    return lambda out, y: F.mse_loss(out.squeeze(-1), y)


class AdamClient(StandardizedClient):
    """A FedAvg client training ``module`` (a plain ``nn.Module``) with Adam on its local data.

    A round (:meth:`~.client.StandardizedClient.fit`) loads the global ``parameters`` (a state dict
    of ``module``: names to tensors, as Flower's ``ArrayRecord.to_torch_state_dict`` gives them),
    runs the round's local epochs and returns ``(state, num_examples, {"train_loss": ...})``: the
    trained state dict (CPU copies), the number of local examples and the mean loss of the round's
    last local epoch."""

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
        self.module.load_state_dict(parameters)  # strict: the names and shapes of this network
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
        return state_of(self.module), len(x), {"train_loss": self.history.loss[-1]}


class SeededFedAvg(FedAvg):
    """Flower's ``FedAvg`` whose clients of each round are a seeded draw (module docstring).

    ``nodes``: the node ids of the run's clients in a reproducible order (the server orders them by
    the clients' names); each round asks ``max(int(len(nodes) * fraction_train), min_train_nodes)``
    of them, Flower's count, with ``fraction_train = clients_per_round / len(nodes)`` and
    ``min_train_nodes = clients_per_round``: ``clients_per_round`` clients drawn without replacement
    by a ``random.Random(seed)`` of the strategy's own, one draw per round (the same seed and order
    ask the same clients in every round). There is no federated evaluation (``fraction_evaluate``
    0): the server evaluates the global model itself (``evaluate_fn`` of ``start``).

    The replies of a round are aggregated in the order of ``nodes`` (the sum of the weighted arrays
    then does not depend on the order the replies arrive in). ``on_replies(server_round, asked,
    replies)``, when given, sees every round's asked node ids and all its replies (errors
    included) before the aggregation and may raise to stop the run. :attr:`asked`: the node ids
    asked in each round."""

    def __init__(self, nodes: Sequence[int], clients_per_round: int, *, seed: int = 0,
                 on_replies: Callable[[int, list[int], list[Message]], None] | None = None, **kwargs):
        nodes = list(nodes)
        if len(set(nodes)) != len(nodes) or not nodes:
            raise ConfigError(f"the run's clients must be distinct node ids, at least one, got {nodes!r}")
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) \
                or not 1 <= clients_per_round <= len(nodes):
            raise ConfigError(f"clients_per_round must be a count from 1 to {len(nodes)} (the clients), "
                              f"got {clients_per_round!r}")
        super().__init__(fraction_train=clients_per_round / len(nodes), min_train_nodes=clients_per_round,
                         min_available_nodes=clients_per_round, fraction_evaluate=0.0, **kwargs)
        self.nodes, self.seed, self.on_replies = nodes, seed, on_replies
        self.sampler = random.Random(seed)
        self.asked: dict[int, list[int]] = {}

    def __repr__(self) -> str:
        return (f"SeededFedAvg({len(self.nodes)} clients, {self.min_train_nodes} per round, seed={self.seed}, "
                f"weighted by {self.weighted_by_key!r})")

    def sample(self, server_round: int) -> list[int]:
        """The node ids asked in round ``server_round`` (sorted): the next seeded draw."""
        size = min(max(int(len(self.nodes) * self.fraction_train), self.min_train_nodes), len(self.nodes))
        self.asked[server_round] = sorted(self.sampler.sample(self.nodes, size))
        return self.asked[server_round]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's train messages (the global ``arrays`` and ``config`` with ``"server-round"``)
        to the round's seeded draw of clients (:meth:`sample`)."""
        if self.fraction_train == 0.0:
            return []
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.sample(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``on_replies``, then Flower's ``FedAvg.aggregate_train`` on the replies in the order of
        the run's clients."""
        replies = list(replies)
        if self.on_replies is not None:
            self.on_replies(server_round, list(self.asked.get(server_round, [])), replies)
        order = {node: k for k, node in enumerate(self.nodes)}
        replies.sort(key=lambda reply: order.get(reply.metadata.src_node_id, len(order)))
        return super().aggregate_train(server_round, replies)
