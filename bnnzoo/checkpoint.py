"""Checkpoints of a fit in progress, and resuming from them.

A :class:`Checkpointer` is the :class:`~bnnzoo.guides.training.Checkpoint` of the fit loops
(:class:`~bnnzoo.guides.training.EpochLoop`): it writes the state of a fit to
``RUN/checkpoint/state.pt`` and puts it back when a fit is resumed, so that the resumed fit
continues exactly (bit-identically on CPU) as the uninterrupted fit with the same seed would have.

What a checkpoint holds: the epochs completed, the lowest loss so far, the model's and the guide's
tensors (``state_dict``), the state of the loop's own objects (the optimiser: Adam's moments and
step counts), the training history and fit state, and the random states (torch CPU and every CUDA
device, Python's ``random``, NumPy; Pyro draws from these), plus an identity: the catalog entry,
its configuration (seed included) and a SHA-256 of the training data. A fit resumes only a
checkpoint of the same identity.

When it is written (the rule):

* ``every=N``: at the end of every ``N``-th epoch;
* ``every=None`` (the default): at the end of the first epoch that finishes at least ``seconds``
  (60 s by default) after the previous write or the start of the fit. A fit of short epochs thus
  writes about once a minute whatever its epoch count, one of long epochs after every epoch, and a
  crash loses at most ``max(seconds, one epoch)`` of work;
* always on Ctrl-C (a ``KeyboardInterrupt`` inside the loop): the state at the end of the last
  completed epoch, kept in memory after every epoch (a copy of the tensors on their device), is
  written; the interrupt is then re-raised.

A write is atomic: the file is written under a temporary name in the same directory, flushed to
disk and renamed over ``state.pt``, so a process killed at any moment leaves the previous
checkpoint or the new one, never a partial file. The checkpoint lives in its own subdirectory and
is not a saved run (no ``config.json`` / ``posterior.pt``): ``bnnzoo.load`` refuses a directory that
holds only a checkpoint, and the final save of the completed fit replaces the whole directory,
checkpoint included (``bnnzoo fit`` saves with :func:`bnnzoo.runs.write_run`, which renames the
finished run into place).

Entries whose fit runs through an :class:`~bnnzoo.guides.training.EpochLoop` owned by the posterior
(the SVI entries: ``map``, ``meanfield-vi``, ``bmr``, ``bmr-iterative``, ``horseshoe-svi``; and
``em-tdamp``) support checkpoints (:func:`supports_checkpoints`). ``spike-slab-sghmc`` does not:
its chain runs inside ``pyro.infer.MCMC``, which keeps the kernel's state (momentum, position in
the cyclical step-size schedule, the EM statistics, the samples collected so far) to itself
between samples and offers no way to start a chain from such a state.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .guides.training import EpochLoop, TrainingHistory
from .models.errors import ConfigError, RunError

#: the subdirectory of a run directory that holds its checkpoint
CHECKPOINT_DIR = "checkpoint"
#: the checkpoint file inside it
CHECKPOINT_FILE = "state.pt"
#: the default time between two checkpoint writes (seconds)
DEFAULT_SECONDS = 60.0
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    """The checkpoint file of run directory ``run_dir`` (``RUN/checkpoint/state.pt``)."""
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint of an unfinished fit."""
    return checkpoint_path(run_dir).is_file()


def supports_checkpoints(posterior) -> bool:
    """Whether ``posterior``'s fit can write checkpoints and resume from them (module docstring)."""
    return bool(getattr(posterior, "supports_checkpoints", False))


def data_fingerprint(x, y) -> str:
    """SHA-256 of the training arrays (dtype, shape and bytes of each), the data part of a
    checkpoint's identity."""
    digest = hashlib.sha256()
    for array in (x, y):
        t = torch.as_tensor(array).detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def fit_identity(name: str, config: dict, x, y) -> dict:
    """What a checkpoint must share with the fit that resumes it: the entry, its configuration
    (where the data were read from left out: the same data may sit elsewhere on another machine)
    and the training data's fingerprint."""
    config = json.loads(json.dumps(config, default=str))
    if isinstance(config.get("data"), dict):
        config["data"].pop("source", None)
    return {"name": name, "config": config, "data_sha256": data_fingerprint(x, y)}


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(saved) | set(wanted), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{where}: absent in the checkpoint, {wanted[key]!r} now")
            elif key not in wanted:
                out.append(f"{where}: {saved[key]!r} in the checkpoint, absent now")
            else:
                out.extend(_differences(saved[key], wanted[key], where))
        return out
    return [] if saved == wanted else [f"{prefix}: {saved!r} in the checkpoint, {wanted!r} now"]


def _clone(value):
    """A deep copy whose tensors are detached clones (on their own device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint of ``run_dir`` as saved; :class:`RunError` naming the file when it is missing,
    unreadable or of another format."""
    path = checkpoint_path(run_dir)
    if not path.is_file() and (Path(run_dir) / "config.json").is_file():
        raise RunError(f"{run_dir} holds a completed run (no checkpoint left to resume): its fit has finished")
    if not path.is_file():
        raise RunError(f"{run_dir}: no checkpoint to resume ({path} does not exist): a fit writes one "
                       f"when it runs with a run directory (bnnzoo fit --out RUN, or fit(..., run_dir=RUN))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (truncated, random bytes, any pickle: all "not a checkpoint")
        raise RunError(f"{path}: the checkpoint is unreadable ({type(err).__name__}: {str(err)[:200]}); "
                       f"delete {path.parent} and fit again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise RunError(f"{path}: not a bnnzoo checkpoint of format {FORMAT_VERSION}")
    return state


class Checkpointer:
    """Writes checkpoints of ``posterior``'s fit into ``run_dir/checkpoint/`` and, with ``resume``,
    continues the fit from the checkpoint there (module docstring: contents, rule, atomicity).

    ``identity`` (:func:`fit_identity`) is saved with every checkpoint and, when resuming, must equal
    the saved one: a checkpoint of another entry, configuration or data set is refused with a
    :class:`~bnnzoo.errors.RunError` listing the differences. ``every``: write every ``every``
    epochs (a positive integer), or ``None`` for the time rule of ``seconds``.
    """

    def __init__(self, posterior, run_dir: str | Path, *, identity: dict, every: int | None = None,
                 seconds: float = DEFAULT_SECONDS, resume: bool = False):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"checkpoint_every must be a positive integer (epochs) or None (every "
                              f"{DEFAULT_SECONDS:g} s), got {every!r}")
        if not supports_checkpoints(posterior):
            raise ConfigError(f"{posterior.name} cannot write checkpoints or resume: its chain runs inside "
                              f"pyro.infer.MCMC, which keeps the sampler's state to itself between samples; "
                              f"fit it again from the start instead")
        self.posterior = posterior
        self.run_dir = Path(run_dir)
        self.path = checkpoint_path(run_dir)
        self.identity = identity
        self.every = every
        self.seconds = float(seconds)
        self.resumed_epoch = 0
        self._saved: dict | None = None
        if resume:
            self._saved = read_checkpoint(run_dir)
            differences = _differences(self._saved.get("identity"), identity)
            if differences:
                raise RunError(f"{self.path}: this checkpoint belongs to another fit, refusing to resume it: "
                               + "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else ""))
        self._snapshot: dict | None = None
        self._written_epoch: int | None = None
        self._last_write = time.monotonic()

    # ---- the Checkpoint protocol of EpochLoop ------------------------------------------------------
    def restore(self, loop: EpochLoop) -> None:
        """Put back the checkpoint being resumed (once; later loops of the same fit start afresh)."""
        self._last_write = time.monotonic()
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        put_back(self.posterior, loop, saved, where=str(self.path))
        self.resumed_epoch = loop.epoch
        self._written_epoch = loop.epoch

    def epoch_end(self, loop: EpochLoop) -> None:
        """Keep the state of the epoch just completed; write it when the rule says so."""
        self._snapshot = self._capture(loop)
        if self.every is not None:
            due = loop.epoch % self.every == 0
        else:
            due = time.monotonic() - self._last_write >= self.seconds
        if due:
            self.write()

    def interrupted(self, loop: EpochLoop) -> None:
        """Write the last completed epoch's state (if newer than the one on disk)."""
        self.write()

    # ---- writing -----------------------------------------------------------------------------
    def write(self) -> Path | None:
        """Write the last kept state atomically (nothing to do if it is on disk already)."""
        snapshot = self._snapshot
        if snapshot is None or snapshot["epoch"] == self._written_epoch:
            return None
        _write_atomic(snapshot, self.path)
        self._written_epoch = snapshot["epoch"]
        self._last_write = time.monotonic()
        return self.path

    @property
    def written_epoch(self) -> int | None:
        """The epochs completed in the checkpoint on disk (``None`` before the first write)."""
        return self._written_epoch

    def _capture(self, loop: EpochLoop) -> dict:
        return capture(self.posterior, loop, self.identity)


def capture(posterior, loop: EpochLoop, identity: dict | None = None) -> dict:
    """The state of ``posterior``'s fit at the end of ``loop``'s last completed epoch (copies of
    every tensor): what a checkpoint holds (module docstring)."""
    history = TrainingHistory.from_dict(posterior.history.to_dict())
    if loop.history is not posterior.history:
        history.extend(TrainingHistory.from_dict(loop.history.to_dict()))
    return {
        "format": FORMAT_VERSION,
        "identity": identity,
        "epoch": loop.epoch,
        "best": loop.best if math.isfinite(loop.best) else float("inf"),
        "model": _clone(posterior.model.state_dict()),
        "guide": _clone(posterior.guide.state_dict()),
        "state": {name: _clone(obj.state_dict()) for name, obj in loop.state.items()},
        "history": _clone(history.to_dict()),
        "fit_state": posterior.fit_state.to_dict(),
        "rng": _rng_state(),
    }


def put_back(posterior, loop: EpochLoop, saved: dict, where: str = "the checkpoint") -> None:
    """Put the state ``saved`` (:func:`capture`) back into ``posterior`` and ``loop``: parameters,
    the loop's objects (the optimiser), history, fit state, epoch count and random states; the loop
    then continues from the epoch after it."""
    posterior.model.load_state_dict(saved["model"])
    posterior.guide.load_state_dict(saved["guide"])
    for name, obj in loop.state.items():
        if name not in saved["state"]:
            raise RunError(f"{where}: the checkpoint holds no {name} state")
        obj.load_state_dict(saved["state"][name])
    restored = TrainingHistory.from_dict(saved["history"])
    history = posterior.history  # changed in place: the fit may hold references to it and its extra
    history.loss[:], history.epoch_seconds[:] = restored.loss, restored.epoch_seconds
    history.extra.clear()
    history.extra.update(restored.extra)
    if loop.history is not history:
        loop.history.loss.clear()
        loop.history.epoch_seconds.clear()
        loop.history.extra.clear()
    posterior.fit_state = type(posterior.fit_state).from_dict(saved["fit_state"])
    loop.epoch = int(saved["epoch"])
    loop.best = float(saved["best"])
    _set_rng_state(saved["rng"])


class Continuation:
    """The :class:`~bnnzoo.guides.training.Checkpoint` protocol in memory, for fits that run in
    stages: it keeps the state of the last completed epoch (:func:`capture`) and, after
    :meth:`arm`, puts it back when the posterior's next fit starts its loop, so that a fit asked for
    more epochs continues where the last one stopped, exactly as one uninterrupted fit of that many
    epochs (bit-identically on CPU, as a resumed checkpoint). It writes nothing."""

    def __init__(self, posterior):
        self.posterior = posterior
        self._snapshot: dict | None = None
        self._armed = False

    def arm(self) -> None:
        """Make the next fit of the posterior continue from the last completed epoch."""
        if self._snapshot is None:
            raise RunError(f"{self.posterior.name}: no completed epoch to continue from")
        self._armed = True

    def restore(self, loop: EpochLoop) -> None:
        if self._armed:
            self._armed = False
            put_back(self.posterior, loop, self._snapshot, where="the continued fit")

    def epoch_end(self, loop: EpochLoop) -> None:
        self._snapshot = capture(self.posterior, loop)

    def interrupted(self, loop: EpochLoop) -> None:
        pass
