"""Diagnostics (issue 7): does PSIS-LOO on the training data predict the held-out log-likelihood?

For the mean-field baseline on Boston housing splits: fit (the entry's defaults), convert to ArviZ
with the training data, and compare the PSIS-LOO estimate of the expected log predictive density per
point (``elpd_loo / n`` +- ``se / n``) with the test log-likelihood per point (mean +- its standard
error over the test points), both from the same number of posterior draws. Per split: the difference,
its standard error ``sqrt(se_loo^2 + se_test^2)``, the Pareto-k diagnostics, WAIC, the in-sample log
predictive density, and, as the reference that Pareto k > 0.7 calls for, K-fold cross-validation on
the training data (K refits; ``elpd_kfold / n`` +- its standard error over the points).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch

import bnnzoo
from bnnzoo.data import load_uci, uci_num_splits

from .harness import fit_with_baseline, mean_se


def kfold_log_likelihood(name: str, data, *, k: int, device, seed: int, num_samples: int) -> torch.Tensor:
    """Pointwise out-of-fold log predictive density of the training points: K refits, each on the
    other folds (standardised with its own training statistics)."""
    n = len(data.y_train)
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).chunk(k)
    out = torch.empty(n)
    for i, held in enumerate(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        post = bnnzoo.create(name, data.task, data.input_shape, data.output_dim, dataset=data.name, device=device,
                             seed=seed * 100 + i)
        post.fit(data.x_train[keep], data.y_train[keep], progress=False)
        out[held] = post.log_likelihood(data.x_train[held], data.y_train[held], num_samples=num_samples,
                                        seed=seed).cpu()
    return out


def loo_split(name: str, split: int, *, device, num_samples: int, kfold: int) -> dict:
    import arviz as az

    data = load_uci("boston", split=split)
    start = time.perf_counter()
    posterior, _ = fit_with_baseline(name, data, device=device, seed=split, baseline=None)
    fit_seconds = time.perf_counter() - start
    idata = posterior.to_arviz((data.x_train, data.y_train), num_samples=num_samples, sites=None, seed=split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # high Pareto k: counted below
        loo = az.loo(idata, pointwise=True)
        waic = az.waic(idata)
    n, n_test = len(data.y_train), len(data.y_test)
    test = posterior.log_likelihood(data.x_test, data.y_test, num_samples=num_samples, seed=split).cpu()
    test_mean = float(test.mean())
    test_se = float(test.std()) / math.sqrt(n_test)
    loo_mean, loo_se = float(loo.elpd_loo) / n, float(loo.se) / n
    diff_se = math.hypot(loo_se, test_se)
    k = loo.pareto_k.values
    train = posterior.log_likelihood(data.x_train, data.y_train, num_samples=num_samples, seed=split).cpu()
    row = {}
    if kfold:
        cv = kfold_log_likelihood(name, data, k=kfold, device=device, seed=split, num_samples=num_samples)
        row = {"kfold": kfold, "kfold_per_point": float(cv.mean()), "kfold_se": float(cv.std()) / math.sqrt(n),
               "kfold_z": (test_mean - float(cv.mean())) / math.hypot(float(cv.std()) / math.sqrt(n), test_se)}
    return {"split": split, "loo_per_point": loo_mean, "loo_se": loo_se, "p_loo": float(loo.p_loo),
            "test_ll": test_mean, "test_se": test_se, "difference": test_mean - loo_mean, "difference_se": diff_se,
            "z": (test_mean - loo_mean) / diff_se, "pareto_k_good_threshold": float(loo.good_k),
            "pareto_k_bad_fraction": float((k > loo.good_k).mean()), "pareto_k_max": float(k.max()),
            "waic_per_point": float(waic.elpd_waic) / n, "in_sample_per_point": float(train.mean()),
            "fit_seconds": fit_seconds, **row}


def loo_vs_test(device, name: str = "meanfield-vi", splits: list[int] | None = None, num_samples: int = 200,
                kfold: int = 5) -> dict:
    splits = list(range(uci_num_splits("boston"))) if splits is None else splits
    rows = []
    for split in splits:
        row = loo_split(name, split, device=device, num_samples=num_samples, kfold=kfold)
        rows.append(row)
        cv = f", {kfold}-fold CV {row['kfold_per_point']:.3f} +- {row['kfold_se']:.3f}" if kfold else ""
        print(f"  {name} boston split {split}: LOO {row['loo_per_point']:.3f} +- {row['loo_se']:.3f}, test "
              f"{row['test_ll']:.3f} +- {row['test_se']:.3f} (z {row['z']:+.2f}){cv}, in-sample "
              f"{row['in_sample_per_point']:.3f}; Pareto k > {row['pareto_k_good_threshold']:.2f} for "
              f"{row['pareto_k_bad_fraction']:.1%}", flush=True)
    keys = ["loo_per_point", "test_ll", "difference", "p_loo", "waic_per_point", "in_sample_per_point",
            "pareto_k_bad_fraction", "pareto_k_max"] + (["kfold_per_point"] if kfold else [])
    summary = {k: mean_se([r[k] for r in rows]) for k in keys}
    within_1 = sum(abs(r["z"]) <= 1 for r in rows)
    within_2 = sum(abs(r["z"]) <= 2 for r in rows)
    pooled_se = statistics.fmean(r["difference_se"] for r in rows)
    s = summary
    headline = (f"{name} Boston ({len(rows)} splits, {num_samples} draws): PSIS-LOO {s['loo_per_point']['mean']:.3f} "
                f"+- {s['loo_per_point']['se']:.3f} vs test LL {s['test_ll']['mean']:.3f} +- {s['test_ll']['se']:.3f} "
                f"per point; test - LOO = {s['difference']['mean']:+.3f} +- {s['difference']['se']:.3f} over splits "
                f"(per-split SE {pooled_se:.3f}); within 1 SE in {within_1}/{len(rows)} splits, 2 SE in "
                f"{within_2}/{len(rows)}; Pareto k > {rows[0]['pareto_k_good_threshold']:.2f} for "
                f"{s['pareto_k_bad_fraction']['mean']:.0%} of the points")
    if kfold:
        kz = sum(abs(r["kfold_z"]) <= 1 for r in rows)
        headline += (f"; {kfold}-fold CV {s['kfold_per_point']['mean']:.3f} +- {s['kfold_per_point']['se']:.3f}, "
                     f"within 1 SE of the test LL in {kz}/{len(rows)} splits")
    return {"model": name, "dataset": "boston", "splits": splits, "num_samples": num_samples, "summary": summary,
            "splits_within_1se": within_1, "splits_within_2se": within_2, "mean_per_split_se": pooled_se,
            "per_split": rows, "headline": headline}


def boston(device) -> dict:
    # the first 10 of the 20 splits: each costs 1 + K fits
    return {"diagnostics-loo-meanfield-boston": loo_vs_test(device, splits=list(range(10)))}


SUITES = {"diagnostics-loo-boston": boston}
