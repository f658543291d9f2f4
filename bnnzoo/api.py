"""The user-facing functions: ``create`` an unfitted posterior, ``fit`` one by catalog name, ``load``, and
``build`` a catalog model and guide for plain Pyro code."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import NamedTuple

import torch

from .catalog import get_entry
from .checkpoint import Checkpointer, fit_identity, supports_checkpoints
from .data import Dataset, load_dataset
from .distributed import check_entry
from .guides import MeanFieldNormal, PointMass, PyroAutoGuide
from .guides.data_parallel import current as data_parallel_context
from .guides.training import set_seed
from .models.errors import ConfigError
from .models.standardizer import Standardizer
from .networks import module_spec, supplying
from .posterior import Posterior


def create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None = None,
           dataset: str = "", device="auto", seed: int = 0, guide=None, module: torch.nn.Module | None = None,
           **options) -> Posterior:
    """An unfitted posterior of catalog model ``name`` for data of ``input_shape`` (per example)
    and ``output_dim`` outputs (1 for regression, the number of classes for classification).

    Use it like a scikit-learn estimator: ``create(...).fit(x, y).predict(x_new)``. ``options``
    override the entry's defaults; each is checked against the entry's schema first (a
    :class:`~bnnzoo.errors.ConfigError` names the option, the value and what is allowed; see
    ``bnnzoo list NAME``).

    ``guide``: a Pyro autoguide class (``pyro.infer.autoguide.AutoNormal``, ``AutoDelta``...) or a
    callable ``model -> AutoGuide`` to fit in place of the entry's own guide
    (:class:`~bnnzoo.guides.PyroAutoGuide`); only the entries whose guide is a plain distribution over
    the weights of a Gaussian-prior model take one (``map``, ``meanfield-vi``), the others raise
    :class:`~bnnzoo.errors.ConfigError`. Such a posterior fits, predicts and evaluates, but is not saved.

    ``module``: your own ``torch.nn.Module`` as the network, in place of ``network`` (a catalog
    architecture): its ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers get the entry's prior,
    one group per output neuron or channel, and every other parameter (normalisation layers,
    embeddings) is a point estimate (:class:`~bnnzoo.models.ModuleNetwork`). The module is copied;
    its last such layer is the output layer. A saved run is loaded with ``load(path, module=...)``.
    """
    return _create(name, task, input_shape, output_dim, network=network, dataset=dataset, device=device,
                   seed=seed, options=options, guide=guide, module=module)


def _create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None, dataset: str, device,
            seed: int, options: dict, data: dict | None = None, guide=None, module=None) -> Posterior:
    """The posterior of :func:`create`; ``data`` (where the training data came from) joins the config.
    The options are checked against the entry's schema (:meth:`CatalogEntry.configure`) before
    anything is built."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    entry = get_entry(name)
    if module is not None:
        if network is not None:
            raise ConfigError("give network= (a catalog architecture) or module= (your own), not both")
        network = module_spec(module)
    config = entry.configure(task, tuple(input_shape), output_dim, dataset, network=network, **options)
    config["seed"] = int(seed)
    if data is not None:
        config["data"] = data
    set_seed(seed)
    with supplying(module):
        posterior = entry.create(config, device=device)
    if guide is not None:
        _use_autoguide(posterior, guide)
    return posterior


#: the entries whose own guide an autoguide may replace: SVI over a Gaussian-prior model's weights
AUTOGUIDE_ENTRIES = ("map", "meanfield-vi")


def _use_autoguide(posterior: Posterior, autoguide) -> None:
    """Replace ``posterior``'s guide by a :class:`~bnnzoo.guides.PyroAutoGuide` of ``autoguide``."""
    if posterior.name not in AUTOGUIDE_ENTRIES or not isinstance(getattr(posterior, "guide", None),
                                                                 (MeanFieldNormal, PointMass)):
        raise ConfigError(f"entry {posterior.name!r} cannot fit an autoguide in place of its own guide: only "
                          f"{', '.join(AUTOGUIDE_ENTRIES)} can (the others' fits rely on their guide's structure)")
    posterior.guide = PyroAutoGuide(posterior.model.cpu(), autoguide).to(posterior.device)
    posterior.model.to(posterior.device)
    posterior.supports_checkpoints = False  # an autoguide's parameters are not saved (PyroAutoGuide.state_dict)


class BuiltModel(NamedTuple):
    """What :func:`build` returns: a Pyro ``model`` and ``guide`` working in standardised units, and
    the ``standardizer`` of the data given (``None`` without data)."""

    model: torch.nn.Module
    guide: torch.nn.Module
    standardizer: Standardizer | None


def build(name: str, task: str, *, input_shape, output_dim: int, data=None, network: dict | None = None,
          seed: int = 0, module: torch.nn.Module | None = None, **options) -> BuiltModel:
    """The Pyro model and guide of catalog entry ``name`` for your own Pyro code, on the CPU.

    ``model(x, y=None, num_data=None)`` is a :class:`~bnnzoo.models.BayesianNeuralNetwork`
    (observed site ``"obs"`` in a ``"data"`` plate, network outputs at ``"f"``) and ``guide`` the
    entry's guide, built exactly as :func:`create` builds them (``options`` as there). Both
    register their parameters with Pyro when called, so ``pyro.infer.SVI(model, guide,
    pyro.optim.ClippedAdam(...), TraceMeanField_ELBO())`` trains them, and ``Predictive`` and
    ``poutine`` handlers work on them. They work in standardised units: pass
    ``standardizer.x(x)`` and ``standardizer.y(y)``, and map predictions back with
    ``standardizer.y_inverse``. ``data`` (a :class:`~bnnzoo.data.Dataset`, whose training split is
    used, or an ``(x, y)`` pair of tensors) gives the standardizer's statistics; without it the
    standardizer is ``None``.

    Returns a :class:`BuiltModel` named tuple ``(model, guide, standardizer)``.
    """
    posterior = _create(name, task, input_shape, output_dim, network=network, dataset="", device="cpu",
                        seed=seed, options=options, module=module)
    standardizer = None
    if data is not None:
        if isinstance(data, Dataset):
            x, y = data.x_train, data.y_train
        elif isinstance(data, tuple) and len(data) == 2:
            x, y = data
        else:
            raise ConfigError(f"data must be a Dataset or an (x, y) pair of tensors, got {type(data).__name__}")
        x, y = posterior.validate(x, y, "data")
        standardizer = Standardizer.from_data(x, y, posterior.task)
    guide = getattr(posterior, "guide", None)
    if guide is None:
        raise ConfigError(f"entry {name!r} is not fitted through a Pyro guide (it samples or passes messages); "
                          f"build gives the model and guide of a guide-based entry")
    return BuiltModel(posterior.model, guide, standardizer)


def fit(name: str, data: Dataset | str | None = None, *, split: int = 0, network: dict | None = None,
        seed: int = 0, device="auto", progress: bool = True, run_dir=None, resume=None,
        checkpoint_every: int | None = None, guide=None, module: torch.nn.Module | None = None,
        **options) -> Posterior:
    """Fit catalog model ``name`` on ``data`` (a :class:`~bnnzoo.data.Dataset`, a dataset name, a
    directory, or ``None`` for the bundled Boston housing split ``split``).

    ``options`` override the entry's defaults (``epochs``, ``batch_size``, ``lr``, prior settings...).
    ``guide``: an autoguide to fit in place of the entry's own guide, as in :func:`create` (no
    checkpoints then: ``run_dir`` and ``resume`` raise :class:`~bnnzoo.errors.ConfigError`).
    ``module``: your own ``torch.nn.Module`` as the network, as in :func:`create`.

    Checkpoints (:mod:`bnnzoo.checkpoint`): with ``run_dir`` the fit writes checkpoints into
    ``run_dir/checkpoint/`` (every ``checkpoint_every`` epochs, or by default once a minute at an
    epoch's end, and on Ctrl-C); ``resume=RUN_DIR`` continues the fit from the checkpoint there and
    keeps checkpointing into it. A resumed fit must be asked for with the same entry, options, seed
    and data as the interrupted one (else :class:`~bnnzoo.errors.RunError`), and ends bit-identical
    on CPU to the uninterrupted fit. The checkpoint stays after the fit, until the run is saved over
    it: ``posterior.save(run_dir, overwrite=True)`` (as ``bnnzoo fit`` does) replaces the directory,
    checkpoint included. ``spike-slab-sghmc`` cannot checkpoint: ``run_dir`` alone fits it
    without checkpoints, ``resume`` or ``checkpoint_every`` raise :class:`~bnnzoo.errors.ConfigError`.

    Inside :func:`bnnzoo.distributed.process_group` (every rank calling ``fit`` alike) the fit is
    data-parallel over the group's ranks (docs/data-parallel.md); an entry without a data-parallel
    fit (:data:`bnnzoo.distributed.DATA_PARALLEL_ENTRIES`) raises :class:`~bnnzoo.errors.ConfigError`.
    """
    if resume is not None and run_dir is not None and Path(resume).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"resume={str(resume)!r} and run_dir={str(run_dir)!r} differ: a resumed fit "
                          f"checkpoints into the run it resumes (give one of them)")
    directory = resume if resume is not None else run_dir
    if checkpoint_every is not None and directory is None:
        raise ConfigError("checkpoint_every needs a run directory to write checkpoints to: give run_dir= or resume=")
    if guide is not None and directory is not None:
        raise ConfigError("an autoguide's fit cannot checkpoint: give guide= without run_dir= and resume=")
    if data_parallel_context() is not None:  # inside bnnzoo.distributed.process_group: every rank fits
        check_entry(name)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, split=split)
    posterior = _create(name, dataset.task, dataset.input_shape, dataset.output_dim, network=network,
                        dataset=dataset.name, device=device, seed=seed, options=options,
                        data={"name": dataset.name, "split": dataset.split, "source": dataset.source},
                        guide=guide, module=module)
    if directory is None or (resume is None and checkpoint_every is None and not supports_checkpoints(posterior)):
        return posterior.fit(dataset.x_train, dataset.y_train, progress=progress)
    identity = fit_identity(name, posterior.config, dataset.x_train, dataset.y_train)
    posterior.checkpoint = Checkpointer(posterior, directory, identity=identity, every=checkpoint_every,
                                        resume=resume is not None)
    try:
        return posterior.fit(dataset.x_train, dataset.y_train, progress=progress)
    finally:
        posterior.checkpoint = None


def load(path, device="cpu", module: torch.nn.Module | None = None) -> Posterior:
    """Load a posterior saved with ``Posterior.save``; a run fitted on your own module needs that
    module again (``module=``; one whose layers differ from the saved run's is refused)."""
    with supplying(module):
        return Posterior.load(path, device=device)
