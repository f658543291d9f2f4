"""The results page (benchmarks/report.py): written from the JSON results alone, deterministically,
never into README.md; the committed page is up to date with benchmarks/results/*.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import harness, report
from benchmarks import run as bench_run

ROOT = Path(__file__).resolve().parents[1]

UCI = {
    "benchmark": "meanfield-vi-boston", "model": "meanfield-vi", "dataset": "boston", "device": "CPU (test)",
    "summary": {
        "rmse": {"mean": 3.0181, "se": 0.1721, "n": 20},
        "log_likelihood": {"mean": -2.5269, "se": 0.0484, "n": 20},
        "weights_pruned_fraction": {"mean": 0.0, "se": 0.0, "n": 20},
        "hidden_groups_pruned_fraction": {"mean": 0.0, "se": 0.0, "n": 20},
        "epoch_time_ratio": {"mean": 2.6, "se": 0.1, "n": 20},
    },
}
TDAMP = {
    "benchmark": "em-tdamp-boston-keep40", "model": "em-tdamp", "dataset": "boston", "device": "CPU (test)",
    "headline": "test NMSE 0.150 at 40% kept",
    "summary": {"nmse": {"mean": 0.15, "se": 0.013, "n": 20}},
}
BMR = {
    "benchmark": "bmr-reduction-cost-mlp-4x500", "model": "bmr", "dataset": "mnist-train5k-t10k",
    "device": "CPU (test)", "headline": "one BMR reduction costs 1.1% of an epoch", "weights": 1149010,
    "in_training": {"ratio": 0.0106}, "post_hoc": {"ratio": 0.0155},
    "targets": {"at_most_5_percent_of_an_epoch": True},
}


def write_results(directory: Path, results: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for r in results:
        (directory / f"{r['benchmark']}.json").write_text(json.dumps(r))
    return directory


def test_the_page_is_written_from_the_json_files(tmp_path):
    results = write_results(tmp_path / "results", [UCI, TDAMP, BMR])
    page = report.write_page(results, tmp_path / "docs" / "results.md")
    text = page.read_text(encoding="utf-8")
    # the full table: one row per file, in file-name order, the UCI layout summarised
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["bmr-reduction-cost-mlp-4x500", "em-tdamp-boston-keep40",
                                                  "meanfield-vi-boston"]
    assert "| `meanfield-vi-boston` | meanfield-vi | boston | RMSE 3.02 ± 0.17, test LL -2.53 ± 0.05 | 2.60x |" in text
    # the headline table: rows for the files present only, with the targets judged from the JSON
    assert "| em-tdamp | Boston, 20 splits | test NMSE 0.150 ± 0.013 at 40% of hidden neurons kept | NMSE <= 0.14 | **no** |" in text
    assert "one reduction of 1,149,010 weights: 1.1% of an epoch (in training), 1.6% (post hoc) | <= 5% of an epoch | yes |" in text
    assert "| meanfield-vi | Boston, 20 splits | test LL -2.53 ± 0.05, RMSE 3.02 ± 0.17 | – | – |" in text
    assert "federated" not in text and "horseshoe" not in text
    assert "tdamp_sweep.png" not in text  # no plot in this results directory


def test_the_page_is_deterministic(tmp_path):
    first = write_results(tmp_path / "a", [UCI, TDAMP, BMR])
    second = write_results(tmp_path / "b", [BMR, TDAMP, UCI])  # other creation order
    one = report.write_page(first, tmp_path / "one.md").read_bytes()
    assert report.write_page(first, tmp_path / "one.md").read_bytes() == one
    assert report.write_page(second, tmp_path / "two.md").read_bytes() == one


def test_a_new_result_changes_the_page_and_check_says_so(tmp_path, capsys):
    results = write_results(tmp_path / "results", [UCI])
    page = tmp_path / "results.md"
    assert report.main(["--results-dir", str(results), "--out", str(page)]) == 0
    assert report.main(["--results-dir", str(results), "--out", str(page), "--check"]) == 0
    write_results(results, [TDAMP])
    assert report.main(["--results-dir", str(results), "--out", str(page), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert "em-tdamp-boston-keep40" not in page.read_text(encoding="utf-8")  # --check writes nothing


def test_neither_the_report_nor_a_benchmark_run_writes_the_readme(tmp_path, monkeypatch):
    readme = ROOT / "README.md"
    before = readme.read_bytes()
    results = tmp_path / "results"
    page = tmp_path / "docs" / "results.md"
    monkeypatch.setattr(harness, "RESULTS", results)
    monkeypatch.setattr(report, "RESULTS_PAGE", page)
    suite = {k: v for k, v in UCI.items() if k not in ("benchmark", "device")}
    monkeypatch.setattr(bench_run, "all_suites", lambda: {"fake-suite": lambda device: {"meanfield-vi-boston": suite}})
    bench_run.main(["fake-suite", "--device", "cpu"])
    assert json.loads((results / "meanfield-vi-boston.json").read_text())["model"] == "meanfield-vi"
    assert "`meanfield-vi-boston`" in page.read_text(encoding="utf-8")
    report.main(["--results-dir", str(results), "--out", str(tmp_path / "other.md")])
    assert readme.read_bytes() == before


def test_the_committed_results_page_is_up_to_date():
    committed = report.RESULTS_PAGE.read_text(encoding="utf-8")
    assert committed == report.render(report.RESULTS_DIR), (
        "docs/results.md differs from benchmarks/results/*.json: run python -m benchmarks.report")


def test_every_headline_row_reads_a_committed_result():
    results = report.load_results()
    missing = [row.key for row in report.HEADLINES if row.key not in results]
    assert not missing, f"headline rows without a result file: {missing}"
    table = report.headline_table(results)
    assert len(table.splitlines()) == 2 + len(report.HEADLINES)


@pytest.mark.parametrize("name", ["README.md", "docs/results.md"])
def test_the_sweep_plot_link_resolves(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    link = re.search(r"\]\(([^)]*tdamp_sweep\.png)\)", text).group(1)
    assert (ROOT / name).parent.joinpath(link).resolve().is_file()


def test_the_readme_quotes_the_current_headline_figures():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/results.md)" in readme
    current = set(report.headline_table(report.load_results()).splitlines())
    quoted = [line for line in readme.splitlines() if line.startswith("| ") and line.count(" | ") == 4]
    assert quoted, "the README's results section has no headline table"
    stale = [line for line in quoted if line not in current]
    assert not stale, f"README rows that differ from python -m benchmarks.report's headline table: {stale}"


def test_the_documentation_links_resolve():
    pages = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text(encoding="utf-8")):
            if not link.startswith(("http://", "https://")) and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not broken, broken
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs" / "methods").glob("*.md"):
        assert f"(methods/{page.name})" in index, f"docs/index.md does not list {page.name}"
