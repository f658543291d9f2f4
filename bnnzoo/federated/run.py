"""One-machine federated runs: a Flower server in this process, one process per client, gRPC on loopback.

:func:`run_federated` partitions a :class:`~bnnzoo.data.Dataset`'s training set over ``num_clients``
clients (:mod:`.partition`), starts each client in its own process (``multiprocessing``, fork where available;
each connects with ``flwr.client.start_client`` to ``127.0.0.1:<free port>``) and runs the server
here (:class:`FederatedServer`, ``flwr.server.start_server``): round 1 collects the standardisation statistics
(:mod:`.standardize`), then ``rounds`` rounds of federated EM-TDAMP (:mod:`.strategy`) or of FedAvg
(:mod:`.fedavg`). The held-out data never leave the server, which evaluates the global model
after every ``eval_every`` rounds. Across machines the same pieces run as ``bnnzoo federated
--serve HOST:PORT`` on the server and ``bnnzoo federated-client --server HOST:PORT`` on each client.

Who takes part is :class:`~.roster.RosterStrategy`'s: the server waits for its clients (reporting
how many have connected), checks each one's run spec and token in a handshake before the first
round (:mod:`.handshake`), and stops the run with :class:`~.handshake.FederatedError` when a round
has fewer answering clients than ``min_clients``. The link is gRPC, with TLS when the server is
given ``certificates`` (Flower's own ``start_server(certificates=...)`` and
``start_client(root_certificates=...)``). The legacy gRPC transport these run on has no node
authentication (Flower's ``authentication_keys`` need its SuperLink), so clients authenticate
with a shared token checked in the handshake; without TLS that token travels in the clear.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import torch
from flwr.client import start_client as flower_start_client
from flwr.server import ServerConfig, start_server

from bnnzoo.api import create
from bnnzoo.catalog import get_entry
from bnnzoo.devices import resolve_device
from bnnzoo.errors import BnnzooError, ConfigError
from bnnzoo.metrics import accuracy

from .client import TDAMPClient
from .fedavg import AdamClient, fedavg_strategy, set_weights
from .handshake import FederatedError, run_spec
from .partition import partition as make_partition
from .roster import RosterStrategy
from .standardize import StandardizingStrategy
from .strategy import FederatedTDAMP

METHODS = ("em-tdamp", "fedavg")


@dataclass
class FederatedRun:
    """The outcome of a run: ``model`` (the server's :class:`~bnnzoo.methods.tdamp.TDAMPPosterior`,
    fitted and pruned, or the FedAvg ``nn.Module``), the ``standardizer``, per-round ``history``
    (``eval_round`` and the test metrics, plus the strategy's own records for EM-TDAMP), the
    clients' ``partition_sizes`` and the wall-clock ``seconds``; ``failed_clients`` (name -> the
    round and reason) and ``refused_clients`` (name -> the handshake's reason) name the clients the
    run went on without."""

    method: str
    model: object
    standardizer: object
    history: dict
    partition_sizes: list
    seconds: float
    config: dict = field(default_factory=dict)
    failed_clients: dict = field(default_factory=dict)
    refused_clients: dict = field(default_factory=dict)


def quiet_flower(level: int = logging.CRITICAL) -> None:
    """Silence Flower's console logging below ``level`` (bnnzoo reports failures in its own words)."""
    logging.getLogger("flwr").setLevel(level)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the minibatch size of a federated run where the centralised entry chooses one on a validation
#: part of the data (regression): 32, the largest size that selection compares
FEDERATED_BATCH_SIZE = 32


def build_posterior(data, *, network=None, device="cpu", seed: int = 0, **options):
    """The EM-TDAMP posterior of ``data`` (its network also serves the FedAvg baseline).

    Nothing is chosen on a validation part of the data (no server sees the clients' data): every
    client runs the configured passes (``validation_fraction`` null) and a batch size the
    centralised entry would choose on validation data is :data:`FEDERATED_BATCH_SIZE`, unless
    ``options`` say otherwise."""
    fixed = {"validation_fraction": None}
    if get_entry("em-tdamp").defaults[data.task]["train"]["batch_size"] is None:
        fixed["batch_size"] = FEDERATED_BATCH_SIZE
    return create("em-tdamp", data.task, data.input_shape, data.output_dim, network=network,
                  dataset=data.name, device=device, seed=seed, **{**fixed, **options})


def make_client(spec: dict, x: torch.Tensor, y: torch.Tensor):
    """The Flower client a client process runs, from a picklable ``spec`` (see :func:`client_spec`)."""
    posterior = get_entry("em-tdamp").create(copy.deepcopy(spec["config"]), device=spec["device"])
    if spec["method"] == "em-tdamp":
        client = TDAMPClient(posterior, x, y, seed=spec["seed"])
    else:
        torch.manual_seed(spec["config"]["seed"])
        client = AdamClient(posterior.net.to_torch(), x, y, posterior.task, spec["config"]["train"]["batch_size"],
                            lr=spec["lr"], seed=spec["seed"], device=spec["device"])
    client.introduce(spec.get("name") or f"client {spec['seed']}", run_spec(spec["method"], posterior), spec.get("token"))
    return client


def client_spec(method: str, config: dict, device, seed: int, lr: float = 1e-3, *, name: str | None = None,
                token: str | None = None) -> dict:
    """The picklable description of a client: ``method``, the posterior ``config`` (the server's,
    for the handshake to accept it), ``device``, ``seed``, FedAvg's ``lr``, the ``name`` the server
    reports it by and the shared ``token`` it presents."""
    if method not in METHODS:
        raise ConfigError(f"unknown federated method {method!r}; choose from {METHODS}")
    return {"method": method, "config": copy.deepcopy(config), "device": str(device), "seed": int(seed), "lr": lr,
            "name": name, "token": token}


def connection_message(address: str, err: BaseException, tls: bool) -> str:
    """The one-line explanation of a failed or lost connection to the server at ``address``."""
    code, detail = getattr(err, "code", None), getattr(err, "details", None)
    what = (f"{code().name}: {detail()}" if callable(code) and callable(detail)
            else f"{type(err).__name__}: {err}")
    hint = ("check the address, that the server runs with TLS (--ssl-certfile) and that --root-certificates is "
            "the CA that signed its certificate" if tls else
            "check the address and port, that the server runs there, and whether it uses TLS (then give "
            "--root-certificates)")
    return f"the connection to the server at {address} failed ({what}); {hint}"


def start_client(address: str, spec: dict, x: torch.Tensor, y: torch.Tensor, *, threads: int | None = None,
                 quiet: bool = True, crash_round: int | None = None, root_certificates: bytes | None = None,
                 timeout: float = 600.0):
    """Connect a client to the server at ``address`` and serve until the run ends (blocking);
    returns the client. The server must accept TCP connections within ``timeout`` seconds
    (:func:`wait_for_server`); ``root_certificates`` (PEM bytes) turns TLS on, checking the
    server's certificate against them. Raises :class:`~.handshake.FederatedError` when the server
    cannot be reached, the connection fails, or the server refused this client or ended the run
    before its first round; a client's own bnnzoo error (a diverging local fit) propagates.
    ``crash_round`` makes the process exit abruptly when that round's work arrives (fault injection:
    a client disconnecting mid-round)."""
    if threads:
        torch.set_num_threads(threads)
    if quiet:
        quiet_flower()
    flushing = torch.device(spec["device"]).type == "cpu" and torch.set_flush_denormal(True)  # as the centralised fit
    try:
        return _serve_client(address, spec, x, y, crash_round, root_certificates, timeout)
    finally:
        if flushing:  # the setting is global to the process: a client run in-process leaves it as it found it
            torch.set_flush_denormal(False)


def _serve_client(address, spec, x, y, crash_round, root_certificates, timeout):
    client = make_client(spec, x, y)
    if crash_round is not None:
        inner = client.fit

        def fit(parameters, config):
            if config.get("stage") != "statistics" and int(config.get("round", 0)) == crash_round:
                os._exit(3)
            return inner(parameters, config)

        client.fit = fit
    wait_for_server(address, timeout)
    try:
        flower_start_client(server_address=address, client=client.to_client(), root_certificates=root_certificates,
                            max_wait_time=timeout)
    except BnnzooError:
        raise
    except Exception as err:  # noqa: BLE001  # gRPC's errors: one line naming the server instead
        raise FederatedError(connection_message(address, err, root_certificates is not None)) from None
    if client.refusal:
        raise FederatedError(f"the server at {address} refused this client: {'; '.join(client.refusal)}; "
                             "start it with the server's data, --hidden, --method and --set options")
    if client.rounds_done == 0:
        raise FederatedError(f"the server at {address} ended the run before this client's first round: it "
                             "refused the client (a wrong or missing --token-file?) or the run failed; see the "
                             "server's output")
    return client


def wait_for_server(address: str, timeout: float = 600.0) -> None:
    """Block until ``address`` (host:port) accepts TCP connections, polling every 50 ms (a client
    started before its server would otherwise sit in Flower's exponential reconnect back-off);
    :class:`~.handshake.FederatedError` naming the address after ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"the server address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise FederatedError(f"cannot reach the server at {address}: nothing accepted a connection in "
                                     f"{timeout:.0f} s; check that `bnnzoo federated --serve` runs there, the host "
                                     "and port, and that no firewall blocks the port") from None
            time.sleep(0.05)


def _client_process(address, spec, x, y, threads, quiet, crash_round, root_certificates, timeout):
    try:
        start_client(address, spec, x, y, threads=threads, quiet=quiet, crash_round=crash_round,
                     root_certificates=root_certificates, timeout=timeout)
    except BnnzooError as err:
        print(f"{spec.get('name') or 'client'}: {err}", file=sys.stderr)
        sys.exit(2)


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
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class FederatedServer:
    """The server side of a run (also run alone on a server machine, ``bnnzoo federated --serve``):
    the statistics round, then ``rounds`` rounds of ``method``, with the global model evaluated on
    ``data``'s test split after every ``eval_every`` rounds. :meth:`serve` blocks until the run ends.

    The roster (:class:`~.roster.RosterStrategy`, :attr:`roster`): the server waits up to
    ``wait_timeout`` seconds for ``num_clients`` clients, reporting progress every ``report_every``
    seconds through ``report(message)``; accepts only clients whose run spec matches its own and
    that present ``token`` (when one is set); and stops the run when a round has fewer answering
    clients than ``min_clients`` (a count, or a fraction of ``num_clients``; default all of them)."""

    def __init__(self, data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                 local_epochs: int = 1, seed: int = 0, device="cpu", network: dict | None = None,
                 weighting: str = "geometric", eval_every: int = 1, eval_samples: int = 10, quiet: bool = True,
                 min_clients: float | None = None, token: str | None = None, wait_timeout: float = 600.0,
                 report_every: float = 10.0, report=None, **options):
        if method not in METHODS:
            raise ConfigError(f"unknown federated method {method!r}; choose from {METHODS}")
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

        standardizing = StandardizingStrategy(self.inner, data.task, image=len(data.input_shape) > 1,
                                              on_standardizer=on_standardizer)
        self.roster = self.strategy = RosterStrategy(
            standardizing, run_spec(method, posterior), num_clients, min_clients=min_clients, token=token,
            wait_timeout=wait_timeout, report_every=report_every, report=report)

    def client_spec(self, seed: int, lr: float = 1e-3, *, name: str | None = None, token: str | None = None) -> dict:
        return client_spec(self.method, self.posterior.config, self.device, seed, lr, name=name, token=token)

    def serve(self, address: str, round_timeout: float | None = 600.0,
              certificates: tuple[bytes, bytes, bytes] | None = None):
        """Run the server at ``address`` until the last round; returns the fitted model (the
        EM-TDAMP posterior pruned by its own rule, or the FedAvg network). ``certificates`` (PEM
        bytes of the CA certificate, the server's certificate and its private key) turn TLS on.
        Raises the roster's :class:`~.handshake.FederatedError` when the run stopped short."""
        start_server(server_address=address, config=ServerConfig(num_rounds=self.rounds + 1, round_timeout=round_timeout),
                     strategy=self.strategy, certificates=certificates)
        if self.roster.failure is not None:
            raise self.roster.failure
        if self.method == "em-tdamp":
            self.history.update(self.inner.history)
            if self.posterior.prune_at_end:
                self.model = self.posterior.prune()
        return self.model


def run_federated(data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                  partition: str = "iid", alpha: float = 0.5, local_epochs: int = 1, seed: int = 0, device="cpu",
                  network: dict | None = None, weighting: str = "geometric", eval_every: int = 1,
                  eval_samples: int = 10, lr: float = 1e-3, threads: int | None = 1, quiet: bool = True,
                  crash: tuple[int, int] | None = None, round_timeout: float | None = 600.0,
                  min_clients: float | None = None, certificates: tuple[bytes, bytes, bytes] | None = None,
                  token: str | None = None, wait_timeout: float = 600.0, report=None, **options) -> FederatedRun:
    """Run ``rounds`` rounds of ``method`` ("em-tdamp" or "fedavg") over ``num_clients`` local
    client processes on loopback (module docstring). ``weighting`` ("geometric" or "product", see
    :mod:`.strategy`) applies to EM-TDAMP; ``options`` go to the EM-TDAMP configuration (``keep``,
    ``batch_size``, ``damping``, ...; the network and batch size also serve FedAvg). The held-out
    split is evaluated with ``eval_samples`` posterior draws after every ``eval_every`` rounds.
    ``crash=(client, round)`` makes that client exit abruptly when that round's work arrives.
    ``min_clients``, ``token``, ``wait_timeout`` and ``report`` are the server's
    (:class:`FederatedServer`); ``certificates`` turn TLS on (the clients trust their CA). The
    clients are named "client 0", "client 1", ...; a run that stops short raises
    :class:`~.handshake.FederatedError`."""
    server = FederatedServer(data, method=method, num_clients=num_clients, rounds=rounds, local_epochs=local_epochs,
                             seed=seed, device=device, network=network, weighting=weighting, eval_every=eval_every,
                             eval_samples=eval_samples, quiet=quiet, min_clients=min_clients, token=token,
                             wait_timeout=wait_timeout, report=report, **options)
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
                               args=(address, server.client_spec(seed * 1000 + k, lr, name=f"client {k}", token=token),
                                     data.x_train[idx], data.y_train[idx], threads, quiet, crash_round,
                                     None if certificates is None else certificates[0], wait_timeout))
            proc.start()
            procs.append(proc)
        model = server.serve(address, round_timeout, certificates)
        finished = True
    finally:
        for proc in procs:  # the clients leave when the server ends the run; after an error, at once
            proc.join(timeout=10 if finished else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    return FederatedRun(method, model, server.standardizer, server.history, [len(p) for p in parts],
                        time.perf_counter() - start, copy.deepcopy(server.posterior.config),
                        dict(server.roster.failed), dict(server.roster.refused))
