"""Run directories: written atomically with a manifest, verified on load, refused when corrupt, not
overwritten silently, and evaluated on the data given now or the recorded dataset name."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnnzoo
from bnnzoo.cli import main
from bnnzoo.data import load_dataset
from bnnzoo.errors import RunError
from bnnzoo.runs import MANIFEST, check_target, file_digest, verify_run

FORMAT1 = Path(__file__).parent / "data" / "runs-format1"
SAVED = json.loads((FORMAT1 / "predictions.json").read_text())
BOSTON_DIR = Path(bnnzoo.__file__).parent / "data" / "bundled" / "boston"


@pytest.fixture(scope="module")
def saved_run(fitted_map, tmp_path_factory):
    """A run saved by the current ``save`` (with a manifest); copy it before damaging it."""
    return fitted_map.save(tmp_path_factory.mktemp("saved") / "run", extra_files={"metrics.json": "{}"})


@pytest.fixture
def run(saved_run, tmp_path):
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


@pytest.fixture
def legacy_run(tmp_path):
    """A run saved without a manifest (format 1): only the structural checks apply."""
    return Path(shutil.copytree(FORMAT1 / "map", tmp_path / "legacy"))


def _predict(posterior, x):
    return posterior.predict(x, num_samples=8, seed=0)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- the manifest; every entry's saved run verifies and reloads to the same predictions ----------------
@pytest.mark.parametrize("name", sorted(SAVED["predictions"]))
def test_every_entry_saves_a_verified_run_that_reloads_identically(name, tmp_path):
    posterior = bnnzoo.load(FORMAT1 / name)
    path = posterior.save(tmp_path / "run")
    manifest = verify_run(path)
    assert set(manifest["files"]) == {"config.json", "posterior.pt"}
    for file, entry in manifest["files"].items():
        assert file_digest(path / file) == (entry["sha256"], entry["size"])
    x = torch.tensor(SAVED["x"])
    a, b = _predict(posterior, x), _predict(bnnzoo.load(path), x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left beside it


def test_extra_files_are_written_with_the_run_and_listed(saved_run):
    manifest = json.loads((saved_run / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "posterior.pt", "metrics.json"}
    assert (saved_run / "metrics.json").read_text() == "{}"


def test_extra_file_names_must_stay_inside_the_run(fitted_map, tmp_path):
    for bad in ("../escape.json", "config.json", MANIFEST):
        with pytest.raises(bnnzoo.errors.ConfigError, match="extra_files"):
            fitted_map.save(tmp_path / "run", extra_files={bad: "{}"})
    assert not (tmp_path / "run").exists()


# ---- case 5: a corrupt run is refused with one RunError naming the run and the file ---------------------
def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _fill(file: Path, value: float, *keys: str) -> None:
    """Overwrite one saved tensor of ``file`` with ``value`` everywhere."""
    state = torch.load(file, weights_only=True)
    target = state
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = torch.full_like(target[keys[-1]], value)
    torch.save(state, file)


def _wider_hidden_layer(meta: dict) -> dict:
    spec = copy.deepcopy(meta["config"]["network_spec"])
    spec["layers"][0]["out_features"] = spec["layers"][2]["in_features"] = 7
    return {**meta, "config": {**meta["config"], "network_spec": spec}}


MANIFEST_CASES = {
    "truncated posterior.pt": (lambda p: _truncate(p / "posterior.pt"), r"posterior\.pt is truncated"),
    "random posterior.pt": (lambda p: (p / "posterior.pt").write_bytes(bytes(range(256)) * 20),
                            r"posterior\.pt is (truncated|longer)"),
    "altered config.json": (lambda p: _config(p, lambda m: {**m, "name": "bmr"}), r"config\.json (was altered|is)"),
    "missing metrics.json": (lambda p: (p / "metrics.json").unlink(), r"metrics\.json is missing"),
    "manifest removed": (lambda p: (p / MANIFEST).unlink(), r"manifest\.json is missing"),
    "manifest of another shape": (lambda p: (p / MANIFEST).write_text("[1, 2]"),
                                  r"manifest\.json is not a bnnzoo manifest"),
    "manifest unreadable": (lambda p: (p / MANIFEST).write_text("{"), r"manifest\.json is unreadable"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_a_run_that_differs_from_its_manifest_is_refused(case, run):
    damage, message = MANIFEST_CASES[case]
    damage(run)
    with pytest.raises(RunError, match=message) as err:
        bnnzoo.load(run)
    assert str(run) in str(err.value)


def _config(path: Path, edit) -> None:
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(meta)))


LEGACY_CASES = {
    "truncated posterior.pt": (lambda p: _truncate(p / "posterior.pt"), r"posterior\.pt is unreadable"),
    "random posterior.pt": (lambda p: (p / "posterior.pt").write_bytes(bytes(range(256)) * 20),
                            r"posterior\.pt is unreadable"),
    "empty posterior.pt": (lambda p: (p / "posterior.pt").write_bytes(b""), r"posterior\.pt is unreadable"),
    "posterior.pt of another layout": (lambda p: torch.save({"weights": torch.zeros(3)}, p / "posterior.pt"),
                                       r"posterior\.pt does not hold the saved layout"),
    "NaN in the standardiser": (lambda p: _fill(p / "posterior.pt", float("nan"), "standardizer", "y_std"),
                                r"posterior\.pt: standardizer\.y_std holds NaN"),
    "NaN in the weights": (lambda p: _fill(p / "posterior.pt", float("nan"), "posterior", "guide", "locs.fc1.weight"),
                           r"posterior\.pt: posterior\.guide\.locs\.fc1\.weight holds NaN"),
    "infinite standardiser": (lambda p: _fill(p / "posterior.pt", float("inf"), "standardizer", "x_mean"),
                              r"posterior\.pt: the standardiser's x_mean holds infinite values"),
    "zero standardiser scale": (lambda p: _fill(p / "posterior.pt", 0.0, "standardizer", "x_std"),
                                r"posterior\.pt: the standardiser's x_std is not positive"),
    "weights of another network": (lambda p: _config(p, _wider_hidden_layer),
                                   r"posterior\.pt does not match the network and method of config\.json"),
    "config.json a list": (lambda p: (p / "config.json").write_text("[]"), r"config\.json holds a list"),
    "config.json not JSON": (lambda p: (p / "config.json").write_text("{'format': 1"), r"config\.json is unreadable"),
    "config.json of another format": (lambda p: _config(p, lambda m: {**m, "format": 9}),
                                      r"config\.json says format 9"),
    "config.json without a name": (lambda p: _config(p, lambda m: {k: v for k, v in m.items() if k != "name"}),
                                   r"config\.json: 'name' must be a JSON string"),
    "config.json naming no entry": (lambda p: _config(p, lambda m: {**m, "name": "mapp"}),
                                    r"config\.json names .*mapp"),
    "config of the wrong shape": (lambda p: _config(p, lambda m: {**m, "config": {"model": 3}}),
                                  r"config\.json does not describe a map posterior"),
    "history of the wrong shape": (lambda p: _config(p, lambda m: {**m, "history": {"loss": 5, "bogus": 1}}),
                                   r"config\.json has a history"),
    "posterior.pt missing": (lambda p: (p / "posterior.pt").unlink(),
                             r"is not a saved bnnzoo posterior.*posterior\.pt missing"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_a_corrupt_run_without_manifest_is_refused_naming_the_file(case, legacy_run):
    damage, message = LEGACY_CASES[case]
    assert bnnzoo.load(legacy_run).name == "map"  # intact, it loads
    damage(legacy_run)
    with pytest.raises(RunError, match=message) as err:
        bnnzoo.load(legacy_run)
    assert str(legacy_run) in str(err.value)


def test_a_stray_file_in_a_run_is_fine(run, fitted_map, boston):
    (run / "notes.txt").write_text("mine")
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "ppc.png").write_bytes(b"png")
    back = bnnzoo.load(run)
    assert torch.equal(_predict(back, boston.x_test).mean, _predict(fitted_map, boston.x_test).mean)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["posterior.pt", "config.json", "metrics.json"]), where=st.floats(0, 1, exclude_max=True),
       how=st.sampled_from(["truncate", "flip", "append"]))
def test_any_change_to_a_listed_file_is_caught(saved_run, tmp_path_factory, file, where, how):
    path = Path(shutil.copytree(saved_run, tmp_path_factory.mktemp("damaged") / "run"))
    data = bytearray((path / file).read_bytes())
    at = int(where * len(data))
    if how == "truncate":
        data = data[:at]
    elif how == "flip":
        data[at] ^= 0xFF
    else:
        data += b"\0"
    (path / file).write_bytes(bytes(data))
    with pytest.raises(RunError, match=re.escape(file)):
        bnnzoo.load(path)


def test_cli_reports_a_corrupt_run_in_one_line(run):
    _truncate(run / "posterior.pt", 0.3)
    for command in (["evaluate", str(run)], ["prune", str(run), "--out", str(run.parent / "pruned")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and "posterior.pt is truncated" in result.output
        assert len(result.output.strip().splitlines()) == 1  # no traceback
    assert not (run.parent / "pruned").exists()


# ---- case 6: atomic saves, no silent overwrite --------------------------------------------------------
def test_save_onto_an_existing_run_is_refused_unless_overwrite(fitted_map, fitted_meanfield, tmp_path, boston):
    path = fitted_map.save(tmp_path / "run", extra_files={"metrics.json": "{}", "report/old.json": "{}"})
    before = _snapshot(path)
    with pytest.raises(RunError, match="already exists: pass --overwrite"):
        fitted_meanfield.save(path)
    assert _snapshot(path) == before
    fitted_meanfield.save(path, overwrite=True)
    assert sorted(_snapshot(path)) == ["config.json", MANIFEST, "posterior.pt"]  # the old run's files are gone
    back = bnnzoo.load(path)
    assert back.name == "meanfield-vi"
    assert torch.equal(_predict(back, boston.x_test).mean, _predict(fitted_meanfield, boston.x_test).mean)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is not a directory"):
        fitted_map.save(tmp_path / "file", overwrite=True)
    (tmp_path / "empty").mkdir()
    assert bnnzoo.load(fitted_map.save(tmp_path / "empty")).name == "map"  # an empty directory is free


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True])
def test_a_save_interrupted_between_its_files_leaves_no_run_or_the_previous_one(
        fitted_map, fitted_meanfield, tmp_path, monkeypatch, interrupt, existing):
    path = tmp_path / "run"
    if existing:
        fitted_meanfield.save(path, extra_files={"metrics.json": "{}"})
    before = _snapshot(path) if existing else None
    real_dumps = json.dumps

    def dumps(obj, *args, **kwargs):  # posterior.pt is written, config.json is being written
        assert any(p.name == "posterior.pt" for p in tmp_path.rglob("posterior.pt") if ".partial-" in str(p))
        raise interrupt("interrupted")

    monkeypatch.setattr(json, "dumps", dumps)
    with pytest.raises(interrupt):
        fitted_map.save(path, overwrite=True, extra_files={"metrics.json": "{}"})
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert [p.name for p in tmp_path.iterdir()] == (["run"] if existing else [])
    if existing:
        assert _snapshot(path) == before
        assert bnnzoo.load(path).name == "meanfield-vi"


def test_a_killed_writers_leftovers_are_removed_by_the_next_save(fitted_map, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    leftover = tmp_path / f".run.partial-{pid}-0000"
    leftover.mkdir()
    (leftover / "posterior.pt").write_bytes(b"half")
    with pytest.raises(RunError, match="is not a saved bnnzoo posterior"):
        bnnzoo.load(tmp_path / "run")  # a killed save leaves no run at the target
    fitted_map.save(tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    # killed between moving the old run aside and renaming the new one in: the old run comes back
    before = _snapshot(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / f".run.replaced-{pid}-0000")
    with pytest.raises(RunError, match="already exists"):
        fitted_map.save(tmp_path / "run")
    assert _snapshot(tmp_path / "run") == before and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_save_killed_at_random_points_leaves_no_run_or_a_complete_one(tmp_path):
    """A writer that replaces a run again and again (two posteriors in turn) is killed with SIGKILL
    at five points; the target is then absent or a complete run that verifies and loads."""
    posteriors = [bnnzoo.load(FORMAT1 / "map"), bnnzoo.load(FORMAT1 / "meanfield-vi")]
    target = tmp_path / "run"
    for trial, delay in enumerate([0.2, 0.003, 0.011, 0.029, 0.047]):
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                for i in range(10_000):
                    posteriors[i % 2].save(target, overwrite=True, extra_files={"metrics.json": str(i)})
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if target.exists():
            verify_run(target)
            assert bnnzoo.load(target).name in ("map", "meanfield-vi")
        else:  # killed between moving the old run aside and renaming the new one in
            assert trial > 0 and any(".replaced-" in p.name for p in tmp_path.iterdir())
    assert all(".partial-" in p.name or ".replaced-" in p.name for p in tmp_path.iterdir() if p.name != "run")


def test_check_target_refuses_before_any_work(tmp_path):
    assert check_target(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(RunError, match="taken already exists"):
        check_target(tmp_path / "taken")
    assert check_target(tmp_path / "taken", overwrite=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):  # overwrite replaces runs only, never a directory of other files
        with pytest.raises(RunError, match="home"):
            check_target(tmp_path / "home", overwrite=overwrite)


def test_cli_fit_refuses_an_existing_out_before_fitting(saved_run):
    before = _snapshot(saved_run)
    result = CliRunner().invoke(main, ["fit", "map", "--epochs", "1", "--out", str(saved_run), "--quiet"])
    assert result.exit_code == 1 and "already exists: pass --overwrite" in result.output
    assert "fitting" not in result.output  # refused before the fit started
    assert _snapshot(saved_run) == before


def test_cli_fit_overwrite_replaces_the_run_with_its_metrics_inside(run):
    (run / "stale.txt").write_text("old")
    result = CliRunner().invoke(main, ["fit", "map", "--epochs", "1", "--num-samples", "2", "--out", str(run),
                                       "--overwrite", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = verify_run(run)
    assert set(manifest["files"]) == {"config.json", "posterior.pt", "metrics.json"}
    assert not (run / "stale.txt").exists()
    assert json.loads((run / "metrics.json").read_text())["architecture"] == "13-50-1"
    assert json.loads((run / "config.json").read_text())["config"]["train"]["epochs"] == 1


def test_cli_prune_writes_its_reports_inside_the_run_and_needs_overwrite(fitted_meanfield, tmp_path):
    run = fitted_meanfield.save(tmp_path / "run")
    out = tmp_path / "reduced"
    args = ["prune", str(run), "--out", str(out), "--num-samples", "5"]
    assert CliRunner().invoke(main, args).exit_code == 0
    manifest = verify_run(out)
    assert {"config.json", "posterior.pt", "metrics.json", "bmr_report.json"} == set(manifest["files"])
    (out / "stale.txt").write_text("old")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "already exists: pass --overwrite" in result.output
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and verify_run(out)


# ---- case 8: evaluate on the data given now, or the recorded name ---------------------------------------
def _metrics(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+): (\S+)$", output, flags=re.MULTILINE))


def _run_recording(fitted_map, tmp_path, data: dict) -> Path:
    moved = copy.deepcopy(fitted_map)
    moved.config = {**moved.config, "data": data}
    return moved.save(tmp_path / "run")


def test_evaluate_falls_back_to_the_dataset_name_when_the_recorded_path_is_gone(fitted_map, tmp_path):
    run = _run_recording(fitted_map, tmp_path, {"name": "boston", "split": 2, "source": "/elsewhere/uci/boston"})
    result = CliRunner().invoke(main, ["evaluate", str(run), "--num-samples", "5"])
    assert result.exit_code == 0, result.output
    data = load_dataset("boston", split=2)
    expected = fitted_map.evaluate(data.x_test, data.y_test, num_samples=5)
    assert "on boston split 2" in result.output
    assert float(_metrics(result.output)["rmse"]) == pytest.approx(expected["rmse"], abs=1e-4)


def test_evaluate_on_data_given_now(fitted_map, tmp_path):
    mine = Path(shutil.copytree(BOSTON_DIR, tmp_path / "my-houses"))
    run = _run_recording(fitted_map, tmp_path, {"name": "nowhere", "split": 0, "source": "relative/dir"})
    result = CliRunner().invoke(main, ["evaluate", str(run), "--data", str(mine), "--split", "3", "--num-samples", "5"])
    assert result.exit_code == 0, result.output
    data = load_dataset(mine, split=3)
    expected = fitted_map.evaluate(data.x_test, data.y_test, num_samples=5)
    assert "split 3" in result.output
    assert float(_metrics(result.output)["rmse"]) == pytest.approx(expected["rmse"], abs=1e-4)
    result = CliRunner().invoke(main, ["evaluate", str(run), "--data", "mnist"])  # data of another shape
    assert result.exit_code == 1 and "does not fit this run" in result.output and "13" in result.output


def test_evaluate_without_usable_data_says_what_it_tried(fitted_map, tmp_path):
    run = _run_recording(fitted_map, tmp_path, {"name": "my-houses", "split": 0, "source": "relative/my-houses"})
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert "relative/my-houses (not found here)" in result.output and "--data" in result.output
    assert len(result.output.strip().splitlines()) == 1
