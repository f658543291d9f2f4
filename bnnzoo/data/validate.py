"""Checks and conversion of user-supplied arrays into the tensors a :class:`Dataset` holds.

What is accepted: anything NumPy or torch reads as a real numeric array (floating point of any
width, signed or unsigned integers, booleans; any byte order); ``x`` of shape ``(N, features...)``
and ``y`` of shape ``(N,)`` (regression also ``(N, 1)``). What is refused, with a
:class:`DataError` that names the argument, the rows and the allowed values: non-numeric or complex
data, ragged lists, scalars, empty data, a length mismatch, NaN or inf, values whose magnitude
exceeds :data:`MAX_MAGNITUDE`, and class labels that are not integers in ``[0, num_classes)``.

The magnitude bound: every fit computes in float32, and the standardiser and the metrics sum
squares of the data (a feature's variance, the squared residuals). With ``|v| <= 1e15`` a sum of
``10^8`` squares stays below 1e38, inside float32's range (3.4e38), so no statistic of the data
can overflow; larger values are refused with the advice to rescale them (a change of units). Tiny
magnitudes (``1e-30``) need no bound: a column whose variance underflows is treated as constant
by the standardiser.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import TASKS
from .errors import DataError

#: the largest magnitude accepted in ``x`` and ``y`` (see the module docstring)
MAX_MAGNITUDE = 1e15

# dtypes torch cannot compare or convert on every device: read as float64 first (exact for labels)
_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def _as_tensor(a, name: str, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.is_complex():
            raise DataError(f"{what}: complex values are not supported ({name} has dtype {t.dtype})")
        if t.dtype in _WIDE_UNSIGNED:
            t = t.to(torch.float64)
        return t
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{what}: {name} cannot be read as an array ({exc})") from exc
    if np.iscomplexobj(arr):
        raise DataError(f"{what}: complex values are not supported ({name} has dtype {arr.dtype})")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{what}: {name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.float64)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(arr.shape))  # (ascontiguousarray makes 0-d 1-d)


def _bad_rows(t: torch.Tensor) -> tuple[int, list[int], str]:
    """Rows holding NaN or inf: (count, first few row indices, 'NaN'/'inf'/'NaN and inf')."""
    if not t.is_floating_point():
        return 0, [], ""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    nan = torch.isnan(flat).any(dim=1)
    inf = torch.isinf(flat).any(dim=1)
    bad = (nan | inf).nonzero().flatten()
    kinds = " and ".join(k for k, m in (("NaN", nan), ("inf", inf)) if bool(m.any()))
    return int(bad.numel()), bad[:5].tolist(), kinds


def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    count, first, kinds = _bad_rows(t)
    if count:
        raise DataError(
            f"{what}: {name} contains {kinds} in {count} of {t.shape[0]} rows (first rows: {first})"
        )


def _check_magnitude(t: torch.Tensor, name: str, what: str) -> None:
    """Refuse values beyond :data:`MAX_MAGNITUDE` (checked in float64, before any float32 cast)."""
    if t.dtype == torch.bool or t.numel() == 0:
        return
    flat = t.reshape(t.shape[0], -1).to(torch.float64).abs()
    big = flat > MAX_MAGNITUDE
    if bool(big.any()):
        rows = big.any(dim=1).nonzero().flatten()
        row = int(rows[0])
        col = int(big[row].nonzero()[0, 0])
        where = f"row {row}" + (f", column {col}" if flat.shape[1] > 1 else "")
        raise DataError(
            f"{what}: {name} holds values of magnitude above {MAX_MAGNITUDE:g} in {rows.numel()} of "
            f"{t.shape[0]} rows (first: {where} = {float(t.reshape(t.shape[0], -1)[row, col]):.4g}); "
            f"fits compute in float32, where sums of squares of such values overflow: rescale {name} "
            f"(e.g. change its units)"
        )


def validate_arrays(x, y, task: str, num_classes: int | None = None, what: str = "data"):
    """Check ``x``/``y`` and return them as ``(float32 x, y)``; ``y=None`` checks inputs alone.

    ``y`` is returned float32 ``(N,)`` for regression and int64 ``(N,)`` for classification (``None``
    when not given). Raises :class:`DataError` (prefixed with ``what``) for an unknown task,
    unreadable, non-numeric or complex data, empty data, a length mismatch, NaN/inf values,
    magnitudes above :data:`MAX_MAGNITUDE`, wrong dimensions, non-integer or out-of-range class
    labels (see the module docstring).
    """
    if task not in TASKS:
        raise DataError(f"{what}: unknown task {task!r} (expected one of {TASKS})")
    xt = _as_tensor(x, "x", what)
    if xt.dim() < 2:
        raise DataError(
            f"{what}: x must have shape (N, features...) with at least 2 dimensions, got shape {tuple(xt.shape)}"
            + (" (use x.reshape(-1, 1) for a single feature)" if xt.dim() == 1 else "")
        )
    if xt.shape[0] == 0:
        raise DataError(f"{what}: empty data (x has 0 rows)")
    if xt[0].numel() == 0:
        raise DataError(f"{what}: x has no features (shape {tuple(xt.shape)})")
    _check_finite(xt, "x", what)
    _check_magnitude(xt, "x", what)
    xt = xt.to(torch.float32).contiguous()
    if y is None:
        return xt, None

    yt = _as_tensor(y, "y", what)
    if yt.dim() == 0:
        raise DataError(f"{what}: y must be 1-D, got a scalar")
    if yt.shape[0] == 0:
        raise DataError(f"{what}: empty data (x has {xt.shape[0]} rows, y has 0)")
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"{what}: x has {xt.shape[0]} rows but y has {yt.shape[0]}")
    _check_finite(yt, "y", what)

    if task == "regression":
        if yt.dim() == 2 and yt.shape[1] == 1:
            yt = yt[:, 0]
        if yt.dim() != 1:
            raise DataError(f"{what}: regression y must have shape (N,) or (N, 1), got {tuple(yt.shape)}")
        _check_magnitude(yt, "y", what)
        return xt, yt.to(torch.float32).contiguous()

    if yt.dim() != 1:
        raise DataError(f"{what}: classification y must be 1-D integer labels, got shape {tuple(yt.shape)}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise DataError(f"{what}: num_classes must be a positive integer, got {num_classes!r}")
    if yt.is_floating_point():
        frac = yt != torch.round(yt)
        if bool(frac.any()):
            rows = frac.nonzero().flatten()
            raise DataError(
                f"{what}: class labels must be integers; {rows.numel()} rows are not "
                f"(first: row {int(rows[0])} = {float(yt[rows[0]])})"
            )
        yt = yt.to(torch.float64)  # range-checked before the cast to int64, which could wrap
    hi = num_classes
    bad = (yt < 0) if hi is None else ((yt < 0) | (yt >= hi))
    if hi is None:
        bad = bad | (yt > torch.iinfo(torch.int64).max // 2)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        rng = "[0, inf)" if hi is None else f"[0, {hi})"
        raise DataError(
            f"{what}: {rows.numel()} class labels are out of range {rng} "
            f"(first: row {int(rows[0])} = {yt[rows[0]].item():g}; "
            f"labels span {yt.min().item():g}..{yt.max().item():g})"
        )
    return xt, yt.to(torch.int64).contiguous()
