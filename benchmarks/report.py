"""Regenerate the README's results table from ``benchmarks/results/*.json``.

A result may carry its own one-line ``headline``; otherwise the UCI (``summary``) and MNIST
(``metrics``) layouts of :mod:`benchmarks.harness` are summarised. The table sits between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers of README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _pm(summary: dict, key: str, digits: int = 2) -> str:
    s = summary[key]
    return f"{s['mean']:.{digits}f} ± {s['se']:.{digits}f}"


def headline(result: dict) -> str:
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
    if "epoch_time_ratio" in result and not isinstance(result["epoch_time_ratio"], dict):
        return f"{result['epoch_time_ratio']:.2f}x"
    s = result.get("summary", {}).get("epoch_time_ratio")
    return f"{s['mean']:.2f}x" if s else ""


def table(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    rows = ["| benchmark | model | data | result | epoch time vs plain PyTorch | device |", "|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        rows.append(f"| `{r['benchmark']}` | {r.get('model', '')} | {r.get('dataset', '')} | {headline(r)} | "
                    f"{ratio(r)} | {r.get('device', '')} |")
    return "\n".join(rows)


def update_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    update_readme()
    print(table())
