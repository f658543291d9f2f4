"""The UCI regression sets in the standard split format (Hernandez-Lobato & Adams 2015).

Values are returned raw: standardisation with training statistics is the posterior's job.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .errors import DataError
from .paths import ENV_VAR, bundled_dir, data_roots
from .textfiles import read_indices, read_int, read_table
from .validate import validate_arrays

UCI_SETS: dict[str, str] = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "yacht": "yacht",
    "wine": "wine-quality-red",
    "protein": "protein-tertiary-structure",
}

_LOOKUP = {k.lower(): k for k in UCI_SETS} | {v.lower(): k for k, v in UCI_SETS.items()}


def uci_short_name(name: str) -> str | None:
    """``"boston"`` for ``"boston"``/``"bostonHousing"`` (any case); ``None`` for an unknown name."""
    return _LOOKUP.get(str(name).lower())


def _unknown(name: str) -> DataError:
    choices = sorted(set(UCI_SETS) | set(UCI_SETS.values()))
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return DataError(
        f"unknown UCI data set {name!r}.{hint} Known: {', '.join(UCI_SETS)}; "
        "or pass a directory in the UCI split format (data.txt, index_*.txt)."
    )


def resolve_uci_dir(name_or_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The directory holding a UCI set and the set's display name."""
    short = uci_short_name(str(name_or_dir))
    if short is not None:
        dirname = UCI_SETS[short]
        if root is None and short == "boston":
            return bundled_dir("boston"), short
        tried = []
        for base in data_roots(root):
            for cand in (base / "uci" / dirname, base / dirname):
                if (cand / "data.txt").is_file():
                    return cand, short
                tried.append(str(cand))
        where = "; ".join(tried) if tried else "(no root given, $%s unset, no shared/data/uci found)" % ENV_VAR
        raise DataError(
            f"UCI set {short!r} ({dirname}) not found: no data.txt in {where}. "
            f"Pass root=<dir holding uci/{dirname}>, set ${ENV_VAR}, or pass the directory itself."
        )
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "data.txt").is_file():
            raise DataError(f"missing file: {path / 'data.txt'} ({path} is not in the UCI split format)")
        return path, path.name
    if os.sep in str(name_or_dir) or str(name_or_dir).startswith((".", "~")):
        raise DataError(f"UCI data directory not found: {path}")
    raise _unknown(str(name_or_dir))


def _num_splits(directory: Path) -> int:
    f = directory / "n_splits.txt"
    if f.is_file():
        return read_int(f)
    n = len(list(directory.glob("index_train_*.txt")))
    if n == 0:
        raise DataError(f"missing file: {f} (and no index_train_<i>.txt files in {directory})")
    return n


def uci_num_splits(name_or_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """How many train/test splits a UCI set has (20 for most, 5 for protein)."""
    return _num_splits(resolve_uci_dir(name_or_dir, root)[0])


def load_uci(name_or_dir: str | os.PathLike, split: int = 0, root: str | os.PathLike | None = None) -> Dataset:
    """Split ``split`` of a UCI set: float32 ``x (N, D)``, ``y (N,)``, raw values."""
    directory, name = resolve_uci_dir(name_or_dir, root)
    n_splits = _num_splits(directory)
    if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or not 0 <= split < n_splits:
        raise DataError(f"split {split!r} is out of range for {name}: it has {n_splits} splits (0..{n_splits - 1})")
    split = int(split)
    table = read_table(directory / "data.txt")
    nrows, ncols = table.shape
    feats = read_indices(directory / "index_features.txt", ncols, "column")
    target_file = directory / "index_target.txt"
    target = read_indices(target_file, ncols, "column")
    if target.size != 1:
        raise DataError(f"{target_file}: expected one target column, got {target.size}")
    if int(target[0]) in set(feats.tolist()):
        raise DataError(f"{target_file}: target column {int(target[0])} is also listed in index_features.txt")
    train_file, test_file = directory / f"index_train_{split}.txt", directory / f"index_test_{split}.txt"
    train = read_indices(train_file, nrows, "row")
    test = read_indices(test_file, nrows, "row")
    shared = np.intersect1d(train, test)
    if shared.size:
        raise DataError(
            f"{train_file} and {test_file} share {shared.size} rows (first: {shared[:5].tolist()}); "
            "train and test must be disjoint"
        )
    where = f"{name} split {split}"
    x_tr, y_tr = validate_arrays(table[train][:, feats], table[train, target[0]], "regression", what=f"{where} train")
    x_te, y_te = validate_arrays(table[test][:, feats], table[test, target[0]], "regression", what=f"{where} test")
    meta: dict = {"n_splits": n_splits, "feature_columns": feats.tolist(), "target_column": int(target[0]),
                  "train_rows": train.tolist(), "test_rows": test.tolist()}
    for key in ("n_hidden", "n_epochs"):
        if (directory / f"{key}.txt").is_file():
            meta[key] = read_int(directory / f"{key}.txt")
    return Dataset(
        name=name,
        task="regression",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        split=split,
        source=str(directory),
        meta=meta,
    )


__all__ = ["UCI_SETS", "load_uci", "uci_num_splits", "resolve_uci_dir", "uci_short_name"]
