"""Federated standardisation: the training statistics from the clients' sums, in a first round.

Every method standardises with the training set's statistics (:class:`~bnnzoo.models.standardizer.Standardizer`).
No client holds the whole set, so before its first round every federated run collects each client's count, sums
and sums of squares (:func:`moments`); the server combines them (:func:`standardizer_from_moments`,
equal to the pooled statistics) and sends the result with every later round, in the fit
configuration as bytes (:func:`encode` / :func:`decode`). The ServerApp (:mod:`.server_app`) asks
every client for its moments before the first round.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from bnnzoo.models.standardizer import Standardizer

STANDARDIZER_KEY = "standardizer"


def moments(x: torch.Tensor, y: torch.Tensor, task: str) -> list[np.ndarray]:
    """``[count, sum x, sum x^2, sum y, sum y^2]`` of one client (per feature for tabular inputs,
    over all pixels for images, as :class:`Standardizer` does), as float64 numpy arrays."""
    x, y = x.detach().double(), y.detach().double()
    if x.dim() > 2:
        sx, sxx, count_x = x.sum().reshape(1), (x * x).sum().reshape(1), x.numel()
    else:
        sx, sxx, count_x = x.sum(0), (x * x).sum(0), len(x)
    sy = y.sum() if task == "regression" else torch.zeros((), dtype=torch.float64)
    syy = (y * y).sum() if task == "regression" else torch.zeros((), dtype=torch.float64)
    out = [np.array([len(x), count_x], dtype=np.float64), sx, sxx, sy.reshape(1), syy.reshape(1)]
    return [a if isinstance(a, np.ndarray) else a.cpu().numpy() for a in out]


def standardizer_from_moments(parts: list[list[np.ndarray]], task: str, image: bool) -> Standardizer:
    """The :class:`Standardizer` of the union of the clients' data from their :func:`moments`
    (unbiased standard deviations, as ``torch.std``)."""
    counts = sum(p[0] for p in parts)
    n, n_x = float(counts[0]), float(counts[1])
    if n < 1:
        raise ValueError("no training examples were reported by the clients")

    def mean_std(total_count, s, ss):
        mean = s / total_count
        var = (ss - total_count * mean * mean) / max(total_count - 1.0, 1.0)
        std = np.sqrt(np.clip(var, 0.0, None))
        return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32)

    x_mean, x_std = mean_std(n_x, sum(p[1] for p in parts), sum(p[2] for p in parts))
    if image:
        x_mean, x_std = x_mean.reshape(()), x_std.reshape(())
    if task != "regression":
        return Standardizer(x_mean, x_std)
    y_mean, y_std = mean_std(n, sum(p[3] for p in parts), sum(p[4] for p in parts))
    y_std = y_std if n > 1 else torch.ones(1)
    return Standardizer(x_mean, x_std, y_mean.reshape(()), y_std.reshape(()))


def encode(std: Standardizer) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in vars(std).items() if v is not None})
    return buf.getvalue()


def decode(blob: bytes, device="cpu") -> Standardizer:
    with np.load(io.BytesIO(blob)) as arrays:
        return Standardizer(**{k: torch.as_tensor(arrays[k]) for k in arrays.files}).to(device)
