"""The UCI regression protocol (Hernandez-Lobato & Adams 2015) for every regression entry of the
catalog, with the catalog's defaults, on the six bundled sets.

Suites:

- ``uci``: every set (boston, concrete, energy, yacht, wine, then protein), all standard splits (20;
  protein 5), every regression entry;
- ``uci-quick``: the five small sets, the first :data:`QUICK_SPLITS` splits of each;
- ``uci-<set>`` (``uci-boston``, ..., ``uci-protein``): one set, all its splits.

Environment variables narrow any of them, so parts can be run and re-run:
``BNNZOO_UCI_SETS`` (comma-separated set names), ``BNNZOO_UCI_ENTRIES`` (comma-separated entry
names) and ``BNNZOO_UCI_SPLITS`` (``N``: the first N splits; ``i,j,k``: those splits; ``all``).

Per split: the entry is created with the catalog's defaults and nothing else (the network is the
catalog's default for the set: one hidden layer of 50 units, 100 for protein, as in the protocol),
seeded with the split's index, fitted on the training split and evaluated on the test split with
:data:`~benchmarks.harness.TEST_DRAWS` posterior draws (:func:`~benchmarks.harness.fit_regression_defaults`).
Entries that prune behind a ``prune`` switch are fitted a second time with ``prune=False`` and the
same seed, which gives the dense network of the same run. No option is chosen per set and nothing is
tuned on the test splits.

One result file per (entry, set): ``uci-<set>-<entry>`` when every split of the set ran, else
``uci-<set>-<entry>-<n>splits``, so a partial run never overwrites a full one. Each holds the mean
+- standard error over the splits of every figure, each split's row, the architectures kept, the
published figures of PBP and MC dropout on the set (:data:`PUBLISHED`, from
``shared/reference/anchors.md``) and the splits used. The results are written one file at a time as
they finish (:class:`Results`), so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import bnnzoo
from bnnzoo.catalog import get_entry
from bnnzoo.data import load_uci, uci_num_splits
from bnnzoo.errors import BnnzooError, ConfigError

from .harness import TEST_DRAWS, fit_regression_defaults, has_prune_switch, mean_se

#: the six bundled sets, in the order they run (protein, the large one, last)
SETS = ("boston", "concrete", "energy", "yacht", "wine", "protein")
SMALL_SETS = SETS[:-1]
#: splits per set of the ``uci-quick`` suite
QUICK_SPLITS = 3

#: published figures on these sets, (RMSE mean, se, test LL mean, se), se None where the source gives
#: none. All from shared/reference/anchors.md, which lists PBP and the 2016 MC dropout figures for
#: Boston only and the 2018 MC dropout rerun (means only) for every set here.
PUBLISHED: dict[str, dict[str, tuple]] = {
    "PBP (Hernandez-Lobato & Adams 2015)": {"boston": (3.01, 0.18, -2.57, 0.09)},
    "MC dropout (Gal & Ghahramani 2016)": {"boston": (2.97, 0.19, -2.46, 0.06)},
    "MC dropout (2018 rerun)": {"boston": (2.90, 0.18, -2.40, 0.04), "concrete": (4.83, None, -2.94, None),
                                "energy": (0.54, None, -1.21, None), "yacht": (0.67, None, -1.25, None),
                                "wine": (0.62, None, -0.93, None), "protein": (4.27, None, -2.87, None)},
}

#: per-split figures summarised as mean +- se over the splits
SUMMARISED = ("rmse", "log_likelihood", "mse", "nmse", "weights_pruned_fraction", "hidden_groups_pruned_fraction",
              "fit_seconds", "epochs", "empty_layer_warnings", "dense_rmse", "dense_log_likelihood", "dense_mse")


def published(dataset: str) -> dict:
    """The published figures on ``dataset``: source -> {rmse, rmse_se, log_likelihood, log_likelihood_se}."""
    out = {}
    for source, sets in PUBLISHED.items():
        if dataset in sets:
            rmse, rmse_se, ll, ll_se = sets[dataset]
            out[source] = {"rmse": rmse, "rmse_se": rmse_se, "log_likelihood": ll, "log_likelihood_se": ll_se}
    return out


def result_key(dataset: str, entry: str, num_splits: int, available: int) -> str:
    """The result file name (without ``.json``) of ``entry`` on ``dataset`` over ``num_splits`` of
    the set's ``available`` splits."""
    key = f"uci-{dataset}-{entry}"
    return key if num_splits == available else f"{key}-{num_splits}splits"


def parse_splits(text: str | None, available: int, default: int | None = None) -> list[int]:
    """The splits a run uses: ``text`` is ``None``/``""``/``"all"`` (``default`` first splits, or all),
    ``"N"`` (the first N, at most all) or ``"i,j,..."`` (those, each in range)."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return list(range(available if default is None else min(default, available)))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"BNNZOO_UCI_SPLITS must be 'all', a count N or a list i,j,...; got {text!r}") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise ConfigError(f"BNNZOO_UCI_SPLITS: a count of splits must be >= 1, got {values[0]}")
        return list(range(min(values[0], available)))
    bad = [v for v in values if not 0 <= v < available]
    if bad or not values:
        raise ConfigError(f"BNNZOO_UCI_SPLITS: splits {bad or values} out of range 0..{available - 1}")
    return sorted(set(values))


def _names(variable: str, allowed: list[str] | tuple[str, ...], default) -> list[str]:
    text = os.environ.get(variable, "").strip()
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ConfigError(f"{variable}: unknown {unknown}; known: {', '.join(allowed)}")
    return names


def run_entry(entry: str, dataset: str, splits: list[int], *, device="cpu", progress: bool = True) -> dict:
    """``entry`` on ``splits`` of ``dataset`` with the catalog's defaults: the per-(entry, set) result."""
    available = uci_num_splits(dataset)
    rows, failed, config = [], [], None
    start = time.perf_counter()
    for split in splits:
        data = load_uci(dataset, split=split)
        try:
            row = fit_regression_defaults(entry, data, device=device, seed=split, num_samples=TEST_DRAWS)
        except (BnnzooError, RuntimeError, ValueError) as err:  # a failed split is recorded, never dropped silently
            failed.append({"split": split, "error": f"{type(err).__name__}: {err}"})
            if progress:
                print(f"  {entry} {dataset} split {split}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        rows.append({"split": split, **row})
        if config is None:
            config = get_entry(entry).configure("regression", tuple(data.input_shape), 1, data.name)
        if progress:
            dense = (f", dense ll {row['dense_log_likelihood']:.3f}" if "dense_log_likelihood" in row else "")
            print(f"  {entry} {dataset} split {split}: rmse {row['rmse']:.3f} ll {row['log_likelihood']:.3f}"
                  f"{dense} arch {row['architecture']} ({row['fit_seconds']:.1f} s)", flush=True)
    summary = {k: mean_se([r[k] for r in rows]) for k in SUMMARISED if rows and all(k in r for r in rows)}
    z2 = [r["noise_refit"]["train_mean_z2"] for r in rows if "noise_refit" in r]
    if z2:
        summary["noise_refit_train_mean_z2"] = mean_se(z2)
    draws = {k: rows[0][k] for k in ("test_draws", "stored_draws") if rows and k in rows[0]}
    return {"model": entry, "dataset": dataset, "protocol": "uci", "splits": [r["split"] for r in rows],
            "splits_asked": splits, "num_splits": len(rows), "splits_available": available,
            "failed_splits": failed, "test_draws": TEST_DRAWS, **draws,
            "dense": "same seed, prune=False" if has_prune_switch(entry) else None,
            "hidden_units": (config or {}).get("network", {}).get("hidden"),
            "architectures": dict(Counter(r["architecture"] for r in rows).most_common()),
            "summary": summary, "published": published(dataset), "per_split": rows, "config": config,
            "seconds": time.perf_counter() - start}


class Results:
    """The results of a UCI suite, computed one (entry, set) at a time as :meth:`items` is iterated,
    so that ``benchmarks.run`` writes each file as soon as it is done."""

    def __init__(self, sets, entries, splits_text: str | None, default_splits: int | None, device):
        self.sets, self.entries, self.device = list(sets), list(entries), device
        self.splits_text, self.default_splits = splits_text, default_splits

    def items(self) -> Iterator[tuple[str, dict]]:
        for dataset in self.sets:
            available = uci_num_splits(dataset)
            splits = parse_splits(self.splits_text, available, self.default_splits)
            for entry in self.entries:
                print(f" {entry} on {dataset}, splits {splits}", flush=True)
                result = run_entry(entry, dataset, splits, device=self.device)
                yield result_key(dataset, entry, result["num_splits"], available), result


def suite(sets, default_splits: int | None = None):
    """A suite over ``sets`` (narrowed by ``BNNZOO_UCI_SETS``), every regression entry (narrowed by
    ``BNNZOO_UCI_ENTRIES``), ``default_splits`` first splits or all (``BNNZOO_UCI_SPLITS`` overrides)."""

    def run(device) -> Results:
        chosen = _names("BNNZOO_UCI_SETS", SETS, sets)
        entries = _names("BNNZOO_UCI_ENTRIES", bnnzoo.list_models("regression"), bnnzoo.list_models("regression"))
        return Results(chosen, entries, os.environ.get("BNNZOO_UCI_SPLITS"), default_splits, device)

    return run


SUITES = {"uci": suite(SETS), "uci-quick": suite(SMALL_SETS, QUICK_SPLITS),
          **{f"uci-{name}": suite((name,)) for name in SETS}}
