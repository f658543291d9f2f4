"""Checks and conversion of user-supplied arrays into the tensors a :class:`Dataset` holds."""

from __future__ import annotations

import numpy as np
import torch

from .dataset import TASKS
from .errors import DataError


def _as_tensor(a, name: str, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{what}: {name} cannot be read as an array ({exc})") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{what}: {name} must be numeric, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _bad_rows(t: torch.Tensor) -> tuple[int, list[int], str]:
    """Rows holding NaN or inf: (count, first few row indices, 'NaN'/'inf'/'NaN and inf')."""
    if not (t.is_floating_point() or t.is_complex()):
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


def validate_arrays(x, y, task: str, num_classes: int | None = None, what: str = "data"):
    """Check ``x``/``y`` and return them as ``(float32 x, y)``.

    ``y`` is returned float32 ``(N,)`` for regression and int64 ``(N,)`` for classification.
    Raises :class:`DataError` (prefixed with ``what``) for an unknown task, empty data, a length
    mismatch, NaN/inf values, wrong dimensions, non-integer or out-of-range class labels.
    """
    if task not in TASKS:
        raise DataError(f"{what}: unknown task {task!r} (expected one of {TASKS})")
    xt, yt = _as_tensor(x, "x", what), _as_tensor(y, "y", what)
    if xt.dim() < 2:
        raise DataError(
            f"{what}: x must have shape (N, features...) with at least 2 dimensions, got shape {tuple(xt.shape)}"
            + (" (use x.reshape(-1, 1) for a single feature)" if xt.dim() == 1 else "")
        )
    if yt.dim() == 0:
        raise DataError(f"{what}: y must be 1-D, got a scalar")
    if xt.shape[0] == 0 or yt.shape[0] == 0:
        raise DataError(f"{what}: empty data (x has {xt.shape[0]} rows, y has {yt.shape[0]})")
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"{what}: x has {xt.shape[0]} rows but y has {yt.shape[0]}")
    if xt.is_complex() or yt.is_complex():
        raise DataError(f"{what}: complex values are not supported")
    _check_finite(xt, "x", what)
    _check_finite(yt, "y", what)
    xt = xt.to(torch.float32).contiguous()

    if task == "regression":
        if yt.dim() == 2 and yt.shape[1] == 1:
            yt = yt[:, 0]
        if yt.dim() != 1:
            raise DataError(f"{what}: regression y must have shape (N,) or (N, 1), got {tuple(yt.shape)}")
        return xt, yt.to(torch.float32).contiguous()

    if yt.dim() != 1:
        raise DataError(f"{what}: classification y must be 1-D integer labels, got shape {tuple(yt.shape)}")
    if yt.is_floating_point():
        frac = yt != torch.round(yt)
        if bool(frac.any()):
            rows = frac.nonzero().flatten()
            raise DataError(
                f"{what}: class labels must be integers; {rows.numel()} rows are not "
                f"(first: row {int(rows[0])} = {float(yt[rows[0]])})"
            )
    yt = yt.to(torch.int64)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"{what}: num_classes must be a positive integer, got {num_classes!r}")
    hi = num_classes
    bad = (yt < 0) if hi is None else ((yt < 0) | (yt >= hi))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        rng = "[0, inf)" if hi is None else f"[0, {hi})"
        raise DataError(
            f"{what}: {rows.numel()} class labels are out of range {rng} "
            f"(first: row {int(rows[0])} = {int(yt[rows[0]])}; labels span {int(yt.min())}..{int(yt.max())})"
        )
    return xt, yt.contiguous()
