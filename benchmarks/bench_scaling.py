"""Data-parallel scaling: training throughput with 1 and 2 processes (gloo on the CPU, one thread per
process) for ``meanfield-vi`` and ``spike-slab-sghmc`` on LeNet-5, MNIST train5k.

Suites (``python -m benchmarks.run SUITE --threads 1``):

- ``scaling``: examples per second of the fit with one process (the ordinary fit, in this process)
  and with two (``bnnzoo.distributed.spawn``), in two ways: on the same global minibatches (same
  seed, same batch size, each rank computing half of every minibatch: strong scaling) and with a
  global minibatch twice as large (each rank computing as many examples a step as the single
  process: weak scaling, the way data-parallel training is usually scaled out). The ratio is the
  speed-up (the target is 1.6x on two cores). Throughput is the training examples of the timed epochs over
  their summed wall time (the fits' own ``history.epoch_seconds``: process start-up, data loading and
  evaluation are left out); the first epoch is left out as warm-up. The final losses of the 1- and
  2-process fits are recorded side by side, as a check that both fitted the same thing: they agree
  closely, not exactly, since the 1-process fit here is the plain one, whose per-example noise comes
  from another stream than the ranks' block draws (``meanfield-vi``), and rounding differences of
  the summed gradients grow over a chain's steps (``spike-slab-sghmc``); the exact equality is
  checked against the 1-rank world in ``tests/test_data_parallel.py``.
  The suite repeats this three times (the entries in turn) and reports the medians, with every
  run's speed-ups: one run's figure moves by about 0.1x on a two-core machine.
- ``scaling-smoke``: the same code on 512 training images for one timed epoch, to check that the
  suite runs end to end (its figures mean nothing).

Timings need a quiet machine: another process on one of the two cores slows the 2-process run
most.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import bnnzoo
from bnnzoo import distributed
from bnnzoo.data import Dataset, load_dataset

ARCH = "lenet5"
BATCH_SIZE = 128
#: per entry: options of the timed fit (no validation fits: every epoch is a timed training epoch)
OPTIONS = {
    "meanfield-vi": {"validation_fraction": None, "calibrate": False, "batch_size": BATCH_SIZE},
    "spike-slab-sghmc": {"batch_size": BATCH_SIZE, "samples_per_cycle": 1, "thinning": 1, "warmup_cycles": 1},
}


def _epochs_options(name: str, epochs: int) -> dict:
    """Epochs (and, for SGHMC, one cycle per epoch) of a run of ``epochs`` epochs."""
    extra = {"cycles": epochs} if name == "spike-slab-sghmc" else {}
    return {"epochs": epochs, **extra}


def _subset(dataset: Dataset, n: int | None) -> Dataset:
    if n is None:
        return dataset
    return replace(dataset, x_train=dataset.x_train[:n], y_train=dataset.y_train[:n], x_test=dataset.x_test[:64],
                   y_test=dataset.y_test[:64])


def _fit(name: str, options: dict, n: int | None, device) -> dict:
    dataset = _subset(load_dataset("mnist"), n)
    posterior = bnnzoo.fit(name, dataset, network={"arch": ARCH}, seed=0, device=device, progress=False, **options)
    return {"epoch_seconds": list(posterior.history.epoch_seconds), "loss": list(posterior.history.loss),
            "num_train": len(dataset.x_train)}


def _rank(parallel, device, name: str, options: dict, n: int | None, out: str) -> None:
    result = _fit(name, options, n, device)
    if parallel.is_main:
        torch.save(result, Path(out) / "rank0.pt")


def _throughput(run: dict, warmup: int = 1) -> float:
    seconds = run["epoch_seconds"][warmup:]
    return len(seconds) * run["num_train"] / sum(seconds)


def _two_processes(name: str, options: dict, n: int | None, device) -> dict:
    with tempfile.TemporaryDirectory(prefix="bnnzoo-scaling-") as out:
        distributed.spawn(_rank, 2, name, options, n, out, device=device, threads=1)
        return torch.load(Path(out) / "rank0.pt")


def scaling_case(name: str, epochs: int, n: int | None = None, device="cpu") -> dict:
    """One entry's 1- and 2-process fits of ``epochs`` epochs (the first one untimed): the 2-process
    fit on the same global minibatches (strong scaling: each rank computes half of every batch of
    ``BATCH_SIZE``) and on global minibatches twice as large (weak scaling: each rank computes
    ``BATCH_SIZE`` examples a step, as the single process does)."""
    options = {**OPTIONS[name], **_epochs_options(name, epochs)}
    torch.set_num_threads(1)
    single = _fit(name, options, n, device)
    double = _two_processes(name, options, n, device)
    weak = _two_processes(name, {**options, "batch_size": 2 * options["batch_size"]}, n, device)
    one, two, two_weak = _throughput(single), _throughput(double), _throughput(weak)
    return {"examples_per_second": {"1": one, "2": two}, "speedup": two / one,
            "epoch_seconds": {"1": single["epoch_seconds"], "2": double["epoch_seconds"]},
            "final_loss": {"1": single["loss"][-1], "2": double["loss"][-1]},
            "final_loss_abs_difference": abs(single["loss"][-1] - double["loss"][-1]),
            "options": options, "num_train": single["num_train"],
            "median_epoch_seconds": {"1": statistics.median(single["epoch_seconds"][1:]),
                                     "2": statistics.median(double["epoch_seconds"][1:])},
            "weak": {"batch_size_per_process": options["batch_size"], "global_batch_size": 2 * options["batch_size"],
                     "examples_per_second": two_weak, "speedup": two_weak / one,
                     "epoch_seconds": weak["epoch_seconds"]}}


def _median_case(runs: list[dict]) -> dict:
    """The speed-ups and throughputs of repeated :func:`scaling_case` runs: their medians, with the
    runs themselves under ``"runs"``."""
    def med(pick):
        return statistics.median(pick(r) for r in runs)
    return {"speedup": med(lambda r: r["speedup"]),
            "examples_per_second": {k: med(lambda r, k=k: r["examples_per_second"][k]) for k in ("1", "2")},
            "weak": {"speedup": med(lambda r: r["weak"]["speedup"]),
                     "examples_per_second": med(lambda r: r["weak"]["examples_per_second"])},
            "speedups": [r["speedup"] for r in runs], "weak_speedups": [r["weak"]["speedup"] for r in runs],
            "runs": runs}


def _suite(key: str, epochs: int, n: int | None, device, repeats: int = 1) -> dict:
    """Every entry's :func:`scaling_case` ``repeats`` times, the entries in turn (so a slow spell of
    the machine touches both), reported as the medians over the repeats (:func:`_median_case`)."""
    if torch.device(device).type != "cpu":
        raise ValueError("the scaling suite measures gloo processes on the CPU: run it with --device cpu")
    runs: dict[str, list] = {name: [] for name in OPTIONS}
    for _ in range(repeats):
        for name in OPTIONS:
            runs[name].append(scaling_case(name, epochs, n, device))
    cases = {name: _median_case(r) for name, r in runs.items()}

    def spread(values):
        return f" (runs {min(values):.2f}-{max(values):.2f}x)" if len(values) > 1 else ""
    summary = ", ".join(f"{name} {c['speedup']:.2f}x{spread(c['speedups'])} ({c['examples_per_second']['1']:.0f} -> "
                        f"{c['examples_per_second']['2']:.0f} examples/s)" for name, c in cases.items())
    weak = ", ".join(f"{name} {c['weak']['speedup']:.2f}x{spread(c['weak_speedups'])} "
                     f"({c['weak']['examples_per_second']:.0f} examples/s)" for name, c in cases.items())
    what = f"median of {repeats} runs" if repeats > 1 else "1 run"
    return {key: {"model": ", ".join(OPTIONS), "dataset": "mnist-train5k" if n is None else f"mnist-train5k[:{n}]",
                  "arch": ARCH, "processes": [1, 2], "backend": "gloo", "threads_per_process": 1, "repeats": repeats,
                  "headline": (f"2 processes over 1 ({what}), global batch {BATCH_SIZE} (strong scaling): {summary}; "
                               f"batch {BATCH_SIZE} per process (weak scaling): {weak}"),
                  "cases": cases}}


#: repeats of the ``scaling`` suite (its figures are medians over them): the timings of a two-core
#: machine move by about 0.1x from run to run
SCALING_REPEATS = 3


def run_scaling(device) -> dict:
    return _suite("scaling", epochs=4, n=None, device=device, repeats=SCALING_REPEATS)


def run_scaling_smoke(device) -> dict:
    return _suite("scaling-smoke", epochs=2, n=512, device=device)


SUITES = {"scaling": run_scaling, "scaling-smoke": run_scaling_smoke}
