"""The results page (benchmarks/report.py): written from the JSON results alone, deterministically,
never into README.md; the committed page is up to date with benchmarks/results/*.json. The results
files (benchmarks/harness.py): the git state they record, the draws behind their figures. The UCI and
dense-teacher suites' pieces that need no long run (benchmarks/bench_uci.py,
benchmarks/bench_dense_teacher.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import bnnzoo
from benchmarks import (
    bench_dense_teacher,
    bench_peers_boston,
    bench_uci,
    harness,
    report,
)
from benchmarks import run as bench_run
from bnnzoo.catalog import get_entry
from bnnzoo.data import Dataset
from bnnzoo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

UCI = {
    "benchmark": "uci-boston-meanfield-vi", "model": "meanfield-vi", "dataset": "boston", "device": "CPU (test)",
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
                                                  "uci-boston-meanfield-vi"]
    assert "| `uci-boston-meanfield-vi` | meanfield-vi | boston | RMSE 3.02 ± 0.17, test LL -2.53 ± 0.05 | 2.60x |" in text
    # the headline table: rows for the files present only, with the targets judged from the JSON
    assert "| em-tdamp | Boston, 20 splits | test NMSE 0.150 ± 0.013 at 40% of hidden neurons kept‡ | NMSE <= 0.14 | **no** |" in text
    assert "one reduction of 1,149,010 weights: 1.1% of an epoch (in training), 1.6% (post hoc)‡ | <= 5% of an epoch | yes |" in text
    # the fixture records no commit: its figure is marked ‡ and the full table says "commit unknown"
    assert "| meanfield-vi | Boston, 20 splits | test LL -2.53 ± 0.05, RMSE 3.02 ± 0.17‡ | – | – |" in text
    assert "| CPU (test) | not recorded | commit unknown |" in text
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
    results = report.load_results()
    current = set(report.headline_table(results).splitlines())
    uci = {line for table in report.readme_tables(results) for line in table.splitlines()}
    uci |= set(bench_peers_boston.table(results["peers-boston"]).splitlines())  # its own five-column table
    quoted = [line for line in readme.splitlines() if line.startswith("| ") and line.count(" | ") == 4
              and line not in uci]
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


def test_the_readme_quotes_the_current_uci_tables():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tables = report.readme_tables(report.load_results())
    stale = [t.splitlines()[0] for t in tables if t not in readme]
    assert not stale, f"README lacks the current UCI tables (python -m benchmarks.report --readme-tables): {stale}"


# ---- the git state and draws every results file records ------------------------------------------
def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_state_says_commit_and_dirty(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "ROOT", tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    assert harness.git_state() == {"commit": None, "dirty": None}  # not a checkout: no claim either way
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.setattr(harness, "ROOT", repo)
    assert harness.git_state() == {"commit": head, "dirty": False}
    # the benchmarks' own outputs do not make the tree dirty (a run writes them as it goes)
    (repo / "benchmarks" / "results" / "a.json").write_text("{}")
    (repo / "docs").mkdir()
    (repo / "docs" / "results.md").write_text("page")
    assert harness.git_state()["dirty"] is False
    # a change to the code does, tracked or untracked, and the diff's hash follows the change
    (repo / "code.py").write_text("x = 2\n")
    first = harness.git_state()
    assert first["dirty"] is True and first["dirty_paths"] == ["code.py"] and first["commit"] == head
    (repo / "code.py").write_text("x = 3\n")
    assert harness.git_state()["diff_sha1"] != first["diff_sha1"]
    (repo / "code.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")
    assert harness.git_state()["dirty_paths"] == ["new.py"]


def test_write_result_records_the_git_state(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(harness, "git_state", lambda: {"commit": "f" * 40, "dirty": True})
    path = harness.write_result("x", {"model": "m", "test_draws": 7}, "cpu")
    written = json.loads(path.read_text())
    assert written["commit"] == "f" * 40 and written["dirty"] is True and written["test_draws"] == 7
    # and the real state of this checkout is a commit and a flag
    state = {k: v for k, v in harness.git_state().items() if k in ("commit", "dirty")}
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)


def test_marks_and_commit_cells(tmp_path):
    clean = {**UCI, "benchmark": "a-clean", "commit": "abcdef0123", "dirty": False, "test_draws": 100}
    dirty = {**UCI, "benchmark": "b-dirty", "commit": "abcdef0123", "dirty": True, "test_draws": 100,
             "stored_draws": 25}
    assert (report.mark(clean), report.mark(dirty), report.mark(UCI)) == ("", "†", "‡")
    assert report.commit(clean) == "abcdef0" and report.commit(dirty) == "abcdef0, dirty"
    assert report.commit(UCI) == "commit unknown"
    text = report.table(write_results(tmp_path, [clean, dirty, UCI]))
    assert "| 100 | abcdef0 |" in text and "| 100 (25 stored) | abcdef0, dirty |" in text
    assert "| not recorded | commit unknown |" in text


def test_the_protocols_use_one_number_of_draws():
    import inspect

    for fn in (harness.uci_protocol, harness.mnist_protocol, harness.fit_regression_defaults):
        assert inspect.signature(fn).parameters["num_samples"].default == harness.TEST_DRAWS


def test_mean_se_is_the_standard_error_of_the_mean():
    values = [1.0, 2.0, 4.0, 7.0]
    out = harness.mean_se(values)
    assert out["mean"] == pytest.approx(3.5) and out["n"] == 4
    assert out["se"] == pytest.approx(math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3) / 2)


# ---- the UCI tables ----------------------------------------------------------------------------------
def _uci(entry: str, dataset: str, rmse: float, ll: float, *, n: int = 20, available: int = 20, date="2026-01-01",
         pruned: float = 0.0, arch: str = "13-50-1", dense: float | None = None, dirty: bool = False) -> dict:
    summary = {"rmse": {"mean": rmse, "se": 0.1, "n": n}, "log_likelihood": {"mean": ll, "se": 0.05, "n": n},
               "weights_pruned_fraction": {"mean": pruned, "se": 0.0, "n": n},
               "hidden_groups_pruned_fraction": {"mean": pruned / 2, "se": 0.0, "n": n},
               "fit_seconds": {"mean": 2.0, "se": 0.1, "n": n}}
    if dense is not None:
        summary["dense_log_likelihood"] = {"mean": dense, "se": 0.05, "n": n}
    key = bench_uci.result_key(dataset, entry, n, available)
    return {"benchmark": key, "model": entry, "dataset": dataset, "protocol": "uci", "device": "CPU (test)",
            "date": date, "commit": "1234567abc", "dirty": dirty, "num_splits": n, "splits_available": available,
            "test_draws": 100, "architectures": {arch: n}, "summary": summary,
            "published": bench_uci.published(dataset)}


def test_uci_tables_as_papers_print_them(tmp_path):
    results = write_results(tmp_path, [
        _uci("map", "boston", 3.03, -2.85),
        _uci("map", "boston", 9.99, -9.99, n=3, date="2030-01-01"),  # partial and later: the full run wins
        _uci("map", "yacht", 0.93, -1.20, n=3),
        _uci("horseshoe-svi", "boston", 3.07, -2.51, pruned=0.66, arch="13-23-1", dense=-2.60, dirty=True),
    ])
    loaded = report.load_results(results)
    rmse = report.uci_metric_table(loaded, "rmse").splitlines()
    assert rmse[0] == "| entry | boston | yacht | commit |"  # the sets in the protocol's order
    assert rmse[2] == "| horseshoe-svi | 3.07 ± 0.10† | – | 1234567, dirty |"
    assert rmse[3] == "| map | 3.03 ± 0.10 | 0.930 ± 0.100 (3/20) | 1234567 |"
    # the published figures of anchors.md beside them, with their standard errors where given
    assert "| *PBP (Hernandez-Lobato & Adams 2015)* | 3.01 ± 0.18 | – | published |" in rmse
    assert "| *MC dropout (2018 rerun)* | 2.90 ± 0.18 | 0.670 | published |" in rmse
    ll = report.uci_metric_table(loaded, "log_likelihood")
    assert "| map | -2.85 ± 0.05 | -1.20 ± 0.05 (3/20) | 1234567 |" in ll
    arch = report.uci_architecture_table(loaded).splitlines()
    assert arch[2:] == ["| horseshoe-svi | 13-23-1 (33% / 66%)† | – |"]  # only the entries that pruned
    assert "| horseshoe-svi | -2.60 → -2.51† | – |" in report.uci_dense_table(loaded)
    page = report.render(results)
    assert "averages 100 posterior draws" in page and "### Pruned architecture" in page
    assert report.readme_tables(loaded) == [report.uci_metric_table(loaded, "rmse"),
                                            report.uci_metric_table(loaded, "log_likelihood"),
                                            report.uci_architecture_table(loaded)]
    assert all(t in page for t in report.readme_tables(loaded))


def test_uci_suite_options():
    assert bench_uci.parse_splits(None, 20) == list(range(20))
    assert bench_uci.parse_splits("", 20, default=3) == [0, 1, 2]
    assert bench_uci.parse_splits("all", 5, default=3) == [0, 1, 2]
    assert bench_uci.parse_splits("4", 20) == [0, 1, 2, 3] and bench_uci.parse_splits("30", 5) == list(range(5))
    assert bench_uci.parse_splits("7,2,2", 20) == [2, 7]
    for bad in ("0", "x", "3,40", "-1,2"):
        with pytest.raises(ConfigError):
            bench_uci.parse_splits(bad, 20)
    assert bench_uci.result_key("boston", "map", 20, 20) == "uci-boston-map"
    assert bench_uci.result_key("protein", "map", 3, 5) == "uci-protein-map-3splits"
    assert set(bench_uci.published("boston")) == set(bench_uci.PUBLISHED)
    assert list(bench_uci.published("protein")) == ["MC dropout (2018 rerun)"]
    assert {"uci", "uci-quick", "uci-protein", "uci-boston"} <= set(bench_uci.SUITES)
    assert set(bench_dense_teacher.SUITES) == {"dense-teacher"}


def test_uci_suite_runs_every_regression_entry_with_its_defaults(monkeypatch):
    monkeypatch.delenv("BNNZOO_UCI_ENTRIES", raising=False)
    monkeypatch.setenv("BNNZOO_UCI_SETS", "yacht")
    monkeypatch.setenv("BNNZOO_UCI_SPLITS", "2")
    results = bench_uci.SUITES["uci-quick"]("cpu")
    assert results.sets == ["yacht"] and results.entries == bnnzoo.list_models("regression")
    assert bench_uci.parse_splits(results.splits_text, 20, results.default_splits) == [0, 1]
    monkeypatch.setenv("BNNZOO_UCI_ENTRIES", "map,nonsense")
    with pytest.raises(ConfigError, match="nonsense"):
        bench_uci.SUITES["uci"]("cpu")


def test_results_are_written_one_at_a_time(tmp_path, monkeypatch):
    """A suite's lazy results reach the disk as each is done: an interrupted run keeps them."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "RESULTS_PAGE", tmp_path / "results.md")

    class Lazy:
        def items(self):
            yield "uci-boston-map", {k: v for k, v in UCI.items() if k not in ("benchmark", "device")}
            raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "all_suites", lambda: {"lazy": lambda device: Lazy()})
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(["lazy", "--device", "cpu"])
    assert json.loads((tmp_path / "results" / "uci-boston-map.json").read_text())["model"] == "meanfield-vi"


def _tiny_regression(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 3, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(2 * n, generator=g)
    return Dataset(name="tiny", task="regression", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])


def test_a_default_fit_and_its_dense_twin():
    data = _tiny_regression()
    assert harness.has_prune_switch("horseshoe-svi") and not harness.has_prune_switch("map")
    row = harness.fit_regression_defaults("horseshoe-svi", data, seed=0, num_samples=20)
    # the headline figures are the default fit's: refit them by hand with the catalog defaults
    posterior = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, dataset="tiny", device="cpu", seed=0)
    harness.set_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        posterior.fit(data.x_train, data.y_train, progress=False)
    m = posterior.evaluate(data.x_test, data.y_test, num_samples=20)
    assert row["rmse"] == pytest.approx(m["rmse"]) and row["log_likelihood"] == pytest.approx(m["log_likelihood"])
    assert row["architecture"] == posterior.sparsity()["architecture"] and row["test_draws"] == 20
    assert row["mse"] == pytest.approx(m["rmse"] ** 2)
    assert row["nmse"] == pytest.approx(m["rmse"] ** 2 / float(data.y_test.var()))
    # the dense twin: same seed, prune=False, so nothing pruned and its own figures
    dense = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, dataset="tiny", device="cpu", seed=0, prune=False)
    harness.set_seed(0)
    dense.fit(data.x_train, data.y_train, progress=False)
    assert dense.sparsity()["weights_pruned_fraction"] == 0
    assert row["dense_log_likelihood"] == pytest.approx(dense.evaluate(data.x_test, data.y_test,
                                                                       num_samples=20)["log_likelihood"])
    plain = harness.fit_regression_defaults("map", data, seed=0, num_samples=20)
    assert "dense_log_likelihood" not in plain and plain["weights_pruned_fraction"] == 0
    # map chooses its epochs on a validation fifth: at most the configured number
    assert plain["empty_layer_warnings"] == 0
    assert 1 <= plain["epochs"] <= get_entry("map").defaults["regression"]["train"]["epochs"]


# ---- the dense teacher ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_inputs", [2, 16])
def test_the_dense_teacher_reads_every_input_at_the_stated_noise(num_inputs):
    data = bench_dense_teacher.dense_teacher(num_inputs, seed=3)
    assert data.name == f"dense-teacher-{num_inputs}" and data.x_train.shape == (2000, num_inputs)
    teacher = data.meta["teacher"]
    first = teacher.weights[0]
    assert first.shape == (bench_dense_teacher.HIDDEN, num_inputs) and bool((first != 0).all())
    # N(0, 1/fan_in) first-layer weights: their variance times the fan-in is near 1 (Monte Carlo, 50*D draws)
    assert float(first.var() * num_inputs) == pytest.approx(1.0, abs=4 * math.sqrt(2 / first.numel()))
    # every input moves the output: the mean |gradient| of the teacher along each input is non-zero
    x = data.x_test[:500].clone().requires_grad_(True)
    teacher(x).sum().backward()
    assert bool((x.grad.abs().mean(0) > 1e-3).all())
    # the noise is a tenth of the signal's spread (the signal has unit variance)
    noise = torch.cat([data.y_train - teacher(data.x_train), data.y_test - teacher(data.x_test)])
    assert float(noise.std()) == pytest.approx(0.1, rel=0.05)
    assert float(teacher(data.x_test).std()) == pytest.approx(1.0, rel=0.1)
    # the catalog gives the entries their regression default: one hidden layer of 50 units
    assert get_entry("map").configure("regression", (num_inputs,), 1, data.name)["network"]["hidden"] == [50]


def test_whole_layer_pruned():
    row = {"groups_kept": {"fc1": 3, "fc2": 1}, "empty_layer_warnings": 0}
    assert not bench_dense_teacher.whole_layer_pruned(row)
    assert bench_dense_teacher.whole_layer_pruned({**row, "groups_kept": {"fc1": 0, "fc2": 1}})
    assert bench_dense_teacher.whole_layer_pruned({**row, "empty_layer_warnings": 1})  # rescued by the guard
    assert not bench_dense_teacher.whole_layer_pruned({"groups_kept": {"fc1": 50, "out": 1}, "empty_layer_warnings": 0})


def test_dense_teacher_table(tmp_path):
    def model(arch, ratio, whole=False):
        return {"summary": {"mse_ratio": {"mean": ratio, "se": 0.0, "n": 2}}, "whole_layer_pruned": whole,
                "architectures": [arch], "targets": {"a": not whole, "b": ratio <= 1.2}}

    files = [{"benchmark": f"dense-teacher-d{d}", "protocol": "dense-teacher", "inputs": d, "hidden": 50,
              "noise_sd": 0.1, "n_train": 2000, "n_test": 2000, "seeds": [0, 1], "reference": "meanfield-vi",
              "mse_tolerance": 0.2, "commit": "1234567abc", "dirty": False, "headline": "h",
              "models": {"meanfield-vi": model(f"{d}-50-1", 1.0), "em-tdamp": model(f"{d}-1-1", 1.5, whole=d == 2)}}
             for d in (16, 2)]
    table = report.dense_teacher_table(report.load_results(write_results(tmp_path, files)))
    assert "| entry | D = 2 | D = 16 | targets met |" in table
    assert "| em-tdamp | 2-1-1, MSE ×1.50, **whole layer pruned** | 16-1-1, MSE ×1.50 | **no** |" in table
    assert "| meanfield-vi | 2-50-1, MSE ×1.00 | 16-50-1, MSE ×1.00 | yes |" in table


def test_median_architecture():
    rows = [{"groups_kept": {"fc1": k, "fc2": 1}} for k in (27, 25, 12)]
    result = {"architectures": {"13-27-1": 1, "13-25-1": 1, "13-12-1": 1}, "per_split": rows}
    assert report.median_architecture(result) == "13-25-1"
    assert report.median_architecture({**result, "per_split": rows[:2]}) == "13-25-1"  # the lower median
    assert report.median_architecture({"architectures": {"13-9-1": 1, "13-8-1": 2}}) == "13-8-1"


def test_the_uci_section_states_the_draws():
    one = {"a": _uci("map", "boston", 3.0, -2.5), "b": {**_uci("spike-slab-sghmc", "boston", 3.0, -2.5),
                                                       "stored_draws": 25}}
    text = report.uci_tables(one)
    assert "averages 100 posterior draws (spike-slab-sghmc: cycling through the 25 it stores)" in text
    other = {**one, "c": {**_uci("bmr", "boston", 3.0, -2.5), "test_draws": 10}}
    assert "different numbers of posterior draws (10, 100)" in report.uci_tables(other)


def test_a_narrowed_dense_teacher_rerun_replaces_its_entries_rows():
    """A run of some entries only is keyed apart from the full run, and the table shows its rows (and
    its commit) in place of the full run's, keeping every other entry's."""
    full = bench_dense_teacher.Results([16], ["meanfield-vi", "map", "bmr"], [0], "cpu")
    narrow = bench_dense_teacher.Results([16], ["map"], [0], "cpu", every_entry=False)
    assert full.key(16) == "dense-teacher-d16" and narrow.key(16) == "dense-teacher-d16-map"

    def model(ratio):
        return {"summary": {"mse_ratio": {"mean": ratio}}, "architectures": ["16-50-1"],
                "whole_layer_pruned": False, "targets": {"mse": ratio <= 1.2}}

    common = {"protocol": "dense-teacher", "inputs": 16, "hidden": 50, "noise_sd": 0.1, "n_train": 2000,
              "n_test": 2000, "seeds": [0], "reference": "meanfield-vi", "mse_tolerance": 0.2, "dirty": False}
    results = {
        "dense-teacher-d16": {**common, "commit": "a" * 40,
                              "models": {"meanfield-vi": model(1.0), "map": model(1.27), "bmr": model(1.01)}},
        "dense-teacher-d16-map": {**common, "commit": "b" * 40,
                                  "models": {"meanfield-vi": model(1.0), "map": model(1.1)}},
    }
    rows = {line.split(" | ")[0].strip("| "): line for line in report.dense_teacher_table(results).splitlines()
            if line.startswith("| ") and "MSE" in line}
    assert "×1.10" in rows["map"] and "bbbbbbb" in rows["map"] and "| yes |" in rows["map"]
    assert "×1.01" in rows["bmr"] and "aaaaaaa" in rows["bmr"]
