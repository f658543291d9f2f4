"""Horseshoe with SVI: Boston housing (all 20 splits) and MNIST train5k -> t10k with
LeNet-300-100 and LeNet-5.

Each posterior is fitted with the catalog entry's defaults but without its closing prune, evaluated
dense, then pruned by the method's own rule (``Posterior.prune``) and evaluated again. The metrics,
sparsity and architecture reported at the top level are those of the *pruned* network; the dense
network's metrics are kept beside under ``dense``. A plain PyTorch Adam run of the same network on
the same batches (PyTorch's default Adam, :class:`benchmarks.harness.PlainTorch`),
is interleaved epoch by epoch (``fit_with_baseline``) for the epoch-time ratio and, on MNIST, the
reference accuracy.

Every test log-likelihood averages the predictive density over ``harness.TEST_DRAWS`` posterior
draws (the one number all suites use). The closing prune is the entry's own rule
(``train.prune_rule``, recorded as ``pruning_rule``); a regression fit's noise is then refitted on
its training data, as the entry does at the end of a fit.
"""

from __future__ import annotations

import statistics

from bnnzoo import metrics
from bnnzoo.data import load_dataset, load_uci, uci_num_splits

from .harness import TEST_DRAWS, epoch_ratio, fit_with_baseline, mean_se

NAME = "horseshoe-svi"


def _fit_dense_and_pruned(data, *, device, seed: int, num_samples: int, **options):
    posterior, plain = fit_with_baseline(NAME, data, device=device, seed=seed, prune=False, **options)
    dense = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    pruned = posterior.prune(data=(data.x_train, data.y_train)) if data.task == "regression" else posterior.prune()
    return posterior, pruned, plain, dense


def boston(device, num_samples: int = TEST_DRAWS, **options) -> dict:
    """All 20 splits with the entry's defaults (``options`` override them)."""
    rows = []
    for split in range(uci_num_splits("boston")):
        data = load_uci("boston", split=split)
        posterior, pruned, plain, dense = _fit_dense_and_pruned(data, device=device, seed=split,
                                                                num_samples=num_samples, **options)
        m = pruned.evaluate(data.x_test, data.y_test, num_samples=num_samples)
        sp = pruned.sparsity()
        rows.append({"split": split, **m, "nmse": m["rmse"] ** 2 / float(data.y_test.var()),
                     "weights_pruned_fraction": sp["weights_pruned_fraction"],
                     "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
                     "dense_rmse": dense["rmse"], "dense_log_likelihood": dense["log_likelihood"],
                     "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds),
                     "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
                     "architecture": sp["architecture"]})
        print(f"  boston split {split}: {sp['architecture']} rmse {m['rmse']:.3f} ll {m['log_likelihood']:.3f} "
              f"(dense {dense['rmse']:.3f} / {dense['log_likelihood']:.3f})", flush=True)
    summary = {k: mean_se([r[k] for r in rows]) for k in rows[0] if k not in ("split", "architecture")}
    key = "horseshoe-svi-boston" + ("-" + "-".join(f"{k}-{v}" for k, v in options.items()) if options else "")
    return {key: {
        "model": NAME, "dataset": "boston", "splits": [r["split"] for r in rows], "options": options, "summary": summary,
        "per_split": rows, "config": posterior.config, "num_samples": num_samples,
        "pruning_rule": posterior.config["train"]["prune_rule"],
    }}


def _mnist(arch: str, device, num_samples: int = TEST_DRAWS, **options) -> dict:
    data = load_dataset("mnist")
    posterior, pruned, plain, dense = _fit_dense_and_pruned(data, device=device, seed=0, num_samples=num_samples,
                                                            network={"arch": arch}, progress=True, **options)
    m = pruned.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    sp = pruned.sparsity()
    x_test = posterior.standardizer.x(data.x_test.to(posterior.device))
    plain_metrics = metrics.classification_metrics(plain.probs(x_test), data.y_test.to(posterior.device))
    print(f"  mnist {arch}: {sp['architecture']} accuracy {m['accuracy']:.4f} (dense {dense['accuracy']:.4f}, "
          f"plain adam {plain_metrics['accuracy']:.4f}), {100 * sp['weights_pruned_fraction']:.1f}% pruned", flush=True)
    return {
        "model": NAME, "dataset": "mnist-train5k-t10k", "arch": arch, "options": options, "metrics": m,
        "weights_pruned_fraction": sp["weights_pruned_fraction"],
        "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
        "compression_ratio": sp["compression_ratio"], "architecture": sp["architecture"],
        "layers": sp["layers"],
        "dense": dense, "accuracy_gap_to_plain_adam": plain_metrics["accuracy"] - m["accuracy"],
        "plain_adam": {**plain_metrics, "seconds_per_epoch": statistics.median(plain.epoch_seconds)},
        "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds),
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
        "epochs": len(posterior.history.epoch_seconds), "config": posterior.config,
        "pruning_rule": posterior.config["train"]["prune_rule"],
    }


def mnist(device) -> dict:
    return {f"horseshoe-svi-mnist-{arch}": _mnist(arch, device) for arch in ("lenet-300-100", "lenet5")}


def mnist_mlp(device) -> dict:
    return {"horseshoe-svi-mnist-lenet-300-100": _mnist("lenet-300-100", device)}


def mnist_lenet5(device) -> dict:
    return {"horseshoe-svi-mnist-lenet5": _mnist("lenet5", device)}


def boston_exact_elbo(device) -> dict:
    """The same protocol with the exact ELBO (``kl_weight = 1``) instead of the tempered default."""
    return boston(device, kl_weight=1.0)


SUITES = {"horseshoe-boston": boston, "horseshoe-boston-exact-elbo": boston_exact_elbo, "horseshoe-mnist": mnist,
          "horseshoe-mnist-mlp": mnist_mlp, "horseshoe-mnist-lenet5": mnist_lenet5}
