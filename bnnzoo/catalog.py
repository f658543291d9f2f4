"""The catalog: a registry of named methods (model + inference + defaults + paper).

A method's module registers its :class:`CatalogEntry` with :func:`register` when it is imported;
``import bnnzoo`` imports the built-in methods (:mod:`bnnzoo.methods`), so :func:`list_models` and
:func:`get_entry` see them. This module imports no method: it is the registry the methods write to.

Another installed package adds entries the same way, from its own modules, and advertises them with
an entry point in the ``bnnzoo.catalog`` group (``[project.entry-points."bnnzoo.catalog"]``,
``my-method = "mypackage.methods"``): on the first :func:`list_models` or :func:`get_entry` every such
entry point is loaded once; loading imports its module (which registers its entries), and an entry
point that names a :class:`CatalogEntry` object is registered directly.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable

#: the entry-point group through which other packages add catalog entries
ENTRY_POINT_GROUP = "bnnzoo.catalog"

_REGISTRY: dict[str, "CatalogEntry"] = {}
_LOADED_ENTRY_POINTS: set[tuple[str, str, str]] = set()

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
    """Add ``entry`` to the catalog under ``entry.name`` (a name can be registered once); returns it."""
    if entry.name in _REGISTRY:
        raise ValueError(f"a catalog entry named {entry.name!r} exists already")
    _REGISTRY[entry.name] = entry
    return entry


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every installed entry point of ``group`` not loaded before (module docstring): import its
    module, registering what it registers, and register it if it names a :class:`CatalogEntry`.
    An entry point that fails to load is skipped with a warning. Returns the names loaded now."""
    loaded = []
    for point in entry_points(group=group):
        key = (group, point.name, point.value)
        if key in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(key)
        try:
            value = point.load()
            if isinstance(value, CatalogEntry) and _REGISTRY.get(value.name) is not value:
                register(value)
        except Exception as err:  # a broken plugin must not break the catalog
            warnings.warn(f"bnnzoo catalog: the entry point {point.name!r} ({point.value}) failed to load: {err!r}",
                          RuntimeWarning, stacklevel=2)
            continue
        loaded.append(point.name)
    return loaded


def list_models(task: str | None = None) -> list[str]:
    """Names of the catalog's models, optionally only those supporting ``task``."""
    load_entry_points()
    return sorted(n for n, e in _REGISTRY.items() if task is None or task in e.tasks)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called ``name``; an unknown name suggests the closest ones."""
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
