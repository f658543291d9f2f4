"""The handshake of a federated run: what a client must share with its server, and the check of it.

Before the first round the server sends its *run spec* (:func:`run_spec`: the method, the task,
the resolved network spec and the options that change what a client computes: the EM-TDAMP guide
options and the batch size) to every connected client, in the configuration of the statistics
round. Each client answers with its name, its own run spec and, where the server asks for one,
the shared token (:func:`introduce`). The server accepts a client only when :func:`mismatches`
finds no difference and the token matches (:func:`token_matches`, constant-time); a refused client
is named with the differences, left out of every later round and disconnected. The client runs the
same comparison on the server's spec, so it can say why it was refused.

Pure Python and JSON (the specs travel as strings in Flower's configuration and metrics), no Flower
import, so the command line checks its options (:func:`resolve_min_clients`, :func:`read_token`)
and :class:`FederatedError` is importable without starting Flower.
"""

from __future__ import annotations

import hmac
import json
import math

from bnnzoo.errors import BnnzooError, ConfigError

#: keys of the statistics round's configuration (server -> client) and of a client's reply metrics
HANDSHAKE_KEY, NAME_KEY, SPEC_KEY, TOKEN_KEY = "handshake", "client_name", "client_spec", "client_token"
#: the stage and key of the instruction that tells the clients the run stopped, and why
ABORT, REASON_KEY = "abort", "reason"
#: the guide and training options a client's local passes depend on (the rest are the server's)
CLIENT_OPTIONS = {"guide": None, "train": ("batch_size",)}


class FederatedError(BnnzooError, RuntimeError):
    """A federated run that cannot go on: a round with fewer answering clients than the minimum,
    clients that never connected, a server that cannot be reached, or a client that the server
    refused. The message names the round, the clients and the reason."""


def run_spec(method: str, posterior) -> dict:
    """What server and clients must agree on: ``method``, the posterior's task, input shape, output
    dimension, resolved network spec, and its guide options and batch size (:data:`CLIENT_OPTIONS`)."""
    config = posterior.config
    options = {}
    for section, keys in CLIENT_OPTIONS.items():
        values = config.get(section) or {}
        options[section] = {k: values[k] for k in (keys or sorted(values)) if k in values}
    return {"method": method, "task": config["task"], "input_shape": list(config["input_shape"]),
            "output_dim": config["output_dim"], "network": posterior.network_spec, "options": options}


def _describe(key: str, value) -> str:
    if key == "network" and isinstance(value, dict):
        return str(value.get("name", value))
    return json.dumps(value)


def mismatches(server: dict, client: dict) -> list[str]:
    """The differences between a ``client``'s run spec and the ``server``'s, one line each
    ("network mlp-13-8-1, the server's mlp-13-50-1"; options by dotted name); empty when they agree."""
    out = []
    for key in ("method", "task", "input_shape", "output_dim", "network"):
        if server.get(key) != client.get(key):
            out.append(f"{key} {_describe(key, client.get(key))}, the server's {_describe(key, server.get(key))}")
    s_opts, c_opts = server.get("options", {}), client.get("options", {})
    for section in sorted(set(s_opts) | set(c_opts)):
        s, c = s_opts.get(section, {}), c_opts.get(section, {})
        for name in sorted(set(s) | set(c)):
            if s.get(name) != c.get(name):
                out.append(f"option {section}.{name} {json.dumps(c.get(name))}, the server's {json.dumps(s.get(name))}")
    return out


def resolve_min_clients(min_clients: float | None, num_clients: int) -> int:
    """The fewest clients that must answer each round of a run of ``num_clients``: all of them for
    ``None``, the count itself for an ``int`` (1 to ``num_clients``), the fraction of ``num_clients``
    rounded up for a ``float`` in (0, 1]; :class:`~bnnzoo.errors.ConfigError` otherwise."""
    if min_clients is None:
        return num_clients
    if isinstance(min_clients, bool) or not isinstance(min_clients, int | float):
        raise ConfigError(f"min_clients must be a count from 1 to {num_clients} or a fraction in (0, 1], "
                          f"got {min_clients!r}")
    if isinstance(min_clients, float):
        if not 0.0 < min_clients <= 1.0:
            raise ConfigError(f"min_clients as a fraction must lie in (0, 1], got {min_clients!r}")
        return max(1, math.ceil(min_clients * num_clients - 1e-9))
    if not 1 <= min_clients <= num_clients:
        raise ConfigError(f"min_clients must lie in [1, {num_clients}] (the number of clients), got {min_clients}")
    return min_clients


def introduce(name: str, spec: dict, token: str | None) -> dict:
    """A client's handshake reply (Flower metrics): its name, run spec (JSON) and token ("" if none)."""
    return {NAME_KEY: str(name), SPEC_KEY: json.dumps(spec, sort_keys=True), TOKEN_KEY: token or ""}


def token_matches(expected: str | None, given: str) -> bool:
    """Whether a client's ``given`` token is the server's ``expected`` one (always, when the server
    asks for none); compared in constant time."""
    return expected is None or hmac.compare_digest(expected.encode(), str(given).encode())


def read_token(path) -> str:
    """The shared token in the file ``path`` (surrounding whitespace stripped; it must not be empty)."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token
