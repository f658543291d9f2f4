"""Write the results page, ``docs/results.md``, from ``benchmarks/results/*.json``.

The page's tables are all generated here and nowhere else:

- the headline table (:func:`headline_table`): for each method, the figures its benchmark was set up
  to measure, the target where one was set, and whether the run met it. :data:`HEADLINES` says which
  result file and which fields each row reads; a row whose result file is absent is left out.
- the UCI tables (:func:`uci_tables`), as papers print them: entries as rows, data sets as columns,
  test RMSE and test log-likelihood (mean ± standard error over splits), the published figures of
  PBP and MC dropout beside them, the pruned architecture per set, the dense against the pruned
  network's log-likelihood, and the fit time; read from the ``uci-*`` files of
  :mod:`benchmarks.bench_uci`. The README quotes the first three (:func:`readme_tables`).
- the dense-teacher table (:func:`dense_teacher_table`), from the ``dense-teacher-*`` files.
- the full table (:func:`table`): one row per result file, in file-name order, with the commit it
  was run from and the posterior draws behind its test log-likelihood. A result may carry its own
  one-line ``headline``; otherwise the UCI (``summary``) and MNIST (``metrics``) layouts of
  :mod:`benchmarks.harness` are summarised.

Every result file written by :func:`benchmarks.harness.write_result` records the git ``commit`` and
whether the working tree was ``dirty``; the tables mark a figure from a dirty tree with † and one
whose file records no commit (written before the harness recorded it) with ‡ ("commit unknown").

The page depends on the JSON files only (no clock, no machine), so writing it twice gives the same
bytes. ``python -m benchmarks.report`` rewrites it; ``--check`` exits with status 1 when the
committed page differs from what the JSON files give. README.md is never written: it links to the
page and quotes the headline table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_PAGE = ROOT / "docs" / "results.md"


def _pm(summary: dict, key: str, digits: int = 2) -> str:
    s = summary[key]
    return f"{s['mean']:.{digits}f} ± {s['se']:.{digits}f}"


def _pct(value: float, digits: int = 0) -> str:
    return f"{100 * value:.{digits}f}%"


# ---- the full table ------------------------------------------------------------------------------
def headline(result: dict) -> str:
    """A result's one-line summary: its own ``headline``, else a summary of its metrics."""
    if "headline" in result:
        return result["headline"]
    if "summary" in result:  # UCI protocol
        s = result["summary"]
        text = f"RMSE {_pm(s, 'rmse')}, test LL {_pm(s, 'log_likelihood')}"
        if s["weights_pruned_fraction"]["mean"] > 0:
            text += (f", {100 * s['weights_pruned_fraction']['mean']:.0f}% weights / "
                     f"{100 * s['hidden_groups_pruned_fraction']['mean']:.0f}% hidden neurons pruned")
        if "num_splits" in result and "splits_available" in result:
            text += f" ({result['num_splits']} of {result['splits_available']} splits)"
        return text
    if "metrics" not in result:  # a layout of its own and no headline: the file has the figures
        return "(no one-line summary: see the file)"
    m = result["metrics"]
    text = f"accuracy {100 * m['accuracy']:.2f}%, NLL {m['nll']:.3f}, ECE {m['ece']:.3f}"
    if result.get("weights_pruned_fraction", 0) > 0:
        text += f", {100 * result['weights_pruned_fraction']:.1f}% weights pruned ({result['architecture']})"
    for key in ("plain_adam", "plain_sgd"):
        if key in result:
            p = result[key]
            text += f"; plain {key[6:]}: {100 * p['accuracy']:.2f}%, ECE {p['ece']:.3f}"
    return text


def ratio(result: dict) -> str:
    """The epoch-time ratio against plain PyTorch, or ``""`` when the result has none."""
    if "epoch_time_ratio" in result and not isinstance(result["epoch_time_ratio"], dict):
        return f"{result['epoch_time_ratio']:.2f}x"
    s = result.get("summary", {}).get("epoch_time_ratio")
    return f"{s['mean']:.2f}x" if s else ""


def commit(result: dict) -> str:
    """The code a result comes from: the short commit, ``", dirty"`` when the tree differed from it,
    ``"commit unknown"`` when the file records none."""
    sha = result.get("commit")
    if not sha:
        return "commit unknown"
    dirty = result.get("dirty")
    return sha[:7] + (", dirty" if dirty else "" if dirty is False else ", dirty?")


def mark(result: dict) -> str:
    """The footnote mark of a figure: † from a dirty (or unknown-state) tree, ‡ without a commit."""
    if not result.get("commit"):
        return "‡"
    return "" if result.get("dirty") is False else "†"


def draws(result: dict) -> str:
    """The posterior draws behind a result's test log-likelihood, as the file records them."""
    n = result.get("test_draws", result.get("num_samples"))
    if n is None:
        return "not recorded"
    stored = result.get("stored_draws")
    return f"{n} ({stored} stored)" if stored is not None and stored < n else str(n)


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """Every result file of ``results_dir``, by file name without ``.json``, in sorted order."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))}


def table(results_dir: Path = RESULTS_DIR) -> str:
    """The full results table: one row per result file."""
    rows = ["| benchmark | model | data | result | epoch time vs plain PyTorch | device | test draws | commit |",
            "|---|---|---|---|---|---|---|---|"]
    for r in load_results(results_dir).values():
        rows.append(f"| `{r['benchmark']}` | {r.get('model', '')} | {r.get('dataset', '')} | {headline(r)} | "
                    f"{ratio(r)} | {r.get('device', '')} | {draws(r)} | {commit(r)} |")
    return "\n".join(rows)


# ---- the UCI tables --------------------------------------------------------------------------------
#: the column order of the UCI tables (other sets found in the files follow, sorted)
UCI_SETS = ("boston", "concrete", "energy", "yacht", "wine", "protein")


def uci_results(results: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """The result of each (entry, set) of the UCI suite: of several files (a full run and partial
    ones), the one over the most splits, then the most recent, then the first by name."""
    chosen: dict[tuple[str, str], tuple] = {}
    for key, r in results.items():
        if r.get("protocol") != "uci" or not r.get("summary"):
            continue
        rank = (r.get("num_splits", 0), r.get("date", ""), [-ord(c) for c in key])
        cell = (r["model"], r["dataset"])
        if cell not in chosen or rank > chosen[cell][0]:
            chosen[cell] = (rank, r)
    return {cell: r for cell, (_, r) in chosen.items()}


def _digits(value: float, digits: int = 2) -> int:
    """Decimals for a table figure: ``digits``, one more below 1 in magnitude (wine's RMSE of 0.62)."""
    return digits + 1 if abs(value) < 1 else digits


def _num(value: float, digits: int) -> str:
    return f"{value:.{_digits(value, digits)}f}"


def _mean_se(mean: float, se) -> str:
    d = _digits(mean)
    return f"{mean:.{d}f}" + ("" if se is None or math.isnan(se) else f" ± {se:.{d}f}")  # se: NaN with one split


def _cell(r: dict, key: str) -> str:
    s = r["summary"].get(key)
    if s is None:
        return "–"
    text = _mean_se(s["mean"], s["se"])
    if r.get("num_splits", 0) < r.get("splits_available", 0):
        text += f" ({r['num_splits']}/{r['splits_available']})"
    return text + mark(r)


def _published_cell(p: dict, key: str) -> str:
    return _mean_se(p[key], p.get(f"{key}_se"))


def _commits(rs: list[dict]) -> str:
    return "; ".join(sorted({commit(r) for r in rs}))


def _uci_layout(results: dict[str, dict]):
    cells = uci_results(results)
    sets = [d for d in UCI_SETS if any(c[1] == d for c in cells)]
    sets += sorted({c[1] for c in cells} - set(sets))
    entries = sorted({c[0] for c in cells})
    return cells, sets, entries


def _header(first: str, sets: list[str], last: str | None = None) -> list[str]:
    cols = [first, *sets] + ([last] if last else [])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def uci_metric_table(results: dict[str, dict], key: str) -> str:
    """Entries as rows, sets as columns: ``key`` (``"rmse"`` or ``"log_likelihood"``) as mean ± se
    over the splits, then the published figures of every source the files carry; ``""`` without UCI
    results."""
    cells, sets, entries = _uci_layout(results)
    if not cells:
        return ""
    lines = _header("entry", sets, "commit")
    for entry in entries:
        row = [cells.get((entry, d)) for d in sets]
        lines.append(f"| {entry} | " + " | ".join("–" if r is None else _cell(r, key) for r in row) +
                     f" | {_commits([r for r in row if r is not None])} |")
    sources: dict[str, dict[str, dict]] = {}
    for (_, d), r in sorted(cells.items()):
        for source, figures in r.get("published", {}).items():
            sources.setdefault(source, {})[d] = figures
    for source in sorted(sources):
        lines.append(f"| *{source}* | " + " | ".join(
            _published_cell(sources[source][d], key) if d in sources[source] else "–" for d in sets) +
            " | published |")
    return "\n".join(lines)


def median_architecture(result: dict) -> str:
    """The kept architecture of a UCI result: inputs, the median over the splits of the groups kept in
    each layer (the lower median, a count that a split kept), outputs (``"13-26-1"``); where the splits' rows do not say, the architecture found
    most often (``"?"`` without either)."""
    rows = [r["groups_kept"] for r in result.get("per_split", []) if "groups_kept" in r]
    if rows and result.get("architectures"):
        inputs = next(iter(result["architectures"])).split("-")[0]
        layers = list(rows[0])
        return "-".join([inputs] + [str(statistics.median_low(r[layer] for r in rows)) for layer in layers])
    if result.get("architectures"):
        return max(result["architectures"].items(), key=lambda kv: (kv[1], kv[0]))[0]
    return "?"


def uci_architecture_table(results: dict[str, dict]) -> str:
    """The sparse entries (those that pruned anything) as rows, sets as columns: the median kept
    architecture over the splits (:func:`median_architecture`), with the mean pruned fractions of
    hidden neurons and weights."""
    cells, sets, entries = _uci_layout(results)
    sparse = [e for e in entries if any(r["summary"]["weights_pruned_fraction"]["mean"] > 0
                                        for (m, _), r in cells.items() if m == e)]
    if not sparse:
        return ""
    lines = _header("entry", sets)
    for entry in sparse:
        row = []
        for d in sets:
            r = cells.get((entry, d))
            if r is None:
                row.append("–")
                continue
            arch = median_architecture(r)
            s = r["summary"]
            row.append(f"{arch} ({_pct(s['hidden_groups_pruned_fraction']['mean'])} / "
                       f"{_pct(s['weights_pruned_fraction']['mean'])}){mark(r)}")
        lines.append(f"| {entry} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def uci_dense_table(results: dict[str, dict]) -> str:
    """The entries that report their dense network too (a ``prune`` switch): test LL of the dense
    network and of the pruned one, same run, per set."""
    cells, sets, entries = _uci_layout(results)
    rows = [e for e in entries if any("dense_log_likelihood" in r["summary"] for (m, _), r in cells.items() if m == e)]
    if not rows:
        return ""
    lines = _header("entry", sets)
    for entry in rows:
        out = []
        for d in sets:
            r = cells.get((entry, d))
            if r is None or "dense_log_likelihood" not in r["summary"]:
                out.append("–")
                continue
            s = r["summary"]
            out.append(f"{_num(s['dense_log_likelihood']['mean'], 2)} → {_num(s['log_likelihood']['mean'], 2)}{mark(r)}")
        lines.append(f"| {entry} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def uci_seconds_table(results: dict[str, dict]) -> str:
    """Mean fit time per split (seconds, wall clock, pruning and noise refit included) and the device."""
    cells, sets, entries = _uci_layout(results)
    if not cells:
        return ""
    lines = _header("entry", sets, "device")
    for entry in entries:
        row = [cells.get((entry, d)) for d in sets]
        devices = sorted({r.get("device", "") for r in row if r is not None})
        lines.append(f"| {entry} | " + " | ".join(
            "–" if r is None else f"{r['summary']['fit_seconds']['mean']:.1f}" for r in row) +
            f" | {'; '.join(devices)} |")
    return "\n".join(lines)


def _draws_statement(results: dict[str, dict]) -> str:
    cells = uci_results(results)
    asked = sorted({r.get("test_draws") for r in cells.values()}, key=str)
    if len(asked) != 1 or asked[0] is None:
        return ("the test log-likelihoods average different numbers of posterior draws "
                f"({', '.join(map(str, asked))}): see each file")
    stored = sorted({(r["model"], r["stored_draws"]) for r in cells.values()
                     if r.get("stored_draws") is not None and r["stored_draws"] < asked[0]})
    text = f"every test log-likelihood and predictive mean here averages {asked[0]} posterior draws"
    if stored:
        text += " (" + "; ".join(f"{m}: cycling through the {n} it stores" for m, n in stored) + ")"
    return text


def uci_tables(results: dict[str, dict]) -> str:
    """The UCI section of the page (empty without UCI results)."""
    cells = uci_results(results)
    if not cells:
        return ""
    rmse, ll = uci_metric_table(results, "rmse"), uci_metric_table(results, "log_likelihood")
    parts = ["## UCI regression: every regression entry with its catalog defaults\n",
             ("The protocol of Hernandez-Lobato & Adams (2015) (`python -m benchmarks.run uci`, or `uci-quick`, "
              "`uci-<set>`; `benchmarks/bench_uci.py`): one hidden layer of 50 units (100 for protein), the "
              "standard splits, each entry fitted with its catalog defaults and nothing chosen per set; mean ± "
              f"standard error over the splits; {_draws_statement(results)}. A figure over fewer than all splits "
              "shows them as (used/available); † marks a figure from an uncommitted working tree, ‡ one whose "
              "file records no commit. Published figures (in italics) are from `shared/reference/anchors.md`; "
              "– where it gives none.\n"),
             "### Test RMSE\n", rmse + "\n", "### Test log-likelihood\n", ll + "\n"]
    arch = uci_architecture_table(results)
    if arch:
        parts += ["### Pruned architecture\n",
                  ("The kept architecture, inputs-hidden-outputs, with each layer's median over the splits of "
                   "the neurons kept, and the mean fraction of hidden neurons / of weights pruned.\n"), arch + "\n"]
    dense = uci_dense_table(results)
    if dense:
        parts += ["### Dense against pruned network\n",
                  ("Test log-likelihood of the dense network → the pruned one, from the same run (the entries "
                   "with a `prune` switch: a second fit with `prune=False` and the same seed); the pruned "
                   "network's noise is refitted on the training data.\n"), dense + "\n"]
    parts += ["### Fit time\n", "Seconds per split (one fit with the defaults).\n", uci_seconds_table(results) + "\n"]
    return "\n".join(parts)


def readme_tables(results: dict[str, dict]) -> list[str]:
    """The UCI tables the README quotes, each as it appears on the page: test RMSE, test
    log-likelihood and pruned architecture (the ones present)."""
    tables = [uci_metric_table(results, "rmse"), uci_metric_table(results, "log_likelihood"),
              uci_architecture_table(results)]
    return [t for t in tables if t]


# ---- the dense-teacher table -------------------------------------------------------------------------
def dense_teacher_table(results: dict[str, dict]) -> str:
    """Entries as rows, input counts as columns: the kept architecture, the test MSE over the
    reference's (``meanfield-vi``) and a flag where a whole hidden layer was pruned; ``""`` without
    dense-teacher results."""
    runs = [r for r in results.values() if r.get("protocol") == "dense-teacher"]
    if not runs:
        return ""
    # per input count, the file of every entry first; a file of fewer entries (a later re-run of
    # those) then replaces their rows
    by_inputs: dict[int, list[dict]] = {}
    for r in sorted(runs, key=lambda r: -len(r["models"])):
        by_inputs.setdefault(r["inputs"], []).append(r)
    files = sorted(by_inputs.items())
    entries = sorted({e for r in runs for e in r["models"]})
    lines = _header("entry", [f"D = {d}" for d, _ in files] + ["targets met"], "commit")
    for entry in entries:
        row, met, used = [], [], []
        for _, rs in files:
            r = next((r for r in reversed(rs) if entry in r["models"]), None)
            if r is None:
                row.append("–")
                continue
            m = r["models"][entry]
            used.append(r)
            ratio_ = m["summary"].get("mse_ratio", {}).get("mean")
            text = f"{' / '.join(m['architectures'])}, MSE ×{ratio_:.2f}" if ratio_ is not None else "no reference"
            if m["whole_layer_pruned"]:
                text += ", **whole layer pruned**"
            row.append(text + mark(r))
            met.append(all(m["targets"].values()))
        lines.append(f"| {entry} | " + " | ".join(row) + f" | {'yes' if met and all(met) else '**no**'} | "
                     f"{_commits(used)} |")
    first = files[0][1][0]
    intro = (f"Synthetic regression, every input relevant (`python -m benchmarks.run dense-teacher`; "
             f"`benchmarks/bench_dense_teacher.py`): a dense ReLU teacher D-{first['hidden']}-1 with N(0, 1/fan_in) "
             f"weights, noise of {first['noise_sd']} times the signal's standard deviation, {first['n_train']} "
             f"training and {first['n_test']} test points; every regression entry with its catalog defaults; "
             f"seeds {', '.join(map(str, first['seeds']))}. Per cell: the kept architecture(s) over the seeds and "
             f"the test MSE over {first['reference']}'s (mean over seeds). Targets: no whole hidden layer pruned "
             f"(nor rescued from being emptied), MSE within {round(100 * first['mse_tolerance'])}% of "
             f"{first['reference']}'s.\n")
    return "\n".join(["## Dense teacher: every input relevant\n", intro, "\n".join(lines) + "\n"])


# ---- the headline table --------------------------------------------------------------------------
@dataclass(frozen=True)
class Headline:
    """One row of the headline table: ``figure(result)`` is the text quoted from result file
    ``key``; ``target`` the target its benchmark set (empty when none) and ``met(result)`` whether
    the run met it (``None`` when there is no target)."""

    method: str
    data: str
    key: str
    figure: Callable[[dict], str]
    target: str = ""
    met: Callable[[dict], bool | None] = lambda result: None


def _all_targets(result: dict) -> bool:
    return all(result["targets"].values())


def _boston_bmr_targets(result: dict) -> bool:
    s = result["summary"]
    return s["log_likelihood"]["mean"] >= -2.55 and s["weights_pruned_fraction"]["mean"] >= 0.70


def _uci(result: dict) -> str:
    s = result["summary"]
    text = f"test LL {_pm(s, 'log_likelihood')}, RMSE {_pm(s, 'rmse')}"
    pruned = s.get("weights_pruned_fraction", {}).get("mean", 0.0)
    return text + (f", {_pct(pruned)} of weights pruned" if pruned > 0 else "")


def _mnist(result: dict) -> str:
    text = f"accuracy {_pct(result['metrics']['accuracy'], 2)} (plain Adam {_pct(result['plain_adam']['accuracy'], 2)})"
    pruned = result.get("weights_pruned_fraction", 0.0)
    return text + (f", {_pct(pruned, 1)} of weights pruned ({result['architecture']})" if pruned > 0 else "")


def _tdamp_boston(result: dict) -> str:
    return f"test NMSE {_pm(result['summary'], 'nmse', 3)} at 40% of hidden neurons kept"


def _tdamp_mnist(result: dict) -> str:
    return (f"test error {_pct(result['test_error'], 2)} at 40% of hidden neurons kept, dense Adam's best "
            f"{_pct(result['adam_best_error'], 2)}; a pass costs {result['epoch_time_ratio']:.2f}x an Adam epoch")


def _tdamp_mnist_met(result: dict) -> bool:
    return result["test_error"] - result["adam_best_error"] <= 0.01 and result["epoch_time_ratio"] <= 4


def _federated_boston(result: dict) -> str:
    s = result["summary"]
    return (f"test NMSE {_pm(s, 'federated_nmse', 3)} vs centralised {_pm(s, 'central_nmse', 3)} "
            f"({100 * result['relative_gap']:+.1f}%); FedAvg {_pm(s, 'fedavg_nmse', 3)}")


def _federated_mnist(result: dict) -> str:
    return (f"test error IID {_pct(result['iid']['federated_error'], 2)}, label-skew "
            f"{_pct(result['label-skew']['federated_error'], 2)} after {result['rounds']} rounds vs centralised "
            f"{_pct(result['central_error'], 2)}")


def _federated_mnist_met(result: dict) -> bool:
    return all(result[p]["federated_error"] <= result["target_error"] for p in ("iid", "label-skew"))


def _loo(result: dict) -> str:
    p = result["exact_paired_by_house"]
    return (f"exact LOO {result['summary']['exact_per_point']['mean']:.3f} vs test LL "
            f"{result['summary']['test_ll']['mean']:.3f} per point; on the same houses test - LOO = "
            f"{p['estimation']:+.3f} ± {p['estimation_se']:.3f}")


def _reduction_cost(result: dict) -> str:
    return (f"one reduction of {result['weights']:,} weights: {_pct(result['in_training']['ratio'], 1)} of an epoch "
            f"(in training), {_pct(result['post_hoc']['ratio'], 1)} (post hoc)")


HEADLINES: tuple[Headline, ...] = (
    Headline("map", "Boston, 20 splits", "uci-boston-map", _uci),
    Headline("meanfield-vi", "Boston, 20 splits", "uci-boston-meanfield-vi", _uci),
    Headline("meanfield-vi", "MNIST train5k, LeNet-300-100", "meanfield-vi-mnist-lenet-300-100", _mnist),
    Headline("horseshoe-svi", "Boston, 20 splits", "uci-boston-horseshoe-svi", _uci),
    Headline("horseshoe-svi", "MNIST train5k, LeNet-5", "horseshoe-svi-mnist-lenet5", _mnist),
    Headline("spike-slab-sghmc", "Boston, 20 splits", "uci-boston-spike-slab-sghmc", _uci),
    Headline("spike-slab-sghmc", "MNIST train5k, LeNet-5", "spike-slab-mnist-lenet5", _mnist),
    Headline("bmr-iterative (rule ss)", "MNIST train5k, LeNet-5", "bmr-iterative-ss-mnist-lenet5", _mnist,
             "accuracy within 1 point of Adam, >= 90% pruned, ECE and NLL below flat mean-field", _all_targets),
    Headline("bmr-iterative (rule ss)", "Boston, 20 splits", "uci-boston-bmr-iterative", _uci,
             "test LL >= -2.55, >= 70% pruned", _boston_bmr_targets),
    Headline("horseshoe-svi + BMR (rule ss)", "Boston, 20 splits", "bmr-posthoc-horseshoe-ss-boston", _uci,
             "test LL >= -2.55, >= 70% pruned", _all_targets),
    Headline("bmr", "MNIST train5k, MLP 4x500", "bmr-reduction-cost-mlp-4x500", _reduction_cost,
             "<= 5% of an epoch", _all_targets),
    Headline("em-tdamp", "Boston, 20 splits", "em-tdamp-boston-keep40", _tdamp_boston,
             "NMSE <= 0.14", lambda r: r["summary"]["nmse"]["mean"] <= 0.14),
    Headline("em-tdamp", "MNIST train5k, LeNet-300-100", "em-tdamp-mnist-keep40", _tdamp_mnist,
             "within 1 point of Adam, a pass <= 4x an Adam epoch", _tdamp_mnist_met),
    Headline("federated em-tdamp", "Boston, 4 clients, 20 splits", "federated-em-tdamp-boston", _federated_boston,
             "within 10% of centralised", lambda r: r["relative_gap"] <= 0.10),
    Headline("federated em-tdamp", "MNIST train5k, 10 clients", "federated-em-tdamp-mnist", _federated_mnist,
             "within 1 point of centralised", _federated_mnist_met),
    Headline("meanfield-vi diagnostics", "Boston, 20 splits", "diagnostics-loo-meanfield-boston", _loo,
             "LOO agrees with test LL within its SE", lambda r: r["targets"]["loo_agrees_with_test_ll_within_se"]),
)


def headline_table(results: dict[str, dict], rows: tuple[Headline, ...] = HEADLINES) -> str:
    """The headline table of ``results`` (as :func:`load_results` returns them); a figure from a dirty
    tree carries †, one from a file without a commit ‡ (:func:`mark`)."""
    lines = ["| method | data | figure | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        if row.key not in results:
            continue
        result = results[row.key]
        met = row.met(result)
        verdict = "–" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {row.method} | {row.data} | {row.figure(result)}{mark(result)} | {row.target or '–'} | "
                     f"{verdict} |")
    return "\n".join(lines)


# ---- the page ------------------------------------------------------------------------------------
_INTRO = """\
# Benchmark results

Generated by `python -m benchmarks.report` from the JSON files in `benchmarks/results/`, which
`python -m benchmarks.run [SUITE ...]` writes (`--list` shows the suites); do not edit by hand.
Each file records the device it ran on, the torch and bnnzoo versions, the date, and the git commit
of the code with whether the working tree differed from it (files written before this was recorded
show "commit unknown"); the last columns of [every result](#every-result) give them, with the
posterior draws behind each test log-likelihood. Epoch times are
a ratio against plain PyTorch training of the same network on batches of the same size,
interleaved epoch by epoch in the same process. How each figure is measured and how the defaults
were chosen: the method pages listed in [the documentation index](index.md).
"""

_SWEEP = """\
## EM-TDAMP sparsity sweep

Boston housing (13-50-1, 20 splits; `python -m benchmarks.run tdamp-boston-sweep`): test NMSE
against the fraction of hidden neurons kept, EM-TDAMP against Adam and against magnitude pruning
(with fine-tuning) of an Adam network at the same sparsity.

![EM-TDAMP sparsity sweep](../benchmarks/results/tdamp_sweep.png)
"""


def render(results_dir: Path = RESULTS_DIR) -> str:
    """The results page for the result files of ``results_dir``."""
    results = load_results(results_dir)
    parts = [_INTRO, "## Headline figures\n", headline_table(results) + "\n"]
    for extra in (uci_tables(results), dense_teacher_table(results)):
        if extra:
            parts.append(extra)
    parts += ["## Every result\n", table(results_dir) + "\n"]
    if (Path(results_dir) / "tdamp_sweep.png").is_file():
        parts.append(_SWEEP)
    return "\n".join(parts)


def write_page(results_dir: Path = RESULTS_DIR, page: Path = RESULTS_PAGE) -> Path:
    """Write :func:`render`'s page to ``page``; returns its path."""
    page = Path(page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(results_dir), encoding="utf-8")
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the results page from benchmarks/results/*.json.")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_PAGE)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not up to date; write nothing")
    parser.add_argument("--readme-tables", action="store_true",
                        help="print the tables the README quotes (headline and UCI) and write nothing")
    args = parser.parse_args(argv)
    if args.readme_tables:
        results = load_results(args.results_dir)
        print("\n\n".join([headline_table(results), *readme_tables(results)]))
        return 0
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != render(args.results_dir):
            print(f"{args.out} is out of date: run python -m benchmarks.report", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {write_page(args.results_dir, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
