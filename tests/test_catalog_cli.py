"""The catalog (names, defaults, overrides) and the ``bnnzoo`` command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

import bnnzoo
from bnnzoo.catalog import (
    CatalogEntry,
    default_network,
    get_entry,
    list_models,
    register,
)
from bnnzoo.cli import main


# --------------------------------------------------------------------------------------- catalog
def test_list_models_and_entries():
    names = list_models()
    assert {"map", "meanfield-vi"} <= set(names)
    assert names == sorted(names)
    assert "meanfield-vi" in list_models("classification")
    entry = get_entry("meanfield-vi")
    assert entry.tasks == ("regression", "classification")
    assert entry.paper and entry.summary


def test_configure_merges_defaults_and_overrides():
    entry = get_entry("meanfield-vi")
    config = entry.configure("regression", (13,), 1, "boston", prior_scale=0.5, epochs=3, lr=None)
    assert config["model"] == {"prior_scale": 0.5, "noise_scale": 0.5}
    assert config["train"]["epochs"] == 3
    assert config["train"]["lr"] == entry.defaults["regression"]["train"]["lr"]  # None leaves the default
    assert config["network"] == {"arch": "mlp", "hidden": [50]}
    assert (config["task"], config["input_shape"], config["output_dim"]) == ("regression", [13], 1)
    # the entry's defaults are not modified by a configuration
    assert entry.defaults["regression"]["model"]["prior_scale"] == 1.0
    cls = entry.configure("classification", (1, 28, 28), 10, "mnist", network={"arch": "lenet5"})
    assert cls["network"] == {"arch": "lenet5"}
    assert entry.configure("classification", (1, 28, 28), 10, "mnist")["network"] == {"arch": "lenet-300-100"}
    assert default_network("unknown", "classification", (1, 8, 8)) == {"arch": "lenet-300-100"}
    assert default_network("unknown", "regression", (4,)) == {"arch": "mlp", "hidden": [50]}
    with pytest.raises(TypeError, match=r"no option 'batchsize'; did you mean batch_size\?"):
        entry.configure("regression", (13,), 1, batchsize=10)


def test_create_builds_the_configured_network():
    post = bnnzoo.create("map", "classification", (1, 8, 8), 3, network={"arch": "mlp", "hidden": [7]},
                         device="cpu", seed=4)
    assert post.net.sites()["fc1.weight"] == (7, 64)
    assert post.config["seed"] == 4 and post.config["network_spec"] == post.net.spec()
    assert not post.is_fitted


def test_register_refuses_a_duplicate_name():
    entry = get_entry("map")
    with pytest.raises(ValueError, match="exists already"):
        register(CatalogEntry(name="map", summary="", paper="", tasks=("regression",), create=entry.create))


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `bnnzoo fit` run on the bundled default data, shared by the CLI tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = CliRunner().invoke(main, ["fit", "meanfield-vi", "--epochs", "2", "--out", str(out), "--quiet",
                                       "--num-samples", "5", "--set", "prior_scale=0.5", "--device", "cpu"])
    return out, result


def _printed_metrics(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+): (\S+)$", text, flags=re.M))


def test_cli_list():
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "map" in lines and "meanfield-vi" in lines
    assert "regression/classification" in lines["meanfield-vi"]
    result = CliRunner().invoke(main, ["list", "--task", "classification"])
    assert result.exit_code == 0 and "meanfield-vi" in result.output


def test_cli_fit_writes_a_run(cli_run):
    out, result = cli_run
    assert result.exit_code == 0, result.output
    assert {"posterior.pt", "config.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "metrics.json").read_text())
    assert {"rmse", "log_likelihood", "weights_pruned_fraction", "architecture", "fit_seconds"} <= set(saved)
    assert saved["architecture"] == "13-50-1"
    printed = _printed_metrics(result.output)
    assert float(printed["rmse"]) == pytest.approx(saved["rmse"], abs=1e-4)
    assert float(printed["log_likelihood"]) == pytest.approx(saved["log_likelihood"], abs=1e-4)
    assert f"saved to {out}" in result.output


def test_cli_set_reaches_the_config(cli_run):
    out, _ = cli_run
    meta = json.loads((out / "config.json").read_text())
    assert meta["name"] == "meanfield-vi"
    assert meta["config"]["model"]["prior_scale"] == 0.5
    assert meta["config"]["train"]["epochs"] == 2
    assert meta["config"]["data"]["name"] == "boston" and meta["config"]["data"]["split"] == 0
    assert bnnzoo.load(out).model.prior.scale == 0.5


def test_cli_evaluate_reproduces_the_metrics(cli_run):
    out, fit_result = cli_run
    result = CliRunner().invoke(main, ["evaluate", str(out), "--num-samples", "5"])
    assert result.exit_code == 0, result.output
    again = _printed_metrics(result.output)
    before = _printed_metrics(fit_result.output)
    for key in ("rmse", "log_likelihood", "weights_pruned_fraction", "hidden_groups_pruned_fraction", "architecture"):
        assert again[key] == before[key]
    saved = json.loads((out / "metrics.json").read_text())
    assert float(again["rmse"]) == pytest.approx(saved["rmse"], abs=1e-4)


def test_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["fit", "meanfeild-vi", "--epochs", "1", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0
    assert "unknown model 'meanfeild-vi'" in result.output and "Did you mean 'meanfield-vi'" in result.output
    result = runner.invoke(main, ["fit", "map", "--epochs", "1", "--set", "prior_scael=2", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "prior_scael" in result.output and "prior_scale" in result.output
    result = runner.invoke(main, ["fit", "map", "--set", "noequals"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(main, ["fit", "map", "--data", "bostn", "--epochs", "1"])
    assert result.exit_code == 1 and "unknown data set 'bostn'" in result.output
    assert not isinstance(result.exception, ValueError)  # a clean message, not a traceback
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["evaluate", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "is not a saved bnnzoo posterior" in result.output
    assert not isinstance(result.exception, FileNotFoundError)


@pytest.mark.skipif(shutil.which("bnnzoo") is None, reason="the bnnzoo console script is not installed")
def test_console_script_lists_the_catalog():
    proc = subprocess.run(["bnnzoo", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "meanfield-vi" in proc.stdout and "map" in proc.stdout
