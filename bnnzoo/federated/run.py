"""One-machine federated runs: a Flower server in this process, one process per client, gRPC on loopback.

:func:`run_federated` partitions a :class:`~bnnzoo.data.Dataset`'s training set over ``num_clients``
clients (:mod:`.partition`), starts each client in its own process (``multiprocessing``, fork where available;
each connects with ``flwr.client.start_client`` to ``127.0.0.1:<free port>``) and runs the server
here (:class:`FederatedServer`, ``flwr.server.start_server``): round 1 collects the standardisation statistics
(:mod:`.standardize`), then ``rounds`` rounds of federated EM-TDAMP (:mod:`.strategy`) or of FedAvg
(:mod:`.fedavg`). The held-out data never leave the server, which evaluates the global model
after every ``eval_every`` rounds. Across machines the same pieces run as ``bnnzoo federated
--serve HOST:PORT`` on the server and ``bnnzoo federated-client --server HOST:PORT`` on each client.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass, field

import torch
from flwr.client import start_client as flower_start_client
from flwr.server import ServerConfig, start_server

from bnnzoo.api import create
from bnnzoo.catalog import get_entry
from bnnzoo.devices import resolve_device
from bnnzoo.metrics import accuracy

from .client import TDAMPClient
from .fedavg import AdamClient, fedavg_strategy, set_weights
from .partition import partition as make_partition
from .standardize import StandardizingStrategy
from .strategy import FederatedTDAMP

METHODS = ("em-tdamp", "fedavg")


@dataclass
class FederatedRun:
    """The outcome of a run: ``model`` (the server's :class:`~bnnzoo.methods.tdamp.TDAMPPosterior`,
    fitted and pruned, or the FedAvg ``nn.Module``), the ``standardizer``, per-round ``history``
    (``eval_round`` and the test metrics, plus the strategy's own records for EM-TDAMP), the
    clients' ``partition_sizes`` and the wall-clock ``seconds``."""

    method: str
    model: object
    standardizer: object
    history: dict
    partition_sizes: list
    seconds: float
    config: dict = field(default_factory=dict)


def quiet_flower(level: int = logging.ERROR) -> None:
    """Silence Flower's console logging below ``level``."""
    logging.getLogger("flwr").setLevel(level)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_posterior(data, *, network=None, device="cpu", seed: int = 0, **options):
    """The EM-TDAMP posterior of ``data`` (its network also serves the FedAvg baseline)."""
    return create("em-tdamp", data.task, data.input_shape, data.output_dim, network=network,
                  dataset=data.name, device=device, seed=seed, **options)


def make_client(spec: dict, x: torch.Tensor, y: torch.Tensor):
    """The Flower client a client process runs, from a picklable ``spec`` (see :func:`client_spec`)."""
    posterior = get_entry("em-tdamp").create(copy.deepcopy(spec["config"]), device=spec["device"])
    if spec["method"] == "em-tdamp":
        return TDAMPClient(posterior, x, y, seed=spec["seed"])
    torch.manual_seed(spec["config"]["seed"])
    return AdamClient(posterior.net.to_torch(), x, y, posterior.task, spec["config"]["train"]["batch_size"],
                      lr=spec["lr"], seed=spec["seed"], device=spec["device"])


def client_spec(method: str, config: dict, device, seed: int, lr: float = 1e-3) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown federated method {method!r}; choose from {METHODS}")
    return {"method": method, "config": copy.deepcopy(config), "device": str(device), "seed": int(seed), "lr": lr}


def start_client(address: str, spec: dict, x: torch.Tensor, y: torch.Tensor, *, threads: int | None = None,
                 quiet: bool = True, crash_round: int | None = None) -> None:
    """Connect a client to the server at ``address`` and serve until the run ends (blocking).
    ``crash_round`` makes the process exit abruptly when that round's work arrives (fault injection:
    a client disconnecting mid-round)."""
    if threads:
        torch.set_num_threads(threads)
    if quiet:
        quiet_flower()
    if torch.device(spec["device"]).type == "cpu":
        torch.set_flush_denormal(True)  # as the centralised fit: tiny beliefs must not turn subnormal
    client = make_client(spec, x, y)
    if crash_round is not None:
        inner = client.fit

        def fit(parameters, config):
            if config.get("stage") != "statistics" and int(config.get("round", 0)) == crash_round:
                os._exit(3)
            return inner(parameters, config)

        client.fit = fit
    flower_start_client(server_address=address, client=client.to_client())


def wait_for_server(address: str, timeout: float = 600.0) -> None:
    """Block until ``address`` (host:port) accepts TCP connections, polling every 50 ms (a client
    started before its server would otherwise sit in Flower's exponential reconnect back-off)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server listening at {address} after {timeout:.0f} s") from None
            time.sleep(0.05)


def _client_process(address, spec, x, y, threads, quiet, crash_round):
    wait_for_server(address)
    start_client(address, spec, x, y, threads=threads, quiet=quiet, crash_round=crash_round)


def test_metrics(task: str, y_test: torch.Tensor):
    """``metrics(pred)`` for the server's evaluation: regression ``nmse`` (MSE / var y), ``rmse``;
    classification ``error`` and ``accuracy``. ``pred`` is a posterior's
    :class:`~bnnzoo.posterior.Prediction` mean/probs or a network's outputs in original units."""
    if task == "regression":
        var_y = float(y_test.var())

        def regression(mean):
            mse = float(((mean.reshape(-1) - y_test.to(mean.device)) ** 2).mean())
            return {"nmse": mse / var_y, "rmse": mse ** 0.5}
        return regression

    def classification(probs):
        acc = accuracy(probs, y_test.to(probs.device))
        return {"error": 1.0 - acc, "accuracy": acc}
    return classification


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class FederatedServer:
    """The server side of a run (also run alone on a server machine, ``bnnzoo federated --serve``):
    the statistics round, then ``rounds`` rounds of ``method``, with the global model evaluated on
    ``data``'s test split after every ``eval_every`` rounds. :meth:`serve` blocks until the run ends."""

    def __init__(self, data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                 local_epochs: int = 1, seed: int = 0, device="cpu", network: dict | None = None,
                 weighting: str = "geometric", eval_every: int = 1, eval_samples: int = 10, quiet: bool = True,
                 **options):
        if method not in METHODS:
            raise ValueError(f"unknown federated method {method!r}; choose from {METHODS}")
        _check_positive_ints(num_clients=num_clients, rounds=rounds, eval_every=eval_every, local_epochs=local_epochs)
        self.method, self.rounds, self.data = method, rounds, data
        self.device = device = resolve_device(device)
        if quiet:
            quiet_flower()
        self.posterior = posterior = build_posterior(data, network=network, device=device, seed=seed, **options)
        self.history: dict[str, list] = {"eval_round": [], "eval_seconds": [], "wall_seconds": []}
        self.standardizer = None
        score = test_metrics(data.task, data.y_test)
        x_test = data.x_test
        ready = {}

        def record(rnd, metrics, start):
            self.history["eval_round"].append(rnd)
            self.history["wall_seconds"].append(time.perf_counter() - ready["at"])
            self.history["eval_seconds"].append(time.perf_counter() - start)
            for key, value in metrics.items():
                self.history.setdefault(key, []).append(value)
            return next(iter(metrics.values())), metrics

        def due(rnd):
            return rnd >= 1 and (rnd % eval_every == 0 or rnd == rounds)

        if method == "em-tdamp":
            def evaluate_tdamp(rnd, post):
                if not due(rnd):
                    return None
                start = time.perf_counter()
                pred = post.predict(x_test, num_samples=eval_samples)
                return record(rnd, score(pred.probs if data.task == "classification" else pred.mean), start)

            self.inner = FederatedTDAMP(posterior, len(data.y_train), local_epochs=local_epochs, weighting=weighting,
                                        evaluate_fn=evaluate_tdamp)
            self.model = posterior
        else:
            torch.manual_seed(seed)
            self.model = model = posterior.net.to_torch().to(device)

            @torch.no_grad()
            def evaluate_fedavg(rnd, arrays, config):
                if not due(rnd):
                    return None
                start = time.perf_counter()
                set_weights(model, arrays)
                std = self.standardizer
                out = torch.cat([model(std.x(x_test[i:i + 4096].to(device))) for i in range(0, len(x_test), 4096)])
                pred = torch.softmax(out, -1) if data.task == "classification" else std.y_inverse(out.squeeze(-1))
                return record(rnd, score(pred), start)

            self.inner = fedavg_strategy(model, local_epochs=local_epochs, evaluate_fn=evaluate_fedavg)

        def on_standardizer(std):
            self.standardizer = posterior.standardizer = std.to(device)
            ready["at"] = time.perf_counter()

        self.strategy = StandardizingStrategy(self.inner, num_clients, data.task, image=len(data.input_shape) > 1,
                                              on_standardizer=on_standardizer)

    def client_spec(self, seed: int, lr: float = 1e-3) -> dict:
        return client_spec(self.method, self.posterior.config, self.device, seed, lr)

    def serve(self, address: str, round_timeout: float | None = 600.0):
        """Run the server at ``address`` until the last round; returns the fitted model (the
        EM-TDAMP posterior pruned by its own rule, or the FedAvg network)."""
        start_server(server_address=address, config=ServerConfig(num_rounds=self.rounds + 1, round_timeout=round_timeout),
                     strategy=self.strategy)
        if self.method == "em-tdamp":
            self.history.update(self.inner.history)
            if self.posterior.prune_at_end:
                self.model = self.posterior.prune()
        return self.model


def run_federated(data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                  partition: str = "iid", alpha: float = 0.5, local_epochs: int = 1, seed: int = 0, device="cpu",
                  network: dict | None = None, weighting: str = "geometric", eval_every: int = 1,
                  eval_samples: int = 10, lr: float = 1e-3, threads: int | None = 1, quiet: bool = True,
                  crash: tuple[int, int] | None = None, round_timeout: float | None = 600.0, **options) -> FederatedRun:
    """Run ``rounds`` rounds of ``method`` ("em-tdamp" or "fedavg") over ``num_clients`` local
    client processes on loopback (module docstring). ``weighting`` ("geometric" or "product", see
    :mod:`.strategy`) applies to EM-TDAMP; ``options`` go to the EM-TDAMP configuration (``keep``,
    ``batch_size``, ``damping``, ...; the network and batch size also serve FedAvg). The held-out
    split is evaluated with ``eval_samples`` posterior draws after every ``eval_every`` rounds.
    ``crash=(client, round)`` makes that client exit abruptly when that round's work arrives."""
    server = FederatedServer(data, method=method, num_clients=num_clients, rounds=rounds, local_epochs=local_epochs,
                             seed=seed, device=device, network=network, weighting=weighting, eval_every=eval_every,
                             eval_samples=eval_samples, quiet=quiet, **options)
    parts = make_partition(data.y_train, num_clients, partition, seed=seed, alpha=alpha)
    address = f"127.0.0.1:{free_port()}"
    # fork (where the platform has it, on CPU): a client starts at once, without importing torch,
    # Pyro and Flower again; its torch runs single-threaded (``threads``). CUDA cannot cross a fork.
    fork = server.device.type == "cpu" and "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    procs = []
    start = time.perf_counter()
    finished = False
    try:
        for k, idx in enumerate(parts):
            crash_round = crash[1] if crash is not None and crash[0] == k else None
            proc = ctx.Process(target=_client_process, daemon=True,
                               args=(address, server.client_spec(seed * 1000 + k, lr), data.x_train[idx],
                                     data.y_train[idx], threads, quiet, crash_round))
            proc.start()
            procs.append(proc)
        model = server.serve(address, round_timeout)
        finished = True
    finally:
        for proc in procs:  # the clients leave when the server ends the run; after an error, at once
            proc.join(timeout=10 if finished else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return FederatedRun(method, model, server.standardizer, server.history, [len(p) for p in parts],
                        time.perf_counter() - start, copy.deepcopy(server.posterior.config))
