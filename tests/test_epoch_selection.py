"""The number of epochs chosen on a validation part of the training data (Posterior.select_epochs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro.util
import pytest
import torch

import bnnzoo
from benchmarks.bench_baselines import MAP_PRIOR_CANDIDATES
from benchmarks.bench_horseshoe_defaults import LR_CANDIDATES
from benchmarks.select_defaults import choice_within_tolerance
from bnnzoo.catalog import get_entry
from bnnzoo.errors import ConfigError, DataError


def _params(posterior) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in posterior.guide.state_dict().items()}


def test_final_fit_equals_a_fit_of_the_chosen_epochs(boston):
    """Selection leaves the posterior unfitted and the random state untouched: the fit that follows
    is the fit a user would get by asking for the chosen number of epochs directly."""
    selected = bnnzoo.fit("map", boston, epochs=30, validation_fraction=0.25, select_folds=None, patience=5,
                          progress=False, seed=3)
    chosen = selected.fit_state.epoch_selection
    assert chosen is not None and 1 <= chosen["epochs"] <= 30
    assert len(selected.history.loss) == chosen["epochs"] == selected.fit_epochs
    scores = chosen["validation_log_likelihood"]
    assert chosen["epochs"] == max(range(len(scores)), key=scores.__getitem__) + 1
    assert chosen["validation_rows"] == round(0.25 * boston.n_train)
    direct = bnnzoo.fit("map", boston, epochs=chosen["epochs"], validation_fraction=None, progress=False, seed=3)
    assert direct.fit_state.epoch_selection is None
    a, b = _params(selected), _params(direct)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_patience_stops_the_selection_fit(boston):
    """A learning rate that overfits fast: the validation score peaks early and the selection fit
    stops ``patience`` epochs after its best one instead of running all epochs."""
    post = bnnzoo.fit("map", boston, epochs=200, lr=3e-2, validation_fraction=0.25, select_folds=None, patience=4,
                      progress=False, seed=0)
    chosen = post.fit_state.epoch_selection
    run = len(chosen["validation_log_likelihood"])
    assert run < 200
    assert run == chosen["epochs"] + 4
    assert max(chosen["validation_log_likelihood"][-4:]) <= max(chosen["validation_log_likelihood"])


@pytest.mark.parametrize("name", ["map", "meanfield-vi"])
def test_selection_scores_the_held_out_rows(boston, name):
    """Each recorded score is the held-out rows' mean log predictive density of the copy after that
    epoch: re-derived here from a copy fitted on the same rows for 7 epochs. A point estimate's
    density takes the noise at its held-out maximum likelihood (the held-out mean squared error);
    a posterior's is its own predictive (20 draws, seed 0)."""
    post = bnnzoo.create(name, "regression", boston.input_shape, boston.output_dim, dataset=boston.name, seed=1,
                         epochs=12, validation_fraction=0.2, select_folds=None, patience=50)
    rng = pyro.util.get_rng_state()
    chosen = post.select_epochs(boston.x_train, boston.y_train)
    assert not post.is_fitted
    assert len(chosen["validation_log_likelihood"]) == 12
    n_val = chosen["validation_rows"]
    order = torch.randperm(boston.n_train, generator=torch.Generator().manual_seed(0))
    fit_rows, val_rows = order[n_val:], order[:n_val]
    pyro.util.set_rng_state(rng)
    copy = bnnzoo.create(name, "regression", boston.input_shape, boston.output_dim, dataset=boston.name, seed=1,
                         epochs=7, validation_fraction=None)
    pyro.util.set_rng_state(rng)
    copy.fit(boston.x_train[fit_rows], boston.y_train[fit_rows], progress=False)
    x_val, y_val = boston.x_train[val_rows], boston.y_train[val_rows]
    if name == "map":
        mse = float((copy.predict(x_val, num_samples=1).mean - y_val).pow(2).mean())
        expected = -0.5 * math.log(2 * math.pi * math.e * mse)
        assert "noise_scale" in chosen
    else:
        expected = float(copy.log_likelihood(x_val, y_val, num_samples=20, seed=0).mean())
        assert "noise_scale" not in chosen
    assert chosen["validation_log_likelihood"][6] == pytest.approx(expected, abs=1e-5)


def test_a_point_estimate_predicts_with_the_noise_of_its_held_out_residuals(boston):
    """MAP's own noise follows its training residuals down; after the selection the fit on all rows
    predicts with the held-out residuals' scale at the chosen epoch, recorded with the choice."""
    post = bnnzoo.fit("map", boston, epochs=40, validation_fraction=0.2, select_folds=None, patience=10,
                      progress=False, seed=0)
    chosen = post.fit_state.epoch_selection
    assert post.noise_scale(original_units=True) == pytest.approx(chosen["noise_scale"], rel=1e-5)
    best = chosen["epochs"] - 1
    assert chosen["validation_log_likelihood"][best] == pytest.approx(
        -0.5 * math.log(2 * math.pi * math.e * chosen["noise_scale"] ** 2), abs=1e-6)
    own = bnnzoo.fit("map", boston, epochs=chosen["epochs"], validation_fraction=None, progress=False, seed=0)
    assert own.noise_scale(original_units=True) < chosen["noise_scale"]  # the training residuals' is smaller
    pred, own_pred = post.predict(boston.x_test), own.predict(boston.x_test)
    torch.testing.assert_close(pred.mean, own_pred.mean)  # the same weights, another noise


def test_a_fit_continued_by_a_continuation_equals_the_uninterrupted_fit(boston):
    """Continuation keeps the last epoch's state in memory: a fit of 4 epochs continued to 10 is the
    fit of 10 epochs bit for bit, whatever the random state between the two calls."""
    from bnnzoo.checkpoint import Continuation

    def make():
        return bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, dataset=boston.name, seed=1,
                             epochs=10, validation_fraction=None)

    rng = pyro.util.get_rng_state()
    whole = make()
    whole.fit(boston.x_train, boston.y_train, progress=False)
    pyro.util.set_rng_state(rng)
    staged = make()
    staged.checkpoint = Continuation(staged)
    with pytest.raises(bnnzoo.errors.RunError, match="no completed epoch"):
        staged.checkpoint.arm()
    staged.config["train"]["epochs"] = 4
    staged.fit(boston.x_train, boston.y_train, progress=False)
    torch.randn(7)  # moves the global random state: the continuation puts the fit's own back
    staged.config["train"]["epochs"] = 10
    staged.checkpoint.arm()
    staged.fit(boston.x_train, boston.y_train, progress=False)
    assert staged.history.loss == whole.history.loss
    a, b = _params(whole), _params(staged)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["map", "meanfield-vi"])
def test_folds_in_step_choose_the_epoch_of_the_pooled_score(boston, name):
    """select_folds: each recorded score is the pooled held-out score of the folds' copies after that
    epoch, each row held out once: re-derived here from copies fitted directly on each fold's other
    rows for 5 epochs. The folds advance ``patience`` epochs at a time and stop once the best epoch
    lies ``patience`` epochs back; a point estimate's noise is the pooled residuals' scale."""
    post = bnnzoo.create(name, "regression", boston.input_shape, boston.output_dim, dataset=boston.name, seed=1,
                         epochs=60, lr=3e-2, validation_fraction=0.2, select_folds=3, patience=4)
    rng = pyro.util.get_rng_state()
    chosen = post.select_epochs(boston.x_train, boston.y_train)
    assert not post.is_fitted and chosen["folds"] == 3 and chosen["validation_rows"] == boston.n_train
    default = bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim)
    assert default.config["train"]["select_folds"] == 5
    scores = chosen["validation_log_likelihood"]
    run = chosen["fold_epochs_run"]
    assert len(scores) == run and (run % 4 == 0 or run == 60)
    best = max(range(run), key=scores.__getitem__)
    assert chosen["epochs"] == best + 1
    assert run == 60 or (run - 1 - best >= 4 and run - 4 - 1 - best < 4)  # stopped at the first check it could
    order = torch.randperm(boston.n_train, generator=torch.Generator().manual_seed(0))
    total = 0.0
    for k, held in enumerate(order.tensor_split(3)):
        rest = torch.cat([p for j, p in enumerate(order.tensor_split(3)) if j != k])
        pyro.util.set_rng_state(rng)
        fold = bnnzoo.create(name, "regression", boston.input_shape, boston.output_dim, dataset=boston.name, seed=1,
                             epochs=5, lr=3e-2, validation_fraction=None)
        pyro.util.set_rng_state(rng)
        fold.fit(boston.x_train[rest], boston.y_train[rest], progress=False)
        x_held, y_held = boston.x_train[held], boston.y_train[held]
        if name == "map":
            total += float((fold.predict(x_held, num_samples=1).mean - y_held).pow(2).sum())
        else:
            total += float(fold.log_likelihood(x_held, y_held, num_samples=20, seed=0).sum())
    pooled = total / boston.n_train
    if name == "map":
        assert scores[4] == pytest.approx(-0.5 * math.log(2 * math.pi * math.e * pooled), abs=1e-5)
        mse_best = math.exp(-2 * scores[best] - math.log(2 * math.pi * math.e))
        assert chosen["noise_scale"] == pytest.approx(math.sqrt(mse_best), rel=1e-5)
    else:
        assert scores[4] == pytest.approx(pooled, abs=1e-5)
        assert "noise_scale" not in chosen


def test_folds_show_one_progress_bar(boston, capsys):
    """With progress on, the folds' selection reports on one bar of the pooled curve's epochs, not one
    bar per fold and stage."""
    post = bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, dataset=boston.name,
                         epochs=8, validation_fraction=0.2, select_folds=3, patience=4)
    post.select_epochs(boston.x_train, boston.y_train, progress=True)
    err = capsys.readouterr().err
    assert "map: epochs on 3 folds" in err and "best_epoch=" in err
    assert err.replace("map: epochs on 3 folds", "").count("map:") == 0


def test_folds_give_way_to_one_part_on_large_data(boston, monkeypatch):
    """Where the held-out part would have FOLDS_BELOW_VALIDATION_ROWS rows or more, one part
    chooses (the folds' record is absent) even with select_folds set."""
    from bnnzoo.posterior import Posterior

    monkeypatch.setattr(Posterior, "FOLDS_BELOW_VALIDATION_ROWS", round(0.2 * boston.n_train))
    post = bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, dataset=boston.name,
                         epochs=6, validation_fraction=0.2, select_folds=3)
    chosen = post.select_epochs(boston.x_train, boston.y_train)
    assert "folds" not in chosen and chosen["validation_rows"] == round(0.2 * boston.n_train)
    monkeypatch.setattr(Posterior, "FOLDS_BELOW_VALIDATION_ROWS", round(0.2 * boston.n_train) + 1)
    assert post.select_epochs(boston.x_train, boston.y_train)["folds"] == 3


def test_a_fit_that_cannot_continue_chooses_on_one_part(boston):
    """Folds continue each copy's fit in stages, which needs its state: a Pyro autoguide's fit (no
    state_dict, no checkpoints) chooses its epochs on the one held-out part instead."""
    from pyro.infer.autoguide import AutoDelta

    post = bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, dataset=boston.name,
                         epochs=6, validation_fraction=0.2, select_folds=3, guide=AutoDelta)
    assert not post.supports_checkpoints
    chosen = post.select_epochs(boston.x_train, boston.y_train)
    assert "folds" not in chosen and chosen["validation_rows"] == round(0.2 * boston.n_train)


def test_em_tdamp_passes_are_chosen_too(boston):
    post = bnnzoo.fit("em-tdamp", boston, epochs=6, validation_fraction=0.2, patience=2, progress=False, seed=0)
    chosen = post.fit_state.epoch_selection
    assert 1 <= chosen["epochs"] <= 6
    assert len(post.history.loss) == chosen["epochs"]


def test_selection_round_trips_through_a_saved_run(boston, tmp_path):
    post = bnnzoo.fit("map", boston, epochs=5, validation_fraction=0.2, progress=False, seed=0)
    post.save(tmp_path / "run")
    loaded = bnnzoo.load(tmp_path / "run")
    assert loaded.fit_state.epoch_selection == post.fit_state.epoch_selection
    assert loaded.fit_epochs == post.fit_epochs


def test_bad_selection_options_are_named(boston):
    with pytest.raises(ConfigError, match="validation_fraction"):
        bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, validation_fraction=1.5)
    with pytest.raises(ConfigError, match="patience"):
        bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, patience=0)
    with pytest.raises(ConfigError, match="select_folds"):
        bnnzoo.create("map", "regression", boston.input_shape, boston.output_dim, select_folds=1)
    tiny = boston.subset(3, None, seed=0)
    with pytest.raises(DataError, match="validation_fraction"):
        bnnzoo.fit("map", tiny, epochs=2, validation_fraction=0.1, progress=False)


def test_batch_size_null_is_chosen_with_the_passes(boston):
    """em-tdamp's regression default: the batch size is chosen on validation data among the
    candidates, and the final fit is the fit of the chosen size and passes."""
    post = bnnzoo.fit("em-tdamp", boston, epochs=4, patience=2, progress=False, seed=0)
    chosen = post.fit_state.epoch_selection
    assert [c["batch_size"] for c in chosen["candidates"]] == [32, 8]
    best = max(chosen["candidates"], key=lambda c: c["score"])
    assert chosen["batch_size"] == best["batch_size"] == post.fit_batch_size
    assert chosen["epochs"] == best["epochs"] == len(post.history.loss)
    direct = bnnzoo.fit("em-tdamp", boston, epochs=chosen["epochs"], batch_size=chosen["batch_size"],
                        validation_fraction=None, progress=False, seed=0)
    a, b = _params(post), _params(direct)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="batch_size"):
        bnnzoo.create("em-tdamp", "regression", (13,), 1, validation_fraction=None)


def test_small_batches_are_not_tried_where_a_pass_has_many_updates(boston, monkeypatch):
    """A candidate size that would cut a pass into more than MAX_SELECTED_BATCHES_PER_PASS
    minibatches is skipped; the largest candidate is always tried."""
    from bnnzoo.posterior import Posterior

    n_fit = boston.n_train - round(0.2 * boston.n_train)
    monkeypatch.setattr(Posterior, "MAX_SELECTED_BATCHES_PER_PASS", n_fit // 8 - 1)  # 8 just too small
    post = bnnzoo.fit("em-tdamp", boston, epochs=2, patience=1, progress=False, seed=0)
    chosen = post.fit_state.epoch_selection
    assert "candidates" not in chosen and chosen["batch_size"] == 32
    monkeypatch.setattr(Posterior, "MAX_SELECTED_BATCHES_PER_PASS", -(-n_fit // 8))  # 8 just allowed
    post = bnnzoo.fit("em-tdamp", boston, epochs=2, patience=1, progress=False, seed=0)
    assert [c["batch_size"] for c in post.fit_state.epoch_selection["candidates"]] == [32, 8]


def committed_choice(result_file: str) -> dict:
    """The options of the candidate that a committed selection run chose, after checking that it is
    the one with the highest mean validation log-likelihood."""
    result = json.loads((Path(__file__).parents[1] / "benchmarks/results" / result_file).read_text())
    scores = result["mean_validation_log_likelihood"]
    assert result["chosen"] == max(scores, key=scores.get)
    return result["candidates"][result["chosen"]]


def committed_teacher_rule(scores_file: str, teachers_file: str) -> str:
    """The candidate that the dense-teacher rule (:func:`choice_within_tolerance`) takes from a
    committed selection run and its committed teacher check, after checking that both compared the
    same candidates, that the check covers the all-relevant targets and that its verdicts follow
    from its ratios."""
    results = Path(__file__).parents[1] / "benchmarks/results"
    scores = json.loads((results / scores_file).read_text())
    teachers = json.loads((results / teachers_file).read_text())
    assert set(teachers["candidates"]) == set(scores["candidates"])
    assert {r["set"] for r in teachers["rows"]} >= {"teacher-8", "teacher-16", "low-noise-16"}
    for c, ratio in teachers["worst_mse_ratio"].items():
        assert teachers["within_tolerance"][c] == (ratio <= teachers["mse_tolerance"])
    return choice_within_tolerance(scores["mean_validation_log_likelihood"], teachers)


def test_map_regression_defaults_are_the_committed_validation_choice():
    """map's regression step size and epoch cap are the candidate that the committed ``map-select``
    run chose on validation data (benchmarks/results/map-select.json): changing one without
    re-running the other fails here."""
    chosen = committed_choice("map-select.json")
    train = get_entry("map").defaults["regression"]["train"]
    assert {k: train[k] for k in chosen} == chosen
    assert train["validation_fraction"] and train["select_epochs"]


def test_map_regression_prior_is_the_committed_validation_choice():
    """map's regression prior (scale and per-layer scaling) is the candidate that the committed
    ``map-select-prior`` run chose on validation data, and the one the dense-teacher rule takes from
    it and ``map-select-prior-teachers`` (the highest mean validation log-likelihood among the
    candidates within 20% of meanfield-vi's validation MSE on every all-relevant target); under it a
    neuron's pre-activation has the same prior scale whatever its fan-in."""
    chosen = committed_choice("map-select-prior.json")
    rule = committed_teacher_rule("map-select-prior.json", "map-select-prior-teachers.json")
    assert MAP_PRIOR_CANDIDATES[rule] == chosen
    model = get_entry("map").defaults["regression"]["model"]
    assert {k: model[k] for k in chosen} == chosen
    spreads = [bnnzoo.create("map", "regression", (d,), 1).model.prior.site_scale("fc1.weight") * d**0.5
               for d in (4, 16, 64)]
    assert spreads == pytest.approx([chosen["prior_scale"]] * 3)


def test_horseshoe_regression_step_size_is_the_committed_validation_choice():
    """horseshoe-svi's regression learning rate and its schedule are the candidate that the rule of
    ``horseshoe-select-lr-teachers`` takes from the committed runs: the highest mean validation
    log-likelihood of ``horseshoe-select-lr`` (the low-noise target among its sets) among the
    candidates within 20% of meanfield-vi's validation MSE on every all-relevant target."""
    results = Path(__file__).parents[1] / "benchmarks/results"
    scores = json.loads((results / "horseshoe-select-lr.json").read_text())
    assert "low-noise-16" in scores["per_set_validation_log_likelihood"]
    choice = committed_teacher_rule("horseshoe-select-lr.json", "horseshoe-select-lr-teachers.json")
    train = get_entry("horseshoe-svi").defaults["regression"]["train"]
    assert {k: train[k] for k in ("lr", "lr_schedule")} == LR_CANDIDATES[choice]


@pytest.mark.parametrize("name", ["horseshoe-svi", "bmr", "bmr-iterative", "em-tdamp"])
def test_select_folds_is_not_offered_where_the_fit_changes_with_its_total_epochs(name):
    """These fits place a reduction, warm-up or pruning by their total epochs, so fits continued in
    stages would not equal one fit of that many epochs: they have no select_folds option."""
    for task in ("regression", "classification"):
        assert "select_folds" not in get_entry(name).schema(task)
    with pytest.raises(ConfigError, match=f"{name} has no option 'select_folds'"):
        bnnzoo.create(name, "regression", (3,), 1, validation_fraction=0.2, select_folds=3)
