"""Options checked before any work: one schema per catalog entry (type, range, allowed values),
``--set`` for every option, an untrained model never fitted or saved, and the command-line checks
(``--num-samples``, ``--out``, ``federated --method fedavg --out``) made before the fit starts."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnnzoo
import bnnzoo.cli
from bnnzoo.catalog import (
    TRAINING_OPTIONS,
    CatalogEntry,
    Option,
    UnknownModelError,
    UnknownOptionError,
    get_entry,
    list_models,
    register,
)
from bnnzoo.cli import main
from bnnzoo.commands.common import parse_options
from bnnzoo.errors import BnnzooError, ConfigError

ENTRIES = list_models()
#: the entries of issue case 2: an untrained model was saved as fitted
SVI_ENTRIES = ["map", "meanfield-vi", "bmr", "horseshoe-svi"]


class FitStarted(Exception):
    """Raised by a stand-in for the fit: the command got past its checks."""


@pytest.fixture
def no_fit(monkeypatch):
    """``bnnzoo fit`` with the fit replaced by one that raises :class:`FitStarted`."""
    def fit(*args, **kwargs):
        raise FitStarted
    monkeypatch.setattr(bnnzoo.cli, "fit_model", fit)


@pytest.fixture
def capture_config(monkeypatch):
    """``bnnzoo fit`` with the fit replaced by building the posterior (no training): the
    configuration the command would fit is appended to the returned list, then it stops."""
    configs = []

    def fit(name, dataset, **kwargs):
        schema = get_entry(name).schema(dataset.task)
        options = {k: v for k, v in kwargs.items() if k in schema}
        post = bnnzoo.create(name, dataset.task, dataset.input_shape, dataset.output_dim, device="cpu", **options)
        configs.append(post.config)
        raise FitStarted
    monkeypatch.setattr(bnnzoo.cli, "fit_model", fit)
    return configs


def another_value(option: Option, default):
    """A value other than ``default`` that ``option`` allows and every entry's checks accept."""
    if option.choices is not None:
        return next(c for c in option.choices if c != default)
    if option.type is bool:
        return not default
    if default is None:
        return 16 if option.type is int else 0.5
    if option.type is int:
        return default + 1
    return default / 2


def as_set(key: str, value) -> str:
    """``--set`` text of ``value``: strings bare (read as text), the rest as JSON."""
    return f"{key}={value}" if isinstance(value, str) else f"{key}={json.dumps(value)}"


def config_value(config: dict, key: str):
    return next(config[s][key] for s in ("model", "guide", "train") if key in config[s])


# ---------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_declares_every_option_and_its_defaults_pass(name):
    entry = get_entry(name)
    for task in entry.tasks:
        names = entry.option_names(task)
        assert set(names) <= set(entry.options), f"{name}: undeclared {set(names) - set(entry.options)}"
        defaults = {k: v for s in ("model", "guide", "train") for k, v in entry.defaults[task].get(s, {}).items()}
        assert entry.check_options(task, defaults) == defaults
        config = entry.configure(task, (13,) if task == "regression" else (1, 28, 28), 1 if task == "regression" else 10)
        for check in entry.checks:
            check(config)
        for key in set(names) & {"epochs", "batch_size"}:  # an untrained model must be impossible
            with pytest.raises(ConfigError, match=f"'{key}' must be an integer >= 1(, or null)?, got 0"):
                entry.check_options(task, {key: 0})


def test_option_check_and_describe():
    positive = Option(float, gt=0)
    assert positive.check("lr", 1) == 1.0 and isinstance(positive.check("lr", 1), float)
    for bad in (0, -1e-3, math.nan, math.inf, "abc", True, [1.0]):
        with pytest.raises(ConfigError, match=r"option 'lr' must be a number > 0, got"):
            positive.check("lr", bad)
    count = Option(int, ge=1)
    assert count.check("epochs", 3) == 3 and count.describe() == "an integer >= 1"
    for bad in (2.5, 3.0, "3", True, 0):
        with pytest.raises(ConfigError, match="'epochs' must be an integer >= 1"):
            count.check("epochs", bad)
    fraction = Option(float, gt=0, le=1, nullable=True)
    assert fraction.describe() == "a number in (0, 1], or null" and fraction.check("keep", None) is None
    with pytest.raises(ConfigError, match=r"'keep' must be a number in \(0, 1\], or null, got 1.5"):
        fraction.check("keep", 1.5)
    choice = Option(str, choices=("ss", "plain"))
    assert choice.describe() == "one of 'ss', 'plain'"
    with pytest.raises(ConfigError, match="'rule' must be one of 'ss', 'plain', got 'lasso'"):
        choice.check("rule", "lasso")
    with pytest.raises(ConfigError, match="'noise_scale' cannot be null: it must be a number > 0"):
        positive.check("noise_scale", None)
    with pytest.raises(ConfigError, match="'prune' must be true or false, got 1"):
        Option(bool).check("prune", 1)
    with pytest.raises(TypeError, match="int, float, bool or str"):
        Option(list)


def test_unknown_names_are_config_errors_of_the_expected_builtin_types():
    with pytest.raises(UnknownModelError, match="unknown model 'mapp'") as err:
        get_entry("mapp")
    assert isinstance(err.value, (ConfigError, KeyError)) and str(err.value).startswith("unknown model")
    with pytest.raises(UnknownOptionError, match="no option 'epoch'; did you mean epochs") as err:
        get_entry("map").configure("regression", (13,), 1, epoch=3)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TypeError)
    with pytest.raises(ConfigError, match="supports regression, classification, not ranking"):
        get_entry("map").configure("ranking", (13,), 1)


def test_cross_option_checks_run_before_anything_is_built():
    with pytest.raises(ConfigError, match="'warmup_epochs' must be below 'epochs'"):
        bnnzoo.create("bmr-iterative", "regression", (13,), 1, epochs=3, warmup_epochs=3, device="cpu")
    with pytest.raises(ConfigError, match="'spike_scale' must be below 'slab_scale'"):
        bnnzoo.create("spike-slab-sghmc", "regression", (13,), 1, spike_scale=2.0, device="cpu")
    with pytest.raises(ConfigError, match="3 epochs cannot hold 6 cycles"):
        bnnzoo.create("spike-slab-sghmc", "regression", (13,), 1, epochs=3, device="cpu")
    with pytest.raises(ConfigError, match="'warmup_cycles' must be below 'cycles'"):
        bnnzoo.create("spike-slab-sghmc", "regression", (13,), 1, warmup_cycles=6, device="cpu")
    with pytest.raises(ConfigError, match="do not fit in cycles of 10 epochs"):
        bnnzoo.create("spike-slab-sghmc", "regression", (13,), 1, epochs=60, device="cpu")


def test_register_refuses_defaults_that_fail_the_schema_and_infers_undeclared_options():
    base = get_entry("map")
    bad = CatalogEntry(name="bad-defaults", summary="", paper="", tasks=("regression",), create=base.create,
                       defaults={"regression": {"model": {}, "guide": {}, "train": {"epochs": 0}}})
    with pytest.raises(ValueError, match="defaults of 'bad-defaults' fail its own schema: .*'epochs'"):
        register(bad)
    assert "bad-defaults" not in list_models()
    # an entry without a schema (another package's): the training options' rules, types inferred
    plain = CatalogEntry(name="plain", summary="", paper="", tasks=("regression",), create=base.create,
                         defaults={"regression": {"model": {"width": 2.0, "mode": "a", "flag": True, "extra": None},
                                                  "train": {"epochs": 5, "lr": 0.1, "steps": 4}}})
    schema = plain.schema("regression")
    assert schema["epochs"] == TRAINING_OPTIONS["epochs"] and schema["lr"] == TRAINING_OPTIONS["lr"]
    for key, value in (("epochs", 0), ("lr", -1.0), ("width", "wide"), ("width", -1.0), ("steps", 2.5),
                       ("flag", "yes"), ("mode", 3)):
        with pytest.raises(ConfigError, match=f"plain: option '{key}'"):
            plain.configure("regression", (3,), 1, **{key: value})
    assert plain.configure("regression", (3,), 1, extra=[1, 2], width=3)["model"]["width"] == 3.0


# -------------------------------------------------------------------- case 2: no untrained model
@pytest.mark.parametrize("name", ENTRIES)
def test_api_refuses_an_untrained_fit(name, boston):
    schema = get_entry(name).schema("regression")
    bad = [("epochs", 0), ("epochs", -3), ("batch_size", 0), ("batch_size", -1)]
    bad += [("lr", -1e-3), ("lr", 0.0)] if "lr" in schema else [("lr", 1e-3)]  # em-tdamp has no learning rate
    for key, value in bad:
        with pytest.raises(ConfigError, match=f"'{key}'") as err:
            bnnzoo.fit(name, boston, device="cpu", progress=False, **{key: value})
        assert name in str(err.value)


@pytest.mark.parametrize("name", SVI_ENTRIES)
def test_cli_refuses_an_untrained_fit_before_fitting(name, tmp_path, no_fit):
    for args in (["--epochs", "0"], ["--batch-size", "-4"], ["--lr", "-0.01"], ["--set", "epochs=-1"]):
        result = CliRunner().invoke(main, ["fit", name, "--out", str(tmp_path / "run"), "--quiet", *args])
        assert result.exit_code == 1 and not isinstance(result.exception, FitStarted), result.output
        assert f"{name}: option" in result.output and "must be" in result.output
        assert not (tmp_path / "run").exists()


def test_cli_epochs_zero_saves_nothing(tmp_path):
    result = CliRunner().invoke(main, ["fit", "map", "--epochs", "0", "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and "option 'epochs' must be an integer >= 1, got 0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- case 4: --set everything
def test_cli_set_epochs_lr_batch_size_fits(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "map", "--set", "epochs=1", "--set", "lr=0.01", "--set", "batch_size=64",
                                       "--out", str(out), "--quiet", "--num-samples", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    train = json.loads((out / "config.json").read_text())["config"]["train"]
    assert {key: train[key] for key in ("epochs", "lr", "batch_size")} == {"epochs": 1, "lr": 0.01, "batch_size": 64}
    assert len(bnnzoo.load(out).history.loss) == 1


@pytest.mark.parametrize("name", ENTRIES)
def test_cli_set_reaches_every_option(name, tmp_path, capture_config):
    entry = get_entry(name)
    defaults = {k: v for s in ("model", "guide", "train") for k, v in entry.defaults["regression"][s].items()}
    wanted = {key: another_value(option, defaults[key]) for key, option in entry.schema("regression").items()}
    args = [a for key, value in wanted.items() for a in ("--set", as_set(key, value))]
    result = CliRunner().invoke(main, ["fit", name, "--out", str(tmp_path / "run"), "--quiet", *args])
    assert isinstance(result.exception, FitStarted), result.output
    (config,) = capture_config
    assert {key: config_value(config, key) for key in wanted} == wanted


def test_cli_flags_and_set_must_agree(capture_config, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(main, ["fit", "map", "--epochs", "3", "--set", "epochs=3", *out])
    assert isinstance(result.exception, FitStarted) and capture_config[0]["train"]["epochs"] == 3
    result = CliRunner().invoke(main, ["fit", "map", "--epochs", "3", "--set", "epochs=4", *out])
    assert result.exit_code == 2 and "--epochs 3 and --set epochs=4 disagree" in result.output
    result = CliRunner().invoke(main, ["fit", "map", "--set", "lr=0.1", "--set", "lr=0.2", *out])
    assert result.exit_code == 2 and "lr is given twice" in result.output


@pytest.mark.parametrize("name, setting, message", [
    ("map", "epochs=abc", "option 'epochs' must be an integer >= 1, got 'abc'"),
    ("map", 'epochs="3"', "option 'epochs' must be an integer >= 1, got '3'"),
    ("map", "batch_size=0", "option 'batch_size' must be an integer >= 1, got 0"),
    ("map", "lr=abc", "option 'lr' must be a number > 0, got 'abc'"),
    ("meanfield-vi", "lr=NaN", "option 'lr' must be a number > 0, got nan"),
    ("spike-slab-sghmc", "epochs=2.5", "option 'epochs' must be an integer >= 1, got 2.5"),
    ("spike-slab-sghmc", "cycles=0", "option 'cycles' must be an integer >= 1, got 0"),
    ("map", "noise_scale=null", "option 'noise_scale' cannot be null"),
    ("horseshoe-svi", "prune=1", "option 'prune' must be true or false, got 1"),
    ("bmr", "rule=lasso", "option 'rule' must be one of 'ss', 'plain', 'rhs', got 'lasso'"),
    ("em-tdamp", "keep=2", "option 'keep' must be a number in (0, 1], or null, got 2"),
    ("em-tdamp", "lr=0.1", "em-tdamp has no option 'lr'"),
])
def test_cli_set_refuses_bad_values_with_the_option_named(name, setting, message, tmp_path, no_fit):
    result = CliRunner().invoke(main, ["fit", name, "--set", setting, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 1 and not isinstance(result.exception, FitStarted), result.output
    assert message in result.output and "Traceback" not in result.output


def test_set_null_keeps_its_meaning_where_the_option_allows_it(capture_config, tmp_path):
    result = CliRunner().invoke(main, ["fit", "em-tdamp", "--set", "keep=null", "--out", str(tmp_path / "r"), "--quiet"])
    assert isinstance(result.exception, FitStarted) and capture_config[0]["train"]["keep"] is None


def test_parse_options_reads_json_and_python_literals():
    assert parse_options(("a=3", "b=2.5", "c=true", "d=None", "e=ss", "f=[50, 20]", "g=False", 'h="3"', "i=")) == {
        "a": 3, "b": 2.5, "c": True, "d": None, "e": "ss", "f": [50, 20], "g": False, "h": "3", "i": ""}


# ----------------------------------------------------------------------- case 9: checks come first
def test_cli_num_samples_zero_is_refused_before_the_fit(tmp_path, no_fit):
    result = CliRunner().invoke(main, ["fit", "map", "--num-samples", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--num-samples" in result.output
    assert not isinstance(result.exception, FitStarted)


def test_cli_out_onto_a_file_is_refused_before_the_fit(tmp_path, no_fit):
    (tmp_path / "file").write_text("not a run")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        result = CliRunner().invoke(main, ["fit", "map", "--out", str(out), "--quiet"])
        assert result.exit_code != 0 and not isinstance(result.exception, FitStarted), result.output
        assert "file" in result.output
    assert (tmp_path / "file").read_text() == "not a run"


def test_federated_fedavg_out_is_refused_before_any_round(tmp_path, monkeypatch):
    import bnnzoo.federated.run as federated_run  # imports flwr

    def boom(*args, **kwargs):
        raise FitStarted
    monkeypatch.setattr(federated_run, "run_federated", boom)
    monkeypatch.setattr(federated_run, "FederatedServer", boom)
    result = CliRunner().invoke(main, ["federated", "--method", "fedavg", "--rounds", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--method fedavg returns a plain network: drop --out" in result.output
    assert not isinstance(result.exception, FitStarted)
    result = CliRunner().invoke(main, ["federated", "--rounds", "1", "--set", "keep=7", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "option 'keep' must be a number in (0, 1]" in result.output


# ------------------------------------------------------------------------------- bnnzoo list NAME
def test_cli_list_name_shows_the_options():
    result = CliRunner().invoke(main, ["list", "spike-slab-sghmc"])
    assert result.exit_code == 0, result.output
    assert "epochs" in result.output and "an integer >= 1; default 600 / 20" in result.output
    assert "one of 'absolute', 'fan_in'" in result.output and "a number in [1.0842e-19, 9.22337e+18], or null; default null / null" in result.output
    result = CliRunner().invoke(main, ["list", "em-tdamp", "--task", "regression"])
    assert "keep" in result.output and "a number in (0, 1], or null; default null" in result.output
    result = CliRunner().invoke(main, ["list", "mapp"])
    assert result.exit_code == 1 and "unknown model 'mapp'" in result.output


# ------------------------------------------------------------------------------- property-based
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_configure_gives_a_config_error_or_an_allowed_value(data):
    name = data.draw(st.sampled_from(ENTRIES))
    entry = get_entry(name)
    task = data.draw(st.sampled_from(entry.tasks))
    schema = entry.schema(task)
    key = data.draw(st.sampled_from(sorted(schema) + ["not_an_option"]))
    value = data.draw(JSON_VALUES)
    try:
        config = entry.configure(task, (13,), 1 if task == "regression" else 3, **{key: value})
    except ConfigError as err:
        assert isinstance(err, BnnzooError) and key in str(err)
        return
    option, got = schema[key], config_value(config, key)
    if got is None:
        assert option.nullable
        return
    assert option.check(key, got) == got and type(got) is option.type
    assert option.choices is None or got in option.choices
    if option.type is float:
        assert math.isfinite(got)


@given(value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.lists(st.integers(), max_size=3)))
def test_parse_options_round_trips_json_values(value):
    assert parse_options((f"key={json.dumps(value)}",)) == {"key": value}
