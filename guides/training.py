"""Training loops shared by the catalog's fitting procedures: seeding, minibatches, Adam, the
epoch loop (progress, timing, divergence checks, callbacks, checkpoints) and SVI."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import numpy as np
import pyro
import torch
from tqdm import tqdm

from ..models.errors import BnnzooError
from .data_parallel import (
    DataParallel,
    all_reduce_gradients_,
    all_reduce_sum,
    broadcast_,
    current,
    example_slice,
)


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


#: the learning-rate schedules of :func:`fit_svi`
LR_SCHEDULES = ("constant", "cosine")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """The scheduler of ``schedule`` (:data:`LR_SCHEDULES`) over ``epochs`` epochs, stepped once an
    epoch: ``None`` for ``"constant"``, half a cosine from the optimiser's rate to 0 for ``"cosine"``."""
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")


def make_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where the installed torch supports it for these tensors."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


@dataclass
class TrainingHistory:
    """What a fit recorded, epoch by epoch: the mean loss per training example and the wall time.

    ``extra`` holds a method's own per-epoch or per-event records (e.g. BMR decisions, a sampler's
    per-sample statistics) under names the method documents; it must be JSON-serialisable.
    """

    loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def extend(self, other: TrainingHistory) -> None:
        """Append ``other``'s epochs (a fit continued by another loop)."""
        self.loss.extend(other.loss)
        self.epoch_seconds.extend(other.epoch_seconds)
        for key, value in other.extra.items():
            if isinstance(value, list) and isinstance(self.extra.get(key), list):
                self.extra[key].extend(value)
            else:
                self.extra[key] = value

    def to_dict(self) -> dict:
        return {"loss": list(self.loss), "epoch_seconds": list(self.epoch_seconds), **self.extra}

    @classmethod
    def from_dict(cls, values: dict) -> TrainingHistory:
        values = dict(values)
        return cls(loss=list(values.pop("loss", [])), epoch_seconds=list(values.pop("epoch_seconds", [])),
                   extra=values)


class DivergenceError(BnnzooError, FloatingPointError):
    """A fit's loss became non-finite or exploded: the fit is stopped and nothing is saved as fitted."""

    def __init__(self, method: str, epoch: int, loss: float, reason: str):
        self.method, self.epoch, self.loss, self.reason = method, epoch, loss, reason
        super().__init__(
            f"{method}: the fit diverged in epoch {epoch + 1} ({reason}, loss {loss:.4g}). Likely causes: a "
            f"learning rate or step size too large for this data, a prior or noise scale so small that the "
            f"likelihood overflows, or targets / inputs of extreme magnitude (check the data for huge values)")

    def __reduce__(self):  # a chain in a worker process sends its error back pickled
        return type(self), (self.method, self.epoch, self.loss, self.reason)


class Checkpoint(Protocol):
    """Saves and restores a fit's progress for an :class:`EpochLoop` (the package's
    :class:`bnnzoo.checkpoint.Checkpointer` implements it; this layer only calls it).

    ``restore(loop)`` runs once when the loop is built: it puts back the state of a checkpoint, if
    there is one to resume (the posterior's tensors, ``loop.state``'s objects, the history, the RNG
    states), and sets ``loop.epoch`` (epochs done) and ``loop.best``. ``epoch_end(loop)`` runs after
    every completed epoch (after ``on_epoch_end``) and writes a checkpoint when one is due.
    ``interrupted(loop)`` runs when a ``KeyboardInterrupt`` leaves the loop: it writes the state of
    the last completed epoch; the interrupt is then re-raised.
    """

    def restore(self, loop: EpochLoop) -> None: ...

    def epoch_end(self, loop: EpochLoop) -> None: ...

    def interrupted(self, loop: EpochLoop) -> None: ...


class EpochLoop:
    """Progress bar, timing, divergence checks, callbacks and checkpoints for the epochs of one fit.

    Either iterate (``for epoch in loop: ...; loop.end_epoch(loss)``) or, for an event-driven
    sampler whose epochs end inside a kernel's ``sample``, call :meth:`begin_epoch` and
    :meth:`end_epoch` yourself. :meth:`end_epoch` reads the loss back once (a 0-d tensor on any
    device, or a float), raises :class:`DivergenceError` when it is NaN or infinite, or when it
    exceeds the best loss so far by more than ``explode_factor * max(1, |best|)``, records it and the
    epoch's wall time in :attr:`history`, then runs ``on_epoch_end(epoch, loss)`` outside the timed
    part.

    Checkpoints: with a ``checkpoint`` (a :class:`Checkpoint`), the loop resumes where that
    checkpoint left off (:attr:`epoch` starts at the epochs it holds; iterating yields only the
    remaining ones), offers the checkpoint every completed epoch, and, used as a context manager
    (``with loop: for epoch in loop: ...``), hands it a ``KeyboardInterrupt`` before re-raising
    it. ``state`` names the fit's own stateful objects the checkpoint saves and restores beside the
    posterior (``{"optimizer": optimizer}``: anything with ``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, epochs: int, *, method: str, progress: bool = False, description: str | None = None,
                 on_epoch_end: Callable[[int, float], None] | None = None, explode_factor: float = 1e6,
                 history: TrainingHistory | None = None, checkpoint: Checkpoint | None = None,
                 state: Mapping[str, Any] | None = None):
        self.epochs = int(epochs)
        self.method = method
        self.on_epoch_end = on_epoch_end
        self.explode_factor = explode_factor
        self.history = history if history is not None else TrainingHistory()
        self.state = dict(state or {})
        self.checkpoint = checkpoint
        #: epochs completed (by this loop, or by the fit a checkpoint resumed)
        self.epoch = 0
        #: the lowest loss so far (the reference of the explosion check)
        self.best = math.inf
        self._start: float | None = None
        if checkpoint is not None:
            checkpoint.restore(self)
        # no bar at all unless asked: creating one (even disabled) takes tqdm's global lock, which a
        # process forked while another thread held it would wait for forever
        self._bar = tqdm(total=self.epochs, initial=min(self.epoch, self.epochs), desc=description or method,
                         leave=False) if progress else None

    def __iter__(self) -> Iterator[int]:
        try:
            while self.epoch < self.epochs:
                self.begin_epoch()
                yield self.epoch
                if self._start is not None:
                    raise RuntimeError("an EpochLoop epoch ended without end_epoch(loss)")
        finally:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                self.interrupted()
        finally:
            self.close()
        return False

    def interrupted(self) -> None:
        """The fit was interrupted (Ctrl-C): let the checkpoint write the last completed epoch."""
        if self.checkpoint is not None:
            self.checkpoint.interrupted(self)

    def begin_epoch(self) -> None:
        self._start = time.perf_counter()

    def end_epoch(self, loss) -> float:
        """Check, record and report the epoch's mean loss; returns it as a float."""
        seconds = time.perf_counter() - (self._start if self._start is not None else time.perf_counter())
        self._start = None
        value = float(loss)
        if not math.isfinite(value):
            self.close()
            raise DivergenceError(self.method, self.epoch, value, "the loss is not finite")
        if self.best < math.inf and value > self.best + self.explode_factor * max(1.0, abs(self.best)):
            self.close()
            raise DivergenceError(self.method, self.epoch, value,
                                  f"the loss exploded from its best value {self.best:.4g}")
        self.best = min(self.best, value)
        self.history.loss.append(value)
        self.history.epoch_seconds.append(seconds)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{value:.4g}")
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, value)
        if self.checkpoint is not None:
            self.checkpoint.epoch_end(self)
        return value

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def raise_if_parameters_diverged(params, loop: EpochLoop, step: int, cause: BaseException | None = None) -> None:
    """Raise :class:`DivergenceError` for ``loop``'s method and epoch, naming minibatch ``step``
    (0-based within the epoch), when any of ``params`` holds NaN or inf; return otherwise. A fit
    calls it where an error of a library (e.g. Pyro's argument checks) may stem from weights that
    the previous optimiser step made non-finite, so that the user sees the divergence instead."""
    if all(bool(torch.isfinite(p).all()) for p in params):
        return
    loop.close()
    raise DivergenceError(loop.method, loop.epoch, math.nan,
                          f"the weights became NaN or inf before minibatch step {step + 1} of the epoch") from cause


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
    checkpoint: Checkpoint | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lr_schedule: str = "constant",
) -> TrainingHistory:
    """Stochastic variational inference: Adam on ``elbo(model, guide)`` over shuffled minibatches.

    ``lr_schedule`` (:data:`LR_SCHEDULES`): ``"constant"`` keeps ``lr``; ``"cosine"`` anneals it
    epoch by epoch along half a cosine, ``lr (1 + cos(pi e / epochs)) / 2`` in epoch ``e`` (0-based),
    from ``lr`` to nearly 0 in the last epoch (:class:`torch.optim.lr_scheduler.CosineAnnealingLR`),
    so that Adam's steps, which move every parameter by about the learning rate, shrink as the fit
    ends; the schedule counts the fit's ``epochs`` (a resumed fit restores it from the checkpoint).

    Returns the :class:`TrainingHistory`: the mean loss (negative ELBO per training example) and
    the wall time of every epoch. The loss is accumulated on the device and read back once per
    epoch, so there is no host-device copy in the inner loop. ``on_epoch_end(epoch, loss)`` runs
    after each epoch, outside the timed part (pruning schedules and benchmarks use it); a
    non-finite or exploding loss raises :class:`DivergenceError`.

    With a ``checkpoint`` (:class:`Checkpoint`) the fit resumes from it (the optimiser's state is
    saved and restored with it, under ``"optimizer"``), offers it every epoch and hands it a
    ``KeyboardInterrupt``; the returned history then holds only the epochs run by this call.

    ``transform`` (data augmentation) maps each minibatch's inputs to the inputs the step sees (a
    fresh random crop and flip of every image...); it draws from the global random state, on the
    inputs' device.

    Data parallel: inside :func:`~bnnzoo.guides.data_parallel.data_parallel` (every rank calling
    this with the same arguments and random state), the parameters are broadcast from rank 0, every
    rank draws the same global minibatch and computes its slice of it (:func:`_rank_loss`: the
    likelihood scaled to the global batch, an equal share of the KL), the gradients are summed over the
    ranks in one collective per step, then every rank takes the same Adam step: the fit equals the
    1-rank fit on the same global minibatches up to rounding. The epoch loss is summed over the
    ranks; the progress bar and checkpoint writes are rank 0's (every rank restores a checkpoint).
    """
    n = len(x)
    loss_fn = elbo(model, guide)
    params = list(loss_fn.parameters())
    optimizer = make_adam(params, lr)
    state = {"optimizer": optimizer}
    scheduler = lr_scheduler(optimizer, lr_schedule, epochs)
    if scheduler is not None:
        state["lr_scheduler"] = scheduler
    parallel = current()
    if parallel is not None:
        broadcast_(params, parallel)  # one starting point (every rank also seeds alike)
        if not parallel.is_main:  # rank 0 reports and writes; the others restore the same checkpoint
            progress = False
            checkpoint = _RestoreOnly(checkpoint) if checkpoint is not None else None
    loop = EpochLoop(epochs, method=description, progress=progress, on_epoch_end=on_epoch_end,
                     checkpoint=checkpoint, state=state)
    with loop:
        for _ in loop:
            total = torch.zeros((), device=x.device)
            for step, idx in enumerate(minibatches(n, batch_size, x.device)):
                optimizer.zero_grad(set_to_none=True)
                xb = x[idx] if transform is None else transform(x[idx])
                try:
                    loss = loss_fn(xb, y[idx], n) if parallel is None else _rank_loss(loss_fn, xb, y[idx], n, parallel)
                except ValueError as exc:  # Pyro's support checks fail on a weight the last step made NaN/inf
                    raise_if_parameters_diverged(loss_fn.parameters(), loop, step, exc)
                    raise
                loss.backward()
                if parallel is not None:
                    all_reduce_gradients_(params, parallel)
                optimizer.step()
                total += loss.detach() * len(idx)
            if parallel is not None:
                total = all_reduce_sum(total, parallel)
            if scheduler is not None:
                scheduler.step()  # before end_epoch, so that a checkpoint it writes holds the next epoch's rate
            loop.end_epoch(total / n / n)
    return loop.history


def _rank_loss(loss_fn, xb: torch.Tensor, yb: torch.Tensor, n: int, parallel: DataParallel) -> torch.Tensor:
    """This rank's share of the loss of the global minibatch ``(xb, yb)`` (data-parallel :func:`fit_svi`).

    The ELBOs compute ``kl_weight KL + (num_data / |batch|) NLL(batch)``. Of ``W`` ranks, the
    ``V = min(B, W)`` that hold examples of the global batch of ``B`` (:meth:`DataParallel.bounds`)
    compute their ``b_r`` examples with ``num_data = N V b_r / B`` and divide by ``V``:
    ``KL / V + (N / B) NLL(their examples)``, whose sum over the ranks is the 1-rank loss of the global
    batch, and so is the sum of the gradients. A rank without examples (a last batch smaller than
    ``W``) computes the loss of the batch's first example times 0, so that its gradients are zeros of
    the same parameters. Per-example noise is the rank's rows of the global batch's draw, made block
    by block (:func:`~bnnzoo.guides.data_parallel.example_slice`).
    """
    batch = len(xb)
    holding = min(batch, parallel.world_size)
    start, stop = parallel.bounds(batch)
    if stop == start:
        with example_slice(batch, 0, 1):
            return loss_fn(xb[:1], yb[:1], n) * 0.0
    with example_slice(batch, start, stop):
        return loss_fn(xb[start:stop], yb[start:stop], n * holding * (stop - start) / batch) / holding


class _RestoreOnly:
    """A :class:`Checkpoint` seen from a rank other than 0: it restores, and never writes."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def restore(self, loop: EpochLoop) -> None:
        self.checkpoint.restore(loop)

    def epoch_end(self, loop: EpochLoop) -> None:
        pass

    def interrupted(self, loop: EpochLoop) -> None:
        pass
