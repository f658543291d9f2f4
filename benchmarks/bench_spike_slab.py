"""Spike-and-slab EM-SGHMC: cost against plain SGD, the sparse teacher, Boston, MNIST
LeNet-5, and chains in processes.

Suites (``python -m benchmarks.run SUITE``):

- ``spike-slab-speed``: seconds per epoch against plain PyTorch SGD with momentum on the same
  network and batches (interleaved epoch by epoch), the sampler's state against the parameter count,
  and the cost of a gradient through a Pyro trace against the kernel's plain-torch gradient.
- ``spike-slab-teacher``: the sparse teacher (1000 inputs, 10 relevant, net 1000-5-3-1) with the first
  layer grouped by inputs.
- ``spike-slab-boston``: the UCI protocol on all 20 Boston splits.
- ``spike-slab-mnist``: LeNet-5 on MNIST train5k -> t10k against plain Adam (and SGD) trained on the
  same batches in the same run.
- ``spike-slab-chains``: two chains in processes (``mp_context="spawn"``) against the same two chains
  run one after the other.
- ``spike-slab-preconditioners`` (Boston) and ``spike-slab-preconditioners-mnist`` (MNIST train5k,
  LeNet-300-100): the RMSprop preconditioner (the entry's current default) against Ke & Fan's learned
  ``tau`` (``preconditioner="ke-fan"``), with our neuron groups and with their input groups. Every
  setting that differs between them (step size, prune threshold) is chosen on a validation part of
  the training data (the last 20% of each training split; never a test split) by the mean validation
  log-likelihood; the chosen settings are then run on the test splits side by side, with plain
  Adam on the same batches for the epoch time.
- ``spike-slab-temperature-mnist``: the classification temperature, chosen on validation data only:
  each of :data:`TEMPERATURES` fitted with the otherwise default settings on a random 80% of MNIST
  train5k with LeNet-5 and LeNet-300-100 and scored on the other 20% (NLL, accuracy, ECE, weights
  pruned), for each of :data:`TEMPERATURE_SEEDS` (its own validation part and fit seed). The rule,
  the one-standard-error rule of model selection (Breiman et al. 1984; glmnet's ``lambda.1se``)
  read for a sparse method: among the temperatures whose validation NLL
  (averaged over the two networks) is within one standard error of the lowest (the standard error of
  that mean over the validation images), the one that prunes the most weights; a fit that the
  validation images cannot tell from the best is preferred when it is sparser. No test image is read.
- ``spike-slab-select-steps``: regression's ``min_steps`` (at least that many minibatch steps, in
  added cycles of 100 epochs) among :data:`STEPS_CANDIDATES`, by the project's validation protocol
  (:func:`~benchmarks.select_defaults.select_defaults`: 80% of splits 0-2 of the five small UCI
  sets, a dense teacher and a near-linear target, scored on the other 20%; the highest mean
  validation log-likelihood over the sets wins).
- ``spike-slab-select-scales``: regression's spike and slab scales and their ``scaling`` among
  :data:`SCALES_CANDIDATES`, by the same protocol.

The state figure is the size of the tensors the kernel keeps between steps (``SGHMC.state_bytes``:
weights, momentum, one preconditioner tensor, the per-group EM vectors); the optimiser state is all
of it but the weights (plain SGD with momentum: one momentum buffer, 1x). It is a count of held
tensors, not an allocator measurement (this CPU machine has no allocator statistics;
``torch.cuda.max_memory_allocated`` would give one on a GPU).
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
import warnings
from unittest import mock

import pyro.infer.mcmc.api as mcmc_api
import pyro.poutine as poutine
import torch
from pyro.ops.stats import split_gelman_rubin

import bnnzoo
from bnnzoo import metrics
from bnnzoo.data import load_dataset, load_uci, make_sparse_teacher
from bnnzoo.guides import SGHMC
from bnnzoo.guides.training import set_seed
from bnnzoo.models.standardizer import Standardizer

from .harness import (
    TEST_DRAWS,
    PlainTorch,
    epoch_ratio,
    fit_with_baseline,
    mean_se,
    uci_protocol,
)
from .select_defaults import select_defaults

NAME = "spike-slab-sghmc"

# the scales are absolute (the same for every layer), as when the suite's figures were first measured
TEACHER_OPTIONS = {"first_layer": "inputs", "scaling": "absolute", "spike_scale": 0.02, "slab_scale": 1.0,
                   "epochs": 120, "batch_size": 128, "cycles": 4, "samples_per_cycle": 4, "thinning": 2,
                   "em_start": 0.05, "prune_start": 10, "lr": 1e-3}
MNIST_OPTIONS: dict = {}  # the catalog's classification defaults
MNIST_NUM_SAMPLES = 4  # LeNet-5 on 10,000 test images is slow on this CPU: few draws


def _state(posterior) -> dict:
    """The kernel's state between steps, in bytes and against the parameters' bytes."""
    size = posterior.history.extra["state_bytes"]
    params = sum(v[0, 0].numel() * v.element_size() for v in posterior.samples.values())
    return {"parameter_bytes": params, **size,
            "optimiser_state_over_parameters": (size["momentum"] + size["preconditioner"] + size["em"]) / params,
            "state_with_weights_over_parameters": sum(size.values()) / params,
            "plain_sgd_optimiser_state_over_parameters": 1.0}


def _pyro_trace_overhead(posterior, x, y, batch_size: int, repeats: int = 100) -> dict:
    """Seconds per gradient of the potential's likelihood part: the kernel's plain-torch path
    (``SGHMC.minibatch_gradient``) against tracing the conditioned Pyro model (``log_prob_sum`` of
    the trace, then a backward pass), at a stored draw."""
    model = posterior.model
    params = {s: v[0, -1].clone() for s, v in posterior.samples.items()}
    kernel = SGHMC(model, batch_size=batch_size)
    kernel.initial_params = params
    kernel.setup(0, x, y)
    xb, yb = x[:batch_size], y[:batch_size]
    n = len(x)
    leaves = {s: v.clone().requires_grad_() for s, v in params.items()}
    gammas = {f"{lay.layer}.gamma": torch.ones(lay.num_groups, device=x.device) for lay in model.prior.layouts}
    conditioned = poutine.condition(model, data={**leaves, **gammas, "pi": torch.tensor(0.5, device=x.device)})

    def traced():
        log_joint = poutine.trace(conditioned).get_trace(xb, yb, num_data=n).log_prob_sum()
        torch.autograd.grad(-log_joint, list(leaves.values()))

    def timed(fn) -> float:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        fn()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    paths = {"plain_torch": lambda: kernel.minibatch_gradient(xb, yb), "pyro_trace": traced}
    times = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(repeats):  # alternate the two, so that both see the same machine load
        for name, fn in paths.items():
            times[name].append(timed(fn))
    out = {f"{name}_seconds_per_gradient": statistics.median(t) for name, t in times.items()}
    out["pyro_trace_over_plain_torch"] = out["pyro_trace_seconds_per_gradient"] / out["plain_torch_seconds_per_gradient"]
    return out


def _speed_case(data, network, batch_size, epochs, device, **options) -> dict:
    posterior, plain = fit_with_baseline(NAME, data, device=device, seed=0, baseline="sgd", baseline_lr=1e-2,
                                         network=network, epochs=epochs, batch_size=batch_size, **options)
    std = posterior.standardizer
    x = std.x(data.x_train.to(posterior.device))
    y = std.y(data.y_train.to(posterior.device))
    return {"network": repr(posterior.net), "batch_size": batch_size, "epochs": epochs,
            "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
            "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
            "plain_sgd_seconds_per_epoch": statistics.median(plain.epoch_seconds[1:]),
            "state": _state(posterior), "sparsity": posterior.sparsity()["architecture"],
            **_pyro_trace_overhead(posterior, x, y, batch_size)}


def speed(device) -> dict:
    boston = _speed_case(load_uci("boston", split=0), None, 32, 200, device, cycles=2, samples_per_cycle=2)
    lenet = _speed_case(load_dataset("mnist"), {"arch": "lenet5"}, 128, 5, device, cycles=2, samples_per_cycle=1,
                        **MNIST_OPTIONS)
    cases = {"boston-mlp": boston, "mnist-lenet5": lenet}
    worst = max(c["epoch_time_ratio"] for c in cases.values())
    state = max(c["state"]["optimiser_state_over_parameters"] for c in cases.values())
    total = max(c["state"]["state_with_weights_over_parameters"] for c in cases.values())
    headline = (f"epoch time vs plain SGD+momentum: {boston['epoch_time_ratio']:.2f}x (13-50-1, batch 32), "
                f"{lenet['epoch_time_ratio']:.2f}x (LeNet-5, batch 128); optimiser state {state:.2f}x the "
                f"parameters (SGD 1x), {total:.2f}x with the weights; a Pyro-traced gradient costs "
                f"{boston['pyro_trace_over_plain_torch']:.1f}x / {lenet['pyro_trace_over_plain_torch']:.1f}x the kernel's")
    return {"spike-slab-speed": {"model": NAME, "dataset": "boston split 0; mnist train5k", "cases": cases,
                                 "epoch_time_ratio": worst, "headline": headline}}


def teacher(device) -> dict:
    data = make_sparse_teacher()
    posterior, plain = fit_with_baseline(NAME, data, device=device, seed=0, baseline="sgd", baseline_lr=1e-2,
                                         **TEACHER_OPTIONS)
    pred = posterior.predict(data.x_test, num_samples=posterior.num_draws)
    mse = float(((pred.mean - data.y_test.to(posterior.device)) ** 2).mean())
    sp = posterior.sparsity()
    inputs_kept = posterior.masks()["fc1.weight"].any(0).cpu()
    relevant = data.relevant_features
    noise_var = data.meta["noise_var"]
    result = {
        "model": NAME, "dataset": "sparse teacher 1000-5-3-1 (10 relevant inputs)", "options": TEACHER_OPTIONS,
        "test_mse": mse, "noise_var": noise_var, "mse_over_noise_var": mse / noise_var,
        "weights_pruned_fraction": sp["weights_pruned_fraction"], "weights_kept": sp["weights_kept"],
        "weights": sp["weights"], "architecture": sp["architecture"],
        "relevant_inputs_kept": int(inputs_kept[relevant].sum()), "relevant_inputs": len(relevant),
        "inputs_kept": int(inputs_kept.sum()),
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, plain.epoch_seconds),
        "state": _state(posterior), "config": posterior.config,
    }
    result["headline"] = (f"{100 * sp['weights_pruned_fraction']:.2f}% of weights pruned ({sp['weights_kept']} of "
                          f"{sp['weights']} kept, counting a pruned input's weights), relevant inputs kept "
                          f"{result['relevant_inputs_kept']}/{len(relevant)}, inputs kept {result['inputs_kept']}, "
                          f"test MSE {mse:.3f} = {mse / noise_var:.3f}x the noise variance")
    return {"spike-slab-teacher": result}


def boston(device) -> dict:
    result = uci_protocol(NAME, "boston", device=device, baseline="sgd", baseline_lr=1e-2, num_samples=25)
    s = result["summary"]
    result["headline"] = (f"RMSE {s['rmse']['mean']:.2f} ± {s['rmse']['se']:.2f}, test LL "
                          f"{s['log_likelihood']['mean']:.2f} ± {s['log_likelihood']['se']:.2f}, "
                          f"{100 * s['hidden_groups_pruned_fraction']['mean']:.0f}% of hidden neurons "
                          f"({100 * s['weights_pruned_fraction']['mean']:.0f}% of weights) pruned, 20 splits; "
                          f"epoch time vs plain SGD+momentum")
    return {"spike-slab-boston": result}


def mnist(device) -> dict:
    data = load_dataset("mnist")
    posterior = bnnzoo.create(NAME, data.task, data.input_shape, data.output_dim, dataset=data.name,
                              network={"arch": "lenet5"}, device=device, seed=0, **MNIST_OPTIONS)
    std = Standardizer.from_data(data.x_train, data.y_train, data.task).to(posterior.device)
    x, y = std.x(data.x_train.to(posterior.device)), data.y_train.to(posterior.device)
    batch = posterior.config["train"]["batch_size"]
    adam = PlainTorch(posterior.net, x, y, data.task, batch, 1e-3, "adam", 0)
    sgd = PlainTorch(posterior.net, x, y, data.task, batch, 1e-2, "sgd", 0)

    def both(*_):
        adam.epoch()
        sgd.epoch()

    set_seed(0)
    start = time.perf_counter()
    posterior.fit(data.x_train, data.y_train, progress=True, callback=both)
    fit_seconds = time.perf_counter() - start
    num_samples = min(MNIST_NUM_SAMPLES, posterior.num_draws)
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
    sp = posterior.sparsity()
    x_test, y_test = std.x(data.x_test.to(posterior.device)), data.y_test.to(posterior.device)
    plain = {name: {**metrics.classification_metrics(p.probs(x_test), y_test),
                    "seconds_per_epoch": statistics.median(p.epoch_seconds[1:])} for name, p in (("adam", adam), ("sgd", sgd))}
    result = {
        "model": NAME, "dataset": "mnist-train5k-t10k", "arch": "lenet5", "options": MNIST_OPTIONS, "metrics": m,
        "num_samples": num_samples, "stored_draws": posterior.num_draws,
        "weights_pruned_fraction": sp["weights_pruned_fraction"],
        "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
        "compression_ratio": sp["compression_ratio"], "architecture": sp["architecture"],
        "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
        "epochs": len(posterior.history.epoch_seconds), "fit_seconds": fit_seconds,
        "plain_adam": plain["adam"], "plain_sgd": plain["sgd"],
        "accuracy_minus_plain_adam": m["accuracy"] - plain["adam"]["accuracy"],
        "epoch_time_ratio": epoch_ratio(posterior.history.epoch_seconds, sgd.epoch_seconds),
        "epoch_time_ratio_vs_adam": epoch_ratio(posterior.history.epoch_seconds, adam.epoch_seconds),
        "state": _state(posterior), "config": posterior.config,
    }
    result["headline"] = (f"accuracy {100 * m['accuracy']:.2f}% (plain Adam {100 * plain['adam']['accuracy']:.2f}%, "
                          f"SGD {100 * plain['sgd']['accuracy']:.2f}%), ECE {m['ece']:.3f} (Adam "
                          f"{plain['adam']['ece']:.3f}), NLL {m['nll']:.3f}, {100 * sp['weights_pruned_fraction']:.1f}% "
                          f"of weights pruned ({sp['architecture']}), {num_samples} draws; epoch time vs plain SGD")
    return {"spike-slab-mnist-lenet5": result}


def chains(device) -> dict:
    """Two chains in processes and the same two chains in turn. On a machine with fewer free cores
    than chains ``MCMC`` runs chains in turn; the process path is forced here by letting it see
    four cores, so that it is exercised on any machine."""
    data = load_uci("boston", split=0)
    options = {"num_chains": 2, "epochs": 200, "cycles": 4, "samples_per_cycle": 3}
    out = {}
    for mode in ("processes", "in_turn"):
        start = time.perf_counter()
        if mode == "processes":
            with mock.patch.object(mcmc_api.mp, "cpu_count", return_value=4):
                posterior = bnnzoo.fit(NAME, data, seed=0, device=device, progress=False, mp_context="spawn",
                                       **options)
        else:
            posterior = bnnzoo.fit(NAME, data, seed=0, device=device, progress=False, **options)
        seconds = time.perf_counter() - start
        pred = posterior.predict(data.x_test, num_samples=posterior.num_draws, return_samples=True)
        f = pred.samples.squeeze(-1).reshape(2, -1, len(data.x_test))  # (chain, draw, test point)
        r_hat = split_gelman_rubin(f, chain_dim=0, sample_dim=1)
        out[mode] = {"wall_seconds": seconds, **posterior.evaluate(data.x_test, data.y_test,
                                                                    num_samples=posterior.num_draws),
                     "max_r_hat_predictions": float(r_hat.max()), "median_r_hat_predictions": float(r_hat.median()),
                     "hidden_neurons_kept_per_chain": [int(posterior.chain_masks["fc1.bias"][c].sum()) for c in range(2)]}
    headline = (f"2 chains in processes: {out['processes']['wall_seconds']:.0f} s, in turn "
                f"{out['in_turn']['wall_seconds']:.0f} s; RMSE {out['processes']['rmse']:.2f} / "
                f"{out['in_turn']['rmse']:.2f}; split R-hat of test predictions, median "
                f"{out['processes']['median_r_hat_predictions']:.2f}")
    return {"spike-slab-chains": {"model": NAME, "dataset": "boston split 0", "options": options, **out,
                                  "headline": headline}}


# ---- preconditioners: RMSprop against Ke & Fan's learned tau ------------------------------------------
#: Ke & Fan's sampler: their momentum coefficient 0.1 (friction 0.9), and as a second candidate the
#: entry's momentum 0.9 (friction 0.1) with a smaller step.
KE_FAN = {"preconditioner": "ke-fan", "friction": 0.9}
#: what the validation chooses between: per family, the step size and friction ...
#: (a first, wider pass on this machine: friction 0.9 with lr 0.1 diverged on Boston and reached
#: 0.331 validation NLL on MNIST against 0.653 at 3e-2; docs/methods/spike-slab-sghmc.md)
PRECONDITIONER_GRID = {
    "regression": {"rmsprop": [{"lr": 3e-3}],
                   "ke-fan": [{**KE_FAN, "lr": 3e-2}, {**KE_FAN, "friction": 0.1, "lr": 1e-2}]},
    "classification": {"rmsprop": [{"lr": 5e-4}],
                       "ke-fan": [{**KE_FAN, "lr": 1e-1}, {**KE_FAN, "friction": 0.1, "lr": 1e-2}]},
}
#: ... when EM starts for Ke & Fan's preconditioner: as the entry's defaults (epoch 2, tuned for
#: RMSprop) or when the first (warm-up) cycle ends (their code starts EM after a warm-up of epochs;
#: the first cycle means the same for any data and schedule) ...
EM_TIMINGS = ("early", "after-first-cycle")
#: ... and the in-run prune threshold (an inclusion probability): both for the default family, the
#: median probability rule for Ke & Fan's
PRUNE_THRESHOLDS = (1e-3, 0.5)
KE_FAN_PRUNE_THRESHOLDS = (0.5,)
VALIDATION_SPLITS = [0, 1, 2]
MNIST_ARCH = "lenet-300-100"


def _em_timing(options: dict, task: str, timing: str) -> dict:
    """``timing="after-first-cycle"``: EM and pruning start when the first cycle ends."""
    if timing == "early":
        return options
    train = bnnzoo.catalog.get_entry(NAME).defaults[task]["train"]
    start = train["epochs"] // train["cycles"]
    return {"em_start": start, "prune_start": start, **options}


def _candidates(task: str) -> list[tuple[str, str, dict]]:
    """``(family, groups, options)`` for every setting the validation compares."""
    out = []
    for family, grid in PRECONDITIONER_GRID[task].items():
        ke_fan = family == "ke-fan"
        for groups in ("output", "input") if ke_fan else ("output",):
            for options in grid:
                for timing in EM_TIMINGS if ke_fan else ("early",):
                    for threshold in PRUNE_THRESHOLDS if not ke_fan else KE_FAN_PRUNE_THRESHOLDS:
                        out.append((family, groups, _em_timing(
                            {**options, "groups": groups, "prune_threshold": threshold}, task, timing)))
    return out


def _quiet_fit(name, data, **options):
    with warnings.catch_warnings():  # EmptyLayerWarning: recorded as the architecture instead
        warnings.simplefilter("ignore")
        return bnnzoo.fit(name, data, progress=False, **options)


def _validate(task: str, datasets: list, device, num_samples: int) -> list[dict]:
    rows = []
    for family, groups, options in _candidates(task):
        per = []
        for i, data in enumerate(datasets):
            start = time.perf_counter()
            try:
                post = _quiet_fit(NAME, data, device=device, seed=i, **options)
            except bnnzoo.errors.BnnzooError as err:  # a diverged setting is a result too
                per.append({"error": f"{type(err).__name__}: {err}"[:200]})
                continue
            m = post.evaluate(data.x_test, data.y_test, num_samples=num_samples)
            per.append({**m, "weights_pruned_fraction": post.sparsity()["weights_pruned_fraction"],
                        "architecture": post.sparsity()["architecture"], "seconds": time.perf_counter() - start})
        ok = [r for r in per if "error" not in r]
        key = "log_likelihood" if task == "regression" else "nll"
        row = {"family": family, "groups": groups, "options": options, "runs": per, "failed": len(per) - len(ok)}
        if ok and not row["failed"]:
            for k in ok[0]:
                if k not in ("architecture",):
                    row[k] = mean_se([r[k] for r in ok])
            row["score"] = row[key]["mean"] if task == "regression" else -row[key]["mean"]
        else:
            row["score"] = -math.inf
        rows.append(row)
        print(f"  validation {family} groups={groups} {options}: score {row['score']:.4f}", flush=True)
    return rows


def _run_score(run: dict, task: str) -> float:
    return run["log_likelihood"] if task == "regression" else -run["nll"]


def _chosen(rows: list[dict], task: str) -> dict[str, dict]:
    """Per (family, groups), the options with the best mean validation score, and the paired
    difference of its per-split scores from the current default's (``rmsprop/output``): mean and
    standard error over the validation splits (``se`` is ``nan`` with one split)."""
    best = {}
    for row in rows:
        key = f"{row['family']}/{row['groups']}"
        if key not in best or row["score"] > best[key]["score"]:
            best[key] = row
    base = best["rmsprop/output"]
    out = {}
    for key, row in best.items():
        pick = {"options": row["options"], "validation_score": row["score"]}
        if math.isfinite(row["score"]) and math.isfinite(base["score"]):
            pick["minus_rmsprop"] = mean_se([_run_score(a, task) - _run_score(b, task)
                                             for a, b in zip(row["runs"], base["runs"])])
        out[key] = pick
    return out


def _default(chosen: dict) -> str:
    """The rule: another family replaces the current default (RMSprop, neuron groups) only if its
    validation score is higher by more than two standard errors of the paired difference (with one
    validation split, by more than 1% of the score's magnitude)."""
    base = chosen["rmsprop/output"]["validation_score"]
    best, margin = "rmsprop/output", 0.0
    for key, pick in chosen.items():
        diff = pick.get("minus_rmsprop")
        if diff is None:
            continue
        bar = 2 * diff["se"] if diff["n"] > 1 else 0.01 * abs(base)
        if diff["mean"] > bar and diff["mean"] - bar > margin:
            best, margin = key, diff["mean"] - bar
    return best


def preconditioners(device) -> dict:
    """Boston: validation on ``VALIDATION_SPLITS`` (last 20% of each training split held out), then
    the chosen settings of each family on the test splits (``BNNZOO_BENCH_SPLITS`` limits their
    number; all 20 by default)."""
    val_data = [load_uci("boston", split=s).validation_split(0.2, seed=None) for s in VALIDATION_SPLITS]
    start = time.perf_counter()
    task = "regression"
    rows = _validate(task, val_data, device, num_samples=25)
    validation_seconds = time.perf_counter() - start
    chosen = _chosen(rows, task)
    default = _default(chosen)
    num_splits = int(os.environ.get("BNNZOO_BENCH_SPLITS", "20"))
    rows_by = {key: [] for key in chosen}
    for split in range(num_splits):  # split by split, every family: a cut-short run stays balanced
        data = load_uci("boston", split=split)
        for key, pick in chosen.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                post, plain = fit_with_baseline(NAME, data, device=device, seed=split, baseline="adam",
                                                **pick["options"])
            m = post.evaluate(data.x_test, data.y_test, num_samples=25)
            sp = post.sparsity()
            rows_by[key].append({"split": split, **m, "weights_pruned_fraction": sp["weights_pruned_fraction"],
                                 "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"],
                                 "architecture": sp["architecture"],
                                 "seconds_per_epoch": statistics.median(post.history.epoch_seconds),
                                 "epoch_time_ratio": epoch_ratio(post.history.epoch_seconds, plain.epoch_seconds)})
            print(f"  test split {split} {key}: rmse {m['rmse']:.3f} ll {m['log_likelihood']:.3f} pruned "
                  f"{sp['weights_pruned_fraction']:.2f} ({sp['architecture']})", flush=True)
    tests = {key: {"options": chosen[key]["options"], "test_draws": 25,
                   "summary": {k: mean_se([r[k] for r in rows]) for k in rows[0] if k not in ("split", "architecture")},
                   "per_split": rows} for key, rows in rows_by.items()}
    parts = []
    for key, r in tests.items():
        s = r["summary"]
        parts.append(f"{key}: LL {s['log_likelihood']['mean']:.2f} ± {s['log_likelihood']['se']:.2f}, RMSE "
                     f"{s['rmse']['mean']:.2f} ± {s['rmse']['se']:.2f}, {100 * s['weights_pruned_fraction']['mean']:.0f}% "
                     f"pruned, {s['epoch_time_ratio']['mean']:.2f}x Adam's epoch")
    headline = (f"{num_splits} test splits; " + "; ".join(parts) +
                f". Validation (last 20% of training splits {VALIDATION_SPLITS}) chose {default}")
    return {"spike-slab-preconditioners-boston": {
        "model": NAME, "dataset": "boston", "validation": {"splits": VALIDATION_SPLITS, "fraction": 0.2,
                                                           "criterion": "mean validation log-likelihood; "
                                                                        "the default changes only by more than 2 se "
                                                                        "of the paired difference",
                                                           "rows": rows, "seconds": validation_seconds},
        "chosen": chosen, "default_by_validation": default, "test_splits": num_splits, "test": tests,
        "headline": headline}}


def _mnist_case(data, device, options: dict, num_samples: int) -> dict:
    posterior = bnnzoo.create(NAME, data.task, data.input_shape, data.output_dim, dataset=data.name,
                              network={"arch": MNIST_ARCH}, device=device, seed=0, **options)
    std = Standardizer.from_data(data.x_train, data.y_train, data.task).to(posterior.device)
    x, y = std.x(data.x_train.to(posterior.device)), data.y_train.to(posterior.device)
    adam = PlainTorch(posterior.net, x, y, data.task, posterior.config["train"]["batch_size"], 1e-3, "adam", 0)
    set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        posterior.fit(data.x_train, data.y_train, progress=False, callback=lambda *_: adam.epoch())
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=min(num_samples, posterior.num_draws))
    sp = posterior.sparsity()
    x_test, y_test = std.x(data.x_test.to(posterior.device)), data.y_test.to(posterior.device)
    taus = posterior.history.extra["chains"][0].get("tau_mean", [])
    return {"options": options, "metrics": m, "weights_pruned_fraction": sp["weights_pruned_fraction"],
            "hidden_groups_pruned_fraction": sp["hidden_groups_pruned_fraction"], "architecture": sp["architecture"],
            "plain_adam": metrics.classification_metrics(adam.probs(x_test), y_test),
            "seconds_per_epoch": statistics.median(posterior.history.epoch_seconds[1:]),
            "plain_adam_seconds_per_epoch": statistics.median(adam.epoch_seconds[1:]),
            "epoch_time_ratio_vs_adam": epoch_ratio(posterior.history.epoch_seconds, adam.epoch_seconds),
            "tau_mean_per_sample": taus}


def preconditioners_mnist(device) -> dict:
    """MNIST train5k (LeNet-300-100): validation on a random 20% of train5k (seed 0), then the chosen settings
    of each family trained on all of train5k and tested on t10k, with plain Adam on the same batches."""
    data = load_dataset("mnist")
    start = time.perf_counter()
    task = "classification"
    rows = _validate(task, [data.validation_split(0.2, seed=0)], device, num_samples=4)
    validation_seconds = time.perf_counter() - start
    chosen = _chosen(rows, task)
    default = _default(chosen)
    tests = {}
    for key, pick in chosen.items():
        print(f"  test {key}: {pick['options']}", flush=True)
        tests[key] = _mnist_case(data, device, pick["options"], num_samples=4)
    parts = [f"{key}: accuracy {100 * r['metrics']['accuracy']:.2f}% (Adam {100 * r['plain_adam']['accuracy']:.2f}%), "
             f"ECE {r['metrics']['ece']:.3f}, {100 * r['weights_pruned_fraction']:.1f}% pruned "
             f"({r['architecture']}), {r['epoch_time_ratio_vs_adam']:.2f}x Adam's epoch" for key, r in tests.items()]
    headline = "; ".join(parts) + f". Validation (a random 20% of train5k, NLL) chose {default}"
    return {"spike-slab-preconditioners-mnist": {
        "model": NAME, "dataset": "mnist-train5k-t10k", "arch": MNIST_ARCH,
        "validation": {"fraction": 0.2, "criterion": "validation NLL; the default changes only by more "
                                                                 "than 1% of it", "rows": rows, "seconds": validation_seconds},
        "chosen": chosen, "default_by_validation": default, "test": tests, "headline": headline}}


#: the classification temperatures ``spike-slab-temperature-mnist`` compares (1: the posterior)
TEMPERATURES = (0.001, 0.005, 0.02, 0.1, 1.0)
TEMPERATURE_ARCHS = ("lenet5", "lenet-300-100")
#: each seed draws its own validation fifth of train5k and seeds its fits: a temperature at which some
#: fits collapse (a layer emptied down to the group the guard keeps) shows in the mean
TEMPERATURE_SEEDS = (0, 1, 2)


def temperature_mnist(device) -> dict:
    """The classification temperature on validation fifths of MNIST train5k, one per seed (module
    docstring)."""
    mnist = load_dataset("mnist")
    rows = []
    for seed, arch, temperature in itertools.product(TEMPERATURE_SEEDS, TEMPERATURE_ARCHS, TEMPERATURES):
        data = mnist.validation_split(0.2, seed=seed)
        start = time.perf_counter()
        post = _quiet_fit(NAME, data, device=device, seed=seed, network={"arch": arch}, temperature=temperature)
        seconds = time.perf_counter() - start
        draws = min(TEST_DRAWS, post.num_draws)
        m = post.evaluate(data.x_test, data.y_test, num_samples=draws)
        nll = -post.log_likelihood(data.x_test, data.y_test, num_samples=draws)
        sp = post.sparsity()
        rows.append({"seed": seed, "arch": arch, "temperature": temperature, **m, "draws": draws,
                     "nll_per_image": nll.tolist(),
                     "weights_pruned_fraction": sp["weights_pruned_fraction"],
                     "architecture": sp["architecture"], "fit_seconds": seconds})
        print(f"  seed {seed} {arch} T={temperature:g}: nll {m['nll']:.4f} accuracy {m['accuracy']:.4f} ece {m['ece']:.4f} "
              f"pruned {sp['weights_pruned_fraction']:.3f} ({sp['architecture']}) {seconds:.0f} s", flush=True)
    score, se, pruned = {}, {}, {}
    for t in TEMPERATURES:
        mine = [r for r in rows if r["temperature"] == t]
        # per validation image, the mean over the networks; the seeds' parts are different images
        per_image = torch.cat([torch.tensor([r["nll_per_image"] for r in mine if r["seed"] == s]).mean(0)
                               for s in TEMPERATURE_SEEDS])
        score[t], se[t] = float(per_image.mean()), float(per_image.std() / math.sqrt(per_image.numel()))
        pruned[t] = statistics.mean(r["weights_pruned_fraction"] for r in mine)
    best = min(TEMPERATURES, key=score.get)
    within = [t for t in TEMPERATURES if score[t] <= score[best] + se[best]]
    chosen = max(within, key=lambda t: (pruned[t], -score[t]))
    return {"spike-slab-temperature-mnist": {
        "model": NAME, "dataset": "mnist-train5k", "protocol": "fit on a random 80% of train5k, score on the other "
                                                             "20%, per seed; no test image is read",
        "seeds": list(TEMPERATURE_SEEDS),
        "archs": list(TEMPERATURE_ARCHS), "temperatures": list(TEMPERATURES), "rows": rows,
        "mean_validation_nll": {str(t): v for t, v in score.items()},
        "mean_validation_nll_se": {str(t): v for t, v in se.items()},
        "mean_weights_pruned_fraction": {str(t): v for t, v in pruned.items()},
        "rule": "one standard error: the sparsest temperature whose validation NLL is within one standard "
                "error of the lowest", "lowest_nll": best, "within_one_se": within, "chosen": chosen,
        "headline": f"validation NLL ± se by temperature (mean over {', '.join(TEMPERATURE_ARCHS)}): "
                    + ", ".join(f"T={t:g} {score[t]:.4f} ± {se[t]:.4f} ({100 * pruned[t]:.0f}% pruned)"
                                for t in TEMPERATURES)
                    + f"; lowest T={best:g}; chosen (one-standard-error rule) T={chosen:g}"}}


#: the candidates of ``spike-slab-select-steps``: 6 cycles of 100 epochs whatever the rows, or at least
#: 18,000, 36,000 or 72,000 minibatch steps (Boston's 455 rows at batch 32 run 1,500 a cycle: 12, 24
#: and 48 cycles; protein's 45,730 rows 143,000: 6 cycles for every candidate)
STEPS_CANDIDATES = {
    "6 cycles": {"min_steps": None},
    "min_steps 18000": {"min_steps": 18000},
    "min_steps 36000": {"min_steps": 36000},
    "min_steps 72000": {"min_steps": 72000},
}


def select_steps(device) -> dict:
    return select_defaults(NAME, STEPS_CANDIDATES, "spike-slab-select-steps", device)


#: the candidates of ``spike-slab-select-scales``: regression's spike and slab scales, the same for
#: every weight (the former default) or divided by the square root of the layer's fan-in. At the
#: median probability rule a group of ``m`` weights leaves the slab when its norm falls below about
#: ``1.83 s0 sqrt(m)`` (slab five times the spike): absolute scales put that threshold on a neuron's
#: norm at ``0.37 sqrt(m)``, which grows with the fan-in; fan-in scales put it at ``1.83 s0`` for any
#: fan-in (0.73 and 1.10 here, a neuron's pre-activation sd for unit-variance inputs)
SCALES_CANDIDATES = {
    "absolute 0.2 / 1": {},
    "fan_in 0.4 / 2": {"scaling": "fan_in", "spike_scale": 0.4, "slab_scale": 2.0},
    "fan_in 0.6 / 3": {"scaling": "fan_in", "spike_scale": 0.6, "slab_scale": 3.0},
}


def select_scales(device) -> dict:
    return select_defaults(NAME, SCALES_CANDIDATES, "spike-slab-select-scales", device)


SUITES = {"spike-slab-select-steps": select_steps, "spike-slab-select-scales": select_scales,
          "spike-slab-speed": speed, "spike-slab-teacher": teacher,
          "spike-slab-boston": boston,
          "spike-slab-mnist": mnist, "spike-slab-chains": chains,
          "spike-slab-preconditioners": preconditioners, "spike-slab-preconditioners-mnist": preconditioners_mnist,
          "spike-slab-temperature-mnist": temperature_mnist}
