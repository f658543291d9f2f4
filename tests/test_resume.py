"""Checkpoints and resume: a fit interrupted by Ctrl-C (KeyboardInterrupt, SIGINT) or killed
(SIGKILL) continues from its checkpoint to the same result as the uninterrupted fit with the same
seed, bit for bit on CPU; a checkpoint of another fit, or a corrupt one, is refused by name."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bnnzoo
from bnnzoo.checkpoint import checkpoint_path, has_checkpoint, read_checkpoint
from bnnzoo.cli import main
from bnnzoo.data import Dataset
from bnnzoo.errors import BnnzooError, ConfigError, RunError
from bnnzoo.guides import training
from bnnzoo.methods import tdamp

NET = {"arch": "mlp", "hidden": [8]}
EPOCHS = 4
# every entry whose fit runs through an EpochLoop it owns, with options that keep the fit tiny
# (the epoch selection on validation data is off here: the fits run exactly EPOCHS; a fit with it is
# tested by test_a_fit_that_chose_its_epochs_resumes_after_the_selection)
ENTRIES = [
    ("map", {"validation_fraction": None}),
    ("meanfield-vi", {}),
    ("bmr", {}),
    ("bmr-iterative", {"warmup_epochs": 1}),
    ("horseshoe-svi", {}),
    ("horseshoe-svi", {"lr_schedule": "cosine"}),  # the scheduler's place in the cosine resumes with it
    ("em-tdamp", {"keep": 0.5, "validation_fraction": None}),
]


def _tiny(seed: int = 0, n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x[:, 0] - 2 * x[:, 1] + 0.1 * torch.randn(n, generator=g)
    k = 2 * n // 3
    return Dataset(name="tiny", task="regression", x_train=x[:k], y_train=y[:k], x_test=x[k:], y_test=y[k:])


@pytest.fixture(scope="module")
def data() -> Dataset:
    return _tiny()


def _fit(name, data, options, **kwargs):
    return bnnzoo.fit(name, data, network=NET, device="cpu", progress=False, seed=3,
                      **{"epochs": EPOCHS, "batch_size": 16, **options}, **kwargs)


def _predict(posterior) -> torch.Tensor:
    return posterior.predict(_tiny().x_test, num_samples=5).mean


def _interrupt_during_epoch(monkeypatch, epoch: int) -> None:
    """Raise KeyboardInterrupt after the first minibatch of pass ``epoch`` (0-based), as a Ctrl-C
    arriving in the middle of an epoch would."""
    passes = {"n": 0}
    real = training.minibatches

    def minibatches(*args, **kwargs):
        this, passes["n"] = passes["n"], passes["n"] + 1
        for step, idx in enumerate(real(*args, **kwargs)):
            if this == epoch and step == 1:
                raise KeyboardInterrupt
            yield idx

    monkeypatch.setattr(training, "minibatches", minibatches)
    monkeypatch.setattr(tdamp, "minibatches", minibatches)


def _without_timing(history: dict) -> dict:
    return {k: v for k, v in history.items() if "seconds" not in k}


@pytest.mark.parametrize("name, options", ENTRIES,
                         ids=[e[0] + "".join(f"-{v}" for k, v in e[1].items() if k == "lr_schedule") for e in ENTRIES])
def test_a_fit_interrupted_mid_epoch_resumes_bit_identically(name, options, data, tmp_path, monkeypatch):
    reference = _fit(name, data, options)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_during_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _fit(name, data, options, run_dir=run)
    # the interrupt wrote the last completed epoch (the default rule writes nothing this early)
    saved = read_checkpoint(run)
    assert saved["epoch"] == 2
    assert not (run / "config.json").exists() and not (run / "posterior.pt").exists()  # not a run
    with pytest.raises((RunError, FileNotFoundError)):
        bnnzoo.load(run)

    resumed = _fit(name, data, options, resume=run)
    assert torch.equal(_predict(resumed), _predict(reference))
    assert resumed.history.loss == reference.history.loss
    assert _without_timing(resumed.history.to_dict()) == _without_timing(reference.history.to_dict())
    # the first two epochs were not run again: their recorded wall times are the interrupted fit's
    assert resumed.history.epoch_seconds[:2] == saved["history"]["epoch_seconds"][:2]
    assert [r.rule for r in resumed.fit_state.pruning] == [r.rule for r in reference.fit_state.pruning]
    assert resumed.masks().keys() == reference.masks().keys()
    assert all(torch.equal(resumed.masks()[s], reference.masks()[s]) for s in reference.masks())


def test_a_fit_that_chose_its_epochs_resumes_after_the_selection(data, tmp_path, monkeypatch):
    """The selection fit writes no checkpoint; interrupted in the fit that follows it, the run
    resumes there (the selection, deterministic, runs again and chooses the same epochs)."""
    options = {"epochs": 8, "validation_fraction": 0.25, "patience": 3}
    reference = _fit("map", data, options)
    chosen = reference.fit_state.epoch_selection
    selection_passes = len(chosen["validation_log_likelihood"]) * chosen["folds"]  # map: folds in step
    assert chosen["epochs"] >= 3, "the interrupt below must fall inside the final fit"
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_during_epoch(m, selection_passes + 2)
        with pytest.raises(KeyboardInterrupt):
            _fit("map", data, options, run_dir=run)
    assert read_checkpoint(run)["epoch"] == 2
    resumed = _fit("map", data, options, resume=run)
    assert resumed.fit_state.epoch_selection == chosen
    assert torch.equal(_predict(resumed), _predict(reference))
    assert resumed.history.loss == reference.history.loss


def test_checkpoint_every_and_the_default_time_rule(data, tmp_path):
    options = {"epochs": 5}
    _fit("map", data, options, run_dir=tmp_path / "default")
    assert not has_checkpoint(tmp_path / "default")  # a fit of a few ms: the once-a-minute rule never fires
    _fit("map", data, options, run_dir=tmp_path / "every2", checkpoint_every=2)
    assert read_checkpoint(tmp_path / "every2")["epoch"] == 4
    # a checkpoint of the finished fit resumes to the same posterior (the last epoch runs again)
    reference = _fit("map", data, options)
    assert torch.equal(_predict(_fit("map", data, options, resume=tmp_path / "every2")), _predict(reference))
    _fit("map", data, options, run_dir=tmp_path / "every1", checkpoint_every=1)
    assert read_checkpoint(tmp_path / "every1")["epoch"] == 5
    assert torch.equal(_predict(_fit("map", data, options, resume=tmp_path / "every1")), _predict(reference))


def test_a_checkpoint_of_another_fit_or_a_corrupt_one_is_refused(data, tmp_path):
    run = tmp_path / "run"
    _fit("map", data, {"epochs": 2}, run_dir=run, checkpoint_every=1)
    cases = [
        (("map", data, {"epochs": 2, "lr": 0.5}), "train.lr"),
        (("map", data, {"epochs": 3}), "train.epochs"),
        (("meanfield-vi", data, {"epochs": 2}), "name"),
        (("map", _tiny(seed=1), {"epochs": 2}), "data_sha256"),
    ]
    for (name, d, options), what in cases:
        with pytest.raises(RunError, match=what) as err:
            _fit(name, d, options, resume=run)
        assert str(checkpoint_path(run)) in str(err.value)
    with pytest.raises(RunError, match="seed"):
        bnnzoo.fit("map", data, network=NET, device="cpu", progress=False, seed=4, epochs=2, batch_size=16,
                   resume=run)
    with pytest.raises(RunError, match="no checkpoint"):
        _fit("map", data, {"epochs": 2}, resume=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="spike-slab-sghmc cannot"):
        bnnzoo.fit("spike-slab-sghmc", data, network=NET, device="cpu", progress=False, resume=run)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        _fit("map", data, {"epochs": 2}, checkpoint_every=1)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        _fit("map", data, {"epochs": 2}, run_dir=run, checkpoint_every=0)
    file = checkpoint_path(run)
    for corrupt in (file.read_bytes()[: file.stat().st_size // 2], os.urandom(300)):
        file.write_bytes(corrupt)
        with pytest.raises(RunError, match="state.pt: the checkpoint is unreadable"):
            _fit("map", data, {"epochs": 2}, resume=run)


# ---- the command line: SIGINT and SIGKILL in a real process ----------------------------------------
CLI_EPOCHS = 30


@pytest.fixture(scope="module")
def uci_dir(tmp_path_factory) -> Path:
    """A 60-row data set in the UCI split format (one split)."""
    root = tmp_path_factory.mktemp("uci")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    table = np.column_stack([x, x[:, 0] - x[:, 1] + 0.1 * rng.normal(size=60)])
    np.savetxt(root / "data.txt", table)
    (root / "index_features.txt").write_text("0\n1\n2\n")
    (root / "index_target.txt").write_text("3\n")
    (root / "index_train_0.txt").write_text("\n".join(map(str, range(45))) + "\n")
    (root / "index_test_0.txt").write_text("\n".join(map(str, range(45, 60))) + "\n")
    return root


def _cli_args(uci_dir, out, *extra) -> list[str]:
    return ["fit", "map", "--data", str(uci_dir), "--epochs", str(CLI_EPOCHS), "--batch-size", "16", "--seed", "1",
            "--set", "validation_fraction=null", "--device", "cpu", "--num-samples", "5", "--quiet", "--out", str(out),
            *extra]


def _cli(*args) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _run_predictions(run, uci_dir) -> torch.Tensor:
    return _predict_on(bnnzoo.load(run), uci_dir)


def _predict_on(posterior, uci_dir) -> torch.Tensor:
    x = torch.as_tensor(np.loadtxt(uci_dir / "data.txt")[45:, :3], dtype=torch.float32)
    return posterior.predict(x, num_samples=5).mean


@pytest.fixture(scope="module")
def cli_reference(uci_dir, tmp_path_factory) -> tuple[torch.Tensor, float]:
    """The uninterrupted CLI fit's test predictions and its wall time (fit, evaluation and save)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _cli(*_cli_args(uci_dir, out))  # the first fit of the process pays torch's one-off imports
    shutil.rmtree(out)
    start = time.perf_counter()
    _cli(*_cli_args(uci_dir, out))
    seconds = time.perf_counter() - start
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "metrics.json", "posterior.pt"]
    return _run_predictions(out, uci_dir), seconds


def _cli_process(args: list[str], log: str) -> None:
    """The body of a ``bnnzoo fit`` process: its output into the file ``log``, then the console
    script's ``main`` with ``args`` (its exit status becomes the process's)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    main(args)


@pytest.fixture(scope="module")
def cli_processes():
    """Starts ``bnnzoo fit`` processes: forked from a fork server that has imported bnnzoo and torch
    (and torch's lazily imported compiler stack, which the first optimiser pulls in) and done no
    computation, so that a process is as fresh as a new interpreter (no thread pools to inherit)
    but costs its fit rather than a start-up of several seconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bnnzoo.cli", "torch._dynamo", "click.testing", "pytest"])

    def start(args: list[str], log) -> multiprocessing.Process:
        proc = context.Process(target=_cli_process, args=(args, str(log)))
        proc.start()
        return proc

    return start


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_sigint_writes_a_checkpoint_and_resume_reproduces_the_uninterrupted_fit(uci_dir, cli_reference, cli_processes,
                                                                                tmp_path):
    """A ``bnnzoo fit`` process gets Ctrl-C (SIGINT) some way into its fit: it writes the last
    completed epoch, says how to resume and exits with 130; ``--resume`` then ends where the
    uninterrupted fit does."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = cli_processes(_cli_args(uci_dir, out, "--checkpoint-every", "10"), log)
    deadline = time.monotonic() + 120
    while not has_checkpoint(out) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(120)
    if (out / "config.json").exists():
        pytest.skip("the fit finished before SIGINT arrived")
    err = log.read_text()
    assert proc.exitcode == 130, err
    assert f"--resume {out}" in err and "Traceback" not in err
    assert read_checkpoint(out)["epoch"] >= 10
    _cli(*_cli_args(uci_dir, out, "--resume", str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "metrics.json", "posterior.pt"]
    assert torch.equal(_run_predictions(out, uci_dir), cli_reference[0])


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sigkill_at_random_points_leaves_no_run_or_a_complete_one(uci_dir, cli_reference, cli_processes, tmp_path):
    """Five ``bnnzoo fit`` processes (run side by side), each killed with SIGKILL at a random moment
    of its fit (in an epoch, in a checkpoint write) or of its evaluation and save. Each
    leaves a complete run that predicts as the uninterrupted fit, or no run (at most the checkpoint),
    which ``--resume`` completes to the same predictions."""
    reference, _ = cli_reference
    rng = random.Random(19)
    # where each is killed: once its checkpoint reaches a random epoch, after a random delay; the
    # last trial reaches the final epoch and is killed during the evaluation or the save (or after)
    targets = sorted(rng.sample(range(1, CLI_EPOCHS), 4)) + [CLI_EPOCHS]
    delays = [rng.uniform(0.0, 0.02) for _ in range(4)] + [rng.uniform(0.0, 0.5)]
    outs = [tmp_path / f"run{trial}" for trial in range(5)]
    procs = [cli_processes(_cli_args(uci_dir, out, "--checkpoint-every", "1"), tmp_path / f"log{i}")
             for i, out in enumerate(outs)]
    kill_at: list[float | None] = [None] * len(outs)
    seen = [0] * len(outs)  # the checkpoint file's last modification time read
    deadline = time.monotonic() + 180
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        for i, (proc, out) in enumerate(zip(procs, outs)):
            if not proc.is_alive():
                continue
            if kill_at[i] is None:
                try:
                    mtime = checkpoint_path(out).stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                if mtime != seen[i]:
                    seen[i] = mtime
                    if read_checkpoint(out)["epoch"] >= targets[i]:
                        kill_at[i] = time.monotonic() + delays[i]
            if kill_at[i] is not None and time.monotonic() >= kill_at[i]:
                proc.kill()
        time.sleep(0.002)
    outcomes = []
    for proc, out in zip(procs, outs):
        proc.kill()
        proc.join(60)
        files = {p.name for p in out.iterdir()} if out.exists() else set()
        if files - {"checkpoint"}:  # a run: complete, loads, predicts as the uninterrupted fit
            outcomes.append("complete run")
            assert files == {"config.json", "manifest.json", "metrics.json", "posterior.pt"}, files
            assert torch.equal(_run_predictions(out, uci_dir), reference)
            continue
        with pytest.raises((BnnzooError, FileNotFoundError)):  # no run: at most the unfinished fit's checkpoint
            bnnzoo.load(out)
        assert has_checkpoint(out)  # every process was killed after its first checkpoint
        outcomes.append(f"checkpoint at epoch {read_checkpoint(out)['epoch']}")
        _cli(*_cli_args(uci_dir, out, "--resume", str(out)))
        assert torch.equal(_run_predictions(out, uci_dir), reference)
    print("SIGKILL outcomes:", outcomes)


def test_cli_refuses_to_start_over_a_checkpoint_and_to_resume_a_finished_run(uci_dir, cli_reference, tmp_path,
                                                                             monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_during_epoch(m, 7)
        interrupted = CliRunner().invoke(main, _cli_args(uci_dir, run))
    assert interrupted.exit_code == 130 and f"--resume {run}" in interrupted.output
    assert read_checkpoint(run)["epoch"] == 7
    fresh = CliRunner().invoke(main, _cli_args(uci_dir, run))  # the same command without --resume
    assert fresh.exit_code != 0 and f"--resume {run}" in fresh.output and "Traceback" not in fresh.output
    assert read_checkpoint(run)["epoch"] == 7  # untouched
    _cli(*_cli_args(uci_dir, run, "--resume", str(run)))
    assert torch.equal(_run_predictions(run, uci_dir), cli_reference[0])
    again = CliRunner().invoke(main, _cli_args(uci_dir, run, "--resume", str(run)))
    assert again.exit_code != 0 and "completed run" in again.output
