"""Data-parallel fits on one machine or several: ``bnnzoo fit ... --devices N`` and
``torchrun --nnodes ... -m bnnzoo fit ...``.

The fits themselves are data-parallel in :mod:`bnnzoo.guides.data_parallel` (gradients summed over
the ranks each step, the same global minibatches, the same noise); this module starts and joins the
processes:

- :func:`spawn` starts ``N`` processes on this machine (``torch.multiprocessing``, start method
  ``spawn``), the rendezvous on ``127.0.0.1`` at a port the operating system chooses
  (:func:`free_port`), and waits for them within a time limit;
- :func:`launched_by_torchrun` tells whether this process is one rank of a ``torchrun`` job (the
  variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
- :func:`process_group` joins the process group of the environment (gloo on the CPU, NCCL on CUDA,
  rank ``r`` on ``cuda:LOCAL_RANK``) and makes the fits inside it data-parallel.

Every rank loads the data set and the same seed: each rank computes, at every step, its contiguous
part of the global minibatch that all ranks draw alike (its shard of that step); rank 0 writes the
checkpoints and the saved run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import ConfigError, RunError
from .guides.data_parallel import DataParallel, data_parallel, init_process_group

#: the variables ``torchrun`` sets for every rank
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: the catalog entries whose fits are data-parallel (SVI through ``fit_svi``, SGHMC, EM-TDAMP's passes)
DATA_PARALLEL_ENTRIES = ("map", "meanfield-vi", "bmr", "bmr-iterative", "horseshoe-svi", "spike-slab-sghmc",
                         "em-tdamp")

#: seconds :func:`spawn` waits for its processes by default
DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a ``torchrun`` (or other ``env://``) launch: ``RANK`` and
    ``WORLD_SIZE`` are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this process reports and writes: rank 0 of a ``torchrun`` launch, or any process
    outside one."""
    return os.environ.get("RANK", "0") == "0" or not launched_by_torchrun()


def check_entry(name: str) -> None:
    """A :class:`~bnnzoo.errors.ConfigError` unless catalog entry ``name`` fits data-parallel
    (:data:`DATA_PARALLEL_ENTRIES`): the ranks of any other entry would each run the whole fit."""
    if name not in DATA_PARALLEL_ENTRIES:
        raise ConfigError(f"{name} has no data-parallel fit (only {', '.join(DATA_PARALLEL_ENTRIES)}): fit it in "
                          f"one process, without --devices or torchrun")


def free_port() -> int:
    """A TCP port on ``127.0.0.1`` that the operating system reports free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_devices(devices, device="auto") -> int:
    """``devices`` as the number of processes of a data-parallel fit on this machine, or a
    :class:`~bnnzoo.errors.ConfigError` naming what is wrong: not a positive integer, more processes
    than CUDA devices for a CUDA fit, a single CUDA device named for several processes, or
    ``--devices`` given to a process that ``torchrun`` started (it sets the processes itself)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices must be a positive integer (processes on this machine), got {devices!r}")
    if launched_by_torchrun():
        raise ConfigError(f"devices={devices} was given to a process that torchrun started (WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}): torchrun sets the processes; leave --devices out")
    dev = _device(device)
    if dev.type == "cuda" and devices > 1:
        if dev.index is not None:
            raise ConfigError(f"device {str(device)!r} names one CUDA device, but devices={devices}: give "
                              f"--device cuda (rank r then runs on cuda:r)")
        if devices > torch.cuda.device_count():
            raise ConfigError(f"devices={devices} CUDA processes asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA devices (--device cpu runs the processes on the CPU)")
    return devices


def _device(device) -> torch.device:
    """:func:`~bnnzoo.devices.resolve_device`, its errors (an unknown device, CUDA asked for where there
    is none) as :class:`~bnnzoo.errors.ConfigError`."""
    try:
        return resolve_device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def rank_device(device, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its machine: ``cuda:local_rank`` for a CUDA
    fit (``device`` ``"cuda"`` or ``"auto"`` with CUDA), the CPU otherwise."""
    dev = _device(device)
    if dev.type == "cuda":
        if dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"device {str(device)!r} names one CUDA device for several processes on this "
                              f"machine: give --device cuda (local rank r then runs on cuda:r)")
        return torch.device("cuda", local_rank if dev.index is None else dev.index)
    return dev


@contextmanager
def process_group(device="auto", *, timeout_s: float = 1800.0) -> Iterator[tuple[DataParallel, torch.device]]:
    """Join the process group described by the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) on this rank's device (:func:`rank_device`),
    with NCCL for CUDA and gloo for the CPU; inside the block, the fits are data-parallel over its
    ranks. Yields ``(parallel, device)``; the group is destroyed on leaving."""
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ and v != "LOCAL_RANK"]
    if missing:
        raise RunError(f"a data-parallel process needs the variables {', '.join(missing)} (torchrun sets them)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = rank_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    parallel = init_process_group(dev, rank, world, timeout_s=timeout_s)
    try:
        with data_parallel(parallel):
            yield parallel, dev
    finally:
        if created:
            dist.destroy_process_group()


def _worker(local_rank: int, fn: Callable, world: int, port: int, device, threads: int | None, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(world)})
    if threads is not None:
        torch.set_num_threads(threads)
    with process_group(device) as (parallel, dev):
        fn(parallel, dev, *args)


def spawn(fn: Callable, devices: int, *args, device="auto", timeout_s: float = DEFAULT_TIMEOUT_S,
          threads: int | None = None) -> None:
    """Run ``fn(parallel, device, *args)`` in ``devices`` new processes on this machine, one rank
    each, inside :func:`process_group` (``fn`` and ``args`` must pickle: a module-level function).
    ``threads``: torch's CPU threads per process (default: the machine's cores shared out among the
    processes, unless ``OMP_NUM_THREADS`` sets them). Waits for all of them; a
    rank that fails stops the others and its error is raised here (a
    :class:`~bnnzoo.errors.RunError` also when they run past ``timeout_s`` seconds)."""
    devices = check_devices(devices, device)
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // devices)
    port = free_port()
    context = torch.multiprocessing.start_processes(
        _worker, args=(fn, devices, port, device, threads, args), nprocs=devices, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=min(1.0, max(deadline - time.monotonic(), 0.01))):
            if time.monotonic() > deadline:
                raise RunError(f"the {devices} data-parallel processes ran past {timeout_s:g} s and were stopped")
    except torch.multiprocessing.ProcessRaisedException as err:  # the rank's error, traceback last
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise RunError(f"rank {err.error_index} of the data-parallel fit failed: {lines[-1] if lines else err}") from err
    except torch.multiprocessing.ProcessExitedException as err:
        raise RunError(f"rank {err.error_index} of the data-parallel fit exited with code {err.exit_code}") from err
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


__all__ = ["DATA_PARALLEL_ENTRIES", "TORCHRUN_VARIABLES", "check_devices", "check_entry", "free_port", "is_main_process", "launched_by_torchrun",
           "process_group",
           "rank_device", "spawn"]
