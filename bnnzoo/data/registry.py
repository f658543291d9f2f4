"""One entry point for every data set the CLI and benchmarks accept."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .cifar import is_cifar_dir, load_cifar
from .dataset import Dataset
from .errors import DataError
from .mnist import load_fashion_mnist, load_mnist, mnist_files
from .synthetic import make_sparse_teacher
from .uci import load_uci, uci_short_name

DATASETS: list[str] = [
    "boston", "concrete", "energy", "yacht", "wine", "protein", "mnist", "fashion-mnist", "cifar10", "cifar100",
    "sparse-teacher",
]
_CIFAR_NAMES = {"cifar10": 10, "cifar-10": 10, "cifar100": 100, "cifar-100": 100}
_FASHION_NAMES = ("fashion-mnist", "fashionmnist")


def _no_options(name: str, kwargs: dict) -> None:
    if kwargs:
        raise DataError(f"data set {name!r} takes no options, got {', '.join(sorted(kwargs))}")


def _load_mnist_dir(root: Path | None, kwargs: dict) -> Dataset:
    """MNIST from ``root``; without an explicit ``train=`` the full set wins when present."""
    if root is not None and "train" not in kwargs and "train" in mnist_files(root):
        kwargs = {**kwargs, "train": "train"}
    return load_mnist(root, **kwargs)


def load_dataset(
    name_or_dir: str | os.PathLike | None = None, split: int = 0, root: str | os.PathLike | None = None, **kwargs
) -> Dataset:
    """Load a data set by name (see :data:`DATASETS`) or from a directory.

    ``None`` is the bundled Boston housing set. UCI names take ``split`` and ``root``; ``"mnist"``
    reads the bundled train5k/t10k unless ``root`` is given (``train=``, ``test=``, ``flatten=`` pass
    through); ``"fashion-mnist"``, ``"cifar10"`` and ``"cifar100"`` (not bundled) read ``root`` or
    the ``$BNNZOO_DATA`` / ``shared/data`` copy (``labels="coarse"`` for CIFAR-100's superclasses);
    ``"sparse-teacher"`` passes ``kwargs`` to :func:`make_sparse_teacher`. A directory with
    ``data.txt`` is read as a UCI split set, one with IDX files as MNIST (as Fashion-MNIST when its
    name says ``fashion``), one with CIFAR python batches as CIFAR-10 or CIFAR-100.
    """
    if name_or_dir is None:
        _no_options("boston", kwargs)
        return load_uci("boston", split=split, root=root)
    text = str(name_or_dir)
    key = text.lower().replace("_", "-")
    if uci_short_name(text) is not None:
        _no_options(text, kwargs)
        return load_uci(text, split=split, root=root)
    if key == "mnist":
        return _load_mnist_dir(None if root is None else Path(root).expanduser(), kwargs)
    if key in _FASHION_NAMES:
        return load_fashion_mnist(root, **kwargs)
    if key in _CIFAR_NAMES:
        return load_cifar(root, num_classes=_CIFAR_NAMES[key], **kwargs)
    if key in ("sparse-teacher", "teacher"):
        return make_sparse_teacher(**kwargs)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "data.txt").is_file():
            _no_options(text, kwargs)
            return load_uci(path, split=split)
        if mnist_files(path):
            if "fashion" in path.name.lower():
                return load_fashion_mnist(path, **kwargs)
            return _load_mnist_dir(path, kwargs)
        classes = is_cifar_dir(path)
        if classes is not None:
            return load_cifar(path, num_classes=classes, **kwargs)
        raise DataError(
            f"{path} holds neither a UCI split set (data.txt), MNIST IDX files (<prefix>-images-idx3-ubyte[.gz]) "
            "nor CIFAR python batches (data_batch_1 ... test_batch, or train / test)"
        )
    if os.sep in text or text.startswith((".", "~")):
        raise DataError(f"data directory not found: {path}")
    close = difflib.get_close_matches(key, DATASETS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise DataError(f"unknown data set {text!r}.{hint} Known: {', '.join(DATASETS)}; or pass a data directory.")
