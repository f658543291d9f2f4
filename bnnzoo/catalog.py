"""The catalog: a registry of named methods (model + inference + defaults + option schema + paper).

A method's module registers its :class:`CatalogEntry` with :func:`register` when it is imported;
``import bnnzoo`` imports the built-in methods (:mod:`bnnzoo.methods`), so :func:`list_models` and
:func:`get_entry` see them. This module imports no method: it is the registry the methods write to.

Options. Every key of an entry's ``defaults[task]`` sections (``model``, ``guide``, ``train``) is an
option of the entry, and each has an :class:`Option` in the entry's schema: its type (``int``,
``float``, ``bool`` or ``str``), its range (``gt``/``ge``/``lt``/``le``), its allowed values
(``choices``) and whether ``None`` is allowed (``nullable``, for options whose default is ``None``:
``keep=None`` means "no target"). :meth:`CatalogEntry.configure` checks every value the user gives
against it, and then the entry's cross-option ``checks``, before anything is built or fitted; a value
that fails raises :class:`~bnnzoo.errors.ConfigError` naming the entry, the option, the value and
what is allowed. ``None`` is an ordinary value there: it is refused for an option that is not
nullable (leave the option out to keep its default). An integer option takes only integers (``2.5``
and ``True`` are refused); a float option takes any finite real number and stores it as ``float``.
:func:`register` checks that the defaults of every task pass the schema.

An entry declares its schema in ``options``; :data:`TRAINING_OPTIONS` holds the options shared by
the gradient-trained entries (``epochs``, ``batch_size``, ``lr``). An option an entry does not
declare (an entry of another package written before schemas existed) gets the schema of
:data:`TRAINING_OPTIONS` where the name is one of those, else one inferred from the type of its
default (:meth:`Option.infer`), so ``epochs <= 0`` or a negative learning rate is refused by every
entry.

Another installed package adds entries the same way, from its own modules, and advertises them with
an entry point in the ``bnnzoo.catalog`` group (``[project.entry-points."bnnzoo.catalog"]``,
``my-method = "mypackage.methods"``): on the first :func:`list_models` or :func:`get_entry` every such
entry point is loaded once; loading imports its module (which registers its entries), and an entry
point that names a :class:`CatalogEntry` object is registered directly.
"""

from __future__ import annotations

import copy
import difflib
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from bnnzoo.models.errors import ConfigError

#: the entry-point group through which other packages add catalog entries
ENTRY_POINT_GROUP = "bnnzoo.catalog"

_REGISTRY: dict[str, CatalogEntry] = {}
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


class UnknownOptionError(ConfigError, TypeError):
    """An option the entry does not have (also a ``TypeError``, as an unexpected keyword argument)."""


class UnknownModelError(ConfigError, KeyError):
    """A model name that is not in the catalog (also a ``KeyError``, as a failed look-up)."""

    __str__ = ConfigError.__str__  # the message as written, not quoted as KeyError quotes it


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_SECTIONS = ("model", "guide", "train")


@dataclass(frozen=True)
class Option:
    """The schema of one option: its ``type`` (``int``, ``float``, ``bool`` or ``str``), its range
    (``gt`` / ``ge`` / ``lt`` / ``le`` bounds, for numbers), its allowed values (``choices``),
    whether ``None`` is allowed (``nullable``) and a one-line ``help``.

    :meth:`check` returns the value in its canonical form (``float`` for a float option) or raises
    :class:`~bnnzoo.errors.ConfigError`: a bool is never a number, an integer option refuses
    ``2.5``, a float option refuses NaN and infinities, a string option takes only its ``choices``
    (when it has them)."""

    type: type
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    help: str = ""
    why: str = ""  # the reason for the range, added to a range error (e.g. what float32 can hold)

    def __post_init__(self):
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"an option's type is int, float, bool or str, not {self.type!r}")

    @classmethod
    def infer(cls, default) -> Option:
        """The schema of an undeclared option, from the type of its ``default``: the same type (a
        non-negative default bounds a number below by 0), nullable where the default is ``None``
        (any value is then taken as it is; the entry's ``create`` checks it)."""
        if isinstance(default, bool):
            return cls(bool)
        if isinstance(default, numbers.Integral):
            return cls(int, ge=0 if default >= 0 else None)
        if isinstance(default, numbers.Real):
            return cls(float, ge=0 if default >= 0 else None)
        if isinstance(default, str):
            return cls(str)
        return _ANY

    def describe(self) -> str:
        """What the option allows, e.g. ``"an integer >= 1"``, ``"one of 'ss', 'plain'"``,
        ``"a number in (0, 1], or null"``."""
        if self is _ANY:
            return "any JSON value"
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _TYPE_NAMES[self.type]
            low = (self.gt, "(") if self.gt is not None else (self.ge, "[") if self.ge is not None else None
            high = (self.lt, ")") if self.lt is not None else (self.le, "]") if self.le is not None else None
            if low and high:
                text += f" in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
            elif low:
                text += f" {'>' if low[1] == '(' else '>='} {low[0]:g}"
            elif high:
                text += f" {'<' if high[1] == ')' else '<='} {high[0]:g}"
        return text + (", or null" if self.nullable else "")

    def check(self, name: str, value, where: str = "") -> Any:
        """``value`` in canonical form if it is allowed for option ``name``, else a
        :class:`~bnnzoo.errors.ConfigError` naming ``where`` (the entry), the option, the value and
        what is allowed."""
        if self is _ANY or (value is None and self.nullable):
            return value
        if value is None:
            raise ConfigError(f"{where}option {name!r} cannot be null: it must be {self.describe()} "
                              "(leave it out to keep its default)")
        ok = True
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is str:
            ok = isinstance(value, str)
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            ok = False
        elif self.type is int:
            ok = isinstance(value, numbers.Integral)
            value = int(value) if ok else value
        else:
            ok = math.isfinite(value)
            value = float(value) if ok else value
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.type in (int, float):
            ok = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                  and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        if not ok:
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(f"{where}option {name!r} must be {self.describe()}, got {value!r}{why}")
        return value


_ANY = Option(str, nullable=True, help="not declared by the entry; any value")

#: the options of gradient-trained entries; also the schema of these names in an entry that does
#: not declare them
TRAINING_OPTIONS: dict[str, Option] = {
    "epochs": Option(int, ge=1, help="passes over the training data"),
    "batch_size": Option(int, ge=1, help="examples per minibatch"),
    "lr": Option(float, gt=0, help="learning rate (step size)"),
    "augment": Option(str, choices=("crop-flip",), nullable=True,
                      help="image classification: augment every minibatch on the device (crop-flip: pad 4, "
                           "random crop, random horizontal flip); null: none"),
}

#: a number a user may give (key) and the default rule that otherwise sets it (value, a ``train``
#: option): giving the number without the rule sets the rule to null, so that it runs as asked
#: (``epochs`` and horseshoe-svi's ``min_steps``; ``epochs`` or ``cycles`` and spike-slab-sghmc's
#: ``min_steps``; ``warmup_epochs`` and bmr-iterative's ``warmup_fraction``)
RULE_OPTIONS = {"epochs": "min_steps", "cycles": "min_steps", "warmup_epochs": "warmup_fraction"}

#: the options of the entries that make choices on a validation part of the training data
#: (:meth:`bnnzoo.posterior.Posterior.fit`): the number of epochs (``epochs`` is then the most they
#: may run) and, for classification, the predictive's temperature
VALIDATION_OPTIONS: dict[str, Option] = {
    "validation_fraction": Option(float, gt=0, lt=1, nullable=True,
                                  help="fraction of the training rows held out for the choices below (then the "
                                       "fit runs on all rows); null: no choice is made on validation data"),
    "select_epochs": Option(bool, help="choose the number of epochs (at most `epochs`) on the held-out rows"),
    "patience": Option(int, ge=1, help="epochs without a better validation log-likelihood before the "
                                       "selection fit stops"),
    "select_folds": Option(int, ge=2, nullable=True,
                           help="choose the epochs on this many folds of the training rows fitted in step, each "
                                "row held out once, by their pooled score, while the held-out part would have "
                                "fewer than 1,000 rows and the fit can continue in stages (not an autoguide's); "
                                "null: on the one held-out part"),
    "calibrate": Option(bool, help="classification: fit the predictive's temperature on the held-out "
                                   "rows (temperature scaling)"),
}

#: the validation options' values of an entry that makes no choice on validation data
VALIDATION_OFF = {"validation_fraction": None, "select_epochs": True, "patience": 20, "calibrate": False}
#: classification: the predictive's temperature fitted on a validation fifth of the training
#: rows, the epochs run as configured: a mean-field fit of a few epochs is overconfident (its
#: posterior spread barely leaves the initial scale), and one temperature fitted on held-out rows
#: corrects that without touching the fit (docs/methods/map-meanfield.md). The classification
#: default of meanfield-vi, horseshoe-svi, bmr and bmr-iterative.
CALIBRATED = {"validation_fraction": 0.2, "select_epochs": False, "patience": 20, "calibrate": True}
#: ``select_folds`` continues each fold's fit in stages, so only an entry whose fit up to an epoch
#: does not depend on its total epochs offers it (map and meanfield-vi; not the entries that place a
#: reduction, warm-up or pruning by the epochs): those entries add this to their training defaults
NO_FOLDS = {"select_folds": None}


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
    dataset and the user's overrides; ``options`` is the schema of those options (name ->
    :class:`Option`, one schema for every task); ``checks`` are functions of a full configuration
    that raise :class:`~bnnzoo.errors.ConfigError` for a combination of values the entry cannot
    run (``warmup_epochs`` not below ``epochs``...), run by :meth:`configure` after the schema.
    """

    name: str
    summary: str
    paper: str
    tasks: tuple[str, ...]
    create: Callable
    defaults: dict = field(default_factory=dict)
    network_overrides: dict = field(default_factory=dict)  # dataset name -> network for this method
    options: dict = field(default_factory=dict)
    checks: tuple = ()

    def option_names(self, task: str) -> list[str]:
        """The options of ``task``: every key of its ``model``, ``guide`` and ``train`` defaults."""
        return sorted({k for s in _SECTIONS for k in self.defaults[task].get(s, {})})

    def schema(self, task: str) -> dict[str, Option]:
        """Option name -> :class:`Option` for ``task`` (an undeclared option's schema as in the
        module docstring)."""
        self._check_task(task)
        out = {}
        for s in _SECTIONS:
            for key, default in self.defaults[task].get(s, {}).items():
                out[key] = self.options.get(key) or TRAINING_OPTIONS.get(key) or Option.infer(default)
        return out

    def check_options(self, task: str, options: dict) -> dict:
        """``options`` (name -> value) checked against :meth:`schema` of ``task``, in canonical form.
        An unknown name raises :class:`UnknownOptionError` (a :class:`~bnnzoo.errors.ConfigError`)
        suggesting the closest ones and listing the options; a bad value names the option and what it allows."""
        schema = self.schema(task)
        out = {}
        for key, value in options.items():
            if key not in schema:
                close = difflib.get_close_matches(key, list(schema), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UnknownOptionError(f"{self.name} has no option {key!r}{hint} "
                                         f"Options: {', '.join(sorted(schema))}")
            out[key] = schema[key].check(key, value, f"{self.name}: ")
        return out

    def configure(self, task: str, input_shape: tuple[int, ...], output_dim: int, dataset_name: str = "",
                  network: dict | None = None, **overrides) -> dict:
        """The full configuration for ``task`` on data of ``input_shape``; ``overrides`` replace any
        default found in the ``model``, ``guide`` or ``train`` sections. Every override is checked
        against the entry's schema and the result against its ``checks`` before it is returned
        (:class:`~bnnzoo.errors.ConfigError` otherwise; unknown keys are errors)."""
        self._check_task(task)
        overrides = self.check_options(task, overrides)
        config = copy.deepcopy(self.defaults[task])
        net = network or self.network_overrides.get(dataset_name) or default_network(dataset_name, task, input_shape)
        config.update(task=task, input_shape=list(input_shape), output_dim=int(output_dim), network=dict(net),
                      dataset=dataset_name)
        for key, value in overrides.items():
            for s in _SECTIONS:
                if key in config.get(s, {}):
                    config[s][key] = value
        for asked, rule in RULE_OPTIONS.items():  # an asked-for number replaces the default rule that would set it
            if asked in overrides and rule not in overrides and rule in config.get("train", {}):
                config["train"][rule] = None
        for check in self.checks:
            check(config)
        return config

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ConfigError(f"{self.name} supports {', '.join(self.tasks)}, not {task}")


def register(entry: CatalogEntry) -> CatalogEntry:
    """Add ``entry`` to the catalog under ``entry.name`` (a name can be registered once, and the
    defaults of each of its tasks must pass its schema and its checks); returns it."""
    if entry.name in _REGISTRY:
        raise ValueError(f"a catalog entry named {entry.name!r} exists already")
    for task in entry.tasks:
        defaults = {k: v for s in _SECTIONS for k, v in entry.defaults[task].get(s, {}).items()}
        try:
            entry.check_options(task, defaults)
            for check in entry.checks:
                check({**copy.deepcopy(entry.defaults[task]), "task": task})
        except ConfigError as err:
            raise ValueError(f"the {task} defaults of {entry.name!r} fail its own schema: {err}") from None
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
    """The catalog entry called ``name``; an unknown name raises :class:`UnknownModelError` (a
    :class:`~bnnzoo.errors.ConfigError`) suggesting the closest ones."""
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
