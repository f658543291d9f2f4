"""Calibrated classification: the temperature of the posterior predictive, fitted on a validation
part of the training data (temperature scaling), and how every prediction uses it."""

from __future__ import annotations

import math

import pyro.util
import pytest
import torch

import bnnzoo
from bnnzoo.checkpoint import read_checkpoint
from bnnzoo.errors import ConfigError
from bnnzoo.guides import training
from bnnzoo.guides.predictive_moments import probit_softmax, sampled_softmax
from bnnzoo.guides.temperature_scaling import (
    TEMPERATURE_RANGE,
    fit_temperature,
    tempered_log_probs,
)
from bnnzoo.posterior import MOMENT_LOGIT_POINTS, PREDICTIVE_CANDIDATES, FitState


def _labels_from(log_probs: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels drawn from the tempered predictive softmax(log_probs / T)."""
    probs = torch.softmax(log_probs / temperature, -1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)


def _mixture_log_probs(n: int, seed: int) -> torch.Tensor:
    """The log-probabilities of a draw-averaged predictive: four draws of 5-class logits."""
    gen = torch.Generator().manual_seed(seed)
    centre = 3.0 * torch.randn(n, 5, generator=gen)
    logits = centre + 0.5 * torch.randn(4, n, 5, generator=gen)
    return torch.softmax(logits, -1).mean(0).log()


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fitted_temperature_recovers_the_temperature_labels_were_drawn_at(true_temperature):
    """Monte Carlo: labels drawn from softmax(log p / T0); the maximum-likelihood temperature of
    20,000 points is within a few standard errors of T0."""
    log_probs = _mixture_log_probs(20_000, seed=1)
    y = _labels_from(log_probs, true_temperature, seed=2)
    assert fit_temperature(log_probs, y) == pytest.approx(true_temperature, rel=0.06)


def test_fitted_temperature_is_the_maximum_of_the_held_out_log_density():
    """The fitted T beats every temperature of a fine grid over the whole allowed range, and the
    tempered predictive is p^(1/T) normalised (checked against the direct formula)."""
    gen = torch.Generator().manual_seed(3)
    log_probs = _mixture_log_probs(300, seed=4)
    y = torch.randint(0, 5, (300,), generator=gen)
    p = log_probs.exp()
    direct = p ** (1 / 1.7) / (p ** (1 / 1.7)).sum(-1, keepdim=True)
    torch.testing.assert_close(tempered_log_probs(log_probs, 1.7).exp(), direct, rtol=1e-5, atol=1e-6)

    def score(t):
        return float(tempered_log_probs(log_probs, t).gather(-1, y.unsqueeze(-1)).mean())

    t = fit_temperature(log_probs, y)
    grid = torch.logspace(math.log10(TEMPERATURE_RANGE[0]), math.log10(TEMPERATURE_RANGE[1]), 400)
    assert score(t) >= max(score(float(g)) for g in grid) - 1e-6


def test_fit_temperature_refuses_bad_input():
    with pytest.raises(ValueError, match="log-probabilities"):
        fit_temperature(torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long))
    # a class of probability 0 is allowed (log-probability -inf) and stays at 0
    log_probs = torch.tensor([[0.0, -math.inf], [-0.1, -2.4]])
    assert math.isfinite(fit_temperature(log_probs, torch.tensor([0, 0])))


@pytest.fixture(scope="module")
def overconfident(mnist_small):
    """A mean-field fit that is overconfident: a few epochs at a high learning rate from a tiny
    initial spread, with and without the temperature fitted on a validation fifth."""
    options = dict(network={"arch": "mlp", "hidden": [50]}, epochs=15, batch_size=50, lr=3e-2, init_scale=1e-3,
                   device="cpu", progress=False, seed=0)
    calibrated = bnnzoo.fit("meanfield-vi", mnist_small, validation_fraction=0.2, calibrate=True,
                            select_epochs=False, **options)
    plain = bnnzoo.fit("meanfield-vi", mnist_small, validation_fraction=None, calibrate=False, **options)
    return calibrated, plain


def test_calibration_changes_only_the_temperature_and_improves_calibration(mnist_small, overconfident):
    """The fit on all rows is the uncalibrated fit bit for bit (the choice leaves the random state
    alone); the temperature (> 1 for an overconfident fit) lowers the test NLL."""
    calibrated, plain = overconfident
    record = calibrated.fit_state.calibration
    assert record["temperature"] > 1.0
    assert record["validation_rows"] == round(0.2 * mnist_small.n_train)
    assert record["validation_log_likelihood"]["tempered"] >= record["validation_log_likelihood"]["untempered"]
    for key, value in calibrated.guide.state_dict().items():
        torch.testing.assert_close(value, plain.guide.state_dict()[key], rtol=0, atol=0)
    x, y = mnist_small.x_test, mnist_small.y_test
    cal, raw = calibrated.evaluate(x, y, num_samples=20), plain.evaluate(x, y, num_samples=20)
    assert cal["accuracy"] == raw["accuracy"]
    assert cal["nll"] < raw["nll"]


def test_every_predictive_uses_the_temperature(mnist_small, overconfident):
    """predict (sampled, moments, probit) and log_likelihood give the tempered predictive
    softmax(log p / T) of the untempered one p; the per-draw samples and the ArviZ pointwise
    log-likelihood (the model's, for LOO) are untempered."""
    calibrated, _ = overconfident
    t = calibrated.predictive_temperature
    x, y = mnist_small.x_test[:50], mnist_small.y_test[:50]
    pred = calibrated.predict(x, num_samples=10, return_samples=True)
    untempered = torch.stack([calibrated.net(calibrated.standardizer.x(x), w) for w in _draws(calibrated, 10)])
    torch.testing.assert_close(pred.samples, untempered, rtol=1e-5, atol=1e-6)
    p = torch.softmax(untempered, -1).mean(0)
    expected = tempered_log_probs(p.log(), t).exp()
    torch.testing.assert_close(pred.probs, expected, rtol=1e-5, atol=1e-6)
    assert float((pred.probs - p).abs().max()) > 0.01  # the temperature matters here
    ll = calibrated.log_likelihood(x, y, num_samples=10)
    torch.testing.assert_close(ll, expected[torch.arange(50), y].log(), rtol=1e-5, atol=1e-5)
    assert calibrated.evaluate(x, y, num_samples=10)["nll"] == pytest.approx(float(-ll.mean()), rel=1e-5)
    idata = calibrated.to_arviz((x, y), num_samples=10)
    first = torch.as_tensor(idata.log_likelihood["obs"].values.reshape(-1, 50)[0])
    torch.testing.assert_close(first.float(), torch.log_softmax(untempered[0], -1)[torch.arange(50), y],
                               rtol=1e-5, atol=1e-5)
    # the moment predictives, tempered the same way
    xs = calibrated.standardizer.x(x)
    mean, _, cov = calibrated._output_moments(xs, 4096, True)
    raw = sampled_softmax(mean, cov, MOMENT_LOGIT_POINTS, 0)
    torch.testing.assert_close(calibrated.predict(x, method="moments").probs, tempered_log_probs(raw.log(), t).exp())
    mean, var = calibrated._output_moments(xs, 4096, False)
    raw = probit_softmax(mean, var)
    torch.testing.assert_close(calibrated.predict(x, method="probit").probs, tempered_log_probs(raw.log(), t).exp())


def test_the_predictive_is_chosen_on_the_validation_rows_with_its_own_temperature(mnist_small, overconfident):
    """select_temperature's rule on a fitted posterior standing for the validation copy: each
    predictive it supports gets the temperature that maximises its held-out log density, and the
    cheapest one within one standard error of the best wins; the calibrated fit records that choice
    and predicts with it by default (an integer num_samples asks for draws)."""
    calibrated, plain = overconfident
    x_val, y_val = mnist_small.x_test[:300], mnist_small.y_test[:300]
    record = calibrated._twin_temperature(plain, x_val, y_val)
    assert [c["method"] for c in record["candidates"]] == list(PREDICTIVE_CANDIDATES) == plain.predict_methods()
    pointwise = {}
    for candidate in record["candidates"]:
        log_probs = plain.predict(x_val, seed=0, method=candidate["method"]).probs.log()
        t = fit_temperature(log_probs, y_val)
        assert candidate["temperature"] == pytest.approx(t)
        pointwise[candidate["method"]] = tempered_log_probs(log_probs, t).gather(-1, y_val.unsqueeze(-1)).squeeze(-1)
        assert candidate["validation_log_likelihood"] == pytest.approx(float(pointwise[candidate["method"]].mean()),
                                                                      rel=1e-6)
    best = max(pointwise, key=lambda m: float(pointwise[m].mean()))
    within = []
    for candidate in record["candidates"]:
        lead = (pointwise[best] - pointwise[candidate["method"]]).double()
        se = float(lead.std() / math.sqrt(len(lead)))
        assert (candidate["best_lead"], candidate["best_lead_se"]) == (pytest.approx(float(lead.mean()), abs=1e-6),
                                                                       pytest.approx(se, rel=1e-3, abs=1e-7))
        within += [candidate["method"]] if float(lead.mean()) <= se else []
    assert record["predictive"] == within[0]  # the cheapest of those within one SE (the best always is)
    winner = next(c for c in record["candidates"] if c["method"] == within[0])
    assert record["temperature"] == winner["temperature"]
    assert record["num_samples"] == (0 if within[0] != "sample" else plain.predict(x_val, seed=0).num_samples)

    chosen = calibrated.fit_state.calibration
    assert chosen["predictive"] in PREDICTIVE_CANDIDATES and len(chosen["candidates"]) == 3
    x = mnist_small.x_test[:40]
    auto = calibrated.predict(x)
    assert auto.method == chosen["predictive"] == calibrated.fit_state.predictive_method
    torch.testing.assert_close(auto.probs, calibrated.predict(x, method=chosen["predictive"]).probs)
    assert calibrated.predict(x, num_samples=5).method == "sample"
    # uncalibrated fits, and runs saved before the choice was recorded, predict by draws
    assert plain.predict(x).method == "sample"
    old = {k: v for k, v in chosen.items() if k not in ("predictive", "candidates")}
    assert FitState.from_dict({"temperature": 1.0, "pruning": [], "calibration": old}).predictive_method == "sample"
    with pytest.raises(ConfigError, match="'auto'"):
        calibrated.predict(x, method="mean")


def _draws(posterior, n):
    """The weight draws of the posterior's predictive with seed 0 (as _output_draws takes them)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(posterior.draw_weights(n))


def test_the_temperature_is_saved_and_loaded(tmp_path, mnist_small, overconfident):
    calibrated, _ = overconfident
    calibrated.save(tmp_path / "run")
    loaded = bnnzoo.load(tmp_path / "run")
    assert loaded.fit_state.calibration == calibrated.fit_state.calibration
    x = mnist_small.x_test[:40]
    torch.testing.assert_close(loaded.predict(x, num_samples=5).probs, calibrated.predict(x, num_samples=5).probs)


def test_selection_leaves_the_random_state_and_the_posterior_untouched(mnist_small):
    post = bnnzoo.create("meanfield-vi", "classification", mnist_small.input_shape, mnist_small.output_dim,
                         network={"arch": "mlp", "hidden": [20]}, epochs=2, batch_size=100, seed=0,
                         validation_fraction=0.2, calibrate=True, select_epochs=False)
    rng = pyro.util.get_rng_state()
    before = torch.rand(3)
    pyro.util.set_rng_state(rng)
    record = post.select_temperature(mnist_small.x_train, mnist_small.y_train)
    assert not post.is_fitted
    torch.testing.assert_close(torch.rand(3), before, rtol=0, atol=0)
    assert TEMPERATURE_RANGE[0] <= record["temperature"] <= TEMPERATURE_RANGE[1]


def test_the_classification_defaults_calibrate_and_regression_refuses_it(boston):
    for name in ("meanfield-vi", "horseshoe-svi", "bmr", "bmr-iterative"):
        train = bnnzoo.get_entry(name).defaults["classification"]["train"]
        assert train["calibrate"] and train["validation_fraction"] and not train["select_epochs"], name
        assert not bnnzoo.get_entry(name).defaults["regression"]["train"]["calibrate"], name
    with pytest.raises(ConfigError, match="calibrate"):
        bnnzoo.fit("meanfield-vi", boston, epochs=2, validation_fraction=0.2, calibrate=True, progress=False)


def test_a_calibrated_fit_resumes_after_its_calibration(mnist_small, tmp_path, monkeypatch):
    """The calibration fit writes no checkpoint; interrupted in the fit on all rows that follows it,
    the run resumes there (the calibration, deterministic, runs again and fits the same
    temperature) and predicts as the uninterrupted fit."""
    options = dict(network={"arch": "mlp", "hidden": [20]}, epochs=4, batch_size=100, device="cpu",
                   progress=False, seed=0, validation_fraction=0.2, calibrate=True, select_epochs=False)
    reference = bnnzoo.fit("meanfield-vi", mnist_small, **options)
    real = training.minibatches
    passes = {"n": 0}

    def minibatches(*args, **kwargs):  # Ctrl-C after the first minibatch of pass 6: the final fit's third
        this, passes["n"] = passes["n"], passes["n"] + 1
        for step, idx in enumerate(real(*args, **kwargs)):
            if this == 6 and step == 1:
                raise KeyboardInterrupt
            yield idx

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(training, "minibatches", minibatches)
        with pytest.raises(KeyboardInterrupt):
            bnnzoo.fit("meanfield-vi", mnist_small, run_dir=run, **options)
    assert read_checkpoint(run)["epoch"] == 2
    resumed = bnnzoo.fit("meanfield-vi", mnist_small, resume=run, **options)
    assert resumed.fit_state.calibration == reference.fit_state.calibration
    x = mnist_small.x_test[:40]
    torch.testing.assert_close(resumed.predict(x, num_samples=5).probs, reference.predict(x, num_samples=5).probs)


def test_em_tdamp_classification_can_be_calibrated_too(mnist_small):
    """An entry with its own class probabilities (EM-TDAMP's probit product) is tempered the same
    way by predict and log_likelihood when asked to calibrate."""
    post = bnnzoo.fit("em-tdamp", mnist_small, network={"arch": "mlp", "hidden": [20]}, epochs=2, device="cpu",
                      progress=False, seed=0, validation_fraction=0.2, calibrate=True, select_epochs=False)
    assert post.predictive_temperature != 1.0
    record = post.fit_state.calibration  # no moment predictive for its probit product: draws
    assert post.predict_methods() == ["sample"] and record["predictive"] == "sample"
    assert [c["method"] for c in record["candidates"]] == ["sample"]
    x, y = mnist_small.x_test[:40], mnist_small.y_test[:40]
    probs = post.predict(x, num_samples=5).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(40))
    torch.testing.assert_close(post.log_likelihood(x, y, num_samples=5), probs[torch.arange(40), y].log())
