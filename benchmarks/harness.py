"""The benchmark harness every method reuses.

- :func:`uci_protocol`: the UCI regression protocol (Hernandez-Lobato & Adams 2015) over all splits
  of a set: mean +- standard error of test RMSE and log-likelihood, seconds per epoch.
- :func:`mnist_protocol`: MNIST train5k -> t10k: accuracy, NLL, ECE, Brier, seconds per epoch.
- :class:`PlainTorch`: plain PyTorch training of the *same* network on batches of the same size,
  run interleaved with the method (one plain epoch after each of the method's epochs, inside the
  same process), so both see the same machine load and the epoch-time ratio is stable.
- :func:`write_result`: results as JSON under ``benchmarks/results/``, each stamped with the git
  commit of the code that produced it and whether the working tree differed from that commit
  (:func:`git_state`).

Every test log-likelihood these protocols report averages the predictive over :data:`TEST_DRAWS`
posterior draws (unless a suite asks otherwise, which its result then records as ``test_draws``).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import bnnzoo
from bnnzoo import metrics
from bnnzoo.catalog import get_entry
from bnnzoo.data import load_dataset, load_uci, uci_num_splits
from bnnzoo.guides.training import minibatches, set_seed
from bnnzoo.models.sparsity import EmptyLayerWarning
from bnnzoo.models.standardizer import Standardizer

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

#: posterior draws behind every test log-likelihood and predictive mean of the protocols below (a
#: posterior that stores fewer samples cycles through them, so its figures use all it stores)
TEST_DRAWS = 100

#: outputs of the benchmarks themselves, left out of the dirty check (writing a result must not make
#: the next one look dirty)
_OUTPUTS = ("benchmarks/results", "docs/results.md")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PlainTorch:
    """Plain PyTorch training of ``net`` (a :class:`~bnnzoo.models.networks.Network`) with ``optimizer``
    ("adam" with PyTorch defaults, or "sgd" with momentum 0.9), one epoch per :meth:`epoch` call,
    on batches of ``batch_size`` from the same standardised data the method sees. The baseline is
    what a user would write, ``torch.optim.Adam(params, lr)``: the methods' own optimiser choices
    (fused Adam where torch offers it, :func:`bnnzoo.guides.training.make_adam`) are part of their cost."""

    def __init__(self, net, x, y, task: str, batch_size: int, lr: float = 1e-3, optimizer: str = "adam",
                 seed: int = 0):
        torch.manual_seed(seed)
        self.module = net.to_torch().to(x.device).train()  # a module's BatchNorm trains on batch statistics
        self.x, self.y, self.task, self.batch_size = x, y, task, batch_size
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr, momentum=0.9)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.epoch_seconds: list[float] = []

    def loss(self, out, y):
        return F.cross_entropy(out, y) if self.task == "classification" else F.mse_loss(out.squeeze(-1), y)

    def epoch(self, *_):
        if self.x.device.type == "cuda":
            torch.cuda.synchronize(self.x.device)
        start = time.perf_counter()
        for idx in minibatches(len(self.x), self.batch_size, self.x.device):
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(self.module(self.x[idx]), self.y[idx]).backward()
            self.optimizer.step()
        if self.x.device.type == "cuda":
            torch.cuda.synchronize(self.x.device)
        self.epoch_seconds.append(time.perf_counter() - start)

    @torch.no_grad()
    def probs(self, x):
        return torch.cat([torch.softmax(self.module(x[i:i + 4096]), -1) for i in range(0, len(x), 4096)])


def epoch_ratio(method_seconds: list[float], plain_seconds: list[float], skip: int = 1) -> float:
    """Ratio of median epoch times, skipping the first ``skip`` epochs of each (warm-up)."""
    a = method_seconds[skip:] or method_seconds
    b = plain_seconds[skip:] or plain_seconds
    return statistics.median(a) / statistics.median(b)


def mean_epoch_ratio(method_seconds: list[float], plain_seconds: list[float], skip: int = 1) -> float:
    """Ratio of mean epoch times, skipping the first ``skip`` epochs of each: the whole fit's time
    per epoch, for a method whose epochs differ in cost by phase (a fit that reduces its network
    partway runs its later epochs on the smaller network), where the median sees one phase only."""
    a = method_seconds[skip:] or method_seconds
    b = plain_seconds[skip:] or plain_seconds
    return statistics.fmean(a) / statistics.fmean(b)


def mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "n": n}


def fit_with_baseline(name: str, dataset, *, device, seed: int = 0, baseline: str | None = "adam",
                      baseline_lr: float = 1e-3, progress: bool = False, **options):
    """Fit catalog model ``name`` on ``dataset`` with a plain PyTorch run of the same network
    interleaved epoch by epoch. Returns ``(posterior, plain or None)``."""
    posterior = bnnzoo.create(name, dataset.task, dataset.input_shape, dataset.output_dim, dataset=dataset.name,
                              device=device, seed=seed, **options)
    plain = None
    if baseline is not None:
        std = Standardizer.from_data(dataset.x_train, dataset.y_train, dataset.task).to(posterior.device)
        x = std.x(dataset.x_train.to(posterior.device))
        y = std.y(dataset.y_train.to(posterior.device))
        plain = PlainTorch(posterior.net, x, y, dataset.task, posterior.config["train"]["batch_size"], baseline_lr,
                           baseline, seed)
    set_seed(seed)
    posterior.fit(dataset.x_train, dataset.y_train, progress=progress, callback=plain.epoch if plain else None)
    return posterior, plain


def draws_used(posterior, num_samples: int) -> dict:
    """How many posterior draws a figure used: ``test_draws`` (asked for) and, for a posterior that
    stores samples, ``stored_draws`` (the distinct draws behind them)."""
    out = {"test_draws": int(num_samples)}
    if getattr(posterior, "stores_samples", False):
        out["stored_draws"] = int(posterior.num_draws)
    return out


def uci_protocol(name: str, dataset: str = "boston", splits: list[int] | None = None, *, device="cpu",
                 num_samples: int = TEST_DRAWS, baseline: str | None = "adam", progress: bool = True, **options) -> dict:
    """Fit ``name`` on every split of a UCI set; mean +- standard error of the test metrics."""
    n_splits = uci_num_splits(dataset)
    splits = list(range(n_splits)) if splits is None else splits
    rows = []
    for split in splits:
        data = load_uci(dataset, split=split)
        posterior, plain = fit_with_baseline(name, data, device=device, seed=split, baseline=baseline, **options)
        m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
        sp = posterior.sparsity()
        var_y = float(data.y_test.var())
        row = {"split": split, **m, "nmse": m["rmse"] ** 2 / var_y,
               "weights_pruned_fraction": sp["weights_pruned_fraction"],
               "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
               "architecture": sp["architecture"],
               "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds)}
        if plain is not None:
            row["epoch_time_ratio"] = epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds)
        rows.append(row)
        if progress:
            print(f"  {name} {dataset} split {split}: rmse {m['rmse']:.3f} ll {m['log_likelihood']:.3f} "
                  f"pruned {sp['weights_pruned_fraction']:.2f}", flush=True)
    summary = {k: mean_se([r[k] for r in rows]) for k in rows[0]
               if k not in ("split", "architecture")}
    return {"model": name, "dataset": dataset, "splits": splits, "num_splits": len(splits), "options": options,
            **draws_used(posterior, num_samples), "summary": summary, "per_split": rows, "config": posterior.config}


def mnist_protocol(name: str, *, arch: str = "lenet-300-100", device="cpu", seed: int = 0,
                   num_samples: int = TEST_DRAWS,
                   baseline: str | None = "adam", progress: bool = True, root: str | None = None, **options) -> dict:
    """Fit ``name`` on MNIST train5k (or the full set under ``root``), test on t10k; the plain
    PyTorch network is trained on the same batches in the same run and evaluated alike."""
    data = load_dataset("mnist", root=root) if root else load_dataset("mnist")
    posterior, plain = fit_with_baseline(name, data, device=device, seed=seed, baseline=baseline,
                                         network={"arch": arch}, progress=progress, **options)
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    sp = posterior.sparsity()
    out = {"model": name, "dataset": "mnist-train5k-t10k", "arch": arch, "options": options,
           **draws_used(posterior, num_samples), "metrics": m,
           "weights_pruned_fraction": sp["weights_pruned_fraction"],
           "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
           "compression_ratio": sp["compression_ratio"], "architecture": sp["architecture"],
           "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds),
           "epochs": len(posterior.history.epoch_seconds), "config": posterior.config}
    if plain is not None:
        y_test = data.y_test.to(posterior.device)
        x_test = posterior.standardizer.x(data.x_test.to(posterior.device))
        out[f"plain_{baseline}"] = {**metrics.classification_metrics(plain.probs(x_test), y_test),
                                    "seconds_per_epoch": statistics.median(plain.epoch_seconds)}
        out["epoch_time_ratio"] = epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds)
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_state() -> dict:
    """The code a result comes from: ``commit`` (``git rev-parse HEAD``; ``None`` outside a git
    checkout) and ``dirty``: whether ``git status --porcelain`` lists any change, tracked or
    untracked, outside the benchmarks' own outputs (``benchmarks/results/``, ``docs/results.md``);
    ``None`` when git cannot tell. A dirty tree adds ``dirty_paths`` (the changed paths, at most 20)
    and ``diff_sha1``, a hash of ``git diff HEAD`` (tracked changes), so that results from the same
    uncommitted state can be told apart from others."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in _OUTPUTS))
    if status is None:
        return {"commit": head.strip(), "dirty": None}
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    out = {"commit": head.strip(), "dirty": bool(paths)}
    if paths:
        diff = _git("diff", "HEAD", "--", ".", *(f":(exclude){p}" for p in _OUTPUTS)) or ""
        out.update(dirty_paths=paths[:20], diff_sha1=hashlib.sha1(diff.encode()).hexdigest())
    return out


def write_result(key: str, result: dict, device) -> Path:
    """Write ``result`` to ``benchmarks/results/<key>.json`` with the device, the versions, the date
    and the code's git state (:func:`git_state`: ``commit``, ``dirty``), read when the result is
    written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": key, "device": device_name(torch.device(device)), "torch": torch.__version__,
              "bnnzoo": bnnzoo.__version__, "date": time.strftime("%Y-%m-%d"), **git_state(), **result}
    path = RESULTS / f"{key}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


# ---- one regression fit with catalog defaults, pruned and (where the entry can say) dense --------
def has_prune_switch(name: str, task: str = "regression") -> bool:
    """Whether catalog entry ``name`` prunes at the end of its fit by default behind a ``prune``
    option, so that ``prune=False`` gives the dense network of the same training run."""
    train = get_entry(name).defaults.get(task, {}).get("train", {})
    return train.get("prune") is True


def fit_regression_defaults(name: str, data, *, device="cpu", seed: int = 0, num_samples: int = TEST_DRAWS,
                            dense: bool = True) -> dict:
    """Fit catalog entry ``name`` on a regression :class:`~bnnzoo.data.Dataset` with the catalog's
    defaults (seed ``seed``) and evaluate it on the test split with ``num_samples`` draws.

    Returns a row: ``rmse``, ``log_likelihood``, ``mse`` and ``nmse`` (test MSE over the test targets'
    variance); the pruned fractions of weights and hidden neurons, the kept ``architecture`` and the
    groups kept per layer (``groups_kept``); ``fit_seconds`` (wall time of ``fit``, pruning and noise
    refit included) and ``epochs``; ``empty_layer_warnings``, how many times a pruning rule would have
    emptied a hidden layer and :func:`bnnzoo.models.sparsity.protect_layers` kept its best group;
    ``noise_refit`` (the record of the noise refit after pruning, where there was one); the draws
    used (:func:`draws_used`). With ``dense`` and an entry that has a ``prune`` switch
    (:func:`has_prune_switch`), a second fit with the same seed and ``prune=False`` gives the dense
    network of the same run: ``dense_rmse``, ``dense_log_likelihood``, ``dense_mse``. The headline
    figures always come from the fit with the defaults as they are.
    """
    def one_fit(**options):
        posterior = bnnzoo.create(name, data.task, data.input_shape, data.output_dim, dataset=data.name,
                                  device=device, seed=seed, **options)
        set_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EmptyLayerWarning)
            start = time.perf_counter()
            posterior.fit(data.x_train, data.y_train, progress=False)
            seconds = time.perf_counter() - start
        empty = sum(issubclass(w.category, EmptyLayerWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, EmptyLayerWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return posterior, seconds, empty

    posterior, seconds, empty = one_fit()
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    sp = posterior.sparsity()
    var_y = float(data.y_test.var())
    row = {"rmse": m["rmse"], "log_likelihood": m["log_likelihood"], "mse": m["rmse"] ** 2,
           "nmse": m["rmse"] ** 2 / var_y,
           "weights_pruned_fraction": sp["weights_pruned_fraction"],
           "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
           "architecture": sp["architecture"],
           "groups_kept": {layer: v["groups_kept"] for layer, v in sp["layers"].items()},
           "fit_seconds": seconds, "epochs": len(posterior.history.epoch_seconds),
           "empty_layer_warnings": empty, **draws_used(posterior, num_samples)}
    records = posterior.fit_state.pruning
    if records and "noise_refit" in records[-1].summary:
        row["noise_refit"] = records[-1].summary["noise_refit"]
    if dense and has_prune_switch(name, data.task):
        dense_posterior, dense_seconds, _ = one_fit(prune=False)
        d = dense_posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
        row.update(dense_rmse=d["rmse"], dense_log_likelihood=d["log_likelihood"], dense_mse=d["rmse"] ** 2,
                   dense_fit_seconds=dense_seconds)
    return row
