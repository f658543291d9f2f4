"""Simulated federated runs: Flower's Simulation Runtime (``flwr.simulation.run_simulation``, Ray).

:func:`run_federated` partitions a :class:`~bnnzoo.data.Dataset`'s training set over ``num_clients``
clients (:mod:`.partition`) and runs the run's ServerApp (:class:`~.server_app.FederatedServer`,
in a thread of this process) and ClientApp (:func:`~.client_app.client_app`, one virtual SuperNode
per client, executed by Ray actors) in Flower's Simulation Runtime: the statistics round, then
``rounds`` rounds of federated EM-TDAMP (:mod:`.strategy`) or of FedAvg (:mod:`.fedavg`) on
``clients_per_round`` sampled clients. The held-out data never leave the server, which evaluates
the global model after every ``eval_every`` rounds. Across machines the same ServerApp and
ClientApp run on Flower's SuperLink and SuperNodes (``flwr run``; :mod:`.settings`).

Ray runs ``workers`` actors of one CPU each (default: the CPUs torch may use, at most the number of
clients); each client's torch uses ``threads`` threads.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

from flwr.simulation import run_simulation

from bnnzoo.errors import ConfigError

from .client_app import client_app
from .partition import partition as make_partition
from .server_app import (
    FEDERATED_BATCH_SIZE,
    FederatedServer,
    build_posterior,
    test_metrics,
)
from .settings import METHODS, FederatedError

__all__ = ["FEDERATED_BATCH_SIZE", "METHODS", "FederatedError", "FederatedRun", "FederatedServer", "build_posterior",
           "quiet_flower", "run_federated", "test_metrics"]


@dataclass
class FederatedRun:
    """The outcome of a run: ``model`` (the server's :class:`~bnnzoo.methods.tdamp.TDAMPPosterior`,
    fitted and pruned, or the FedAvg ``nn.Module``), the ``standardizer``, per-round ``history``
    (``eval_round`` and the test metrics, plus per round the clients that answered and failed, and
    the strategy's own records for EM-TDAMP), the clients' ``partition_sizes``, the wall-clock
    ``seconds`` of the whole simulation (Ray's start included); ``failed_clients`` (name -> the
    round and reason) names the clients the run went on without, ``rounds`` the clients asked and
    answering per round."""

    method: str
    model: object
    standardizer: object
    history: dict
    partition_sizes: list
    seconds: float
    config: dict = field(default_factory=dict)
    failed_clients: dict = field(default_factory=dict)
    rounds: list = field(default_factory=list)


def quiet_flower(level: int = logging.CRITICAL) -> None:
    """Silence Flower's console logging below ``level`` (bnnzoo reports failures in its own words)."""
    logging.getLogger("flwr").setLevel(level)


def _workers(workers: int | None, num_clients: int) -> int:
    if workers is None:
        return max(1, min(num_clients, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    return workers


def run_federated(data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                  clients_per_round: int | None = None, partition: str = "iid", alpha: float = 0.5,
                  local_epochs: int = 1, seed: int = 0, device="cpu", network: dict | None = None,
                  weighting: str = "geometric", eval_every: int = 1, eval_samples: int = 10, lr: float = 1e-3,
                  threads: int | None = 1, workers: int | None = None, quiet: bool = True,
                  crash: tuple[int, int] | None = None, round_timeout: float | None = 600.0,
                  min_clients: float | None = None, report=None, **options) -> FederatedRun:
    """Simulate ``rounds`` rounds of ``method`` ("em-tdamp" or "fedavg") over ``num_clients``
    clients, ``clients_per_round`` of them sampled each round (module docstring). ``weighting``
    ("geometric" or "product", see :mod:`.strategy`) applies to EM-TDAMP; ``options`` go to the
    EM-TDAMP configuration (``keep``, ``batch_size``, ``damping``, ...; the network and batch size
    also serve FedAvg). The held-out split is evaluated with ``eval_samples`` posterior draws after
    every ``eval_every`` rounds. ``min_clients`` (a count or a fraction of the clients asked per
    round; default all) and ``round_timeout`` are the server's (:class:`~.server_app.FederatedServer`);
    ``crash=(client, round)`` makes that client fail when that round's work arrives. The clients
    are named "client 0", "client 1", ...; a run that stops short raises
    :class:`~.settings.FederatedError`."""
    server = FederatedServer(data, method=method, num_clients=num_clients, rounds=rounds,
                             clients_per_round=clients_per_round, local_epochs=local_epochs, seed=seed, device=device,
                             network=network, weighting=weighting, eval_every=eval_every, eval_samples=eval_samples,
                             min_clients=min_clients, round_timeout=round_timeout, wait_timeout=120.0, lr=lr,
                             report=report, **options)
    parts = make_partition(data.y_train, num_clients, partition, seed=seed, alpha=alpha)
    n_workers = _workers(workers, num_clients)
    gpu = 1.0 / n_workers if server.device.type == "cuda" else 0.0
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": gpu},
               "init_args": {"num_cpus": n_workers, "num_gpus": 1 if gpu else 0,
                             "logging_level": "ERROR" if quiet else "WARNING", "log_to_driver": not quiet}}
    if quiet:
        quiet_flower()
    start = time.perf_counter()
    with warnings.catch_warnings():
        if quiet:  # Ray's notice about a future default of its GPU settings, which these runs do not use
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        run_simulation(server.server_app(), client_app(data, parts, threads=threads, crash=crash), num_clients,
                       backend_config=backend, verbose_logging=False)
    if len(server.history["round"]) < rounds:  # Flower logs a ServerApp's exception; the server keeps its record
        raise FederatedError(f"the simulation ended after {len(server.history['round'])} of {rounds} rounds; "
                             f"{server._summary()}")
    return FederatedRun(method, server.model, server.standardizer, server.history, [len(p) for p in parts],
                        time.perf_counter() - start, copy.deepcopy(server.posterior.config), dict(server.failed),
                        list(server.rounds_log))
