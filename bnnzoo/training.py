"""Minibatch loops shared by the catalog's fitting procedures."""

from __future__ import annotations

import random
import time
from typing import Callable, Iterator

import numpy as np
import pyro
import torch
from tqdm import tqdm


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch (every device) and Pyro."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    pyro.set_rng_seed(seed)


def minibatches(n: int, batch_size: int, device, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled pass over ``n`` examples (the last batch may be smaller)."""
    perm = torch.randperm(n, device=device, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start:start + batch_size]


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where the installed torch supports it for these tensors."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def fit_svi(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    elbo,
    epochs: int,
    batch_size: int,
    lr: float,
    progress: bool = True,
    on_epoch_end: Callable[[int, float], None] | None = None,
    description: str = "SVI",
) -> dict[str, list[float]]:
    """Stochastic variational inference: Adam on ``elbo(model, guide)`` over shuffled minibatches.

    Returns ``{"loss": [...], "epoch_seconds": [...]}``: the mean loss (negative ELBO per training
    example) and the wall time of every epoch. The loss is accumulated on the device and read back
    once per epoch, so there is no host-device copy in the inner loop. ``on_epoch_end(epoch, loss)``
    runs after each epoch, outside the timed part (pruning schedules and benchmarks use it).
    """
    n = len(x)
    loss_fn = elbo(model, guide)
    optimizer = make_adam(loss_fn.parameters(), lr)
    history: dict[str, list[float]] = {"loss": [], "epoch_seconds": []}
    bar = tqdm(range(epochs), desc=description, disable=not progress, leave=False)
    for epoch in bar:
        start = time.perf_counter()
        total = torch.zeros((), device=x.device)
        for idx in minibatches(n, batch_size, x.device):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x[idx], y[idx], n)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        epoch_loss = float(total) / n / n
        if not np.isfinite(epoch_loss):
            raise FloatingPointError(f"the loss became {epoch_loss} in epoch {epoch + 1}: lower the learning rate")
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["loss"].append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4g}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_loss)
    return history
