"""The dense-teacher check: does a sparse entry, fitted with its catalog defaults, keep what the data
need when *every* input and every teacher neuron matters?

Data (:func:`dense_teacher`): ``x ~ N(0, I_D)`` for D in :data:`INPUTS` (2, 4, 8, 16, 64); the teacher
is a ReLU network D-50-1 with ``N(0, 1/fan_in)`` weights that reads every input (biases
``N(0, 0.1^2)``, every hidden unit active on 5-95% of inputs; :func:`bnnzoo.data.make_sparse_teacher`
with all inputs relevant), its output centred and scaled to unit variance, plus Gaussian noise of
standard deviation 0.1 (a tenth of the signal's); 2,000 training and 2,000 test points.

Every regression entry of the catalog is fitted with its defaults (the catalog's default network for
an unnamed data set: one hidden layer of 50 ReLU units), seeded as the data (seeds
:data:`SEEDS`, or ``BNNZOO_TEACHER_SEEDS``: comma-separated; ``BNNZOO_TEACHER_INPUTS`` and
``BNNZOO_TEACHER_ENTRIES`` narrow the input counts and entries). Per entry, input count and seed the
result records whether a whole hidden layer was pruned (a layer left with no group, or one that a
pruning rule would have emptied and :func:`bnnzoo.models.sparsity.protect_layers` rescued: its
``EmptyLayerWarning``), the pruned fraction of hidden neurons and weights, the kept architecture, and
the test MSE relative to the dense ``meanfield-vi`` fit on the same data and seed. Targets: no entry
prunes a whole layer; every entry's test MSE within 20% of ``meanfield-vi``'s (:data:`MSE_TOLERANCE`),
judged on the mean over seeds of the MSE ratio.

One result file per input count, ``dense-teacher-d<D>``, written as soon as it is done; a run of some
entries only (``BNNZOO_TEACHER_ENTRIES``) writes ``dense-teacher-d<D>-<entries>``, whose rows the
report shows in place of the full run's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import bnnzoo
from bnnzoo.data import make_sparse_teacher
from bnnzoo.errors import BnnzooError, ConfigError

from .harness import TEST_DRAWS, fit_regression_defaults, mean_se

INPUTS = (2, 4, 8, 16, 64)
SEEDS = (0,)
HIDDEN = 50
N_TRAIN = N_TEST = 2000
NOISE_SD = 0.1  # of the signal's standard deviation (the signal has unit variance)
#: the dense reference every entry's test MSE is divided by
REFERENCE = "meanfield-vi"
#: the target: test MSE at most (1 + MSE_TOLERANCE) times the reference's
MSE_TOLERANCE = 0.20


def dense_teacher(num_inputs: int, seed: int = 0):
    """The dense-teacher regression data with ``num_inputs`` inputs, all relevant (module docstring).
    The data set is named ``dense-teacher-<D>`` (no catalog default network: the entries get their
    regression default, one hidden layer of 50 units)."""
    data = make_sparse_teacher(n_train=N_TRAIN, n_test=N_TEST, n_features=num_inputs, n_relevant=num_inputs,
                               hidden=(HIDDEN,), noise_var=NOISE_SD**2, signal_var=1.0, seed=seed)
    return dataclasses.replace(data, name=f"dense-teacher-{num_inputs}")


def whole_layer_pruned(row: dict) -> bool:
    """Whether a fit pruned a whole hidden layer: a hidden layer kept no group, or a pruning rule would
    have emptied one (an ``EmptyLayerWarning``: the guard kept its best group)."""
    hidden = list(row["groups_kept"].values())[:-1]
    return any(k == 0 for k in hidden) or row["empty_layer_warnings"] > 0


def _env_list(variable: str, default, cast=str) -> list:
    text = os.environ.get(variable, "").strip()
    if not text:
        return list(default)
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{variable}: expected a comma-separated list, got {text!r}") from None


def run_inputs(num_inputs: int, entries: list[str], seeds: list[int], *, device="cpu", progress: bool = True) -> dict:
    """Every entry of ``entries`` (the reference first) on the dense teacher with ``num_inputs``
    inputs, one fit per seed: the result of one input count."""
    order = [REFERENCE] + [e for e in entries if e != REFERENCE]
    per_seed: dict[str, list[dict]] = {e: [] for e in order}
    failed = []
    for seed in seeds:
        data = dense_teacher(num_inputs, seed)
        reference_mse = None
        for entry in order:
            try:
                row = fit_regression_defaults(entry, data, device=device, seed=seed, num_samples=TEST_DRAWS)
            except (BnnzooError, RuntimeError, ValueError) as err:
                failed.append({"model": entry, "seed": seed, "error": f"{type(err).__name__}: {err}"})
                print(f"  {entry} D={num_inputs} seed {seed}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            if entry == REFERENCE:
                reference_mse = row["mse"]
            row = {"seed": seed, **row, "whole_layer_pruned": whole_layer_pruned(row),
                   "mse_ratio": row["mse"] / reference_mse if reference_mse else None}
            per_seed[entry].append(row)
            if progress:
                print(f"  {entry} D={num_inputs} seed {seed}: mse {row['mse']:.4f} "
                      f"(x{row['mse_ratio'] or float('nan'):.2f} of {REFERENCE}) arch {row['architecture']}"
                      f"{' WHOLE LAYER PRUNED' if row['whole_layer_pruned'] else ''} ({row['fit_seconds']:.1f} s)",
                      flush=True)
    models = {}
    for entry, rows in per_seed.items():
        if not rows:
            continue
        ratios = [r["mse_ratio"] for r in rows if r["mse_ratio"] is not None]
        summary = {k: mean_se([r[k] for r in rows]) for k in
                   ("mse", "rmse", "log_likelihood", "hidden_groups_pruned_fraction", "weights_pruned_fraction",
                    "fit_seconds")}
        if ratios:
            summary["mse_ratio"] = mean_se(ratios)
        whole = any(r["whole_layer_pruned"] for r in rows)
        ratio_ok = bool(ratios) and summary["mse_ratio"]["mean"] <= 1 + MSE_TOLERANCE
        models[entry] = {"summary": summary, "whole_layer_pruned": whole,
                         "architectures": sorted({r["architecture"] for r in rows}),
                         "targets": {"no_whole_layer_pruned": not whole,
                                     f"mse_within_{round(100 * MSE_TOLERANCE)}pct_of_{REFERENCE}": ratio_ok},
                         "per_seed": rows}
    met = {e: all(m["targets"].values()) for e, m in models.items()}
    missed = sorted(e for e, ok in met.items() if not ok)
    return {"model": "every regression entry", "dataset": f"dense-teacher-{num_inputs}", "protocol": "dense-teacher",
            "inputs": num_inputs, "hidden": HIDDEN, "n_train": N_TRAIN, "n_test": N_TEST, "noise_sd": NOISE_SD,
            "seeds": list(seeds), "reference": REFERENCE, "mse_tolerance": MSE_TOLERANCE, "test_draws": TEST_DRAWS,
            "models": models, "failed": failed, "targets": {"every_entry_met_both": not missed and not failed},
            "headline": (f"D={num_inputs}, {len(seeds)} seed(s): " +
                         ("every entry kept every layer and stayed within "
                          f"{round(100 * MSE_TOLERANCE)}% of {REFERENCE}'s MSE" if not missed and not failed
                          else f"targets missed by {', '.join(missed) or '-'}"
                               f"{'; failed fits: ' + str(len(failed)) if failed else ''}"))}


class Results:
    """The suite's results, one input count at a time as :meth:`items` is iterated (each file is
    written as soon as it is done)."""

    def __init__(self, inputs, entries, seeds, device, *, every_entry: bool = True):
        self.inputs, self.entries, self.seeds, self.device = inputs, entries, seeds, device
        self.every_entry = every_entry

    def key(self, num_inputs: int) -> str:
        """``dense-teacher-d<D>``, or with the entries run (besides the reference) when narrowed:
        a re-run of some entries is a file of its own, which the report sets over the full run's rows."""
        if self.every_entry:
            return f"dense-teacher-d{num_inputs}"
        return f"dense-teacher-d{num_inputs}-" + "-".join(e for e in self.entries if e != REFERENCE)

    def items(self) -> Iterator[tuple[str, dict]]:
        for d in self.inputs:
            yield self.key(d), run_inputs(d, self.entries, self.seeds, device=self.device)


def suite(device) -> Results:
    entries = bnnzoo.list_models("regression")
    chosen = _env_list("BNNZOO_TEACHER_ENTRIES", entries)
    unknown = [e for e in chosen if e not in entries]
    if unknown:
        raise ConfigError(f"BNNZOO_TEACHER_ENTRIES: unknown {unknown}; known: {', '.join(entries)}")
    return Results(_env_list("BNNZOO_TEACHER_INPUTS", INPUTS, int), chosen,
                   _env_list("BNNZOO_TEACHER_SEEDS", SEEDS, int), device,
                   every_entry=set(entries) <= set(chosen) | {REFERENCE})


SUITES = {"dense-teacher": suite}
