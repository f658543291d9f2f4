"""The Flower client of federated EM-TDAMP: TDAMP passes on the local data, the global posterior as prior.

Each round the client receives the global posterior (:mod:`.codec`), sets it as its guide's state
(the global posterior is the prior of its local passes: :meth:`~bnnzoo.guides.TDAMPGuide.set_state`),
runs ``epochs`` TDAMP passes over its own examples (with the geometric weighting, its messages
scaled so that the local posterior stands for the whole training set: :func:`local_passes`) and
returns its local posterior: slab means and variances, inclusion probabilities and the noise
statistics of its passes. The EM step is the server's. Round 1 of a run is the statistics round
(:mod:`.standardize`), which also carries the handshake (:mod:`.handshake`).
"""

from __future__ import annotations

import json
from abc import abstractmethod

import torch
from flwr.client import NumPyClient

from bnnzoo.guides.training import EpochLoop, TrainingHistory, minibatches

from . import codec, handshake
from .standardize import STAGE_KEY, STANDARDIZER_KEY, STATISTICS, decode, moments


def local_passes(n: int, config) -> tuple[int, float]:
    """The ``(num_data, likelihood_scale)`` of a client's TDAMP passes over its ``n`` examples, from
    the round's ``config``: ``num_data`` there is the whole training set's size (0: unknown, the
    client's own), ``weighting`` the server's aggregation (:mod:`.strategy`).

    ``"geometric"``: the forgetting rate of the client's own ``n`` examples and its messages scaled
    by ``num_data / n``, so the local posterior stands for the whole training set (the client's
    likelihood raised to ``num_data / n``). ``"product"``: the rate of ``num_data`` examples,
    unscaled messages (a round adds the client's share of one pass)."""
    total = int(config.get("num_data", 0)) or n
    if total < n:
        raise ValueError(f"the training set of {total} examples cannot hold this client's {n}")
    if config.get("weighting", "geometric") == "product":
        return total, 1.0
    return n, total / n


class StandardizedClient(NumPyClient):
    """Base of the clients: holds the raw local data, answers the statistics round and keeps the
    local data standardised with the server's statistics (on ``device``, converted once).

    The local epochs of every round run in an :class:`~bnnzoo.guides.training.EpochLoop` (timing,
    divergence check) recording into :attr:`history`, one entry per local epoch over all rounds; a
    diverging client raises :class:`~bnnzoo.guides.training.DivergenceError`, which Flower reports
    to the server as a failure of that round.

    Introduced (:meth:`introduce`), a client answers the handshake of the statistics round with
    its name, run spec and token, and records in :attr:`refusal` how its spec differs from the
    server's; :attr:`rounds_done` counts the local rounds it ran."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task: str, device):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"a client needs matching, non-empty inputs and targets, got {len(x)} and {len(y)}")
        self.x_raw, self.y_raw, self.task, self.device = x, y, task, torch.device(device)
        self._blob, self.x, self.y = None, None, None
        self.history = TrainingHistory()
        self.identity: dict | None = None  # the handshake reply (see introduce)
        self._spec: dict | None = None
        self.refusal: list[str] = []  # how this client's run spec differs from the server's
        self.rounds_done = 0  # local rounds run (the statistics round not counted)

    def introduce(self, name: str, spec: dict, token: str | None = None) -> None:
        """Take part in the server's handshake (:mod:`.handshake`) as ``name`` with the run spec
        ``spec`` and the shared ``token``: the statistics round's reply then carries them, and
        :attr:`refusal` lists how ``spec`` differs from the server's."""
        self.identity = handshake.introduce(name, spec, token)
        self._spec = spec

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
        if config.get(STAGE_KEY) == STATISTICS:
            metrics = {}
            if self.identity is not None:
                metrics = dict(self.identity)
                if handshake.HANDSHAKE_KEY in config:
                    self.refusal = handshake.mismatches(json.loads(str(config[handshake.HANDSHAKE_KEY])), self._spec)
            return moments(self.x_raw, self.y_raw, self.task), len(self.x_raw), metrics
        out = self.local_fit(parameters, config)
        self.rounds_done += 1
        return out

    def evaluate(self, parameters, config):
        """The clients evaluate nothing (the server holds the test data); the one evaluation
        instruction they get is the server's notice that the run stopped (stage ``"abort"``), raised
        here as :class:`~.handshake.FederatedError` with the server's reason."""
        if config.get(STAGE_KEY) == handshake.ABORT:
            raise handshake.FederatedError(f"the server stopped the run: {config.get(handshake.REASON_KEY, '')}")
        return 0.0, 0, {}

    @abstractmethod
    def local_fit(self, parameters, config):
        """One round of local training from the global ``parameters``: what each kind of client
        (EM-TDAMP, FedAvg's Adam) defines; returns Flower's ``(parameters, num_examples, metrics)``."""


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
