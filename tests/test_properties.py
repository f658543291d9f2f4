"""Property-based tests (hypothesis) of every catalog entry's public surface: ``bnnzoo.create``,
``fit``, ``predict``, ``evaluate``, ``save`` and ``load`` fed generated arrays (shapes, dtypes
float16/32/64, integers and booleans, NaN and inf, magnitudes 1e30 and 1e-30, class labels out of
range, negative or fractional), option values of every type, and damaged saved runs.

The contract checked everywhere: a call either raises a :class:`bnnzoo.errors.BnnzooError` with a
non-empty message, or returns a finite result of the right shape (and a failed fit leaves the
posterior unfitted); no other exception type escapes. Every entry runs tiny: one hidden layer of 4
units, 2 epochs, at most 10 examples.

Profiles: ``quick``, the default (few examples, derandomised: the same examples on every run, a few
seconds per test), and ``thorough`` (many random examples; ``BNNZOO_HYPOTHESIS_PROFILE=thorough``).
Neither has a deadline (the first fit of an entry pays for its imports) or an example database.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

import bnnzoo
from bnnzoo.catalog import get_entry
from bnnzoo.errors import BnnzooError, ConfigError, NotFittedError

_COMMON = {"deadline": None, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}
settings.register_profile("quick", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("BNNZOO_HYPOTHESIS_PROFILE", "quick"))

ENTRIES = [(name, task) for name in bnnzoo.list_models() for task in get_entry(name).tasks]
NETWORK = {"arch": "mlp", "hidden": [4]}
#: per entry, the options that make a fit tiny (2 epochs; spike-slab: 2 one-epoch cycles, one kept)
TINY = {
    "map": {"epochs": 2},
    "meanfield-vi": {"epochs": 2},
    "bmr": {"epochs": 2},
    "bmr-iterative": {"epochs": 2, "warmup_epochs": 1},
    "horseshoe-svi": {"epochs": 2},
    "em-tdamp": {"epochs": 2},
    "spike-slab-sghmc": {"epochs": 2, "cycles": 2, "warmup_cycles": 1, "samples_per_cycle": 1, "thinning": 1,
                         "em_start": 0, "prune_start": 1},
}
#: options whose accepted values set the amount of work or start processes: fuzzed with small or
#: invalid values only, so that an accepted value still gives a tiny fit
SIZE_OPTIONS = {"epochs", "batch_size", "cycles", "warmup_cycles", "samples_per_cycle", "thinning",
                "warmup_epochs", "turbo_iterations", "num_chains", "mp_context"}

SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, -1e-30, 0.0]
FLOAT_DTYPES = [np.float64, np.float32, np.float16]
OTHER_DTYPES = [np.int64, np.int32, np.uint8, np.bool_]


def test_every_catalog_entry_is_covered():
    assert {name for name, _ in ENTRIES} == set(TINY) == set(bnnzoo.list_models())


# ---------------------------------------------------------------- generated data


def _element(dtype, hostile: bool = True) -> st.SearchStrategy:
    """Values of ``dtype``: small ones, and with ``hostile`` also the extremes (the dtype's limits;
    for floats NaN, inf, 1e30, 1e-30)."""
    if dtype is np.bool_:
        return st.booleans()
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        small = st.integers(max(-3, int(info.min)), min(3, int(info.max)))
        return st.one_of(small, st.sampled_from([int(info.min), int(info.max)])) if hostile else small
    return st.one_of(st.floats(-3, 3), st.floats(-3, 3), st.sampled_from(SPECIAL)) if hostile else st.floats(-3, 3)


@st.composite
def arrays(draw, shape: tuple[int, ...]):
    """An array of ``shape``: a NumPy array of a drawn dtype, a torch tensor, or nested lists;
    half of them hold only small values, the others also extremes."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
    size = math.prod(shape)
    values = draw(st.lists(_element(dtype, draw(st.booleans())), min_size=size, max_size=size))
    with np.errstate(all="ignore"):  # 1e30 overflows float16 to inf: a case in its own right
        array = np.array(values, dtype=dtype).reshape(shape)
    form = draw(st.sampled_from(["numpy", "numpy", "torch", "list"]))
    if form == "torch":
        return torch.from_numpy(array)
    return array.tolist() if form == "list" else array


@st.composite
def inputs(draw, features: int | tuple[int, ...], rows: int):
    """Inputs for a network whose examples have shape ``features`` (an int: a feature vector):
    mostly ``(rows, *features)``, sometimes a wrong shape (1-D, one more dimension, another feature
    count, a scalar, ragged lists)."""
    per_row = (features,) if isinstance(features, int) else tuple(features)
    kind = draw(st.sampled_from(["right"] * 6 + ["vector", "extra-dim", "features", "scalar", "ragged"]))
    if kind == "scalar":
        return draw(_element(np.float64))
    if kind == "ragged":
        return [[1.0] * per_row[-1], [1.0] * (per_row[-1] + 1)]
    shape = {"right": (rows, *per_row), "vector": (rows,), "extra-dim": (rows, *per_row, 2),
             "features": (rows, *per_row[:-1], per_row[-1] + 1)}[kind]
    return draw(arrays(shape))


@st.composite
def targets(draw, task: str, classes: int, rows: int):
    """Targets: regression values (``(rows,)``, ``(rows, 1)``, sometimes ``(rows, 2)`` or another
    length); class labels in ``[-1, classes]``, as integers, floats (some fractional) or booleans."""
    length = rows if draw(st.integers(0, 7)) else draw(st.sampled_from([max(rows - 1, 0), rows + 1]))
    if task == "regression":
        shape = draw(st.sampled_from([(length,)] * 4 + [(length, 1), (length, 2)]))
        return draw(arrays(shape))
    kind = draw(st.sampled_from(["int", "int", "int", "float", "bool"]))
    if kind == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    if not draw(st.booleans()):  # half of them: valid labels
        labels = st.integers(0, classes - 1) if kind == "int" else st.sampled_from([0.0, 1.0])
    else:
        labels = st.integers(-1, classes) if kind == "int" else st.sampled_from([0.0, 1.0, 1.5, -1.0, float(classes)])
    values = draw(st.lists(labels, min_size=length, max_size=length))
    return np.array(values, dtype=np.int64 if kind == "int" else np.float64)


# ---------------------------------------------------------------- the contract


def _attempt(call, *args, **kwargs):
    """``call(...)``'s result, or the :class:`BnnzooError` it raised (whose message must say something).
    Any other exception propagates: that is the failure these tests look for."""
    try:
        return call(*args, **kwargs)
    except BnnzooError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return err


def _check_prediction(pred, task: str, rows: int, classes: int) -> None:
    if task == "regression":
        assert pred.mean.shape == (rows,) and pred.std.shape == (rows,)
        assert bool(torch.isfinite(pred.mean).all()) and bool(torch.isfinite(pred.std).all())
        assert bool((pred.std > 0).all())
    else:
        assert pred.probs.shape == (rows, classes)
        assert bool(torch.isfinite(pred.probs).all()) and bool(((pred.probs >= 0) & (pred.probs <= 1)).all())
        assert torch.allclose(pred.probs.sum(-1), torch.ones(rows), atol=1e-4)


def _check_metrics(metrics, task: str) -> None:
    expected = {"rmse", "log_likelihood"} if task == "regression" else {"accuracy", "nll", "ece", "brier"}
    assert set(metrics) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics


def _create(name: str, task: str, features: int | tuple[int, ...], classes: int, network=NETWORK, **options):
    """An unfitted tiny posterior of entry ``name`` for examples of shape ``features`` (an int: a
    feature vector; a tuple: e.g. an image, flattened by the MLP)."""
    shape = (features,) if isinstance(features, int) else tuple(features)
    return bnnzoo.create(name, task, shape, 1 if task == "regression" else classes, network=network,
                         device="cpu", **{**TINY[name], **options})


def _clean_data(task: str, features: int, classes: int, rows: int = 10, seed: int = 0):
    gen = np.random.default_rng(seed)
    x = gen.normal(size=(rows, features))
    y = gen.normal(size=rows) if task == "regression" else np.arange(rows) % classes
    return x, y


@functools.cache
def _fitted(name: str, task: str):
    """One tiny posterior per entry and task, fitted once on clean data (3 features, 3 classes)."""
    torch.manual_seed(0)
    x, y = _clean_data(task, 3, 3)
    return _create(name, task, 3, 3).fit(x, y, progress=False)


def _fit_and_check(posterior, x, y, task: str, classes: int):
    """Fit; on a bnnzoo error the posterior must be left unfitted; else its predictions on ``x``
    must be finite and of the right shape. Returns the fit's outcome."""
    outcome = _attempt(posterior.fit, x, y, progress=False)
    if currently_in_test_context():  # what the generated cases ended in (--hypothesis-show-statistics)
        event(f"fit: {type(outcome).__name__ if isinstance(outcome, BnnzooError) else 'fitted'}")
    if isinstance(outcome, BnnzooError):
        assert not posterior.is_fitted
        with pytest.raises(NotFittedError):
            posterior.predict(x)
        return outcome
    assert outcome is posterior and posterior.is_fitted
    _check_prediction(posterior.predict(x, num_samples=3), task, len(x), classes)
    return outcome


# ---------------------------------------------------------------- fit, predict, evaluate


@pytest.mark.parametrize("entry", ENTRIES, ids="-".join)
@PROFILE
@given(data=st.data())
def test_fit_on_generated_data_fits_or_raises_a_bnnzoo_error(entry, data):
    """Arrays of any dtype, shape, with NaN/inf or extreme values, and labels of any kind: ``fit``
    either refuses them with a bnnzoo error (leaving the posterior unfitted) or gives a posterior
    whose predictions are finite and of the right shape."""
    name, task = entry
    classes = 1 if task == "regression" else data.draw(st.integers(2, 3), label="classes")
    shape = data.draw(st.sampled_from([(1,), (2,), (3,), (3,), (1, 2, 2), (2, 3)]), label="input shape")
    rows = data.draw(st.integers(0, 10), label="rows")
    x = data.draw(inputs(shape, rows), label="x")
    y = data.draw(targets(task, classes, rows), label="y")
    torch.manual_seed(0)
    _fit_and_check(_create(name, task, shape, classes), x, y, task, classes)


@pytest.mark.parametrize("name, task", ENTRIES)
def test_clean_data_fits(name, task):
    """The generated-data property is not vacuous: each entry fits tiny clean data and predicts."""
    posterior = _fitted(name, task)
    assert posterior.is_fitted
    x, y = _clean_data(task, 3, 3, seed=1)
    _check_prediction(posterior.predict(x, num_samples=3), task, 10, 3)
    _check_metrics(posterior.evaluate(x, y, num_samples=3), task)


@pytest.mark.parametrize("name, task", ENTRIES)
@pytest.mark.parametrize("value, dtype, error", [
    (math.nan, np.float64, "NaN"), (math.inf, np.float32, "inf"), (1e30, np.float64, "magnitude"),
    (1e30, np.float16, "inf"), (2**62, np.int64, "magnitude"),
])
def test_bad_values_are_refused_before_the_fit(name, task, value, dtype, error):
    """NaN, inf and magnitudes that overflow float32 arithmetic, in x or in regression targets, are
    a DataError naming x or y before any work; a tiny magnitude (1e-30) is an ordinary value."""
    x, y = _clean_data(task, 3, 3)
    floating = np.issubdtype(dtype, np.floating)
    with np.errstate(all="ignore"):  # 1e30 becomes inf in float16
        bad_x = x.astype(dtype) if floating else np.ones((10, 3), dtype=dtype)
        bad_x[4, 1] = value
    posterior = _create(name, task, 3, 3)
    with pytest.raises(BnnzooError, match=rf"training data: x .*{error}"):
        posterior.fit(bad_x, y, progress=False)
    assert not posterior.is_fitted
    if task == "regression":
        with np.errstate(all="ignore"):
            bad_y = y.astype(dtype) if floating else np.arange(10, dtype=dtype)
            bad_y[2] = value
        with pytest.raises(BnnzooError, match=rf"training data: y .*{error}"):
            posterior.fit(x, bad_y, progress=False)
    tiny = x.copy()
    tiny[:, 2] = 1e-30
    _fit_and_check(_create(name, task, 3, 3), tiny, y, task, 3)


@pytest.mark.parametrize("entry", ENTRIES, ids="-".join)
@PROFILE
@given(data=st.data())
def test_predict_and_evaluate_on_generated_data(entry, data):
    """A fitted posterior's ``predict`` and ``evaluate`` on generated inputs, labels and sample
    counts: a bnnzoo error, or finite predictions / metrics of the right shape."""
    name, task = entry
    posterior = _fitted(name, task)
    rows = data.draw(st.integers(0, 10), label="rows")
    x = data.draw(inputs(3, rows), label="x")
    y = data.draw(targets(task, 3, rows), label="y")
    num_samples = data.draw(st.sampled_from([3, 3, 3, 1, 0, -1, 2.5, "3", None, True]), label="num_samples")
    pred = _attempt(posterior.predict, x, num_samples=num_samples)
    if not isinstance(pred, BnnzooError):
        _check_prediction(pred, task, len(x), 3)
    metrics = _attempt(posterior.evaluate, x, y, num_samples=num_samples)
    if not isinstance(metrics, BnnzooError):
        _check_metrics(metrics, task)


# ---------------------------------------------------------------- options


def _option_values(name: str, option) -> st.SearchStrategy:
    """Values for one option: of every JSON type, NaN/inf/extremes, the option's choices, and (for
    the options that size the work) only small numbers (see ``SIZE_OPTIONS``)."""
    hostile = [None, "x", "2", True, False, [1], {"a": 1}, math.nan, math.inf, -math.inf, -1, 0, -1e-30]
    if name in SIZE_OPTIONS:
        values = hostile + [1, 2, 2.5, 1e30]
        if name == "num_chains":
            values = [v for v in values if v not in (2,)]  # two chains would start worker processes
        if name == "mp_context":
            values = [v for v in values if not isinstance(v, str)] + ["bogus"]
        return st.sampled_from(values)
    numbers = [0.5, 1, 2, 1e-3, 1e30, 1e-30, 0.999, 1.5]
    choices = list(option.choices) if option.choices is not None else []
    return st.sampled_from(hostile + numbers + choices + ["bogus"])


@pytest.mark.parametrize("entry", ENTRIES, ids="-".join)
@settings(PROFILE, max_examples=3 * PROFILE.max_examples)  # most values are refused at once: cheap examples
@given(data=st.data())
def test_options_are_checked_before_any_work(entry, data):
    """Any value of any option: ``create`` refuses it with a ConfigError naming the option, or the
    posterior fits tiny clean data (or raises a bnnzoo error, e.g. a divergence) and predicts finite
    values of the right shape."""
    name, task = entry
    schema = get_entry(name).schema(task)
    option = data.draw(st.sampled_from(sorted(schema)), label="option")
    value = data.draw(_option_values(option, schema[option]), label="value")
    posterior = _attempt(_create, name, task, 3, 3, **{option: value})
    if isinstance(posterior, BnnzooError):
        assert isinstance(posterior, ConfigError), posterior
        assert option in str(posterior), f"the error does not name option {option!r}: {posterior}"
        return
    x, y = _clean_data(task, 3, 3)
    torch.manual_seed(0)
    _fit_and_check(posterior, x, y, task, 3)


_NETWORKS = st.fixed_dictionaries(
    {"arch": st.sampled_from(["mlp", "mlp", "lenet5", "lenet-300-100", "bogus", None, 3])},
    optional={"hidden": st.sampled_from([[4], [3, 2], [], [0], [-1], [2.5], ["4"], "4", None, 4]),
              "activation": st.sampled_from(["relu", "tanh", "bogus", None, 1])})


@settings(PROFILE, max_examples=3 * PROFILE.max_examples)
@given(entry=st.sampled_from(ENTRIES), network=_NETWORKS)
def test_network_specs_are_checked_before_any_work(entry, network):
    """Any network description: ``create`` refuses it with a bnnzoo error, or the posterior fits
    tiny clean data and predicts finite values of the right shape."""
    name, task = entry
    posterior = _attempt(_create, name, task, 3, 3, network=network)
    if isinstance(posterior, BnnzooError):
        return
    x, y = _clean_data(task, 3, 3)
    torch.manual_seed(0)
    _fit_and_check(posterior, x, y, task, 3)


@pytest.mark.parametrize("name", sorted(TINY))
def test_an_unknown_option_is_a_config_error(name):
    task = get_entry(name).tasks[0]
    with pytest.raises(ConfigError, match="no_such_option"):
        _create(name, task, 3, 3, no_such_option=1)


# ---------------------------------------------------------------- save and load


def _damage(run: Path, how: str, where: float, byte: int) -> None:
    """Damage a saved run: truncate or overwrite a byte of one of its files, replace config.json by
    another JSON value, or delete a file. ``where`` in [0, 1) picks the file and the position."""
    files = sorted(p for p in run.rglob("*") if p.is_file())
    target = files[int(where * len(files))]
    if how == "delete":
        target.unlink()
        return
    if how == "json":
        (run / "config.json").write_text(json.dumps([{"format": 2}, None, byte][byte % 3]))
        return
    raw = bytearray(target.read_bytes())
    pos = int(where * len(files) % 1 * len(raw)) if raw else 0
    if how == "truncate":
        target.write_bytes(bytes(raw[:pos]))
    elif raw:
        raw[pos] = byte if raw[pos] != byte else (byte + 1) % 256
        target.write_bytes(bytes(raw))


@pytest.mark.parametrize("entry", ENTRIES, ids="-".join)
@PROFILE
@given(how=st.sampled_from(["none", "truncate", "byte", "json", "delete"]), where=st.floats(0, 1, exclude_max=True),
       byte=st.integers(0, 255))
def test_save_then_load_predicts_the_same_or_raises_a_bnnzoo_error(entry, how, where, byte):
    """A saved run loads and predicts exactly as the posterior it was saved from; a run with a
    damaged, replaced or missing file raises a bnnzoo error naming the run, never loads into a
    posterior that predicts something else."""
    posterior = _fitted(*entry)
    x, _ = _clean_data(entry[1], 3, 3, seed=2)
    expected = posterior.predict(x, num_samples=3)
    directory = Path(tempfile.mkdtemp(prefix="bnnzoo-properties-"))
    try:
        run = directory / "run"
        posterior.save(run)
        if how != "none":
            _damage(run, how, where, byte)
        loaded = _attempt(bnnzoo.load, run)
        if isinstance(loaded, BnnzooError):
            assert how != "none", f"an intact run did not load: {loaded}"
            assert str(run) in str(loaded), f"the error does not name the run: {loaded}"
            return
        got = loaded.predict(x, num_samples=3)
        assert torch.equal(got.mean, expected.mean), f"the run loaded after '{how}' and predicts differently"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("name, task", ENTRIES)
def test_saving_onto_a_file_or_an_unfitted_posterior_is_a_bnnzoo_error(name, task, tmp_path):
    (tmp_path / "file").write_text("not a run")
    with pytest.raises(BnnzooError):
        _fitted(name, task).save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a run"
    with pytest.raises(BnnzooError):
        _create(name, task, 3, 3).save(tmp_path / "unfitted")
    assert not (tmp_path / "unfitted").exists()


# ---------------------------------------------------------------- divergence and overflow (case by case)


@pytest.fixture(scope="module")
def boston_small():
    """60 training rows of the bundled Boston split 0."""
    return bnnzoo.data.load_dataset(None).subset(60, 20, seed=0)


_SGHMC_SHORT = {"epochs": 6, "cycles": 2, "samples_per_cycle": 2, "thinning": 1, "prune_start": 2}


@pytest.mark.parametrize("name, options", [
    ("spike-slab-sghmc", {"spike_scale": 1e-30}),
    ("spike-slab-sghmc", {"slab_scale": 1e30}),
    ("spike-slab-sghmc", {"scaling": "fan_in", "spike_scale": 2e-19}),  # 2e-19 / sqrt(13) is below float32's range
    ("map", {"noise_scale": 1e-30}),
    ("map", {"prior_scale": 1e-30}),
    ("bmr", {"prior_scale": 1e30}),
    ("meanfield-vi", {"noise_scale": 1e-30}),
])
def test_a_scale_float32_cannot_square_or_invert_is_a_config_error(name, options):
    """A prior or noise scale whose variance or precision over- or underflows float32 is refused
    when the posterior is created, naming the option (it used to diverge or go NaN later)."""
    option = next(k for k in options if k.endswith("_scale") and options[k] != "fan_in")
    with pytest.raises(ConfigError, match=rf"option '{option}.*float32"):
        _create(name, "regression", 13, 1, **options)


def test_spike_slab_with_a_huge_step_size_stops_with_a_divergence_error(boston_small):
    """lr=1e3 used to save a run with an RMSE of 1e12 (the learned noise scale followed the residuals,
    so the loss never looked like it exploded); now the first epoch stops the fit, naming the method,
    the epoch, the step and the step size, and the posterior stays unfitted. The default step size
    still fits."""
    for lr in (1e3, 10.0):
        posterior = _create("spike-slab-sghmc", "regression", 13, 1, **{**_SGHMC_SHORT, "lr": lr})
        with pytest.raises(bnnzoo.errors.DivergenceError, match=r"spike-slab-sghmc: the fit diverged in epoch 1 "
                           r"\(the residuals' root mean square is .* times the targets' at step \d+ "
                           rf"\(base step size {lr:g}\).*step size \(lr\)"):
            posterior.fit(boston_small.x_train, boston_small.y_train, progress=False)
        assert not posterior.is_fitted
    ok = _create("spike-slab-sghmc", "regression", 13, 1, **_SGHMC_SHORT).fit(
        boston_small.x_train, boston_small.y_train, progress=False)
    assert ok.evaluate(boston_small.x_test, boston_small.y_test)["rmse"] < 3 * float(boston_small.y_test.std())


def test_spike_slab_classification_with_a_huge_step_size_stops_with_a_divergence_error():
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=(40, 3)), np.arange(40) % 3
    posterior = _create("spike-slab-sghmc", "classification", 3, 3, lr=1e4, **{
        k: v for k, v in _SGHMC_SHORT.items() if k != "prune_start"})
    with pytest.raises(bnnzoo.errors.DivergenceError, match="negative log-likelihood .* uniform guess"):
        posterior.fit(x, y, progress=False)


@pytest.mark.parametrize("name", ["map", "meanfield-vi", "bmr", "horseshoe-svi"])
def test_svi_entries_with_a_huge_learning_rate_name_the_epoch(name, boston_small):
    """A learning rate of 1e3: a DivergenceError naming the entry and the epoch, never a Pyro
    ValueError dumping a NaN tensor (map's point-mass weights became NaN after one step)."""
    posterior = _create(name, "regression", 13, 1, lr=1e3, epochs=3)
    with pytest.raises(bnnzoo.errors.DivergenceError, match=rf"{name}: the fit diverged in epoch \d+ ") as err:
        posterior.fit(boston_small.x_train, boston_small.y_train, progress=False)
    assert "tensor(" not in str(err.value) and not posterior.is_fitted


def test_targets_past_float32_are_a_data_error_naming_the_file(tmp_path):
    """A target of 1e39 (finite in the file's float64, inf in float32) used to reach the fit as inf;
    now reading the data names the file, line and column, and arrays name y."""
    data = tmp_path / "boston"
    shutil.copytree(Path(bnnzoo.data.load_dataset(None).source), data)
    lines = (data / "data.txt").read_text().splitlines()
    row = lines[4].split()
    row[-1] = "1e39"
    lines[4] = " ".join(row)
    (data / "data.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(bnnzoo.errors.DataError, match=r"data.txt line 5, column 14: value '1e39' exceeds"):
        bnnzoo.data.load_dataset(str(data), split=0)
    x, y = _clean_data("regression", 3, 1)
    y[3] = 1e39
    with pytest.raises(bnnzoo.errors.DataError, match=r"training data: y holds values of magnitude above 1e\+15"):
        _create("spike-slab-sghmc", "regression", 3, 1).fit(x, y, progress=False)


# ---------------------------------------------------------------- validate_arrays: the cases the properties found


@pytest.mark.parametrize("x, y, task, pattern", [
    (np.ones((3, 2)), np.array([0, 1, 1e30]), "classification", r"out of range \[0, 2\) \(first: row 2 = 1e\+30"),
    (np.array(5.0), np.ones(1), "regression", r"x must have shape \(N, features...\).*got shape \(\)"),
    (np.ones((3, 0)), np.ones(3), "regression", r"x has no features"),
    (torch.ones(3, 2, dtype=torch.complex64), np.ones(3), "regression", "complex values are not supported"),
    (np.array([[1.0, 2.0], [3.0, -1e20]]), np.ones(2), "regression",
     r"x holds values of magnitude above 1e\+15 .*row 1, column 1 = -1e\+20.*rescale x"),
    (np.ones((2, 2)), np.array([1.0, 2e15]), "regression", r"y holds values of magnitude above 1e\+15 in 1 of 2 rows"),
])
def test_validate_arrays_refuses_with_a_data_error(x, y, task, pattern):
    with pytest.raises(bnnzoo.errors.DataError, match=pattern):
        bnnzoo.data.validate_arrays(x, y, task, num_classes=2 if task == "classification" else None)


def test_validate_arrays_reads_every_real_dtype_and_byte_order():
    """Big-endian arrays, wide unsigned integers, float16 and booleans are read (torch alone refuses
    the first two); a value of 1e-30 is kept as it is."""
    x, y = bnnzoo.data.validate_arrays(np.array([[1.0, 1e-30], [2.0, 0.0]], dtype=">f8"),
                                       np.array([1, 0], dtype=np.uint32), "classification", 2)
    assert x.dtype == torch.float32 and x[0, 1].item() == pytest.approx(1e-30) and y.tolist() == [1, 0]
    x, y = bnnzoo.data.validate_arrays(np.ones((2, 1), dtype=np.float16), np.array([True, False]), "regression")
    assert x.dtype == torch.float32 and y.tolist() == [1.0, 0.0]
    x, y = bnnzoo.data.validate_arrays(torch.ones(2, 3, dtype=torch.uint8), torch.tensor([2, 1], dtype=torch.uint32),
                                       "classification", 3)
    assert y.dtype == torch.int64 and y.tolist() == [2, 1]
    x, none = bnnzoo.data.validate_arrays([[1, 2]], None, "regression")
    assert x.shape == (1, 2) and none is None
