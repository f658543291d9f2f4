"""Honest rounds: who takes part in a federated run, and a run that fails loudly when too few do.

:class:`RosterStrategy` wraps the run's strategy (the statistics round of :mod:`.standardize` over
federated EM-TDAMP or FedAvg) and keeps the roster of the run:

1. **Waiting.** Before round 1 it waits for ``num_clients`` clients to connect, reporting how many
   of how many have connected every ``report_every`` seconds (the first report after
   ``report_every`` seconds: a run whose clients are quick says nothing); after ``wait_timeout`` seconds it
   starts with those connected if they meet the minimum, else the run fails.
2. **Handshake.** Round 1 (the statistics round) carries the server's run spec
   (:mod:`.handshake`); every client answers with its name, its own spec and its token. A client
   whose spec differs or whose token is wrong is refused: named with the reason, left out of every
   later round and disconnected (Flower's ``ReconnectIns`` without a reconnect time). Clients that
   connect after the handshake take no part.
3. **Minimum per round.** Each round goes to the accepted clients still connected; a client that
   fails or disconnects is named with the reason (Flower's failure, or its having left). A round
   whose answering clients fall below ``min_clients`` stops the run: no later round is configured,
   the clients still connected are told why (an evaluation instruction of stage ``"abort"`` with
   the reason, which a client raises as its own error), Flower ends the run and disconnects the
   clients, and :attr:`failure` holds a
   :class:`~.handshake.FederatedError` naming the round, the failed clients and the reasons, which
   the caller raises (:meth:`bnnzoo.federated.run.FederatedServer.serve`). Raising inside Flower's
   loop instead would leave its gRPC server running.

``min_clients`` is a count (an ``int`` from 1 to ``num_clients``) or a fraction of ``num_clients``
(a ``float`` in (0, 1], rounded up); ``None`` asks for every client (:func:`resolve_min_clients`).
Reports go to ``report(message)``; the per-round record is :attr:`rounds`.
"""

from __future__ import annotations

import contextlib
import json
import time

from flwr.common import EvaluateIns, Parameters, ReconnectIns
from flwr.server.strategy import Strategy

from bnnzoo.errors import ConfigError

from . import handshake
from .handshake import ABORT, REASON_KEY, FederatedError, resolve_min_clients
from .standardize import STAGE_KEY


def _reason(failure) -> str:
    """A failure of Flower's list as text: a client's non-OK status, or the exception of its call."""
    if isinstance(failure, BaseException):
        text = str(failure).strip()
        return f"{type(failure).__name__}: {text}" if text else f"lost the connection ({type(failure).__name__})"
    _, res = failure
    return f"reported {res.status.code.name}: {res.status.message}"


class RosterStrategy(Strategy):
    """``inner`` (a strategy whose server round 1 is the statistics round) with the waiting, the
    handshake and the per-round minimum of the module docstring. ``spec`` is the server's run spec
    (:func:`~.handshake.run_spec`), ``token`` the shared token clients must present (``None``: none)."""

    def __init__(self, inner: Strategy, spec: dict, num_clients: int, *, min_clients: float | None = None,
                 token: str | None = None, wait_timeout: float = 600.0, report_every: float = 10.0, report=None):
        self.inner, self.spec, self.num_clients = inner, spec, num_clients
        self.min_clients = resolve_min_clients(min_clients, num_clients)
        if not wait_timeout > 0 or not report_every > 0:
            raise ConfigError(f"wait_timeout and report_every must be positive seconds, got {wait_timeout!r}, "
                              f"{report_every!r}")
        self.token, self.wait_timeout, self.report_every = token, float(wait_timeout), float(report_every)
        self.report = report or (lambda message: None)
        self.names: dict[str, str] = {}  # accepted clients: Flower cid -> name
        self.refused: dict[str, str] = {}  # name -> reason
        self.failed: dict[str, str] = {}  # name -> "round r: reason"
        self.rounds: list[dict] = []  # per server round: answered names, failed {name: reason}
        self.failure: FederatedError | None = None
        self._asked: dict[int, dict[str, str]] = {}  # server round -> {cid: name} the round went to
        self._told = False  # whether the clients were told that the run stopped

    def __repr__(self) -> str:
        return f"RosterStrategy({self.inner!r}, min_clients={self.min_clients})"

    def _stop(self, message: str) -> None:
        self.failure = FederatedError(message)

    # ---- waiting and the handshake ----------------------------------------------------------------
    def _wait(self, client_manager) -> bool:
        start = time.monotonic()
        due = self.report_every
        while True:
            n = client_manager.num_available()
            elapsed = time.monotonic() - start
            if n >= self.num_clients:
                return True
            if elapsed >= self.wait_timeout:
                if n >= self.min_clients:
                    self.report(f"starting with {n} of {self.num_clients} clients after {elapsed:.0f} s "
                                f"(minimum {self.min_clients})")
                    return True
                self._stop(f"only {n} of {self.num_clients} clients connected in {self.wait_timeout:.0f} s; "
                           f"the run needs at least {self.min_clients} (check the clients' server address and "
                           "TLS settings: a client that fails the TLS handshake never connects)")
                return False
            if elapsed >= due:
                self.report(f"waiting for clients: {n} of {self.num_clients} connected after {elapsed:.0f} s "
                            f"(time-out {self.wait_timeout:.0f} s)")
                due = elapsed + self.report_every
            client_manager.wait_for(n + 1, timeout=max(0.01, min(due, self.wait_timeout) - elapsed))

    def _admit(self, results) -> list:
        """The handshake replies of round 1: the accepted results; refused clients are named and disconnected."""
        accepted, names = [], {}
        for proxy, res in results:
            metrics = res.metrics or {}
            name = str(metrics.get(handshake.NAME_KEY) or f"client {proxy.cid}")
            if name in names.values():
                name = f"{name} ({proxy.cid})"
            try:
                problems = handshake.mismatches(self.spec, json.loads(str(metrics.get(handshake.SPEC_KEY, ""))))
            except json.JSONDecodeError:
                problems = ["it sent no run spec (not a bnnzoo client, or another version)"]
            if not handshake.token_matches(self.token, metrics.get(handshake.TOKEN_KEY, "")):
                problems.append("wrong or missing token")
            if problems:
                self.refused[name] = "; ".join(problems)
                self.report(f"refused client {name!r}: {self.refused[name]}")
                with contextlib.suppress(Exception):  # a client already gone has nothing to end
                    proxy.reconnect(ReconnectIns(seconds=None), timeout=10.0, group_id=None)
                continue
            names[proxy.cid] = name
            accepted.append((proxy, res))
        self.names = names
        return accepted

    # ---- Flower's hooks ---------------------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        if self.failure is not None:
            return []
        if server_round == 1:
            if not self._wait(client_manager):
                return []
            out = self.inner.configure_fit(server_round, parameters, client_manager)
            blob = json.dumps(self.spec, sort_keys=True)
            for _, ins in out:
                ins.config[handshake.HANDSHAKE_KEY] = blob
            self._asked[1] = {proxy.cid: f"client {proxy.cid}" for proxy, _ in out}
            return out
        present = set(client_manager.all())
        gone = [name for cid, name in self.names.items() if cid not in present]
        for name in gone:
            self.failed.setdefault(name, f"round {server_round - 1}: disconnected before the round")
        self.names = {cid: name for cid, name in self.names.items() if cid in present}
        if len(self.names) < self.min_clients:
            self._stop(f"round {server_round - 1}: only {len(self.names)} accepted clients still connected, "
                       f"fewer than the minimum {self.min_clients}; gone: {', '.join(gone) or 'none'}; "
                       f"{self._summary()}")
            return []
        out = [(proxy, ins) for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager)
               if proxy.cid in self.names]
        self._asked[server_round] = {proxy.cid: self.names[proxy.cid] for proxy, _ in out}
        return out

    def aggregate_fit(self, server_round, results, failures):
        asked = self._asked.pop(server_round, {})
        answered = {proxy.cid for proxy, _ in results}
        lost = [name for cid, name in asked.items() if cid not in answered]
        if server_round == 1:
            results = self._admit(results)
        reasons = [_reason(f) for f in failures]
        label = "the handshake and statistics round" if server_round == 1 else f"round {server_round - 1}"
        failed = {}
        for name in lost:  # Flower's failures do not say whose they are: one each when the counts agree
            failed[name] = reasons.pop(0) if len(reasons) == len(lost) - len(failed) else (
                "; ".join(reasons) or "no answer")
        for name, reason in failed.items():
            self.failed[name] = f"{label}: {reason}"
            self.report(f"{label}: client {name!r} failed ({reason})")
        self.rounds.append({"round": server_round, "answered": sorted(self.names[p.cid] for p, _ in results),
                            "failed": failed})
        if len(results) < self.min_clients:
            self._stop(f"{label}: {len(results)} of the {len(asked)} clients asked "
                       f"{'were accepted' if server_round == 1 else 'answered'}, fewer than the minimum "
                       f"{self.min_clients}; {self._summary()}")
            return None, {}
        return self.inner.aggregate_fit(server_round, results, failures)

    def _summary(self) -> str:
        parts = [f"{name}: {why}" for name, why in self.failed.items()]
        parts += [f"{name}: refused ({why})" for name, why in self.refused.items()]
        return "failed clients: " + ("; ".join(parts) if parts else "none")

    def configure_evaluate(self, server_round, parameters, client_manager):
        if self.failure is None:
            return self.inner.configure_evaluate(server_round, parameters, client_manager)
        if self._told:
            return []
        # the run stopped: the connected clients learn why (their evaluate raises it) and exit non-zero
        self._told = True
        ins = EvaluateIns(Parameters(tensors=[], tensor_type="numpy.ndarray"),
                          {STAGE_KEY: ABORT, REASON_KEY: str(self.failure)})
        return [(proxy, ins) for proxy in client_manager.all().values()]

    def aggregate_evaluate(self, server_round, results, failures):
        if self.failure is not None:
            return None, {}
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return None if self.failure is not None else self.inner.evaluate(server_round, parameters)
