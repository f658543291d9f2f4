"""EM-TDAMP's learned noise against a known one: a random ReLU teacher with noise from 1% to 100% of
the target's spread.

Suite ``tdamp-noise`` (writes ``benchmarks/results/tdamp-noise.json``; ``tdamp-noise-learnable`` the same
on a teacher of 5 hidden units, :func:`noise_sweep_learnable`): for each noise level the
ratio of em-tdamp's learned noise standard deviation (after its fit, pruning and the noise refit
that follows it; units of ``y``) to the true one, the test RMSE of em-tdamp and of a meanfield-vi fit
on the same data (both with their catalog defaults, same seed), and each RMSE over the true noise
(1 is the best any method can do); also em-tdamp as it was before the memory rule (``memory=10``). The tests check the same on a smaller problem
(``tests/test_tdamp_noise.py``).
"""

from __future__ import annotations

import math
import time

import torch

import bnnzoo

NOISE_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
INPUTS, HIDDEN = 8, 50
TRAIN, TEST = 4000, 4000


def teacher(n: int, noise_fraction: float, *, seed: int = 0, n_test: int = TEST, inputs: int = INPUTS,
            hidden: int = HIDDEN):
    """A random dense ReLU network ``f(x) = W2 relu(W1 x + b1)`` (``W1 ~ N(0, 1/inputs)``, ``b1 ~
    N(0, 1/4)``, ``W2 ~ N(0, 1/hidden)``), inputs ``x ~ N(0, I)`` and targets ``y = f(x) + e`` with
    ``e ~ N(0, s^2)``, ``s = noise_fraction * sd(f)`` (the function's spread over the drawn inputs).

    Returns ``(x, y, x_test, y_test, s)``: ``n`` training and ``n_test`` test examples (one draw of
    the teacher per ``seed``)."""
    if not noise_fraction > 0:
        raise ValueError(f"the noise fraction must be positive, got {noise_fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, inputs, generator=gen) / math.sqrt(inputs)
    b1 = 0.5 * torch.randn(hidden, generator=gen)
    w2 = torch.randn(1, hidden, generator=gen) / math.sqrt(hidden)
    x = torch.randn(n + n_test, inputs, generator=gen)
    f = (torch.relu(x @ w1.t() + b1) @ w2.t()).squeeze(-1)
    noise_sd = noise_fraction * float(f.std())
    y = f + noise_sd * torch.randn(len(f), generator=gen)
    return x[:n], y[:n], x[n:], y[n:], noise_sd


#: em-tdamp as it was before the memory rule: a memory of 10 passes, which also set the power
FORMER = {"memory": 10.0}


def fit_and_compare(noise_fraction: float, *, n: int = TRAIN, seed: int = 0, device="cpu", baseline: bool = True,
                    former: bool = False, hidden: int = HIDDEN, **options) -> dict:
    """Fit em-tdamp (catalog defaults, overridden by ``options``) and, with ``baseline``, meanfield-vi
    on one teacher problem (a teacher of ``hidden`` units; with ``former``, also em-tdamp with
    :data:`FORMER`, keys ``em_tdamp_former_*``); return the learned noise over the true one and the
    test RMSEs."""
    x, y, x_test, y_test, noise_sd = teacher(n, noise_fraction, seed=seed, hidden=hidden)
    row = {"noise_fraction": noise_fraction, "true_noise_sd": noise_sd, "n": n, "seed": seed, "teacher_hidden": hidden}
    fits = [("em-tdamp", "em_tdamp", options)] + ([("em-tdamp", "em_tdamp_former", FORMER)] if former else []) \
        + ([("meanfield-vi", "meanfield_vi", {})] if baseline else [])
    for name, key, opts in fits:
        start = time.perf_counter()
        post = bnnzoo.create(name, "regression", (INPUTS,), 1, device=device, seed=seed, **opts)
        post.fit(x, y, progress=False)
        seconds = time.perf_counter() - start
        rmse = post.evaluate(x_test, y_test, num_samples=100)["rmse"]
        row[f"{key}_noise_sd"] = post.noise_scale(original_units=True)
        row[f"{key}_noise_ratio"] = row[f"{key}_noise_sd"] / noise_sd
        row[f"{key}_rmse"] = rmse
        row[f"{key}_rmse_over_noise"] = rmse / noise_sd
        row[f"{key}_seconds"] = seconds
        if key == "em_tdamp":
            row["em_tdamp_noise_sd_per_pass"] = [math.sqrt(v) * post.standardizer.y_scale
                                                 for v in post.history.extra["noise_var"]]
            row["em_tdamp_memory"] = post.guide.memory_for(n, post.fit_batch_size)
            row["em_tdamp_architecture"] = post.sparsity()["architecture"]
    return row


def noise_sweep(device, hidden: int = HIDDEN, former: bool = True, key: str = "tdamp-noise") -> dict:
    rows = []
    for fraction in NOISE_FRACTIONS:
        row = fit_and_compare(fraction, device=device, former=former, hidden=hidden)
        rows.append(row)
        former_text = (f" (former {row['em_tdamp_former_noise_ratio']:.3f}, {row['em_tdamp_former_rmse_over_noise']:.2f})"
                       if former else "")
        print(f"  noise {fraction:g} of sd(f): em-tdamp noise/true {row['em_tdamp_noise_ratio']:.3f}, RMSE/noise "
              f"{row['em_tdamp_rmse_over_noise']:.2f}{former_text}; meanfield-vi noise/true "
              f"{row['meanfield_vi_noise_ratio']:.3f}, RMSE/noise {row['meanfield_vi_rmse_over_noise']:.2f}", flush=True)
    within = [r["noise_fraction"] for r in rows if abs(r["em_tdamp_noise_ratio"] - 1) <= 0.2]
    headline = (f"teacher {INPUTS}-{hidden}-1 ReLU, n={TRAIN}: learned/true noise sd "
                + ", ".join(f"{r['em_tdamp_noise_ratio']:.2f}" for r in rows)
                + f" at noise {', '.join(f'{f:g}' for f in NOISE_FRACTIONS)} of sd(f) (within 20% at "
                + (", ".join(f"{f:g}" for f in within) or "none") + ")"
                + ("; with the former memory of 10 passes " + ", ".join(f"{r['em_tdamp_former_noise_ratio']:.2f}" for r in rows)
                   if former else "")
                + "; test RMSE / true noise em-tdamp "
                + ", ".join(f"{r['em_tdamp_rmse_over_noise']:.2f}" for r in rows)
                + (" (former " + ", ".join(f"{r['em_tdamp_former_rmse_over_noise']:.2f}" for r in rows) + ")"
                   if former else "")
                + ", meanfield-vi " + ", ".join(f"{r['meanfield_vi_rmse_over_noise']:.2f}" for r in rows))
    return {key: {"model": "em-tdamp vs meanfield-vi", "dataset": "synthetic ReLU teacher",
                  "headline": headline, "inputs": INPUTS, "hidden": hidden, "n_train": TRAIN,
                  "n_test": TEST, "rows": rows}}


#: the teacher of ``tdamp-noise-learnable``: few enough units that a fit can reach the noise floor
LEARNABLE_HIDDEN = 5


def noise_sweep_learnable(device) -> dict:
    """The sweep on an 8-5-1 teacher, which the 50-unit network fits to below 1% of its spread: where
    the fit can reach the noise floor, the learned noise is the noise estimator's error alone (on the
    8-50-1 teacher of ``tdamp-noise`` the fit's own error exceeds the smallest noises for every entry)."""
    return noise_sweep(device, hidden=LEARNABLE_HIDDEN, former=False, key="tdamp-noise-learnable")


SUITES = {"tdamp-noise": noise_sweep, "tdamp-noise-learnable": noise_sweep_learnable}
