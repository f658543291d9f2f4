"""Readers for the whitespace-separated text files of the UCI split format.

Every error names the file and the 1-based line (and column) at fault.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DataError
from .validate import MAX_MAGNITUDE


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _content_lines(path: Path) -> list[str]:
    """Lines of the file with trailing blank lines dropped."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_table(path: Path) -> np.ndarray:
    """A float64 matrix from a whitespace-separated file; rejects ragged rows, non-numbers, NaN, inf
    and magnitudes above :data:`~bnnzoo.data.validate.MAX_MAGNITUDE` (beyond what a float32 fit can use)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    stat = path.stat()
    return _read_table_cached(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_table_cached(path_str: str, _mtime: int, _size: int) -> np.ndarray:
    path = Path(path_str)
    rows = [line.split() for line in _content_lines(path)]
    if not rows:
        raise DataError(f"{path} is empty")
    ncols = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != ncols:
            got = "an empty line" if not row else f"{len(row)} columns"
            raise DataError(f"{path} line {i + 1}: malformed row, expected {ncols} columns, got {got}")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        for i, row in enumerate(rows):
            for j, tok in enumerate(row):
                try:
                    float(tok)
                except ValueError:
                    raise DataError(f"{path} line {i + 1}, column {j + 1}: {tok!r} is not a number") from None
        raise
    bad = ~np.isfinite(table)
    if bad.any():
        where = np.argwhere(bad)
        i, j = int(where[0, 0]), int(where[0, 1])
        nrows = int(bad.any(axis=1).sum())
        raise DataError(
            f"{path} line {i + 1}, column {j + 1}: value {rows[i][j]!r} is not finite "
            f"({nrows} rows hold NaN or inf)"
        )
    big = np.abs(table) > MAX_MAGNITUDE
    if big.any():
        i, j = (int(v) for v in np.argwhere(big)[0])
        raise DataError(
            f"{path} line {i + 1}, column {j + 1}: value {rows[i][j]!r} exceeds {MAX_MAGNITUDE:g} in magnitude "
            f"(rows holding such values: {int(big.any(axis=1).sum())}): fits compute in float32, where such "
            f"values overflow; rescale the column (e.g. change its units)"
        )
    table.setflags(write=False)
    return table


def read_indices(path: Path, upper: int, kind: str) -> np.ndarray:
    """0-based integer indices (one or more per line), each in ``[0, upper)``."""
    path = Path(path)
    values: list[int] = []
    for i, line in enumerate(_content_lines(path)):
        for tok in line.split():
            try:
                val = float(tok)
            except ValueError:
                raise DataError(f"{path} line {i + 1}: {tok!r} is not an integer {kind} index") from None
            if not np.isfinite(val) or val != int(val):
                raise DataError(f"{path} line {i + 1}: {tok!r} is not an integer {kind} index")
            val = int(val)
            if not 0 <= val < upper:
                raise DataError(
                    f"{path} line {i + 1}: {kind} index {val} is out of range [0, {upper}) "
                    f"(data.txt has {upper} {kind}s)"
                )
            values.append(val)
    if not values:
        raise DataError(f"{path} holds no {kind} indices")
    return np.asarray(values, dtype=np.int64)


def read_int(path: Path) -> int:
    """A single positive integer (``n_splits.txt``, ``n_hidden.txt``, ...)."""
    path = Path(path)
    toks = _read_text(path).split()
    try:
        val = float(toks[0]) if len(toks) == 1 else None
    except ValueError:
        val = None
    if val is None or not np.isfinite(val) or val != int(val) or val < 1:
        raise DataError(f"{path}: expected a single positive integer, got {' '.join(toks)[:40]!r}")
    return int(val)
