"""The regression noise re-estimated after a structural change (pruning, reduction)."""

from __future__ import annotations

import math

import pytest
import torch

import bnnzoo
from bnnzoo.models.likelihoods import noise_m_step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_m_step_maximises_the_expected_log_likelihood(seed):
    """The closed form against a numerical maximisation of E_q[sum_n log N(y_n | f_n, sigma^2)]
    over a fine grid of sigma, for draws f of a spread-out q."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(300, generator=g, dtype=torch.float64)
    f = mean + 0.2 * torch.randn(30, 300, generator=g, dtype=torch.float64)
    y = mean + 0.05 * torch.randn(300, generator=g, dtype=torch.float64)
    log_sd = torch.linspace(math.log(1e-2), math.log(1.0), 4601, dtype=torch.float64)
    var = torch.exp(2 * log_sd)[:, None, None]
    expected_ll = (-0.5 * (y - f) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).mean(1).sum(-1)
    assert float(noise_m_step(f, y)) == pytest.approx(float(log_sd[torch.argmax(expected_ll)]), abs=1e-3)
    # the spread of q counts: the M-step's variance is the residual of the mean plus q's variance
    resid = float(((y - f.mean(0)) ** 2).mean())
    assert math.exp(2 * float(noise_m_step(f, y))) == pytest.approx(resid + float(f.var(0, unbiased=False).mean()))


def _teacher(n: int = 400, noise: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + noise * torch.randn(n, generator=g)
    return x, y


def _train_mean_z2(posterior, x, y) -> float:
    pred = posterior.predict(x, num_samples=100)
    return float((((y - pred.mean) / pred.std) ** 2).mean())


def test_refit_noise_restores_a_calibrated_predictive():
    x, y = _teacher()
    post = bnnzoo.create("meanfield-vi", "regression", (3,), 1, network={"arch": "mlp", "hidden": [20]},
                         epochs=60, seed=0).fit(x, y, progress=False)
    with torch.no_grad():                       # a noise that no longer matches the residuals,
        post.model.likelihood.log_noise_scale.fill_(math.log(1.0))   # as after a structural change
    assert _train_mean_z2(post, x, y) < 0.5
    record = post.refit_noise(x, y)
    assert record["noise_scale_before"] == pytest.approx(1.0 * post.standardizer.y_scale, rel=1e-5)
    assert 0.7 < _train_mean_z2(post, x, y) < 1.3
    assert record["train_mean_z2"] == pytest.approx(_train_mean_z2(post, x, y), rel=0.05)


def test_refit_noise_refuses_classification(fitted_classifier):
    x = torch.zeros(3, 784)
    with pytest.raises(TypeError, match="regression"):
        fitted_classifier.refit_noise(x, torch.zeros(3, dtype=torch.long))


def test_a_fit_that_prunes_refits_its_noise_on_the_training_data():
    x, y = _teacher(seed=1)
    post = bnnzoo.create("bmr", "regression", (3,), 1, network={"arch": "mlp", "hidden": [20]}, epochs=30,
                         seed=0).fit(x, y, progress=False)
    record = post.fit_state.pruning[-1].summary["noise_refit"]
    # the fitted noise is the M-step for the pruned network's own draws on the training data
    xs, ys = post.standardizer.x(x), post.standardizer.y(y)
    f = torch.stack([d.squeeze(-1) for d in post._output_draws(xs, record["num_samples"], 4096, 0, fitted=True)])
    assert math.log(post.noise_scale()) == pytest.approx(float(noise_m_step(f, ys)), abs=1e-5)
    assert record["noise_scale_after"] == pytest.approx(post.noise_scale(original_units=True), rel=1e-6)


def test_prune_without_data_warns_that_the_noise_is_stale():
    x, y = _teacher(seed=2)
    post = bnnzoo.create("meanfield-vi", "regression", (3,), 1, network={"arch": "mlp", "hidden": [10]}, epochs=5,
                         seed=0).fit(x, y, progress=False)
    with pytest.warns(UserWarning, match="not refitted"):
        post.reduce("plain")
    reduced = post.reduce("plain", data=(x, y))
    assert "noise_refit" in reduced.fit_state.pruning[-1].summary
