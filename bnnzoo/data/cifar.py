"""CIFAR-10 and CIFAR-100 from the standard python batches in a directory.

The python version of each set (Krizhevsky 2009) is a directory of pickled dicts: CIFAR-10's
``cifar-10-batches-py`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, CIFAR-100's
``cifar-100-python`` holds ``train`` and ``test``. Each dict has ``data``, a ``(N, 3072)`` uint8 array
(the red, green and blue 32x32 planes of each image, row-major), and the labels: ``labels``
(CIFAR-10), ``fine_labels`` (100 classes) and ``coarse_labels`` (20 superclasses) for CIFAR-100.

The pickles are read with an unpickler that resolves only what these files need (numpy's array
reconstruction, ``ndarray``, ``dtype``, and ``codecs.encode`` for bytes), so a file that asks for anything else is refused with a
:class:`DataError` naming it instead of running its code.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset
from .errors import DataError
from .paths import data_roots

IMAGE_SHAPE = (3, 32, 32)
#: the directory each set unpacks to, and its training and test files
LAYOUTS: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    10: ("cifar-10-batches-py", tuple(f"data_batch_{k}" for k in range(1, 6)), ("test_batch",)),
    100: ("cifar-100-python", ("train",), ("test",)),
}
LABEL_KEYS = {10: {"fine": b"labels"}, 100: {"fine": b"fine_labels", "coarse": b"coarse_labels"}}
LABEL_CLASSES = {"fine": None, "coarse": 20}


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The callables a CIFAR pickle may name: array reconstruction (protocol 2, as the files were
    written, and protocol 5's buffer path), ``ndarray`` and ``dtype``, under numpy 1 and 2 paths, and
    ``_codecs.encode`` (how Python 3 writes bytes at protocol 2)."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_cifar_batch(path: str | os.PathLike, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one pickled batch; a clear :class:`DataError`
    for a missing, unreadable or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"cannot read the CIFAR batch {path}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in batch) \
            if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR batch (needs the keys data and {label_key.decode()}; has {keys})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: data must be a (N, 3072) uint8 array, got {type(data).__name__} {shape}")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {labels.shape} integer labels expected for {data.shape[0]} images")
    return data, labels.astype(np.int64)


def cifar_dir(root: str | os.PathLike | None, num_classes: int) -> Path:
    """The directory of the python batches: ``root`` itself when it holds them, else its
    ``cifar-10-batches-py`` / ``cifar-100-python``; without ``root``, the first data root
    (``$BNNZOO_DATA``, ``shared/data``) that has one."""
    folder, train, _ = LAYOUTS[num_classes]
    candidates = [Path(root).expanduser()] if root is not None else data_roots()
    for base in candidates:
        for cand in (base, base / folder):
            if (cand / train[0]).is_file():
                return cand
    if root is not None:
        raise DataError(f"no CIFAR-{num_classes} batches in {root} (nor in {Path(root) / folder}): "
                        f"expected {train[0]} and the other python batches; bnnzoo.data.download_cifar fetches them")
    raise DataError(f"CIFAR-{num_classes} is not bundled and was not found under $BNNZOO_DATA or shared/data: "
                    f"pass root=DIR (bnnzoo.data.download_cifar(DIR, {num_classes}) fetches it)")


def is_cifar_dir(path: Path) -> int | None:
    """10 or 100 when ``path`` (or the directory it unpacks to) holds CIFAR python batches."""
    for k in LAYOUTS:
        folder, train, test = LAYOUTS[k]
        for cand in (path, path / folder):
            if (cand / train[0]).is_file() and (cand / test[0]).is_file():
                return k
    return None


def _read_part(base: Path, names: tuple[str, ...], key: bytes, classes: int):
    parts = [read_cifar_batch(base / name, key) for name in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{base}: labels out of range [0, {classes}) (min {labels.min()}, max {labels.max()})")
    x = torch.from_numpy(data).to(torch.float32).div_(255.0).reshape(-1, *IMAGE_SHAPE)
    return x, torch.from_numpy(labels)


def load_cifar(root: str | os.PathLike | None = None, num_classes: int = 10, labels: str = "fine") -> Dataset:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (``100``) as a classification :class:`Dataset`:
    x ``(N, 3, 32, 32)`` float32 in ``[0, 1]``, y int64; 50,000 training and 10,000 test images in the
    full sets. ``labels="coarse"`` takes CIFAR-100's 20 superclasses."""
    if num_classes not in LAYOUTS:
        raise DataError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes!r}")
    if labels not in LABEL_KEYS[num_classes]:
        raise DataError(f"CIFAR-{num_classes} labels are {' or '.join(map(repr, LABEL_KEYS[num_classes]))}, "
                        f"got {labels!r}")
    base = cifar_dir(root, num_classes)
    _, train, test = LAYOUTS[num_classes]
    classes = LABEL_CLASSES[labels] or num_classes
    key = LABEL_KEYS[num_classes][labels]
    x_tr, y_tr = _read_part(base, train, key, classes)
    x_te, y_te = _read_part(base, test, key, classes)
    return Dataset(name=f"cifar{num_classes}", task="classification", x_train=x_tr, y_train=y_tr, x_test=x_te,
                   y_test=y_te, num_classes=classes, source=str(base), meta={"labels": labels})
