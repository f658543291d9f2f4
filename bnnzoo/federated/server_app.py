"""The Flower ``ServerApp`` of federated EM-TDAMP and of the FedAvg baseline (Flower's Message API).

:class:`FederatedServer` holds the server's side of a run: the global model (the EM-TDAMP
posterior, or FedAvg's network), the held-out data it evaluates on and the run's history. Its
:meth:`~FederatedServer.main` is the ``ServerApp``'s main function on Flower's ``Grid``:

1. **Clients.** It waits up to ``wait_timeout`` seconds for ``num_clients`` SuperNodes
   (reporting every ``report_every`` seconds); after the wait it starts with those connected if
   they are at least the per-round minimum, else the run fails.
2. **Statistics.** Every connected client answers a ``query.statistics`` message with its name and
   the moments of its data; the server builds the standardiser of the union (:mod:`.standardize`).
3. **Rounds.** Each of ``rounds`` rounds samples ``clients_per_round`` of the clients (all of them
   by default; a draw without replacement by a ``random.Random(seed)``, from the clients ordered
   by the names they gave in the statistics round, then by node id: the node ids of Flower's
   SuperLink are random numbers, the names are not, so the same seed asks the same clients),
   sends each a ``train`` message with the global posterior or weights and the round's
   configuration, and waits up to ``round_timeout`` seconds for the replies. A client that answers
   with an error, or not at all, is named as failed with the reason; a round with fewer answers
   than ``min_clients`` (a count, or a fraction of the clients asked; default all of them) stops
   the run with :class:`~.settings.FederatedError` naming the round, the failed clients and the
   reasons. Otherwise the replies are aggregated. EM-TDAMP: the server's own round loop and
   :class:`~.strategy.FederatedTDAMP` (Gaussian product, product of odds and EM step). FedAvg:
   Flower's ``FedAvg`` strategy runs the rounds (:class:`~.fedavg.SeededFedAvg`: Flower's
   messages, example-weighted aggregation and round loop, the draw above), the server's
   bookkeeping and minimum on its replies. The global model is evaluated on the test split after
   every ``eval_every`` rounds and after the last (for FedAvg through the strategy's
   ``evaluate_fn``; Flower's ``Result`` of the run is :attr:`FederatedServer.result`).
4. **End.** The EM-TDAMP posterior is pruned by its own rule; a regression noise keeps the value of
   the last EM step (the server has no training data to refit it on the pruned network).

In a simulation (:func:`bnnzoo.federated.run.run_federated`) the ServerApp of
:meth:`FederatedServer.server_app` runs in a thread of the caller's process, which reads the model
and history from the server afterwards. Deployed, :data:`app` reads the run's settings from
Flower's run config (:mod:`.settings`) and writes the results into its ``results-dir``.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from bnnzoo.api import create
from bnnzoo.catalog import get_entry
from bnnzoo.data import load_dataset
from bnnzoo.devices import resolve_device
from bnnzoo.errors import ConfigError
from bnnzoo.metrics import accuracy

from .client_app import STATISTICS
from .fedavg import SeededFedAvg, state_of
from .settings import (
    METHODS,
    FederatedError,
    from_run_config,
    network_of_hidden,
    resolve_clients_per_round,
    resolve_min_clients,
)
from .standardize import STANDARDIZER_KEY, encode, standardizer_from_moments
from .strategy import FederatedTDAMP

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


def _reason(reply: Message) -> str:
    text = reply.error.reason.strip()
    return text.split(": ", 1)[1] if text.startswith("client") and ": " in text else text


class FederatedServer:
    """The server of a run (module docstring): ``rounds`` rounds of ``method`` over ``num_clients``
    clients, ``clients_per_round`` of them sampled each round, the global model evaluated on
    ``data``'s test split with ``eval_samples`` posterior draws after every ``eval_every`` rounds.
    ``options`` are EM-TDAMP options (``keep``, ``batch_size``, ``damping``, ...; the network and
    batch size also serve FedAvg, whose clients use Adam with ``lr``). Failures and progress go to
    ``report(message)``.

    After :meth:`main`: :attr:`model` (the pruned posterior, or the FedAvg ``nn.Module``),
    :attr:`standardizer`, :attr:`history` (``eval_round``, ``eval_seconds``, ``wall_seconds`` and
    the test metrics per evaluation; per round ``round``, ``clients``, ``failures`` and, for
    EM-TDAMP, the strategy's records), :attr:`failed` (client name -> "round r: reason"),
    :attr:`rounds_log` (per round: the clients asked, those that answered, the failures) and, for
    FedAvg, :attr:`strategy` (the :class:`~.fedavg.SeededFedAvg` that ran the rounds) and
    :attr:`result` (its Flower ``Result``: the final arrays, the clients' example-weighted
    ``train_loss`` per round and the server's evaluations)."""

    def __init__(self, data, *, method: str = "em-tdamp", num_clients: int = 4, rounds: int = 100,
                 clients_per_round: int | None = None, local_epochs: int = 1, seed: int = 0, device="cpu",
                 network: dict | None = None, weighting: str = "geometric", eval_every: int = 1,
                 eval_samples: int = 10, min_clients: float | None = None, round_timeout: float | None = 600.0,
                 wait_timeout: float = 600.0, report_every: float = 10.0, lr: float = 1e-3, report=None, **options):
        if method not in METHODS:
            raise ConfigError(f"unknown federated method {method!r}; choose from {METHODS}")
        _check_positive_ints(num_clients=num_clients, rounds=rounds, eval_every=eval_every, local_epochs=local_epochs,
                             eval_samples=eval_samples)
        self.clients_per_round = resolve_clients_per_round(clients_per_round, num_clients)
        self.min_clients = resolve_min_clients(min_clients, self.clients_per_round)
        for name, value in (("wait_timeout", wait_timeout), ("report_every", report_every),
                            ("round_timeout", 1.0 if round_timeout is None else round_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive seconds, got {value!r}")
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr!r}")
        self.method, self.data, self.num_clients, self.rounds = method, data, num_clients, rounds
        self.local_epochs, self.seed, self.eval_every, self.eval_samples = local_epochs, seed, eval_every, eval_samples
        self.round_timeout, self.wait_timeout, self.report_every = round_timeout, wait_timeout, report_every
        self.lr = lr
        self.report = report or (lambda message: None)
        self.device = resolve_device(device)
        self.posterior = posterior = build_posterior(data, network=network, device=self.device, seed=seed, **options)
        self.posterior_json = json.dumps(posterior.config)
        self.history: dict[str, list] = {"eval_round": [], "eval_seconds": [], "wall_seconds": [], "round": [],
                                         "clients": [], "failures": []}
        self.failed: dict[str, str] = {}
        self.rounds_log: list[dict] = []
        self.standardizer = None
        self.names: dict[int, str] = {}  # node id -> the client's name
        self.sizes: dict[int, int] = {}  # node id -> the client's number of examples
        if method == "em-tdamp":
            self.strategy = FederatedTDAMP(posterior, len(data.y_train), local_epochs=local_epochs, weighting=weighting)
            self.model = posterior
        else:
            self.strategy = None  # Flower's FedAvg, made once the run's clients are known (main)
            torch.manual_seed(seed)
            self.model = posterior.net.to_torch().to(self.device)
        self.result = None
        self._score = test_metrics(data.task, data.y_test)

    def __repr__(self) -> str:
        return (f"FederatedServer({self.method!r}, {self.num_clients} clients, {self.clients_per_round} per round, "
                f"{self.rounds} rounds)")

    # ---- the ServerApp ----------------------------------------------------------------------------
    def server_app(self) -> ServerApp:
        """A ``ServerApp`` whose main function is :meth:`main` on this server."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            self.main(grid, context)

        return app

    def main(self, grid: Grid, context: Context | None = None) -> None:
        """The run (module docstring) on Flower's ``grid``; raises :class:`~.settings.FederatedError`
        when it stops short."""
        nodes = self._wait(grid)
        self._statistics(grid, nodes)
        clients = self._ordered(nodes)
        start = time.perf_counter()
        if self.method == "fedavg":
            self._fedavg(grid, clients, start)
            return
        sampler = random.Random(self.seed)
        for rnd in range(1, self.rounds + 1):
            asked = sorted(sampler.sample(clients, self.clients_per_round))
            results, failures = self._round(grid, rnd, asked, clients)
            self.strategy.end_round(rnd, results, failures)
            if self._due(rnd):
                self._evaluate(rnd, start)
        self.history.update({k: v for k, v in self.strategy.history.items()
                             if k not in ("round", "clients", "failures")})
        if self.posterior.prune_at_end:
            with warnings.catch_warnings():
                # the server holds no training data to refit a regression noise on: the pruned
                # posterior keeps the noise of the last EM step, from every client's statistics
                warnings.filterwarnings("ignore", message=".*noise scale was not refitted", category=UserWarning)
                self.model = self.posterior.prune()

    def _fedavg(self, grid: Grid, clients: list[int], start: float) -> None:
        """The FedAvg rounds: Flower's ``FedAvg`` (:class:`~.fedavg.SeededFedAvg`) from the
        initial network's weights, the server's evaluation as its ``evaluate_fn``."""
        self.strategy = SeededFedAvg(clients, self.clients_per_round, seed=self.seed, on_replies=self._fedavg_replies)
        config = ConfigRecord({"stage": "fedavg", "epochs": self.local_epochs, **self._run_config()})
        self.result = self.strategy.start(
            grid=grid, initial_arrays=ArrayRecord(state_of(self.model)), num_rounds=self.rounds,
            timeout=self.round_timeout, train_config=config,
            evaluate_fn=lambda rnd, arrays: self._evaluate_fedavg(rnd, arrays, start))
        with torch.no_grad():
            self.model.load_state_dict(self.result.arrays.to_torch_state_dict())

    def _fedavg_replies(self, rnd: int, asked: list[int], replies: list[Message]) -> None:
        ok, failed = self._split(asked, replies)
        self._book(rnd, asked, ok, failed)

    def _ordered(self, nodes: list[int]) -> list[int]:
        """The clients in the order the rounds draw from: by name, then node id."""
        return sorted(nodes, key=lambda node: (self.names.get(node, ""), node))

    def _due(self, rnd: int) -> bool:
        return rnd >= 1 and (rnd % self.eval_every == 0 or rnd == self.rounds)

    def _run_config(self) -> dict:
        """What every train message of the run carries besides the round's own settings."""
        return {STANDARDIZER_KEY: self._blob, "method": self.method, "posterior": self.posterior_json,
                "device": str(self.device), "seed": self.seed, "lr": float(self.lr)}

    def _wait(self, grid: Grid) -> list[int]:
        start = time.monotonic()
        due = self.report_every
        while True:
            nodes = sorted(grid.get_node_ids())
            elapsed = time.monotonic() - start
            if len(nodes) >= self.num_clients:
                return nodes[:self.num_clients] if len(nodes) > self.num_clients else nodes
            if elapsed >= self.wait_timeout:
                if len(nodes) >= max(self.min_clients, self.clients_per_round):
                    self.report(f"starting with {len(nodes)} of {self.num_clients} clients after {elapsed:.0f} s")
                    self.clients_per_round = min(self.clients_per_round, len(nodes))
                    return nodes
                raise FederatedError(
                    f"only {len(nodes)} of {self.num_clients} clients connected in {self.wait_timeout:.0f} s; the run "
                    f"needs at least {max(self.min_clients, self.clients_per_round)} (check that the SuperNodes run, "
                    "their --superlink address and TLS settings, and that their keys are registered with the "
                    "SuperLink where node authentication is on)")
            if elapsed >= due:
                self.report(f"waiting for clients: {len(nodes)} of {self.num_clients} connected after {elapsed:.0f} s "
                            f"(time-out {self.wait_timeout:.0f} s)")
                due = elapsed + self.report_every
            time.sleep(0.1)

    def _send(self, grid: Grid, nodes, message_type: str, content, group: str) -> tuple[dict, dict]:
        messages = [Message(content(), dst_node_id=node, message_type=message_type, group_id=group) for node in nodes]
        return self._split(nodes, grid.send_and_receive(messages, timeout=self.round_timeout))

    def _split(self, nodes, replies) -> tuple[dict, dict]:
        """``(ok, failed)``: node -> reply for the answers, node -> reason for errors and silence."""
        ok, failed = {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failed[node] = _reason(reply)
            else:
                ok[node] = reply
        for node in nodes:
            if node not in ok and node not in failed:
                failed[node] = f"no answer in {self.round_timeout:.0f} s"
        return ok, failed

    def _statistics(self, grid: Grid, nodes: list[int]) -> None:
        task = self.data.task
        ok, failed = self._send(grid, nodes, STATISTICS, lambda: RecordDict({"config": ConfigRecord({"task": task})}),
                                "statistics")
        for node, reason in failed.items():
            name = self.names.setdefault(node, f"node {node}")
            self.failed[name] = f"statistics: {reason}"
            self.report(f"statistics: client {name!r} failed ({reason})")
        if not ok:
            raise FederatedError(f"no client answered the statistics round; {self._summary()}")
        parts = []
        for node, reply in ok.items():
            self.names[node] = str(reply.content["config"]["name"])
            self.sizes[node] = int(reply.content["metrics"]["num-examples"])
            parts.append(reply.content["arrays"].to_numpy_ndarrays())
        self.standardizer = standardizer_from_moments(parts, task, image=len(self.data.input_shape) > 1).to(self.device)
        self.posterior.standardizer = self.standardizer
        self._blob = encode(self.standardizer)

    def _round(self, grid: Grid, rnd: int, asked: list[int], clients: list[int]):
        """An EM-TDAMP round: ``(results, failures)``, the answers as ``(arrays, num_examples)`` in
        the order of ``clients``, and the number of clients that failed."""
        held = sum(self.sizes.get(node, 0) for node in asked) if len(asked) < len(self.sizes) else 0
        config = {**self.strategy.round_config(rnd, held), **self._run_config()}
        record = ArrayRecord(self.strategy.global_arrays())
        ok, failed = self._send(grid, asked, "train", lambda: RecordDict({"arrays": record,
                                                                          "config": ConfigRecord(config)}), str(rnd))
        self._book(rnd, asked, ok, failed)
        return [(ok[node].content["arrays"].to_numpy_ndarrays(), int(ok[node].content["metrics"]["num-examples"]))
                for node in clients if node in ok], len(failed)

    def _book(self, rnd: int, asked: list[int], ok: dict, failed: dict) -> None:
        """Record round ``rnd`` (failed clients, the rounds' log, the history's counts); raise
        :class:`~.settings.FederatedError` when fewer than ``min_clients`` answered."""
        failures = {}
        for node, reason in failed.items():
            name = self.names.get(node, f"node {node}")
            failures[name] = reason
            self.failed[name] = f"round {rnd}: {reason}"
            self.report(f"round {rnd}: client {name!r} failed ({reason})")
        self.rounds_log.append({"round": rnd, "asked": sorted(self.names.get(n, f"node {n}") for n in asked),
                                "answered": sorted(self.names.get(n, f"node {n}") for n in ok), "failed": failures})
        self.history["round"].append(rnd)
        self.history["clients"].append(len(ok))
        self.history["failures"].append(len(failures))
        if len(ok) < self.min_clients:
            raise FederatedError(f"round {rnd}: {len(ok)} of the {len(asked)} clients asked answered, fewer "
                                 f"than the minimum {self.min_clients}; {self._summary()}")

    @torch.no_grad()
    def _evaluate(self, rnd: int, start: float) -> None:
        begin = time.perf_counter()
        pred = self.posterior.predict(self.data.x_test, num_samples=self.eval_samples)
        self._record_evaluation(rnd, start, begin, self._score(pred.probs if self.data.task == "classification"
                                                                else pred.mean))

    @torch.no_grad()
    def _evaluate_fedavg(self, rnd: int, arrays: ArrayRecord, start: float) -> MetricRecord | None:
        """FedAvg's ``evaluate_fn``: the global weights ``arrays`` of round ``rnd`` on the test split
        (``None`` for the rounds not evaluated, round 0 included)."""
        if not self._due(rnd):
            return None
        begin = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        x_test, std, device = self.data.x_test, self.standardizer, self.device
        out = torch.cat([self.model(std.x(x_test[i:i + 4096].to(device))) for i in range(0, len(x_test), 4096)])
        pred = torch.softmax(out, -1) if self.data.task == "classification" else std.y_inverse(out.squeeze(-1))
        metrics = self._score(pred)
        self._record_evaluation(rnd, start, begin, metrics)
        return MetricRecord(metrics)

    def _record_evaluation(self, rnd: int, start: float, begin: float, metrics: dict) -> None:
        self.history["eval_round"].append(rnd)
        self.history["wall_seconds"].append(time.perf_counter() - start)
        self.history["eval_seconds"].append(time.perf_counter() - begin)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)

    def _summary(self) -> str:
        parts = [f"{name}: {why}" for name, why in self.failed.items()]
        return "failed clients: " + ("; ".join(parts) if parts else "none")

    # ---- results of a deployed run ------------------------------------------------------------------
    def write_results(self, directory) -> Path:
        """Write ``history.json`` (the history, the failed clients, the rounds' records) into
        ``directory``, and the fitted EM-TDAMP run into ``directory/run``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "history.json").write_text(json.dumps({
            "method": self.method, "history": self.history, "failed_clients": self.failed,
            "rounds": self.rounds_log}, indent=1, default=float), encoding="utf-8")
        if self.method == "em-tdamp":
            self.model.save(directory / "run", overwrite=True)
        return directory


def server_from_run_config(run_config: dict, report=None) -> tuple[FederatedServer, str]:
    """The server of a deployed run from Flower's run config (:func:`~.settings.from_run_config`)
    and the results directory ("" for none)."""
    s = from_run_config(run_config)
    data = load_dataset(s.pop("dataset"), split=s.pop("split"))
    network = network_of_hidden(s.pop("hidden"))
    if network is None and data.task == "classification" and len(data.input_shape) > 1:
        network = {"arch": "lenet-300-100"}
    options = s.pop("options")
    results = s.pop("results_dir")
    for key in ("partition", "alpha"):  # the clients' (the split of the data), not the server's
        s.pop(key)
    options = get_entry("em-tdamp").check_options(data.task, options)
    return FederatedServer(data, network=network, report=report, **s, **options), results


#: the ServerApp of a deployed run (``flwr run`` starts it from the app's pyproject.toml)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    server, results = server_from_run_config(dict(context.run_config), report=print)
    server.main(grid, context)
    last = {k: server.history[k][-1] for k in ("nmse", "error") if server.history.get(k)}
    print(f"{server.method}: {server.rounds} rounds done; last evaluation {last}")
    if results:
        print(f"results written to {server.write_results(results)}")
