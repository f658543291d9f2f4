"""The ``peers-boston`` suites: Boston housing regression through plain PyTorch Adam, every regression
entry of the bnnzoo catalog and the peer libraries (bayesian-torch, TyXe, laplace-torch).

Task: the bundled 20 standard splits of Boston housing (:func:`bnnzoo.data.load_uci`), network
13-50-1 with ReLU, seed = the split's index. ``peers-boston-quick`` is the plumbing check: the first
:data:`QUICK_SPLITS` splits, :data:`QUICK_EPOCHS` epochs for the peers and their plain Adam, and
the bnnzoo entries of :data:`QUICK_ENTRIES` only. Run on one CPU thread::

    python -m benchmarks.run peers-boston-quick --threads 1

Per split, every method is scored by :func:`regression_score` on the raw test targets: the mean
per-point Gaussian predictive log density in the original units (the mixture over the draws where
the method draws weights, the one Gaussian where its predictive is closed form) and the RMSE of the
predictive mean; the result gives mean +- standard error over the splits.

- **bnnzoo**: every entry of ``bnnzoo.list_models("regression")`` (``quick``: :data:`QUICK_ENTRIES`)
  run by the ``uci`` suite's own :func:`benchmarks.bench_uci.run_entry` (catalog defaults, seed =
  split, :data:`~benchmarks.harness.TEST_DRAWS` draws; nothing re-implemented here), whose metrics
  come from ``posterior.evaluate``, the same mixture log density. Its per-split ``fit_seconds``
  (the whole fit: epoch selection, pruning, noise refit) is set against the split's plain Adam epoch
  (:func:`plain_adam`, run on its own before): ``fit_in_adam_epochs``, and per epoch of the fit
  ``fit_seconds_per_epoch_ratio`` (not interleaved, so less exact than the peers' epoch-time ratio).
- **peers** (:mod:`benchmarks.peers_libs`): bayesian-torch Reparameterization and Flipout and TyXe
  mean-field, trained with a learned Gaussian noise and their epochs interleaved with plain Adam
  epochs on the same batches; laplace-torch last-layer Kronecker and all-weights diagonal, post hoc on
  the plain Adam network with sigma_noise and the prior precision tuned by marginal likelihood.
  Training settings: bnnzoo ``meanfield-vi``'s regression defaults (epochs, batch size, learning
  rate: :func:`meanfield_settings`), since neither bayesian-torch nor TyXe gives a regression setting
  for a data set like this one.
- **plain Adam** (the reference and Laplace's network): the same settings on the mean squared error;
  its predictive is the Gaussian with the network's output and the training RMSE as noise sd.

Peers whose import fails are recorded under ``left_out``; ``docs/peers.md`` says why each runs as
it does.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

import bnnzoo
from bnnzoo.catalog import get_entry
from bnnzoo.data import load_uci, uci_num_splits
from bnnzoo.guides.training import set_seed

from . import peers_libs
from .bench_peers import PeerTask, peer_versions, run_method
from .bench_uci import run_entry
from .harness import TEST_DRAWS, mean_se

DATASET = "boston"
#: the protocol's network for Boston: one hidden layer of 50 ReLU units
HIDDEN = [50]
#: the plumbing check: splits, peer and plain Adam epochs, bnnzoo entries
QUICK_SPLITS = 2
QUICK_EPOCHS = 5
QUICK_ENTRIES = ("map", "meanfield-vi")


def meanfield_settings() -> dict:
    """``{"epochs", "batch_size", "lr"}`` of bnnzoo ``meanfield-vi``'s regression defaults (the
    catalog's), the training settings of the peers and of plain Adam."""
    train = get_entry("meanfield-vi").defaults["regression"]["train"]
    return {"epochs": int(train["epochs"]), "batch_size": int(train["batch_size"]), "lr": float(train["lr"])}


def regression_score(loc: torch.Tensor, scale, y: torch.Tensor) -> dict[str, float]:
    """The one metric code of the Boston task. ``loc``: predictive means ``(S, N)`` (one row per draw;
    ``S = 1`` for a closed-form Gaussian) and ``scale`` (broadcastable to ``loc``) their sds, in the
    original units of the targets ``y`` ``(N,)``. Returns ``log_likelihood``, the mean over points of
    ``log (1/S) sum_s N(y_n; loc_sn, scale_sn^2)``, and ``rmse`` of the predictive mean
    ``(1/S) sum_s loc_sn``."""
    loc = torch.as_tensor(loc, dtype=torch.float64)
    loc = loc.unsqueeze(0) if loc.dim() == 1 else loc
    scale = torch.as_tensor(scale, dtype=torch.float64, device=loc.device).expand_as(loc)
    y = y.to(loc.device, torch.float64)
    log_p = torch.distributions.Normal(loc, scale).log_prob(y)
    ll = torch.logsumexp(log_p, 0) - math.log(loc.shape[0])
    rmse = ((loc.mean(0) - y) ** 2).mean().sqrt()
    return {"log_likelihood": float(ll.mean()), "rmse": float(rmse)}


class RegressionTask(PeerTask):
    """A :class:`~benchmarks.bench_peers.PeerTask` for regression: the training targets standardised
    as bnnzoo does, and :meth:`score` taking ``(loc, scale)`` in those standardised units."""

    def score(self, predictive) -> dict[str, float]:
        """:func:`regression_score` of ``predictive = (loc, scale)`` (standardised units, ``loc`` ``(S,
        N)`` or ``(N,)``), mapped back to the original units of the raw test targets."""
        loc, scale = predictive
        std = self.standardizer
        return regression_score(std.y_inverse(torch.as_tensor(loc)), torch.as_tensor(scale) * std.y_scale,
                                self.y_test)


def boston_task(split: int, device, *, quick: bool = False) -> RegressionTask:
    """Split ``split`` of Boston housing with the task's network and :func:`meanfield_settings` (``quick``:
    :data:`QUICK_EPOCHS` epochs), seeded with the split's index."""
    settings = meanfield_settings()
    if quick:
        settings["epochs"] = QUICK_EPOCHS
    data = load_uci(DATASET, split=split)
    return RegressionTask(f"{DATASET} split {split}", data, torch.device(device), arch="mlp", hidden=list(HIDDEN),
                          seed=split, **settings)


def plain_adam(task: RegressionTask) -> tuple[dict, torch.nn.Module]:
    """The reference: plain PyTorch Adam on the mean squared error, on the task's batches; predictive:
    the network's output with the training RMSE (standardised units) as noise sd. Returns its row and
    its trained module."""
    plain = task.plain()
    for batches in task.schedule():
        plain.epoch_on(batches)

    @torch.no_grad()
    def predict():
        fit = plain.module(task.x_train).squeeze(-1)
        noise = ((fit - task.y_train) ** 2).mean().sqrt()
        return plain.module(task.x_test).squeeze(-1), noise

    (loc, noise), predict_seconds = peers_libs.timed(predict, task.device)
    row = {**task.score((loc, noise)), "epochs": len(plain.epoch_seconds),
           "seconds_per_epoch": statistics.median(plain.epoch_seconds),
           "plain_seconds_per_epoch": statistics.median(plain.epoch_seconds), "epoch_time_ratio": 1.0,
           "predict_seconds": predict_seconds, "predict_samples": 1,
           "predictive": "Gaussian: network output, noise sd = training RMSE",
           "config": {"optimizer": "torch.optim.Adam", "lr": task.lr, "batch_size": task.batch_size,
                      "epochs": task.epochs, "loss": "mse"}}
    return row, plain.module


#: the peers in table order: name -> runner(task, trained plain Adam module)
PEERS = {
    "bayesian-torch Reparameterization": lambda task, adam: peers_libs.bayesian_torch_regression(task, "Reparameterization"),
    "bayesian-torch Flipout": lambda task, adam: peers_libs.bayesian_torch_regression(task, "Flipout"),
    "TyXe mean-field, local reparam.": lambda task, adam: peers_libs.tyxe_regression(task),
    "laplace-torch last-layer Kronecker": lambda task, adam: peers_libs.laplace_regression(task, adam, "last-layer-kron"),
    "laplace-torch all-weights diagonal (BackPACK)": lambda task, adam: peers_libs.laplace_regression(task, adam, "all-diag"),
}

#: per-split figures summarised as mean +- se over the splits
SUMMARISED = ("log_likelihood", "rmse", "epoch_time_ratio", "fit_seconds", "fit_in_adam_epochs",
              "fit_seconds_per_epoch_ratio", "seconds_per_epoch", "predict_seconds")


def summarise(per_split: list[dict]) -> dict:
    """Mean +- standard error over the splits (:func:`benchmarks.harness.mean_se`) of each figure of
    :data:`SUMMARISED` that every split's row has (a number)."""
    return {k: mean_se([r[k] for r in per_split]) for k in SUMMARISED
            if per_split and all(isinstance(r.get(k), (int, float)) for r in per_split)}


def bnnzoo_rows(entry: str, splits: list[int], plain_epoch: dict[int, float], device, progress: bool) -> dict:
    """Catalog entry ``entry`` on ``splits`` of Boston by :func:`benchmarks.bench_uci.run_entry` (the
    ``uci`` suite's protocol), its per-split fit time set against ``plain_epoch`` (split -> the plain
    Adam median epoch seconds of that split). Returns the method's result: ``summary``, ``per_split``,
    ``failed_splits``, ``config``, the draws used."""
    result = run_entry(entry, DATASET, splits, device=device, progress=progress)
    per_split = []
    for r in result["per_split"]:
        epoch = plain_epoch[r["split"]]
        per_split.append({**r, "fit_in_adam_epochs": r["fit_seconds"] / epoch,
                          "fit_seconds_per_epoch_ratio": r["fit_seconds"] / max(r["epochs"], 1) / epoch})
    return {"kind": "bnnzoo", "summary": summarise(per_split), "per_split": per_split,
            "failed_splits": result["failed_splits"], "test_draws": result["test_draws"],
            "predictive": f"Gaussian mixture over {TEST_DRAWS} posterior draws (posterior.evaluate)",
            "config": result["config"]}


def run_suite(splits: list[int], device, *, quick: bool = False, entries: list[str] | None = None,
              peers: dict = PEERS, progress: bool = True) -> dict:
    """Plain Adam and each of ``peers`` on every split of ``splits``, then each bnnzoo entry of
    ``entries`` (default: every regression entry of the catalog) on the same splits; the result the
    harness writes. Rows under ``methods`` (``"plain Adam"``, ``"bnnzoo <entry>"``, the peers), each
    with ``summary`` and ``per_split``; a peer whose library cannot be imported is under ``left_out``
    with the reason."""
    start = time.perf_counter()
    entries = list(bnnzoo.list_models("regression") if entries is None else entries)
    per_method: dict[str, list[dict]] = {"plain Adam": []}
    configs, left_out, plain_epoch = {}, {}, {}
    task = None
    for split in splits:
        task = boston_task(split, device, quick=quick)
        set_seed(task.seed)
        adam_row, adam_module = plain_adam(task)
        per_method["plain Adam"].append({"split": split, **adam_row})
        plain_epoch[split] = adam_row["seconds_per_epoch"]
        for name, runner in peers.items():
            if name in left_out:
                continue
            set_seed(task.seed)
            row, reason = run_method(runner, task, adam_module)
            if row is None:
                left_out[name] = reason
                continue
            if row.get("post_hoc"):
                row["fit_in_adam_epochs"] = row["fit_seconds"] / adam_row["seconds_per_epoch"]
            per_method.setdefault(name, []).append({"split": split, **row})
            configs[name] = row["config"]
            if progress:
                print(f"   split {split} {name}: ll {row['log_likelihood']:.3f} rmse {row['rmse']:.3f}", flush=True)
    methods = {name: {"kind": "reference" if name == "plain Adam" else "peer", "summary": summarise(rows),
                      "per_split": rows, "predictive": rows[0]["predictive"],
                      "config": rows[0]["config"] if name == "plain Adam" else configs[name]}
               for name, rows in per_method.items()}
    for entry in entries:
        methods[f"bnnzoo {entry}"] = bnnzoo_rows(entry, splits, plain_epoch, device, progress)
    result = {"model": "peers", "dataset": DATASET, "splits": list(splits), "num_splits": len(splits),
              "splits_available": uci_num_splits(DATASET),
              "task": {"network": f"{task.x_train.shape[1]}-{'-'.join(map(str, HIDDEN))}-1 relu" if task else None,
                       "epochs": task.epochs if task else None, "batch_size": task.batch_size if task else None,
                       "lr": task.lr if task else None, "seed": "split index",
                       "settings_from": "bnnzoo meanfield-vi regression defaults"},
              "metric_code": "benchmarks.bench_peers_boston.regression_score (Gaussian predictive log density, "
                             "mixture over draws; original units); bnnzoo: posterior.evaluate",
              "threads": torch.get_num_threads(), "peer_versions": peer_versions(),
              "methods": methods, "left_out": left_out, "suite_seconds": time.perf_counter() - start}
    result["headline"] = headline(result)
    return result


# ---- reporting ----------------------------------------------------------------------------------------
def _pm(summary: dict, key: str, digits: int = 3) -> str:
    if key not in summary:
        return "-"
    s = summary[key]
    se = "" if math.isnan(s["se"]) else f" ± {s['se']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{se}"


def _cost(method: dict) -> str:
    s = method["summary"]
    if "epoch_time_ratio" in s:
        return f"{s['epoch_time_ratio']['mean']:.2f}x"
    if method["kind"] == "bnnzoo" and "fit_in_adam_epochs" in s:
        return (f"fit {s['fit_in_adam_epochs']['mean']:.0f} Adam epochs "
                f"({s['fit_seconds_per_epoch_ratio']['mean']:.2f}x per epoch)")
    if "fit_in_adam_epochs" in s:
        return f"post hoc, fit {s['fit_in_adam_epochs']['mean']:.1f} Adam epochs"
    return "-"


def headline(result: dict) -> str:
    """One line: test log-likelihood / RMSE / cost against Adam per method, then what was left out."""
    parts = [f"{name}: {_pm(m['summary'], 'log_likelihood', 2)} / {_pm(m['summary'], 'rmse', 2)} / {_cost(m)}"
             for name, m in result["methods"].items()]
    text = f"{result['dataset']} ({result['num_splits']} splits) test LL / RMSE / cost vs Adam: " + "; ".join(parts)
    if result["left_out"]:
        text += "; left out: " + ", ".join(sorted(result["left_out"]))
    return text


def table(result: dict) -> str:
    """The result as a Markdown table, one row per method (mean ± se over the splits), then one line
    per method left out."""
    lines = ["| method | test LL | RMSE | epoch time / Adam | predict test set |", "|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        predict = _pm(m["summary"], "predict_seconds", 3)
        lines.append(f"| {name} | {_pm(m['summary'], 'log_likelihood')} | {_pm(m['summary'], 'rmse')} | "
                     f"{_cost(m)} | {predict + ' s' if predict != '-' else '-'} |")
    for name, reason in result["left_out"].items():
        lines.append(f"\n{name}: left out ({reason})")
    return "\n".join(lines)


def _suite(key: str, device, quick: bool) -> dict:
    splits = list(range(QUICK_SPLITS if quick else uci_num_splits(DATASET)))
    result = run_suite(splits, device, quick=quick, entries=list(QUICK_ENTRIES) if quick else None)
    print(table(result), flush=True)
    return {key: result}


SUITES = {"peers-boston": lambda device: _suite("peers-boston", device, quick=False),
          "peers-boston-quick": lambda device: _suite("peers-boston-quick", device, quick=True)}
