"""The catalog: model names -> model + inference + defaults + paper (``list_models``, ``get_entry``)."""

from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

_REGISTRY: dict[str, "CatalogEntry"] = {}

# the default network of each bundled or standard dataset (by Dataset.name)
DEFAULT_NETWORKS: dict[str, dict] = {
    "boston": {"arch": "mlp", "hidden": [50]},
    "concrete": {"arch": "mlp", "hidden": [50]},
    "energy": {"arch": "mlp", "hidden": [50]},
    "yacht": {"arch": "mlp", "hidden": [50]},
    "wine": {"arch": "mlp", "hidden": [50]},
    "protein": {"arch": "mlp", "hidden": [100]},
    "mnist": {"arch": "lenet-300-100"},
    "sparse-teacher": {"arch": "mlp", "hidden": [5, 3]},
}


def default_network(dataset_name: str, task: str, input_shape: tuple[int, ...]) -> dict:
    if dataset_name in DEFAULT_NETWORKS:
        return dict(DEFAULT_NETWORKS[dataset_name])
    if task == "classification" and len(input_shape) == 3:
        return {"arch": "lenet-300-100"}
    return {"arch": "mlp", "hidden": [50 if task == "regression" else 100]}


@dataclass(frozen=True)
class CatalogEntry:
    """One method of the catalog.

    ``create(config, device)`` builds an unfitted :class:`~bnnzoo.posterior.Posterior` from a full
    configuration; ``defaults[task]`` holds the per-task defaults that :meth:`configure` merges with a
    dataset and the user's overrides.
    """

    name: str
    summary: str
    paper: str
    tasks: tuple[str, ...]
    create: Callable
    defaults: dict = field(default_factory=dict)
    network_overrides: dict = field(default_factory=dict)  # dataset name -> network for this method

    def configure(self, task: str, input_shape: tuple[int, ...], output_dim: int, dataset_name: str = "",
                  network: dict | None = None, **overrides) -> dict:
        """The full configuration for ``task`` on data of ``input_shape``; ``overrides`` replace any
        default found in the ``model``, ``guide`` or ``train`` sections (unknown keys are errors)."""
        if task not in self.tasks:
            raise ValueError(f"{self.name} supports {', '.join(self.tasks)}, not {task}")
        config = copy.deepcopy(self.defaults[task])
        net = network or self.network_overrides.get(dataset_name) or default_network(dataset_name, task, input_shape)
        config.update(task=task, input_shape=list(input_shape), output_dim=int(output_dim), network=dict(net),
                      dataset=dataset_name)
        for key, value in overrides.items():
            if value is None:
                continue
            sections = [s for s in ("model", "guide", "train") if key in config.get(s, {})]
            if not sections:
                known = sorted(k for s in ("model", "guide", "train") for k in config.get(s, {}))
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TypeError(f"{self.name} has no option {key!r}{hint} Options: {', '.join(known)}")
            for s in sections:
                config[s][key] = value
        return config


def register(entry: CatalogEntry) -> CatalogEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"a catalog entry named {entry.name!r} exists already")
    _REGISTRY[entry.name] = entry
    return entry


def _load_builtins() -> None:
    """Import every module of :mod:`bnnzoo.methods` (each registers its entries once)."""
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def list_models(task: str | None = None) -> list[str]:
    """Names of the catalog's models, optionally only those supporting ``task``."""
    _load_builtins()
    return sorted(n for n, e in _REGISTRY.items() if task is None or task in e.tasks)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called ``name``; an unknown name suggests the closest ones."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
