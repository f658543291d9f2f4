"""The user-facing functions: ``create`` an unfitted posterior, ``fit`` one by catalog name, ``load``."""

from __future__ import annotations

import numbers
from pathlib import Path

from .catalog import get_entry
from .checkpoint import Checkpointer, fit_identity, supports_checkpoints
from .data import Dataset, load_dataset
from .guides.training import set_seed
from .models.errors import ConfigError
from .posterior import Posterior


def create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None = None,
           dataset: str = "", device="auto", seed: int = 0, **options) -> Posterior:
    """An unfitted posterior of catalog model ``name`` for data of ``input_shape`` (per example)
    and ``output_dim`` outputs (1 for regression, the number of classes for classification).

    Use it like a scikit-learn estimator: ``create(...).fit(x, y).predict(x_new)``. ``options``
    override the entry's defaults; each is checked against the entry's schema first (a
    :class:`~bnnzoo.errors.ConfigError` names the option, the value and what is allowed; see
    ``bnnzoo list NAME``).
    """
    return _create(name, task, input_shape, output_dim, network=network, dataset=dataset, device=device,
                   seed=seed, options=options)


def _create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None, dataset: str, device,
            seed: int, options: dict, data: dict | None = None) -> Posterior:
    """The posterior of :func:`create`; ``data`` (where the training data came from) joins the config.
    The options are checked against the entry's schema (:meth:`CatalogEntry.configure`) before
    anything is built."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    entry = get_entry(name)
    config = entry.configure(task, tuple(input_shape), output_dim, dataset, network=network, **options)
    config["seed"] = int(seed)
    if data is not None:
        config["data"] = data
    set_seed(seed)
    return entry.create(config, device=device)


def fit(name: str, data: Dataset | str | None = None, *, split: int = 0, network: dict | None = None,
        seed: int = 0, device="auto", progress: bool = True, run_dir=None, resume=None,
        checkpoint_every: int | None = None, **options) -> Posterior:
    """Fit catalog model ``name`` on ``data`` (a :class:`~bnnzoo.data.Dataset`, a dataset name, a
    directory, or ``None`` for the bundled Boston housing split ``split``).

    ``options`` override the entry's defaults (``epochs``, ``batch_size``, ``lr``, prior settings...).

    Checkpoints (:mod:`bnnzoo.checkpoint`): with ``run_dir`` the fit writes checkpoints into
    ``run_dir/checkpoint/`` (every ``checkpoint_every`` epochs, or by default once a minute at an
    epoch's end, and on Ctrl-C); ``resume=RUN_DIR`` continues the fit from the checkpoint there and
    keeps checkpointing into it. A resumed fit must be asked for with the same entry, options, seed
    and data as the interrupted one (else :class:`~bnnzoo.errors.RunError`), and ends bit-identical
    on CPU to the uninterrupted fit. The checkpoint stays after the fit, until the run is saved over
    it: ``posterior.save(run_dir, overwrite=True)`` (as ``bnnzoo fit`` does) replaces the directory,
    checkpoint included. ``spike-slab-sghmc`` cannot checkpoint: ``run_dir`` alone fits it
    without checkpoints, ``resume`` or ``checkpoint_every`` raise :class:`~bnnzoo.errors.ConfigError`.
    """
    if resume is not None and run_dir is not None and Path(resume).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"resume={str(resume)!r} and run_dir={str(run_dir)!r} differ: a resumed fit "
                          f"checkpoints into the run it resumes (give one of them)")
    directory = resume if resume is not None else run_dir
    if checkpoint_every is not None and directory is None:
        raise ConfigError("checkpoint_every needs a run directory to write checkpoints to: give run_dir= or resume=")
    dataset = data if isinstance(data, Dataset) else load_dataset(data, split=split)
    posterior = _create(name, dataset.task, dataset.input_shape, dataset.output_dim, network=network,
                        dataset=dataset.name, device=device, seed=seed, options=options,
                        data={"name": dataset.name, "split": dataset.split, "source": dataset.source})
    if directory is None or (resume is None and checkpoint_every is None and not supports_checkpoints(posterior)):
        return posterior.fit(dataset.x_train, dataset.y_train, progress=progress)
    identity = fit_identity(name, posterior.config, dataset.x_train, dataset.y_train)
    posterior.checkpoint = Checkpointer(posterior, directory, identity=identity, every=checkpoint_every,
                                        resume=resume is not None)
    try:
        return posterior.fit(dataset.x_train, dataset.y_train, progress=progress)
    finally:
        posterior.checkpoint = None


def load(path, device="cpu") -> Posterior:
    """Load a posterior saved with ``Posterior.save``."""
    return Posterior.load(path, device=device)
