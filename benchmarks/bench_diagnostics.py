"""Diagnostics (issue 7): does LOO on the training data predict the held-out log-likelihood?

For the mean-field baseline on Boston housing splits: fit (the entry's defaults), convert to ArviZ
with the training data, and compare the LOO estimate of the expected log predictive density per point
(``elpd_loo / n`` +- ``se / n``) with the test log-likelihood per point (mean +- its standard error
over the test points), both from the same number of posterior draws. Two LOO estimates: plain PSIS-LOO
(``az.loo``), and PSIS-LOO with exact refits for the points of Pareto k > 0.7 (``az.reloo`` through
``bnnzoo.loo.RefitWrapper``: one fit without each such point), the remedy ArviZ prescribes when
Pareto k is high. Per split: the differences, their standard errors ``sqrt(se_loo^2 + se_test^2)``,
the Pareto-k diagnostics, WAIC, the in-sample log predictive density and, optionally (``kfold``),
K-fold cross-validation on the training data.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch

import bnnzoo
from bnnzoo.data import load_uci, uci_num_splits

from bnnzoo.loo import loo as bnnzoo_loo

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


def loo_split(name: str, split: int, *, device, num_samples: int, kfold: int, refit: bool) -> dict:
    import arviz as az

    data = load_uci("boston", split=split)
    start = time.perf_counter()
    posterior, _ = fit_with_baseline(name, data, device=device, seed=split, baseline=None)
    fit_seconds = time.perf_counter() - start
    xy = (data.x_train, data.y_train)
    idata = posterior.to_arviz(xy, num_samples=num_samples, sites=None, seed=split)
    loo = bnnzoo_loo(posterior, *xy, num_samples=num_samples, seed=split, idata=idata)
    start = time.perf_counter()
    reloo = bnnzoo_loo(posterior, *xy, reloo=True, num_samples=num_samples, seed=split, idata=idata) if refit else None
    reloo_seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # high Pareto k: counted below
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
    if reloo is not None:
        r_mean, r_se = float(reloo.elpd_loo) / n, float(reloo.se) / n
        r_diff_se = math.hypot(r_se, test_se)
        row.update(reloo_per_point=r_mean, reloo_se=r_se, reloo_difference=test_mean - r_mean,
                   reloo_difference_se=r_diff_se, reloo_z=(test_mean - r_mean) / r_diff_se,
                   refits=int(reloo["refits"]), reloo_seconds=reloo_seconds)
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
                kfold: int = 0, refit: bool = True) -> dict:
    splits = list(range(uci_num_splits("boston"))) if splits is None else splits
    rows = []
    for split in splits:
        row = loo_split(name, split, device=device, num_samples=num_samples, kfold=kfold, refit=refit)
        rows.append(row)
        cv = f", {kfold}-fold CV {row['kfold_per_point']:.3f} +- {row['kfold_se']:.3f}" if kfold else ""
        re = (f", with refits ({row['refits']}) {row['reloo_per_point']:.3f} +- {row['reloo_se']:.3f} "
              f"(z {row['reloo_z']:+.2f})" if refit else "")
        print(f"  {name} boston split {split}: test {row['test_ll']:.3f} +- {row['test_se']:.3f}; PSIS-LOO "
              f"{row['loo_per_point']:.3f} +- {row['loo_se']:.3f} (z {row['z']:+.2f}){re}{cv}; in-sample "
              f"{row['in_sample_per_point']:.3f}; Pareto k > {row['pareto_k_good_threshold']:.2f} for "
              f"{row['pareto_k_bad_fraction']:.1%}", flush=True)
    keys = (["loo_per_point", "test_ll", "difference", "p_loo", "waic_per_point", "in_sample_per_point",
             "pareto_k_bad_fraction", "pareto_k_max"] + (["kfold_per_point"] if kfold else [])
            + (["reloo_per_point", "reloo_difference", "refits", "reloo_seconds"] if refit else []))
    summary = {k: mean_se([r[k] for r in rows]) for k in keys}
    s = summary

    def within(zkey: str, bound: float) -> int:
        return sum(abs(r[zkey]) <= bound for r in rows)

    out = {"model": name, "dataset": "boston", "splits": splits, "num_samples": num_samples, "summary": summary,
           "psis_splits_within_1se": within("z", 1), "psis_splits_within_2se": within("z", 2),
           "per_split": rows}
    psis = (f"plain PSIS-LOO {s['loo_per_point']['mean']:.3f} (test - LOO {s['difference']['mean']:+.3f} +- "
            f"{s['difference']['se']:.3f}; Pareto k > {rows[0]['pareto_k_good_threshold']:.2f} for "
            f"{s['pareto_k_bad_fraction']['mean']:.0%} of the points)")
    if refit:
        d = s["reloo_difference"]
        out.update(reloo_splits_within_1se=within("reloo_z", 1), reloo_splits_within_2se=within("reloo_z", 2),
                   mean_per_split_se=statistics.fmean(r["reloo_difference_se"] for r in rows))
        out["targets"] = {"loo_agrees_with_test_ll_within_se": abs(d["mean"]) <= d["se"]}
        out["headline"] = (f"{name} Boston ({len(rows)} splits, {num_samples} draws): LOO (PSIS, exact refits for the "
                           f"{s['refits']['mean']:.0f} points a split of k > 0.7) {s['reloo_per_point']['mean']:.3f} vs "
                           f"test LL {s['test_ll']['mean']:.3f} per point: test - LOO = {d['mean']:+.3f} +- {d['se']:.3f} "
                           f"over splits; within its split's SE in {out['reloo_splits_within_1se']}/{len(rows)} "
                           f"splits, 2 SE in {out['reloo_splits_within_2se']}/{len(rows)}; {psis}")
    else:
        out["headline"] = f"{name} Boston ({len(rows)} splits, {num_samples} draws): test LL {s['test_ll']['mean']:.3f}; {psis}"
    if kfold:
        out["headline"] += f"; {kfold}-fold CV {s['kfold_per_point']['mean']:.3f} +- {s['kfold_per_point']['se']:.3f}"
    return out


def boston(device) -> dict:
    # the first 4 of the 20 splits: each costs one fit plus one refit per point of Pareto k > 0.7
    # (70-90 refits of a few seconds each on Boston)
    return {"diagnostics-loo-meanfield-boston": loo_vs_test(device, splits=list(range(4)))}


SUITES = {"diagnostics-loo-boston": boston}
