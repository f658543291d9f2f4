"""What a federated run is told: its settings, the Flower run config that carries them, its errors.

A run is described by one set of settings (the dataset and split, the method, the network and
EM-TDAMP options, the numbers of clients and rounds, the partition, ...). In a simulation they are
Python arguments (:func:`bnnzoo.federated.run.run_federated`); deployed with Flower's SuperLink
and SuperNodes they travel as the Flower *run config* (``[tool.flwr.app.config]`` of the app's
``pyproject.toml``, overridden by ``flwr run --run-config``), whose keys are the hyphenated names
of :data:`RUN_CONFIG` (:func:`from_run_config`, :func:`write_app`). Each SuperNode says which part
of the data it holds in its *node config* (``flower-supernode --node-config "partition-id=0
num-partitions=2"``, Flower's own keys, or ``dataset=DIR``: a data directory of its own).

Pure Python, no Flower import: the command line checks its options here before starting Flower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bnnzoo.errors import BnnzooError, ConfigError

METHODS = ("em-tdamp", "fedavg")

#: the run config of a deployed run: key -> (keyword of :class:`~.server_app.FederatedServer` or
#: of the data, default). ``hidden`` "" and ``clients-per-round`` 0 mean the entry's network and
#: every client; ``options`` is a JSON object of EM-TDAMP options; ``results-dir`` "" saves nothing.
RUN_CONFIG = {
    "dataset": ("dataset", "boston"), "split": ("split", 0), "seed": ("seed", 0), "method": ("method", "em-tdamp"),
    "hidden": ("hidden", ""), "options": ("options", "{}"), "num-clients": ("num_clients", 2),
    "clients-per-round": ("clients_per_round", 0), "rounds": ("rounds", 10), "local-epochs": ("local_epochs", 1),
    "weighting": ("weighting", "geometric"), "eval-every": ("eval_every", 1), "eval-samples": ("eval_samples", 10),
    "min-clients": ("min_clients", ""), "round-timeout": ("round_timeout", 600.0),
    "wait-timeout": ("wait_timeout", 600.0), "partition": ("partition", "iid"), "alpha": ("alpha", 0.5),
    "lr": ("lr", 1e-3), "device": ("device", "cpu"), "results-dir": ("results_dir", ""),
}


class FederatedError(BnnzooError, RuntimeError):
    """A federated run that cannot go on: a round with fewer answering clients than the minimum,
    clients that never connected, or a client that cannot take part. The message names the round,
    the clients and the reason."""


def resolve_min_clients(min_clients: float | None, num_clients: int) -> int:
    """The fewest clients that must answer each round of ``num_clients`` asked: all of them for
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
        raise ConfigError(f"min_clients must lie in [1, {num_clients}] (the clients asked per round), "
                          f"got {min_clients}")
    return min_clients


def resolve_clients_per_round(clients_per_round: int | None, num_clients: int) -> int:
    """The clients sampled each round: all ``num_clients`` for ``None`` (or 0), else the count
    (1 to ``num_clients``); :class:`~bnnzoo.errors.ConfigError` otherwise."""
    if clients_per_round is None or (clients_per_round == 0 and not isinstance(clients_per_round, bool)):
        return num_clients
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) \
            or not 1 <= clients_per_round <= num_clients:
        raise ConfigError(f"clients_per_round must be a count from 1 to {num_clients} (the clients), "
                          f"got {clients_per_round!r}")
    return clients_per_round


def min_clients_of(text: str):
    """``min_clients`` from its text: "" -> ``None``, "3" -> 3, "0.5" -> 0.5."""
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ConfigError(f"min-clients must be a count or a fraction in (0, 1], got {text!r}") from None


def network_of_hidden(hidden: str | None):
    """The network spec of comma-separated hidden widths ("50", "300,100"); ``None``/"" -> ``None``
    (the entry's default network)."""
    if hidden is None or not str(hidden).strip():
        return None
    try:
        widths = [int(w) for w in str(hidden).split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"hidden must be comma-separated integers, got {hidden!r}") from None
    return {"arch": "mlp", "hidden": widths}


def from_run_config(run_config: dict) -> dict:
    """The settings of a deployed run from Flower's run config (:data:`RUN_CONFIG` keys; missing
    keys take their defaults, unknown keys are an error naming them): a dict of the keywords of
    :data:`RUN_CONFIG` with ``options`` parsed into a dict and ``min_clients`` into a number."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG))
    if unknown:
        raise ConfigError(f"unknown run config keys {unknown}; known: {sorted(RUN_CONFIG)}")
    out = {}
    for key, (name, default) in RUN_CONFIG.items():
        value = run_config.get(key, default)
        if isinstance(default, bool) or type(value) is not type(default):
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                raise ConfigError(f"run config {key} must be a {type(default).__name__}, got {value!r}")
        out[name] = value
    try:
        out["options"] = json.loads(out["options"])
    except json.JSONDecodeError as err:
        raise ConfigError(f"run config options must be a JSON object of EM-TDAMP options: {err}") from None
    if not isinstance(out["options"], dict):
        raise ConfigError(f"run config options must be a JSON object, got {out['options']!r}")
    out["min_clients"] = min_clients_of(out["min_clients"])
    if out["method"] not in METHODS:
        raise ConfigError(f"unknown federated method {out['method']!r}; choose from {METHODS}")
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_app(directory, **settings) -> Path:
    """Write the Flower App of a deployed run into ``directory`` (created if needed): a
    ``pyproject.toml`` whose components are bnnzoo's ServerApp and ClientApp
    (:mod:`.server_app`, :mod:`.client_app`) and whose ``[tool.flwr.app.config]`` holds the run's
    settings (``settings`` by the keywords of :data:`RUN_CONFIG`, defaults for the rest). ``flwr run
    DIRECTORY SUPERLINK`` then starts the run on that SuperLink. Returns the file's path."""
    by_name = {name: key for key, (name, _) in RUN_CONFIG.items()}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown run settings {unknown}; known: {sorted(by_name)}")
    config = {key: default for key, (_, default) in RUN_CONFIG.items()}
    for name, value in settings.items():
        if name == "options" and isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        if name == "min_clients" and value is None:
            value = ""
        if name == "clients_per_round" and value is None:
            value = 0
        config[by_name[name]] = value
    from_run_config(config)  # the same checks as the ServerApp's, before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "bnnzoo-federated"', 'version = "1.0.0"',
             'description = "Federated EM-TDAMP and FedAvg of bnnzoo on Flower"', 'license = "MIT"',
             'dependencies = ["bnnzoo"]', "", "[tool.flwr.app]", 'publisher = "bnnzoo"', "",
             "[tool.flwr.app.components]", 'serverapp = "bnnzoo.federated.server_app:app"',
             'clientapp = "bnnzoo.federated.client_app:app"', "", "[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.items()]
    path = directory / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
