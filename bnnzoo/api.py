"""The user-facing functions: ``create`` an unfitted posterior, ``fit`` one by catalog name, ``load``."""

from __future__ import annotations

from .catalog import get_entry
from .data import Dataset, load_dataset
from .guides.training import set_seed
from .posterior import Posterior


def create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None = None,
           dataset: str = "", device="auto", seed: int = 0, **options) -> Posterior:
    """An unfitted posterior of catalog model ``name`` for data of ``input_shape`` (per example)
    and ``output_dim`` outputs (1 for regression, the number of classes for classification).

    Use it like a scikit-learn estimator: ``create(...).fit(x, y).predict(x_new)``.
    """
    return _create(name, task, input_shape, output_dim, network=network, dataset=dataset, device=device,
                   seed=seed, options=options)


def _create(name: str, task: str, input_shape, output_dim: int, *, network: dict | None, dataset: str, device,
            seed: int, options: dict, data: dict | None = None) -> Posterior:
    """The posterior of :func:`create`; ``data`` (where the training data came from) joins the config."""
    entry = get_entry(name)
    config = entry.configure(task, tuple(input_shape), output_dim, dataset, network=network, **options)
    config["seed"] = int(seed)
    if data is not None:
        config["data"] = data
    set_seed(seed)
    return entry.create(config, device=device)


def fit(name: str, data: Dataset | str | None = None, *, split: int = 0, network: dict | None = None,
        seed: int = 0, device="auto", progress: bool = True, **options) -> Posterior:
    """Fit catalog model ``name`` on ``data`` (a :class:`~bnnzoo.data.Dataset`, a dataset name, a
    directory, or ``None`` for the bundled Boston housing split ``split``).

    ``options`` override the entry's defaults (``epochs``, ``batch_size``, ``lr``, prior settings...).
    """
    dataset = data if isinstance(data, Dataset) else load_dataset(data, split=split)
    posterior = _create(name, dataset.task, dataset.input_shape, dataset.output_dim, network=network,
                        dataset=dataset.name, device=device, seed=seed, options=options,
                        data={"name": dataset.name, "split": dataset.split, "source": dataset.source})
    return posterior.fit(dataset.x_train, dataset.y_train, progress=progress)


def load(path, device="cpu") -> Posterior:
    """Load a posterior saved with ``Posterior.save``."""
    return Posterior.load(path, device=device)
