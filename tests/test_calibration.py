"""Calibrated classification: the logit temperature fitted on a validation part of the training data
(temperature scaling of the draw-averaged predictive) and how every prediction uses it."""

from __future__ import annotations

import math

import pyro.util
import pytest
import torch

import bnnzoo
from bnnzoo.errors import ConfigError
from bnnzoo.guides.predictive_moments import probit_softmax, sampled_softmax
from bnnzoo.guides.temperature_scaling import (
    TEMPERATURE_RANGE,
    fit_temperature,
    tempered_log_predictive,
)
from bnnzoo.posterior import MOMENT_LOGIT_POINTS


def _labels_from(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Labels drawn from the draw-averaged predictive of ``logits`` at ``temperature``."""
    probs = torch.softmax(logits / temperature, -1).mean(0)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fitted_temperature_recovers_the_temperature_labels_were_drawn_at(true_temperature):
    """Monte Carlo: labels drawn from softmax(f / T0) averaged over draws; the maximum-likelihood
    temperature of 20,000 points is within a few standard errors of T0."""
    gen = torch.Generator().manual_seed(1)
    centre = 3.0 * torch.randn(20_000, 5, generator=gen)
    logits = centre + 0.5 * torch.randn(4, 20_000, 5, generator=gen)  # four posterior draws
    y = _labels_from(logits, true_temperature, seed=2)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_temperature, rel=0.06)


def test_fitted_temperature_is_the_maximum_of_the_held_out_log_density():
    """The fitted T beats every temperature of a fine grid over the whole allowed range (and the
    objective is evaluated by tempered_log_predictive, checked here against a direct formula)."""
    gen = torch.Generator().manual_seed(3)
    logits = 4.0 * torch.randn(8, 300, 3, generator=gen)
    y = torch.randint(0, 3, (300,), generator=gen)
    direct = torch.log(torch.softmax(logits / 1.7, -1).mean(0)[torch.arange(300), y])
    torch.testing.assert_close(tempered_log_predictive(logits, y, 1.7), direct, rtol=1e-5, atol=1e-6)
    t = fit_temperature(logits, y)
    best = float(tempered_log_predictive(logits, y, t).mean())
    grid = torch.logspace(math.log10(TEMPERATURE_RANGE[0]), math.log10(TEMPERATURE_RANGE[1]), 400)
    assert best >= max(float(tempered_log_predictive(logits, y, float(g)).mean()) for g in grid) - 1e-6


def test_fit_temperature_refuses_bad_input():
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.full((1, 2, 3), float("nan")), torch.zeros(2, dtype=torch.long))


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
    alone); the temperature (> 1 for an overconfident fit) lowers the test NLL and ECE."""
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
    assert cal["ece"] < raw["ece"]


def test_every_predictive_uses_the_temperature(mnist_small, overconfident):
    """predict (sampled, moments, probit), log_likelihood and the ArviZ log-likelihood all divide
    each draw's logits by T: each equals the untempered computation on logits / T."""
    calibrated, _ = overconfident
    t = calibrated.fit_state.logit_temperature
    x, y = mnist_small.x_test[:50], mnist_small.y_test[:50]
    pred = calibrated.predict(x, num_samples=10, return_samples=True)
    raw_logits = torch.stack(list(calibrated._output_draws(calibrated.standardizer.x(x), 10, 4096, 0)))
    torch.testing.assert_close(pred.samples, raw_logits)  # the predictive's logits: tempered
    untempered = [calibrated.net(calibrated.standardizer.x(x), w) for w in _draws(calibrated, 10)]
    torch.testing.assert_close(pred.samples, torch.stack(untempered) / t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.probs, torch.softmax(torch.stack(untempered) / t, -1).mean(0), rtol=1e-5, atol=1e-6)
    ll = calibrated.log_likelihood(x, y, num_samples=10)
    torch.testing.assert_close(ll, tempered_log_predictive(torch.stack(untempered), y, t), rtol=1e-5, atol=1e-5)
    idata = calibrated.to_arviz((x, y), num_samples=10)
    first = torch.as_tensor(idata.log_likelihood["obs"].values.reshape(-1, 50)[0])
    torch.testing.assert_close(first.float(), torch.log_softmax(untempered[0] / t, -1)[torch.arange(50), y],
                               rtol=1e-5, atol=1e-5)
    # the moment predictives: the logits' Gaussian scaled by 1 / T
    xs = calibrated.standardizer.x(x)
    mean, _, cov = calibrated._output_moments(xs, 4096, True)
    tempered = sampled_softmax(mean / t, cov / t**2, MOMENT_LOGIT_POINTS, 0)
    torch.testing.assert_close(calibrated.predict(x, method="moments").probs, tempered)
    assert float((tempered - sampled_softmax(mean, cov, MOMENT_LOGIT_POINTS, 0)).abs().max()) > 0.01
    mean, var = calibrated._output_moments(xs, 4096, False)
    torch.testing.assert_close(calibrated.predict(x, method="probit").probs, probit_softmax(mean / t, var / t**2))


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
