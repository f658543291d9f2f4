"""MNIST and Fashion-MNIST from IDX files in any directory; the bundled MNIST copy is train5k (500 per
class) + t10k. Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) has the same files, names and shapes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .dataset import Dataset
from .errors import DataError
from .idx import read_idx_ubyte
from .paths import bundled_dir, data_roots

NUM_CLASSES = 10
_PATTERN = re.compile(r"^(?P<prefix>.+?)-(?P<kind>images|labels)[.-]idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$")


def mnist_files(root: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """IDX files in ``root`` by prefix: ``{"t10k": {"images": Path, "labels": Path}, ...}``.

    Matches ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` (also the
    ``<prefix>-images.idx3-ubyte`` spelling); an uncompressed file wins over its ``.gz``.
    A prefix may map to only one of the two kinds when its partner is missing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"MNIST directory not found: {root}")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        m = _PATTERN.match(path.name)
        if not m or not path.is_file():
            continue
        if (m["kind"] == "images") != (m["ndim"] == "3"):
            continue
        slot = found.setdefault(m["prefix"], {})
        if m["kind"] not in slot or not m["gz"]:
            slot[m["kind"]] = path
    return found


def _pair(root: Path, files: dict, prefix: str) -> tuple[Path, Path]:
    slot = files.get(prefix, {})
    for kind, nd in (("images", 3), ("labels", 1)):
        if kind not in slot:
            have = ", ".join(sorted(files)) or "none"
            raise DataError(
                f"missing file: {root / f'{prefix}-{kind}-idx{nd}-ubyte.gz'} (or without .gz); "
                f"prefixes present in {root}: {have}"
            )
    return slot["images"], slot["labels"]


def read_mnist_pair(images_path: Path, labels_path: Path, flatten: bool = False):
    """``(x float32 in [0, 1], y int64)`` from one images file and its labels file."""
    images = read_idx_ubyte(images_path, 3)
    labels = read_idx_ubyte(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"count mismatch: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path} holds no images")
    if labels.max() >= NUM_CLASSES:
        bad = int((labels >= NUM_CLASSES).sum())
        raise DataError(
            f"{labels_path}: {bad} labels out of range [0, {NUM_CLASSES}) (max label {int(labels.max())})"
        )
    x = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0)
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype("int64"))
    return x, y


def load_mnist(
    root: str | os.PathLike | None = None, train: str = "train5k", test: str = "t10k", flatten: bool = False
) -> Dataset:
    """MNIST as a classification :class:`Dataset`: x ``(N, 1, 28, 28)`` (``(N, 784)`` if flatten).

    ``root=None`` reads the bundled ``train5k`` + ``t10k``; ``train="train"`` reads the full 60k set
    from a directory that has it.
    """
    base = bundled_dir("mnist") if root is None else Path(root).expanduser()
    files = mnist_files(base)
    x_tr, y_tr = read_mnist_pair(*_pair(base, files, train), flatten=flatten)
    x_te, y_te = read_mnist_pair(*_pair(base, files, test), flatten=flatten)
    return Dataset(
        name="mnist",
        task="classification",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=NUM_CLASSES,
        source=str(base),
        meta={"train_prefix": train, "test_prefix": test},
    )


FASHION_DIR = "fashion-mnist"


def fashion_mnist_dir(root: str | os.PathLike | None) -> Path:
    """``root`` itself; without it, the first ``<data root>/fashion-mnist`` (``$BNNZOO_DATA``,
    ``shared/data``) that holds IDX files."""
    if root is not None:
        return Path(root).expanduser()
    for base in data_roots():
        if (base / FASHION_DIR).is_dir() and mnist_files(base / FASHION_DIR):
            return base / FASHION_DIR
    raise DataError("Fashion-MNIST is not bundled and was not found under $BNNZOO_DATA/fashion-mnist or "
                    "shared/data/fashion-mnist: pass root=DIR (bnnzoo.data.download_fashion_mnist(DIR) fetches it)")


def load_fashion_mnist(root: str | os.PathLike | None = None, train: str = "train", test: str = "t10k",
                       flatten: bool = False) -> Dataset:
    """Fashion-MNIST as a classification :class:`Dataset` (10 classes of clothing, x ``(N, 1, 28, 28)``
    in ``[0, 1]``, or ``(N, 784)`` if flatten), from the four IDX files in ``root``."""
    base = fashion_mnist_dir(root)
    files = mnist_files(base)
    x_tr, y_tr = read_mnist_pair(*_pair(base, files, train), flatten=flatten)
    x_te, y_te = read_mnist_pair(*_pair(base, files, test), flatten=flatten)
    return Dataset(name="fashion-mnist", task="classification", x_train=x_tr, y_train=y_tr, x_test=x_te,
                   y_test=y_te, num_classes=NUM_CLASSES, source=str(base),
                   meta={"train_prefix": train, "test_prefix": test})
