"""Peak memory of a training epoch on the CPU, where torch keeps no allocator statistics.

Each measurement runs in a fresh spawned process, so that what earlier fits allocated (and the C
allocator kept) does not blur it. The process builds the network and the data, trains one epoch
(the optimiser's state and the allocator's pools settle), returns freed memory to the system
(glibc's ``malloc_trim``), records its resident set size and resets the kernel's peak of it
(``/proc/self/clear_refs``, value 5), trains the remaining epochs (a catalog entry: its own number,
at least two; a plain optimiser: one more) and reads the peak again (``VmHWM``). Reported: the peak
resident set size of those epochs and its rise over the process's resident size just before them
(what training itself allocates: activations, gradients, temporaries), in MiB.

Linux only (``/proc``); elsewhere :func:`cpu_epoch_peak` returns ``None``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import bnnzoo
from bnnzoo.models.standardizer import Standardizer

from .harness import PlainTorch

PROC = Path("/proc/self")


def _status_mib(field: str) -> float:
    for line in (PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rest_and_reset() -> float:
    """Return freed heap to the system, reset the peak resident size; the resident size now (MiB)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    (PROC / "clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _measure(job: dict) -> dict:
    """One measurement (in the child): ``job`` names the network, the data size and either a plain
    optimiser (``{"plain": "adam" | "sgd", "lr": ...}``) or a catalog entry (``{"entry": NAME,
    "options": {...}}``)."""
    from .bench_modules import synthetic_images  # lazy: a cycle

    torch.set_num_threads(1)
    data = synthetic_images(job["n"])
    marks: dict[str, float] = {}
    if "plain" in job:
        net = bnnzoo.create("map", data.task, data.input_shape, data.output_dim, network=job["network"], seed=0).net
        std = Standardizer.from_data(data.x_train, data.y_train, data.task)
        plain = PlainTorch(net, std.x(data.x_train), std.y(data.y_train), data.task, job["batch_size"], job["lr"],
                           job["plain"], 0)
        plain.epoch()
        marks["rest"] = _rest_and_reset()
        plain.epoch()
    else:
        def on_epoch(*_):
            if "rest" not in marks:
                marks["rest"] = _rest_and_reset()

        posterior = bnnzoo.create(job["entry"], data.task, data.input_shape, data.output_dim, seed=0,
                                  network=job["network"], **job["options"])
        posterior.fit(data.x_train, data.y_train, progress=False, callback=on_epoch)
    peak = _status_mib("VmHWM")
    return {"peak_rss_mib": peak, "epoch_rise_mib": peak - marks["rest"]}


def cpu_epoch_peak(job: dict) -> dict | None:
    """:func:`_measure` of ``job`` in a fresh spawned process; ``None`` off Linux."""
    if not sys.platform.startswith("linux") or not (PROC / "clear_refs").exists():
        return None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, job).result()
