"""Choosing a regression entry's defaults on validation data only, never on test splits.

:func:`select_defaults` fits every candidate (a set of options over the entry's catalog defaults) on
80% of each training split of :func:`selection_sets` and scores it on the other 20%
(:meth:`bnnzoo.data.Dataset.validation_split`); the candidate with the highest validation
log-likelihood averaged over the sets is chosen. The sets: splits 0-2 of the five small bundled UCI
sets, a dense ReLU teacher with 16 inputs (every input relevant) and a near-linear target with 4
inputs and 9,500 rows, so that no choice rests on one data set's shape; a selection asked with
``low_noise=True`` adds a smooth 16-input target with 9,000 rows and noise 1% of its spread
(:func:`low_noise_teacher`: targets nearly free of noise, as a simulator's outputs are).

:func:`teacher_check` is the project's dense-teacher check on validation parts: every candidate and
``meanfield-vi`` fitted on 80% of targets where every input is relevant (:func:`teacher_sets`), each
candidate's validation MSE divided by ``meanfield-vi``'s. :func:`choice_within_tolerance` is the
rule that joins the two: of the candidates within :data:`TEACHER_MSE_TOLERANCE` on every one of
those targets, the one with the highest mean validation log-likelihood of :func:`select_defaults`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch

import bnnzoo
from bnnzoo.data import Dataset, load_uci
from bnnzoo.models.sparsity import EmptyLayerWarning

from .harness import TEST_DRAWS, mean_se

UCI_SETS = ("boston", "concrete", "energy", "yacht", "wine")
NUM_SAMPLES = TEST_DRAWS


def dense_teacher(inputs: int, seed: int, n: int = 2000, noise: float = 0.1) -> Dataset:
    """A random one-hidden-layer ReLU teacher (50 units) using every input, noise sd ``noise`` of
    the signal's; the "test" part of the result is a validation part of the same size."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(inputs, 50, generator=g) / math.sqrt(inputs), torch.randn(50, generator=g) / math.sqrt(50)
    x = torch.randn(2 * n, inputs, generator=g)
    f = torch.relu(x @ w1 + 0.1) @ w2
    y = f + noise * f.std() * torch.randn(2 * n, generator=g)
    return Dataset(f"teacher-{inputs}", "regression", x[:n], y[:n], x[n:], y[n:], split=seed)


def near_linear(seed: int, n: int = 9500, inputs: int = 4) -> Dataset:
    """A near-linear target of ``inputs`` inputs with a weak interaction, in the units of a
    power-plant output (mean 450, sd 15), noise a quarter of the signal's spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, inputs, generator=g)
    f = x @ torch.randn(inputs, generator=g) + 0.3 * torch.tanh(x[:, 0] * x[:, 1])
    y = 450 + 15 * (f / f.std() + 0.25 * torch.randn(2 * n, generator=g))
    # only the first n rows are ever used: the validation part is carved out of them
    return Dataset(f"near-linear-{inputs}", "regression", x[:n], y[:n], x[n:], y[n:], split=seed)


def low_noise_teacher(seed: int, n: int = 9000, inputs: int = 16, hidden: int = 10, noise: float = 0.01) -> Dataset:
    """A smooth target of ``inputs`` inputs, every one relevant (a random tanh teacher of ``hidden``
    units), noise sd ``noise`` of the signal's; the "test" part is a validation part of the same size."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(inputs, hidden, generator=g) / math.sqrt(inputs), torch.randn(hidden, generator=g)
    x = torch.randn(2 * n, inputs, generator=g)
    f = torch.tanh(x @ w1) @ w2
    y = f + noise * f.std() * torch.randn(2 * n, generator=g)
    return Dataset(f"low-noise-{inputs}", "regression", x[:n], y[:n], x[n:], y[n:], split=seed)


def selection_sets(low_noise: bool = False):
    """``(name, split, data)`` for the sets of the module docstring (with ``low_noise``, the
    low-noise target last); ``data.x_test`` holds the validation part."""
    for name in UCI_SETS:
        for split in range(3):
            yield name, split, load_uci(name, split=split).validation_split(0.2, seed=split)
    yield "teacher-16", 0, dense_teacher(16, 0).validation_split(0.2, seed=0)
    yield "near-linear-4", 0, near_linear(0).validation_split(0.2, seed=0)
    if low_noise:
        yield "low-noise-16", 0, low_noise_teacher(0).validation_split(0.2, seed=0)


def validation_score(model: str, data: Dataset, seed: int, device, **options) -> dict:
    """``model`` with ``options`` fitted on ``data``'s training part (seeded with ``seed``, the
    empty-layer guard's warnings silenced) and scored on its validation part (``data.x_test``):
    ``rmse``, ``log_likelihood`` (:data:`NUM_SAMPLES` draws), ``architecture``, ``epochs``, ``fit_seconds``."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyLayerWarning)
        post = bnnzoo.create(model, "regression", data.input_shape, 1, dataset=data.name,
                             device=device, seed=seed, **options).fit(data.x_train, data.y_train, progress=False)
    seconds = time.perf_counter() - start
    m = post.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES)
    return {"rmse": m["rmse"], "log_likelihood": m["log_likelihood"], "architecture": post.sparsity()["architecture"],
            "epochs": post.fit_epochs, "fit_seconds": seconds}


def select_defaults(model: str, candidates: dict, key: str, device, low_noise: bool = False) -> dict:
    """Fit ``model`` with each of ``candidates`` (label -> options) on every set of
    :func:`selection_sets` (``low_noise``: with the low-noise target), seeded with the split; returns
    ``{key: result}`` with the validation log-likelihood per set and candidate, its mean over the sets
    (the rule), and the chosen candidate; with ``low_noise`` also the mean over the other sets."""
    rows = []
    for name, split, data in selection_sets(low_noise):
        row = {"set": name, "split": split}
        for label, options in candidates.items():
            row[label] = validation_score(model, data, split, device, **options)
        rows.append(row)
        print(f"  {name} {split}: " + " | ".join(f"{k} {row[k]['log_likelihood']:.3f}" for k in candidates), flush=True)
    sets = list(dict.fromkeys(r["set"] for r in rows))
    per_set = {s: {c: mean_se([r[c]["log_likelihood"] for r in rows if r["set"] == s]) for c in candidates}
               for s in sets}
    score = {c: statistics.mean(per_set[s][c]["mean"] for s in sets) for c in candidates}
    result = {
        "model": model, "protocol": "fit on 80% of each training split, score on the other 20%",
        "num_samples": NUM_SAMPLES, "candidates": candidates, "per_set_validation_log_likelihood": per_set,
        "mean_validation_log_likelihood": score, "chosen": max(score, key=score.get), "rows": rows}
    if low_noise:
        others = [s for s in sets if s != "low-noise-16"]
        result["mean_validation_log_likelihood_without_low_noise"] = {
            c: statistics.mean(per_set[s][c]["mean"] for s in others) for c in candidates}
    return {key: result}


#: the all-relevant targets of :func:`teacher_check`: (inputs, seed) of dense ReLU teachers (the
#: low-noise target follows them)
TEACHERS = ((8, 0), (8, 1), (16, 0), (16, 1), (16, 2))
#: a candidate's validation MSE over meanfield-vi's that :func:`choice_within_tolerance` allows on each
TEACHER_MSE_TOLERANCE = 1.2
#: the dense fit every candidate's validation MSE is divided by
TEACHER_REFERENCE = "meanfield-vi"


def teacher_sets():
    """``(name, seed, data)`` of the all-relevant targets: the dense teachers of :data:`TEACHERS`,
    then the low-noise target; ``data.x_test`` holds the validation part."""
    for inputs, seed in TEACHERS:
        yield f"teacher-{inputs}", seed, dense_teacher(inputs, seed).validation_split(0.2, seed=seed)
    yield "low-noise-16", 0, low_noise_teacher(0).validation_split(0.2, seed=0)


def teacher_check(model: str, candidates: dict, key: str, device) -> dict:
    """Every candidate of ``model`` and :data:`TEACHER_REFERENCE` (its defaults) on the validation
    parts of :func:`teacher_sets`: ``{key: result}`` with each candidate's validation MSE over the
    reference's per set, its worst ratio and whether that stays within :data:`TEACHER_MSE_TOLERANCE`."""
    fits = {TEACHER_REFERENCE: (TEACHER_REFERENCE, {}), **{c: (model, o) for c, o in candidates.items()}}
    rows = []
    for name, seed, data in teacher_sets():
        row = {"set": name, "split": seed}
        for label, (entry, options) in fits.items():
            score = validation_score(entry, data, seed, device, **options)
            row[label] = {**score, "mse": score["rmse"] ** 2}
        for label in candidates:
            row[label]["mse_ratio"] = row[label]["mse"] / row[TEACHER_REFERENCE]["mse"]
        rows.append(row)
        print(f"  {name} {seed}: " + " | ".join(f"{c} x{row[c]['mse_ratio']:.3f}" for c in candidates), flush=True)
    worst = {c: max(r[c]["mse_ratio"] for r in rows) for c in candidates}
    return {key: {
        "model": model, "reference": TEACHER_REFERENCE,
        "protocol": "fit on 80% of each target's training rows, score on the other 20%", "num_samples": NUM_SAMPLES,
        "candidates": candidates, "mse_tolerance": TEACHER_MSE_TOLERANCE, "worst_mse_ratio": worst,
        "within_tolerance": {c: worst[c] <= TEACHER_MSE_TOLERANCE for c in candidates}, "rows": rows}}


def choice_within_tolerance(scores: dict, teachers: dict) -> str:
    """Of the candidates that ``teachers`` (a :func:`teacher_check` result) keeps within tolerance, the
    one with the highest mean validation log-likelihood in ``scores`` (a :func:`select_defaults`
    result's ``mean_validation_log_likelihood``)."""
    kept = [c for c, ok in teachers["within_tolerance"].items() if ok]
    if not kept:
        raise ValueError("no candidate keeps the validation MSE within tolerance on every all-relevant target")
    return max(kept, key=scores.get)
