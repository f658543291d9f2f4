"""Write the results page, ``docs/results.md``, from ``benchmarks/results/*.json``.

The page holds two tables, both generated here and nowhere else:

- the headline table (:func:`headline_table`): for each method, the figures its benchmark was set up
  to measure, the target where one was set, and whether the run met it. :data:`HEADLINES` says which
  result file and which fields each row reads; a row whose result file is absent is left out.
- the full table (:func:`table`): one row per result file, in file-name order. A result may carry
  its own one-line ``headline``; otherwise the UCI (``summary``) and MNIST (``metrics``) layouts of
  :mod:`benchmarks.harness` are summarised.

The page depends on the JSON files only (no clock, no machine), so writing it twice gives the same
bytes. ``python -m benchmarks.report`` rewrites it; ``--check`` exits with status 1 when the
committed page differs from what the JSON files give. README.md is never written: it links to the
page and quotes the headline table.
"""

from __future__ import annotations

import argparse
import json
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
        return text
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


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """Every result file of ``results_dir``, by file name without ``.json``, in sorted order."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(results_dir).glob("*.json"))}


def table(results_dir: Path = RESULTS_DIR) -> str:
    """The full results table: one row per result file."""
    rows = ["| benchmark | model | data | result | epoch time vs plain PyTorch | device |",
            "|---|---|---|---|---|---|"]
    for r in load_results(results_dir).values():
        rows.append(f"| `{r['benchmark']}` | {r.get('model', '')} | {r.get('dataset', '')} | {headline(r)} | "
                    f"{ratio(r)} | {r.get('device', '')} |")
    return "\n".join(rows)


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
    Headline("map", "Boston, 20 splits", "map-boston", _uci),
    Headline("meanfield-vi", "Boston, 20 splits", "meanfield-vi-boston", _uci),
    Headline("meanfield-vi", "MNIST train5k, LeNet-300-100", "meanfield-vi-mnist-lenet-300-100", _mnist),
    Headline("horseshoe-svi", "Boston, 20 splits", "horseshoe-svi-boston", _uci),
    Headline("horseshoe-svi", "MNIST train5k, LeNet-5", "horseshoe-svi-mnist-lenet5", _mnist),
    Headline("spike-slab-sghmc", "Boston, 20 splits", "spike-slab-boston", _uci),
    Headline("spike-slab-sghmc", "MNIST train5k, LeNet-5", "spike-slab-mnist-lenet5", _mnist),
    Headline("bmr-iterative (rule ss)", "MNIST train5k, LeNet-5", "bmr-iterative-ss-mnist-lenet5", _mnist,
             "accuracy within 1 point of Adam, >= 90% pruned, ECE and NLL below flat mean-field", _all_targets),
    Headline("bmr-iterative (rule ss)", "Boston, 20 splits", "bmr-iterative-ss-boston", _uci,
             "test LL >= -2.55, >= 70% pruned", _all_targets),
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
    """The headline table of ``results`` (as :func:`load_results` returns them)."""
    lines = ["| method | data | figure | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        if row.key not in results:
            continue
        result = results[row.key]
        met = row.met(result)
        verdict = "–" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {row.method} | {row.data} | {row.figure(result)} | {row.target or '–'} | {verdict} |")
    return "\n".join(lines)


# ---- the page ------------------------------------------------------------------------------------
_INTRO = """\
# Benchmark results

Generated by `python -m benchmarks.report` from the JSON files in `benchmarks/results/`, which
`python -m benchmarks.run [SUITE ...]` writes (`--list` shows the suites); do not edit by hand.
Each file records the device it ran on, the torch and bnnzoo versions and the date. Epoch times are
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
    parts = [_INTRO, "## Headline figures\n", headline_table(results) + "\n",
             "## Every result\n", table(results_dir) + "\n"]
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
    args = parser.parse_args(argv)
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
