"""How horseshoe-svi's defaults were chosen: on validation data only, never on test splits.

Suite ``horseshoe-prune-rules`` (the pruning rule): for each data set, the entry is fitted with its defaults but
without its closing prune on 80% of a training split, then pruned by each rule of
:data:`bnnzoo.methods.horseshoe.PRUNE_RULES` (``evidence``: BMR's ``dF > 0``; ``snr``: posterior
signal-to-noise below 1; ``scale``: the former fan-in threshold), with the noise refitted on the
80%, and scored on the remaining 20% (:meth:`bnnzoo.data.Dataset.validation_split`); the test
splits are never read. Data: the five small bundled UCI sets (splits 0-4) and synthetic sets that
stress the fan-in: a dense ReLU teacher (every input relevant) with 2, 4, 16 and 64 inputs, and a
near-linear target with 4 inputs and 9,500 rows (the shape on which the scale rule removed every
neuron). The rule: the default is the rule with the highest validation log-likelihood averaged
over all sets, among rules that never need the empty-layer guard.

Suite ``horseshoe-select`` (the temperature, the predictive and the step size): each candidate of
:data:`CANDIDATES` fitted with the entry's closing prune on the same 80/20 parts of splits 0-2 of
the five UCI sets and of one dense teacher (16 inputs) and the near-linear set; the default is the
candidate with the highest validation log-likelihood averaged over the sets.

Suite ``horseshoe-select-prior`` (the noise scale the fit starts from, the global scale's tau0 and
the number of epochs): the same protocol and sets as ``horseshoe-select``, with the candidates of
:data:`PRIOR_CANDIDATES`, each one setting changed from the defaults, among them the epochs chosen
inside every fit on a validation fifth of its own training rows (``validation_fraction``), a rule of
the data rather than a number of passes. Suite ``horseshoe-select-steps``: the same with the candidates
of :data:`STEPS_CANDIDATES`, the number of epochs as a rule of the number of rows (``min_steps``).
Suite ``horseshoe-select-lr`` (the learning rate and its schedule, :data:`LR_CANDIDATES`): the same
protocol and sets plus the low-noise target (``select_defaults(..., low_noise=True)``), scored by
the validation log-likelihood averaged over all of them. Suite ``horseshoe-select-lr-teachers``
(:func:`select_lr_teachers`): the same candidates and ``meanfield-vi`` on the validation parts of
targets where every input is relevant; the rule
(:func:`~benchmarks.select_defaults.choice_within_tolerance`): the candidate with the highest
mean of ``horseshoe-select-lr`` among those whose validation MSE stays within 20% of
``meanfield-vi``'s on every one of these targets (the dense-teacher check, on validation parts).

Suite ``horseshoe-reduce-select`` (classification: the reduction during the fit, ``reduce_at``):
:func:`reduce_select`.
"""

from __future__ import annotations

import statistics
import time
import warnings

import bnnzoo
from bnnzoo.data import load_dataset, load_uci
from bnnzoo.methods.horseshoe import PRUNE_RULES
from bnnzoo.models.sparsity import EmptyLayerWarning

from .harness import TEST_DRAWS, mean_se
from .select_defaults import (
    dense_teacher,
    near_linear,
    select_defaults,
    teacher_check,
)

UCI_SETS = ("boston", "concrete", "energy", "yacht", "wine")
SPLITS = range(5)
TEACHER_INPUTS = (2, 4, 16, 64)
NUM_SAMPLES = TEST_DRAWS


def _sets():
    for name in UCI_SETS:
        for split in SPLITS:
            yield name, split, load_uci(name, split=split).validation_split(0.2, seed=split)
    for d in TEACHER_INPUTS:
        for seed in range(2):
            yield f"teacher-{d}", seed, dense_teacher(d, seed).validation_split(0.2, seed=seed)
    for seed in range(2):
        yield "near-linear-4", seed, near_linear(seed).validation_split(0.2, seed=seed)


def prune_rules(device) -> dict:
    rows = []
    for name, split, data in _sets():
        post = bnnzoo.create("horseshoe-svi", "regression", data.input_shape, 1, dataset=data.name, device=device,
                             seed=split, prune=False).fit(data.x_train, data.y_train, progress=False)
        dense = post.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES)
        row = {"set": name, "split": split, "dense_rmse": dense["rmse"], "dense_log_likelihood": dense["log_likelihood"]}
        for rule in PRUNE_RULES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EmptyLayerWarning)
                pruned = post.prune(rule=rule, data=(data.x_train, data.y_train))
            m = pruned.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES)
            sp = pruned.sparsity()
            row[rule] = {"rmse": m["rmse"], "log_likelihood": m["log_likelihood"], "architecture": sp["architecture"],
                         "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
                         "guard_needed": any(issubclass(w.category, EmptyLayerWarning) for w in caught),
                         "train_mean_z2": pruned.fit_state.pruning[-1].summary["noise_refit"]["train_mean_z2"]}
        rows.append(row)
        print(f"  {name} {split}: dense {dense['log_likelihood']:.3f} " + " ".join(
            f"{r} {row[r]['log_likelihood']:.3f} ({row[r]['architecture']})" for r in PRUNE_RULES), flush=True)
    sets = list(dict.fromkeys(r["set"] for r in rows))
    per_set = {s: {rule: {k: mean_se([r[rule][k] for r in rows if r["set"] == s])
                          for k in ("log_likelihood", "rmse", "hidden_groups_pruned_fraction")}
                   | {"guard_needed": sum(r[rule]["guard_needed"] for r in rows if r["set"] == s)}
                   for rule in PRUNE_RULES}
               | {"dense": {k: mean_se([r[f"dense_{k}"] for r in rows if r["set"] == s])
                            for k in ("log_likelihood", "rmse")}}
               for s in sets}
    score = {rule: statistics.mean(per_set[s][rule]["log_likelihood"]["mean"] for s in sets) for rule in PRUNE_RULES}
    eligible = [rule for rule in PRUNE_RULES if not any(per_set[s][rule]["guard_needed"] for s in sets)]
    chosen = max(eligible, key=score.get) if eligible else None
    return {"horseshoe-prune-rules": {
        "model": "horseshoe-svi", "protocol": "fit on 80% of each training split, score on the other 20%",
        "num_samples": NUM_SAMPLES, "per_set": per_set, "mean_validation_log_likelihood": score,
        "chosen": chosen, "rows": rows}}



#: the candidates of ``horseshoe-select`` (options over the entry's defaults)
CANDIDATES = {
    "T=0.2, untempered": {"kl_weight": 0.2, "untempered": True},
    "T=0.2, tempered": {"kl_weight": 0.2, "untempered": False},
    "T=0.5, untempered": {"kl_weight": 0.5, "untempered": True},
    "T=1 (exact ELBO)": {"kl_weight": 1.0, "untempered": False},
    "T=0.2, untempered, lr 3e-3": {"kl_weight": 0.2, "untempered": True, "lr": 3e-3},
}


#: the candidates of ``horseshoe-select-prior`` (one setting changed from the entry's defaults)
PRIOR_CANDIDATES = {
    "defaults": {},
    "noise start 0.5": {"noise_scale": 0.5},
    "tau0 0.1": {"tau0": 0.1},
    "epochs 50": {"epochs": 50},
    "epochs 200": {"epochs": 200},
    "epochs chosen on a validation fifth (<= 300)": {"epochs": 300, "validation_fraction": 0.2, "patience": 30},
}


#: the candidates of ``horseshoe-select-steps``: ``horseshoe-select-prior`` preferred 200 epochs to 100 on
#: the small sets and 100 on the large ones; a number of minibatch steps (``min_steps``: at least that
#: many, at least ``epochs`` passes) gives small sets more passes and large ones the same
STEPS_CANDIDATES = {
    "defaults": {},
    "epochs 200": {"epochs": 200},
    "min_steps 3000": {"min_steps": 3000},
    "min_steps 6000": {"min_steps": 6000},
}


#: the candidates of ``horseshoe-select-lr``: the step size and its schedule. On targets with
#: little noise the fit at lr 1e-2 held a learned noise near 5 times the true one (Adam moves every
#: parameter by about the learning rate a step); the low-noise set joins the selection sets
LR_CANDIDATES = {
    "defaults (lr 1e-2, constant)": {"lr": 1e-2, "lr_schedule": "constant"},  # the defaults the suite first ran on
    "lr 1e-2, cosine": {"lr": 1e-2, "lr_schedule": "cosine"},
    "lr 3e-3, constant": {"lr": 3e-3, "lr_schedule": "constant"},
    "lr 3e-3, cosine": {"lr": 3e-3, "lr_schedule": "cosine"},
}


def prune_rules_mnist(device) -> dict:
    """The rules on classification: LeNet-5 and LeNet-300-100 fitted on 80% of MNIST train5k
    (without the closing prune), each rule scored on the other 20% (accuracy, NLL, ECE, pruned)."""
    data = load_dataset("mnist").validation_split(0.2, seed=0)
    out = {}
    for arch in ("lenet5", "lenet-300-100"):
        post = bnnzoo.create("horseshoe-svi", "classification", data.input_shape, data.output_dim, dataset=data.name,
                             device=device, seed=0, network={"arch": arch}, prune=False)
        post.fit(data.x_train, data.y_train, progress=False)
        row = {"dense": post.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES)}
        for rule in PRUNE_RULES:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EmptyLayerWarning)
                pruned = post.prune(rule=rule)
            sp = pruned.sparsity()
            row[rule] = {**pruned.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES),
                         "weights_pruned_fraction": sp["weights_pruned_fraction"], "architecture": sp["architecture"],
                         "guard_needed": any(issubclass(w.category, EmptyLayerWarning) for w in caught)}
            print(f"  mnist {arch} {rule}: accuracy {row[rule]['accuracy']:.4f} nll {row[rule]['nll']:.3f} "
                  f"{sp['architecture']} ({100 * sp['weights_pruned_fraction']:.1f}% pruned)", flush=True)
        out[arch] = row
    return {"horseshoe-prune-rules-mnist": {
        "model": "horseshoe-svi", "protocol": "fit on 80% of MNIST train5k, score on the other 20%",
        "num_samples": NUM_SAMPLES, "validation": out}}


def select(device) -> dict:
    return select_defaults("horseshoe-svi", CANDIDATES, "horseshoe-select", device)


def select_lr(device) -> dict:
    return select_defaults("horseshoe-svi", LR_CANDIDATES, "horseshoe-select-lr", device, low_noise=True)


def select_lr_teachers(device) -> dict:
    """Every candidate of :data:`LR_CANDIDATES` and ``meanfield-vi`` on the validation parts of the
    all-relevant targets (:func:`~benchmarks.select_defaults.teacher_check`)."""
    return teacher_check("horseshoe-svi", LR_CANDIDATES, "horseshoe-select-lr-teachers", device)


def select_prior(device) -> dict:
    return select_defaults("horseshoe-svi", PRIOR_CANDIDATES, "horseshoe-select-prior", device)


def select_steps(device) -> dict:
    return select_defaults("horseshoe-svi", STEPS_CANDIDATES, "horseshoe-select-steps", device)


#: the candidates of ``horseshoe-reduce-select``: ``train.reduce_at`` (null: prune at the end only)
REDUCE_CANDIDATES = {"no reduction during the fit": None, "reduce at 1/2": 0.5, "reduce at 3/4": 0.75}
#: (architecture, seed) of the MNIST validation fits of ``horseshoe-reduce-select``
REDUCE_FITS = (("lenet-300-100", 0), ("lenet-300-100", 1), ("lenet5", 0))


def reduce_select(device) -> dict:
    """Classification: the reduction during the fit (``train.reduce_at``). Each candidate is fitted with
    the entry's classification defaults otherwise (its calibration on a validation fifth of the
    fit's own rows included) on 80% of MNIST train5k and scored on the other 20%; t10k is never
    read. The rule, fixed before the run: the lowest validation NLL, averaged over the fits of each
    architecture and then over the architectures."""
    rows = []
    for arch, seed in REDUCE_FITS:
        data = load_dataset("mnist").validation_split(0.2, seed=seed)
        row = {"architecture": arch, "seed": seed}
        for label, fraction in REDUCE_CANDIDATES.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyLayerWarning)
                post = bnnzoo.create("horseshoe-svi", "classification", data.input_shape, data.output_dim,
                                     dataset=data.name, device=device, seed=seed, network={"arch": arch},
                                     reduce_at=fraction, reduce_select=False).fit(data.x_train, data.y_train,
                                                                                  progress=False)
            seconds = time.perf_counter() - start
            m = post.evaluate(data.x_test, data.y_test, num_samples=NUM_SAMPLES)
            sp = post.sparsity()
            row[label] = {**m, "weights_pruned_fraction": sp["weights_pruned_fraction"],
                          "kept": sp["architecture"], "fit_seconds": seconds}
            print(f"  {arch} seed {seed} {label}: accuracy {m['accuracy']:.4f} nll {m['nll']:.4f} ece {m['ece']:.4f} "
                  f"{sp['architecture']} ({100 * sp['weights_pruned_fraction']:.1f}% pruned, {seconds:.0f} s)", flush=True)
        rows.append(row)
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    per_arch = {a: {c: {k: mean_se([r[c][k] for r in rows if r["architecture"] == a])
                        for k in ("accuracy", "nll", "ece", "weights_pruned_fraction")}
                    for c in REDUCE_CANDIDATES} for a in archs}
    score = {c: statistics.mean(per_arch[a][c]["nll"]["mean"] for a in archs) for c in REDUCE_CANDIDATES}
    return {"horseshoe-reduce-select": {
        "model": "horseshoe-svi", "protocol": "fit on 80% of MNIST train5k, score on the other 20%",
        "num_samples": NUM_SAMPLES, "candidates": REDUCE_CANDIDATES, "per_architecture": per_arch,
        "mean_validation_nll": score, "chosen": min(score, key=score.get), "rows": rows}}


SUITES = {"horseshoe-reduce-select": reduce_select, "horseshoe-prune-rules": prune_rules,
          "horseshoe-prune-rules-mnist": prune_rules_mnist,
          "horseshoe-select": select, "horseshoe-select-prior": select_prior,
          "horseshoe-select-steps": select_steps, "horseshoe-select-lr": select_lr,
          "horseshoe-select-lr-teachers": select_lr_teachers}
