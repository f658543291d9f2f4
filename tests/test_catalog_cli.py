"""The catalog (names, defaults, overrides) and the ``bnnzoo`` command line."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
from bnnzoo.commands.common import NumSamples

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ["bmr", "bmr-iterative", "em-tdamp", "horseshoe-svi", "map", "meanfield-vi", "spike-slab-sghmc"]


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
    config = entry.configure("regression", (13,), 1, "boston", prior_scale=0.5, epochs=3)
    assert config["model"] == {"prior_scale": 0.5, "noise_scale": 0.5}
    assert config["train"]["epochs"] == 3
    assert config["train"]["lr"] == entry.defaults["regression"]["train"]["lr"]  # left out: the default
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
    assert post.config["seed"] == 4 and "network_spec" not in post.config  # the config is what was asked for
    assert not post.is_fitted


def test_register_refuses_a_duplicate_name():
    entry = get_entry("map")
    with pytest.raises(ValueError, match="exists already"):
        register(CatalogEntry(name="map", summary="", paper="", tasks=("regression",), create=entry.create))


def test_import_bnnzoo_registers_every_builtin_entry_and_the_catalog_imports_no_method():
    assert set(BUILTIN) <= set(list_models())  # registered by `import bnnzoo`: list_models imports nothing
    tree = ast.parse((ROOT / "bnnzoo" / "catalog.py").read_text())
    imported = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imported  # the scan sees the catalog's own (standard library) imports
    for node in imported:  # a plain registry: of bnnzoo only its error types, never the methods that register in it
        assert not (isinstance(node, ast.ImportFrom) and node.level), ast.unparse(node)
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        assert not any(name.split(".")[0] == "bnnzoo" and name != "bnnzoo.models.errors" for name in names), \
            ast.unparse(node)


def test_entry_points_of_other_packages_add_catalog_entries(tmp_path):
    """An installed package's ``bnnzoo.catalog`` entry points: a module that registers entries on
    import, or a CatalogEntry object; one that fails to load is skipped with a warning."""
    (tmp_path / "demo_plugin.py").write_text(textwrap.dedent('''
        from bnnzoo.catalog import CatalogEntry, get_entry, register

        _map = get_entry("map")
        register(CatalogEntry(name="demo-map", summary="MAP under another name", paper="", tasks=("regression",),
                              create=_map.create, defaults=_map.defaults))
        OBJECT = CatalogEntry(name="demo-object", summary="an entry point naming an entry", paper="",
                              tasks=("classification",), create=_map.create, defaults=_map.defaults)
    '''))
    info = tmp_path / "demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bnnzoo.catalog]\nmodule = demo_plugin\nobject = demo_plugin:OBJECT\n"
                                           "broken = demo_plugin_missing\n")
    code = textwrap.dedent('''
        import json, warnings
        import bnnzoo
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = bnnzoo.list_models()
            again = bnnzoo.list_models()
        post = bnnzoo.create("demo-map", "regression", (3,), 1, device="cpu")
        from click.testing import CliRunner
        from bnnzoo.cli import main
        listed = CliRunner().invoke(main, ["list"]).output
        print(json.dumps([names, again == names, bnnzoo.get_entry("demo-object").tasks, post.task,
                          [str(w.message) for w in caught], listed]))
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env=env, cwd=tmp_path)
    names, stable, tasks, task, warned, listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert names == sorted(BUILTIN + ["demo-map", "demo-object"]) and stable
    assert tasks == ["classification"] and task == "regression"
    assert len(warned) == 1 and "'broken'" in warned[0] and "demo_plugin_missing" in warned[0]
    assert "demo-map" in listed and "MAP under another name" in listed  # `bnnzoo list` shows them


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


def test_cli_evaluate_by_moments(cli_run, tmp_path):
    """``--method moments`` scores the run without draws (the posterior's moment predictive); a
    posterior without one is a command-line error naming why."""
    out, _ = cli_run
    posterior = bnnzoo.load(out)
    data = bnnzoo.data.load_uci("boston", split=0)
    expected = posterior.evaluate(data.x_test, data.y_test, method="moments")
    result = CliRunner().invoke(main, ["evaluate", str(out), "--method", "moments"])
    assert result.exit_code == 0, result.output
    printed = _printed_metrics(result.output)
    assert float(printed["log_likelihood"]) == pytest.approx(expected["log_likelihood"], abs=1e-4)
    assert printed["predictive"] == "moments"
    result = CliRunner().invoke(main, ["evaluate", str(out)])  # an uncalibrated regression fit: draws
    assert result.exit_code == 0 and _printed_metrics(result.output)["predictive"] == "sample"
    result = CliRunner().invoke(main, ["evaluate", str(out), "--method", "closed"])
    assert result.exit_code == 2 and "closed" in result.output
    tdamp = tmp_path / "tdamp"
    fit = CliRunner().invoke(main, ["fit", "em-tdamp", "--epochs", "2", "--batch-size", "32", "--set", "validation_fraction=null",
                                    "--out", str(tdamp)])
    assert fit.exit_code == 0, fit.output
    result = CliRunner().invoke(main, ["evaluate", str(tdamp), "--method", "probit"])
    assert result.exit_code == 1 and "--method probit: the moment-propagated predictive" in result.output


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


def test_cli_fit_of_a_pruning_entry_reports_the_noise_refit(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "horseshoe-svi", "--epochs", "3", "--out", str(out), "--quiet",
                                       "--num-samples", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())["fit_state"]["pruning"][-1]["summary"]["noise_refit"]
    line = re.search(r"noise scale refitted on the training data (\S+) -> (\S+) \(training mean z\^2 (\S+)\)",
                     result.output)
    assert line is not None, result.output
    assert float(line.group(2)) == pytest.approx(record["noise_scale_after"], rel=1e-3)
    assert float(line.group(3)) == pytest.approx(record["train_mean_z2"], abs=1e-3)


def test_num_samples_takes_auto_or_a_positive_integer():
    """--num-samples: 'auto' (the default: the Monte Carlo error sets the count) or N >= 1; anything
    else is a usage error naming the option."""
    param = NumSamples()
    assert param.convert("auto", None, None) == "auto"
    assert param.convert("12", None, None) == 12
    for bad in ("0", "-3", "zero", "1.5"):
        result = CliRunner().invoke(main, ["evaluate", "no-such-run", "--num-samples", bad])
        assert result.exit_code == 2 and "--num-samples" in result.output and "'auto' or a positive integer" in result.output
