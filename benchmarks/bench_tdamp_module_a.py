"""EM-TDAMP's Module A side by side: moment propagation (``module_a="adf"``, the current default)
against deep AMP with Onsager-corrected cavity means and a turbo loop (``module_a="amp"``).

Suites:

* ``tdamp-module-a``: Boston. First the choice of the default on validation data only (splits 0-4,
  a fifth of each training part held out by ``Dataset.validation_split``, no test rows used), then
  the 20 test splits (test log-likelihood, RMSE, hidden neurons and weights pruned, seconds per
  pass against one plain Adam epoch interleaved in the same run).
* ``tdamp-module-a-mnist``: MNIST train5k, LeNet-300-100, 20 passes of 128 (the classification
  defaults): a validation fifth of train5k for the choice, then t10k: accuracy, ECE, pruned
  fraction, seconds per pass against one plain Adam epoch.

Both variants run the same fixed number of passes at the same batch size (regression: 40 passes of
32, the former catalog setting, instead of the per-fit choice of both on validation rows), so the
comparison is of Module A alone; EM sets the sparsity (no ``keep``), neurons pruned at inclusion 1/2.
"""

from __future__ import annotations

import statistics

import bnnzoo
from bnnzoo.data import load_dataset, load_uci, uci_num_splits

from .harness import mean_se, mnist_protocol, uci_protocol

#: the two Module A variants; AMP's turbo loop stops at a belief change of 1e-2 or after 5 exchanges
VARIANTS = {
    "adf": {"module_a": "adf"},
    "amp": {"module_a": "amp", "turbo_iterations": 5, "turbo_tolerance": 1e-2},
}
REGRESSION = {"epochs": 40, "batch_size": 32, "validation_fraction": None}
VALIDATION_SPLITS = (0, 1, 2, 3, 4)


def _validation(datasets: list, options: dict, num_samples: int) -> dict:
    """Each variant fitted on the fit part of every dataset and scored on its validation part."""
    out = {}
    for variant, extra in VARIANTS.items():
        rows = []
        for data in datasets:
            seed = data.split if data.split is not None else 0
            posterior = bnnzoo.fit("em-tdamp", data, progress=False, seed=seed, **options, **extra)
            m = posterior.evaluate(data.x_test, data.y_test, num_samples=num_samples)
            rows.append({"split": data.split, **m,
                         "hidden_groups_pruned_fraction": posterior.sparsity()["hidden_groups_pruned_fraction"],
                         "seconds_per_pass": statistics.median(posterior.history.epoch_seconds),
                         "turbo_iterations": statistics.mean(posterior.history.extra["turbo_iterations"])})
            print(f"  validation {variant} split {data.split}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float)), flush=True)
        out[variant] = {"summary": {k: mean_se([r[k] for r in rows]) for k in rows[0] if k != "split"},
                        "per_split": rows}
    return out


def _better(validation: dict) -> str:
    """The variant with the higher mean validation log-likelihood (minus the NLL for classification)."""
    def score(v):
        s = validation[v]["summary"]
        return s["log_likelihood"]["mean"] if "log_likelihood" in s else -s["nll"]["mean"]

    return max(validation, key=score)


def boston(device) -> dict:
    datasets = [load_uci("boston", split=s).validation_split(0.2, seed=0) for s in VALIDATION_SPLITS]
    validation = _validation(datasets, REGRESSION, num_samples=100)
    chosen = _better(validation)
    test = {}
    for variant, extra in VARIANTS.items():
        test[variant] = uci_protocol("em-tdamp", "boston", device=device, baseline="adam", progress=True,
                                     **REGRESSION, **extra)
    n = uci_num_splits("boston")

    def row(v):
        s, val = test[v]["summary"], validation[v]["summary"]
        return (f"{v}: test LL {s['log_likelihood']['mean']:.3f} ± {s['log_likelihood']['se']:.3f}, RMSE "
                f"{s['rmse']['mean']:.3f} ± {s['rmse']['se']:.3f}, hidden neurons pruned "
                f"{100 * s['hidden_groups_pruned_fraction']['mean']:.0f}%, weights pruned "
                f"{100 * s['weights_pruned_fraction']['mean']:.0f}%, pass {s['epoch_time_ratio']['mean']:.2f}x an Adam "
                f"epoch (validation LL {val['log_likelihood']['mean']:.3f}, RMSE {val['rmse']['mean']:.3f}, "
                f"turbo iterations {val['turbo_iterations']['mean']:.2f})")

    headline = (f"Boston, {n} splits, 40 passes of 32, EM sparsity: " + "; ".join(row(v) for v in VARIANTS)
                + f". Better on validation (splits {list(VALIDATION_SPLITS)}, 20% of each training part): {chosen}")
    return {"em-tdamp-module-a-boston": {"model": "em-tdamp (module_a adf vs amp)", "dataset": "boston",
                                         "headline": headline, "variants": VARIANTS, "options": REGRESSION,
                                         "validation": validation, "chosen_on_validation": chosen, "test": test}}


def mnist(device) -> dict:
    data = load_dataset("mnist")
    validation = _validation([data.validation_split(0.2, seed=0)], {}, num_samples=20)
    chosen = _better(validation)
    test = {v: mnist_protocol("em-tdamp", device=device, baseline="adam", progress=True, **extra)
            for v, extra in VARIANTS.items()}

    def row(v):
        r, val = test[v], validation[v]["summary"]
        return (f"{v}: accuracy {100 * r['metrics']['accuracy']:.2f}%, ECE {r['metrics']['ece']:.3f}, hidden neurons "
                f"pruned {100 * r['hidden_groups_pruned_fraction']:.0f}%, pass {r['epoch_time_ratio']:.2f}x an Adam "
                f"epoch (validation accuracy {100 * val['accuracy']['mean']:.2f}%, NLL "
                f"{val['nll']['mean']:.3f})")

    adam = test["adf"]["plain_adam"]
    headline = ("MNIST train5k -> t10k, LeNet-300-100, 20 passes of 128, EM sparsity: "
                + "; ".join(row(v) for v in VARIANTS)
                + f"; plain Adam 20 epochs {100 * adam['accuracy']:.2f}%. Better on validation: {chosen}")
    return {"em-tdamp-module-a-mnist": {"model": "em-tdamp (module_a adf vs amp)", "dataset": "mnist-train5k-t10k",
                                        "headline": headline, "variants": VARIANTS, "validation": validation,
                                        "chosen_on_validation": chosen, "test": test}}


SUITES = {"tdamp-module-a": boston, "tdamp-module-a-mnist": mnist}
