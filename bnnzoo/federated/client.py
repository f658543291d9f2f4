"""The client side of federated EM-TDAMP: TDAMP passes on the local data, the global posterior as prior.

Each round the client receives the global posterior (:mod:`.codec`), sets it as its guide's state
(the global posterior is the prior of its local passes: :meth:`~bnnzoo.guides.TDAMPGuide.set_state`),
runs ``epochs`` TDAMP passes over its own examples (with the geometric weighting, its messages
scaled so that the local posterior stands for the whole training set: :func:`local_passes`) and
returns its local posterior: slab means and variances, inclusion probabilities and the noise
statistics of its passes. The EM step is the server's. Before the first round every client answers
the statistics round (:mod:`.standardize`). These classes hold the local computation only; the
Flower ``ClientApp`` that runs them on the messages of the server is :mod:`.client_app`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bnnzoo.guides.training import EpochLoop, TrainingHistory, minibatches

from . import codec
from .standardize import STANDARDIZER_KEY, decode, moments


def local_passes(n: int, config) -> tuple[int, float]:
    """The ``(num_data, likelihood_scale)`` of a client's TDAMP passes over its ``n`` examples, from
    the round's ``config``: ``num_data`` there is the whole training set's size ``N`` (0: unknown,
    the client's own), ``round_data`` the examples ``N_r`` held by the round's clients (0 or absent:
    every client takes part, ``N_r = N``), ``weighting`` the server's aggregation (:mod:`.strategy`).

    ``"geometric"``: the forgetting rate of ``n N / N_r`` examples and the messages scaled by
    ``N_r / n``: the scaled likelihood stands for the whole training set (``scale * num_data = N``),
    and an epoch forgets the share ``N_r / N`` of a centralised pass, the share of the data the
    round holds, so the weighted geometric mean of the round's clients moves as a centralised pass
    over their examples would. With every client in the round this is the rate of the client's own
    ``n`` examples and the scale ``N / n``. ``"product"``: the rate of ``N`` examples, unscaled
    messages (a round adds the client's share of one pass)."""
    total = int(config.get("num_data", 0)) or n
    if total < n:
        raise ValueError(f"the training set of {total} examples cannot hold this client's {n}")
    if config.get("weighting", "geometric") == "product":
        return total, 1.0
    share = int(config.get("round_data", 0)) or total
    if not n <= share <= total:
        raise ValueError(f"the round's clients hold {share} examples: at least this client's {n}, at most the "
                         f"training set's {total}")
    num_data = max(n, round(n * total / share))
    return num_data, total / num_data


class StandardizedClient(ABC):
    """Base of the clients: holds the raw local data, answers the statistics round
    (:meth:`statistics`) and keeps the local data standardised with the server's statistics (on
    ``device``, converted once).

    The local epochs of every round run in an :class:`~bnnzoo.guides.training.EpochLoop` (timing,
    divergence check) recording into :attr:`history`, one entry per local epoch over all rounds; a
    diverging client raises :class:`~bnnzoo.guides.training.DivergenceError`, which the
    ``ClientApp`` reports to the server as that client's failure of the round. :attr:`rounds_done`
    counts the local rounds it ran."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task: str, device):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"a client needs matching, non-empty inputs and targets, got {len(x)} and {len(y)}")
        self.x_raw, self.y_raw, self.task, self.device = x, y, task, torch.device(device)
        self._blob, self.x, self.y = None, None, None
        self.history = TrainingHistory()
        self.rounds_done = 0  # local rounds run (the statistics round not counted)

    def statistics(self) -> list:
        """The statistics round's reply: the local count, sums and sums of squares (:func:`.standardize.moments`)."""
        return moments(self.x_raw, self.y_raw, self.task)

    def local_epochs(self, config, method: str) -> EpochLoop:
        """The epoch loop of one round's ``config["epochs"]`` local epochs, recording into :attr:`history`."""
        return EpochLoop(int(config.get("epochs", 1)), method=method, history=self.history)

    def local_data(self, config) -> tuple[torch.Tensor, torch.Tensor]:
        blob = config[STANDARDIZER_KEY]
        if blob != self._blob:
            std = decode(blob, self.device)
            self.x = std.x(self.x_raw.to(self.device))
            self.y = std.y(self.y_raw.to(self.device))
            self._blob = blob
        return self.x, self.y

    def fit(self, parameters, config):
        """One round of local training from the global ``parameters`` (numpy arrays) under the
        round's ``config``: ``(arrays, num_examples, metrics)``."""
        out = self.local_fit(parameters, config)
        self.rounds_done += 1
        return out

    @abstractmethod
    def local_fit(self, parameters, config):
        """One round of local training from the global ``parameters``: what each kind of client
        (EM-TDAMP, FedAvg's Adam) defines; returns ``(arrays, num_examples, metrics)``."""


class TDAMPClient(StandardizedClient):
    """A client of federated EM-TDAMP (module docstring). ``posterior`` is a
    :class:`~bnnzoo.methods.tdamp.TDAMPPosterior` of the same configuration as the server's; its
    guide's state is replaced by the global posterior every round. An epoch's loss in
    :attr:`history` is its negative log evidence per local example."""

    def __init__(self, posterior, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
        super().__init__(x, y, posterior.task, posterior.device)
        self.guide = posterior.guide
        self.batch_size = posterior.config["train"]["batch_size"]
        self.global_layout = codec.global_layout(posterior.net)
        self.reply_layout = codec.reply_layout(posterior.net)
        self.generator_seed = seed

    def local_fit(self, parameters, config):
        x, y = self.local_data(config)
        n = len(x)
        num_data, scale = local_passes(n, config)
        self.guide.set_state(codec.from_ndarrays(parameters, self.global_layout, self.device))
        self.guide.reset_statistics()
        torch.manual_seed(self.generator_seed + int(config.get("round", 0)))
        loop = self.local_epochs(config, "federated EM-TDAMP client")
        for _ in loop:  # the pass statistics add up over the round's epochs: the server reads their sums
            before = self.guide.log_evidence_sum.clone()
            for idx in minibatches(n, self.batch_size, self.device):
                self.guide.update(x[idx], y[idx], num_data, likelihood_scale=scale)
            loop.end_epoch((before - self.guide.log_evidence_sum) / n)  # negative log evidence per example
        self.guide.check_finite()
        state = self.guide.state()
        seen = float(state["num_seen"])
        return (codec.to_ndarrays(state, self.reply_layout), n,
                {"log_evidence": float(state["log_evidence_sum"]) / max(seen, 1.0)})
