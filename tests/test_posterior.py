"""The Posterior API: fit, predict, evaluate, save/load (in a fresh process), bad input, metrics and
the standardizer; and the same on CUDA where a GPU exists."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import bnnzoo
from bnnzoo import metrics
from bnnzoo.data import DataError, load_dataset
from bnnzoo.errors import ConfigError, RunError
from bnnzoo.guides.training import TrainingHistory
from bnnzoo.models.standardizer import Standardizer
from bnnzoo.posterior import FitState, GuidePosterior, PruningRecord


# ------------------------------------------------------------------------------------------ fit
@pytest.mark.parametrize("which", ["fitted_meanfield", "fitted_map"])
def test_regression_fit_and_evaluate(which, boston, request):
    post = request.getfixturevalue(which)
    loss = post.history.loss
    assert len(loss) == 8 and all(math.isfinite(v) for v in loss)
    assert loss[-1] < loss[0]
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert set(m) == {"rmse", "log_likelihood"}
    assert all(math.isfinite(v) for v in m.values())
    assert m["rmse"] < float(boston.y_test.std())  # better than predicting a constant
    # the metrics' closed forms, from the same draws (same seed)
    pred = post.predict(boston.x_test, num_samples=20, return_samples=True, seed=0)
    assert m["rmse"] == pytest.approx(float(((pred.mean - boston.y_test) ** 2).mean().sqrt()), rel=1e-5)
    noise = post.noise_scale() * post.standardizer.y_scale
    lp = torch.distributions.Normal(pred.samples.squeeze(-1), noise).log_prob(boston.y_test)
    ll = torch.logsumexp(lp, 0) - math.log(20)
    assert m["log_likelihood"] == pytest.approx(float(ll.mean()), rel=1e-4, abs=1e-4)
    assert post.score(boston.x_test, boston.y_test, num_samples=20) == pytest.approx(m["log_likelihood"])


def test_regression_predictions(fitted_meanfield, boston):
    post = fitted_meanfield
    x = boston.x_test
    a = post.predict(x, num_samples=30, seed=3)
    b = post.predict(x, num_samples=30, seed=3)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    c = post.predict(x, num_samples=30, seed=4)
    assert not torch.equal(a.mean, c.mean)
    # a seeded prediction leaves the global random state alone
    state = torch.get_rng_state()
    post.predict(x, num_samples=3, seed=5)
    assert torch.equal(state, torch.get_rng_state())

    s = post.predict(x, num_samples=30, return_samples=True, seed=3)
    assert s.samples.shape == (30, len(x), 1)
    assert s.mean.shape == s.std.shape == (len(x),)
    torch.testing.assert_close(s.mean, s.samples.squeeze(-1).mean(0))
    # the predictive std adds the noise to the spread of the network outputs
    spread = s.samples.squeeze(-1).std(0, unbiased=False)
    noise = post.noise_scale() * post.standardizer.y_scale
    assert (s.std > spread).all()
    torch.testing.assert_close(s.std, (spread**2 + noise**2).sqrt(), rtol=1e-4, atol=1e-4)
    assert (spread > 0).all()
    with pytest.raises(AttributeError, match="classification"):
        s.probs


def test_chunking_does_not_change_predictions(fitted_meanfield, fitted_classifier, boston, mnist_small):
    for post, x in ((fitted_meanfield, boston.x_test), (fitted_classifier, mnist_small.x_test[:50])):
        a = post.predict(x, num_samples=10, chunk_size=7, seed=2, return_samples=True)
        b = post.predict(x, num_samples=10, chunk_size=4096, seed=2, return_samples=True)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-5, atol=1e-5)
        ll_a = post.log_likelihood(x, (boston.y_test if post.task == "regression" else mnist_small.y_test[:50]),
                                   num_samples=10, chunk_size=7, seed=2)
        ll_b = post.log_likelihood(x, (boston.y_test if post.task == "regression" else mnist_small.y_test[:50]),
                                   num_samples=10, chunk_size=4096, seed=2)
        torch.testing.assert_close(ll_a, ll_b, rtol=1e-5, atol=1e-5)


def test_map_predictions_have_no_weight_spread(fitted_map, boston):
    s = fitted_map.predict(boston.x_test, num_samples=4, return_samples=True)
    assert torch.equal(s.samples[0], s.samples[3])
    noise = fitted_map.noise_scale() * fitted_map.standardizer.y_scale
    torch.testing.assert_close(s.std, torch.full_like(s.std, noise))


def test_classification_fit(fitted_classifier, mnist_small):
    post = fitted_classifier
    assert post.history.loss[-1] < post.history.loss[0]
    m = post.evaluate(mnist_small.x_test, mnist_small.y_test, num_samples=10)
    assert set(m) == {"accuracy", "nll", "ece", "brier"}
    assert all(math.isfinite(v) for v in m.values())
    assert m["accuracy"] > 0.6  # chance is 0.1
    assert m["nll"] < math.log(10)
    pred = post.predict(mnist_small.x_test, num_samples=10, return_samples=True)
    assert pred.samples.shape == (10, 200, 10)
    assert pred.probs.shape == (200, 10)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(200))
    torch.testing.assert_close(pred.probs, torch.softmax(pred.samples, -1).mean(0))
    assert pred.std is None
    assert m["nll"] == pytest.approx(metrics.nll(pred.probs, mnist_small.y_test), rel=1e-6)
    # log_likelihood is the log of the predictive probability of the label
    ll = post.log_likelihood(mnist_small.x_test, mnist_small.y_test, num_samples=10)
    torch.testing.assert_close(ll, pred.probs.gather(1, mnist_small.y_test[:, None]).squeeze(1).log(),
                               rtol=1e-4, atol=1e-4)


def test_fit_is_reproducible_with_a_seed(boston):
    kw = dict(epochs=2, device="cpu", progress=False, seed=11)
    a = bnnzoo.fit("meanfield-vi", boston, **kw)
    b = bnnzoo.fit("meanfield-vi", boston, **kw)
    assert a.history.loss == b.history.loss
    assert all(torch.equal(a.posterior_mean()[s], b.posterior_mean()[s]) for s in a.net.sites())


def test_pruned_export_predicts_like_the_posterior_mean(fitted_meanfield, boston):
    post = copy.deepcopy(fitted_meanfield)
    w = torch.ones(50, 13, dtype=torch.bool)
    b = torch.ones(50, dtype=torch.bool)
    w[:20], b[:20] = False, False
    post.guide.set_masks({"fc1.weight": w, "fc1.bias": b})
    assert post.sparsity()["architecture"] == "13-30-1"
    module = post.to_torch(pruned=True)
    assert module[0].weight.shape == (30, 13)
    x = post.standardizer.x(boston.x_test)
    torch.testing.assert_close(module(x), post.net(x, post.posterior_mean()), rtol=1e-5, atol=1e-5)
    full = post.to_torch(pruned=False)
    assert full[0].weight.shape == (50, 13)
    torch.testing.assert_close(full(x), module(x), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- save / load
_RELOAD = """
import sys, torch, bnnzoo
torch.set_num_threads(int(sys.argv[1]))  # bitwise equality needs the same reduction order
out = {}
for path, x in zip(sys.argv[2::2], sys.argv[3::2]):
    post = bnnzoo.load(path)
    p = post.predict(torch.load(x), num_samples=7, seed=13, return_samples=True)
    out[path] = (p.mean, p.samples)
torch.save(out, sys.argv[2] + ".reloaded.pt")
"""


def test_save_and_load_in_a_fresh_process(fitted_meanfield, fitted_classifier, boston, mnist_small, tmp_path):
    cases = [(fitted_meanfield, boston.x_test, tmp_path / "reg"), (fitted_classifier, mnist_small.x_test[:40], tmp_path / "cls")]
    args, expected = [], {}
    for post, x, path in cases:
        post.save(path)
        assert (path / "posterior.pt").is_file() and (path / "config.json").is_file()
        torch.save(x, path / "x.pt")
        p = post.predict(x, num_samples=7, seed=13, return_samples=True)
        expected[str(path)] = (p.mean, p.samples)
        args += [str(path), str(path / "x.pt")]
    subprocess.run([sys.executable, "-c", _RELOAD, str(torch.get_num_threads()), *args], check=True, timeout=120)
    got = torch.load(str(tmp_path / "reg") + ".reloaded.pt")
    for key, (mean, samples) in expected.items():
        assert torch.equal(got[key][0], mean)
        assert torch.equal(got[key][1], samples)
    meta = json.loads((tmp_path / "reg" / "config.json").read_text())
    assert meta["name"] == "meanfield-vi" and meta["history"]["loss"] == fitted_meanfield.history.loss


def test_masks_survive_save_and_load(fitted_meanfield, boston, tmp_path):
    post = copy.deepcopy(fitted_meanfield)
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(50, 13, generator=gen) > 0.3
    w[5:9] = False
    b = torch.ones(50, dtype=torch.bool)
    b[5:9] = False
    post.guide.set_masks({"fc1.weight": w, "fc1.bias": b, "fc2.weight": torch.rand(1, 50, generator=gen) > 0.5})
    before = post.sparsity()
    assert before["layers"]["fc1"]["groups_kept"] == 46
    post.save(tmp_path / "run")
    back = bnnzoo.load(tmp_path / "run")
    after = back.sparsity()
    assert {k: v for k, v in after.items() if k != "keep"} == {k: v for k, v in before.items() if k != "keep"}
    assert all(torch.equal(after["keep"][k], before["keep"][k]) for k in before["keep"])
    assert all(torch.equal(back.masks()[s], post.masks()[s]) for s in post.masks())
    assert torch.equal(back.predict(boston.x_test, 5).mean, post.predict(boston.x_test, 5).mean)


# ------------------------------------------------------------------- config, typed state, format
# tiny settings per catalog entry (every entry runs 4 epochs of a 13-8-1 network on 60 houses)
TINY = {
    "bmr-iterative": {"warmup_epochs": 1},
    "em-tdamp": {"keep": 0.5},
    "spike-slab-sghmc": {"cycles": 2, "samples_per_cycle": 1, "thinning": 1, "em_start": 1, "prune_start": 1},
}


def _derived(make):
    """``make()``, or ``None`` where the posterior has no such rule (``TypeError``)."""
    try:
        return make()
    except TypeError:
        return None


@pytest.mark.parametrize("name", bnnzoo.list_models())
def test_fit_prune_reduce_and_save_leave_the_config_as_asked(name, tmp_path):
    data = load_dataset(None).subset(60, 20, seed=0)
    post = bnnzoo.create(name, data.task, data.input_shape, data.output_dim, network={"arch": "mlp", "hidden": [8]},
                         dataset=data.name, device="cpu", seed=0, epochs=4, **TINY.get(name, {}))
    asked = copy.deepcopy(post.config)
    post.fit(data.x_train, data.y_train, progress=False)
    assert post.config == asked
    assert isinstance(post.history, TrainingHistory) and len(post.history.loss) >= 4
    assert isinstance(post.fit_state, FitState)
    derived = [d for d in (_derived(post.prune), _derived(post.reduce)) if d is not None]
    for d in derived:
        assert d.config == asked and len(d.fit_state.pruning) == len(post.fit_state.pruning) + 1
    assert post.config == asked
    back = bnnzoo.load(post.save(tmp_path / "run"))
    assert back.config == asked and back.network_spec == post.network_spec
    assert isinstance(back.history, TrainingHistory) and back.history == post.history
    assert back.fit_state == post.fit_state


def test_config_json_keeps_the_network_spec_fit_state_and_history_beside_the_config(boston, tmp_path):
    post = bnnzoo.fit("horseshoe-svi", boston, epochs=3, network={"arch": "mlp", "hidden": [8]}, device="cpu",
                      progress=False, seed=0)
    meta = json.loads((post.save(tmp_path / "run") / "config.json").read_text())
    assert meta["format"] == 2 and meta["config"] == post.config
    assert meta["network_spec"] == post.net.spec() and "network_spec" not in meta["config"]
    record = post.fit_state.pruning[0]
    assert meta["fit_state"] == {"temperature": 0.2, "pruning": [
        {"rule": "evidence", "options": {"allow_empty": False}, "summary": record.summary, "seconds": None}]}
    assert meta["fit_state"]["pruning"][0]["summary"]["fc1"]["groups"] == 8
    assert set(meta["fit_state"]["pruning"][0]["summary"]["noise_refit"]) == {
        "noise_scale_before", "noise_scale_after", "train_mean_z2", "num_samples"}
    assert meta["history"]["loss"] == post.history.loss
    assert "pruned_threshold" not in meta["config"]["train"]


def test_a_run_of_an_unknown_format_is_refused(fitted_meanfield, tmp_path):
    path = fitted_meanfield.save(tmp_path / "run")
    meta = json.loads((path / "config.json").read_text())
    meta["format"] = 3
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 3"):
        bnnzoo.load(path)


def test_reduce_is_refused_without_gaussian_weights(fitted_map, fitted_meanfield):
    assert isinstance(fitted_meanfield, GuidePosterior)
    with pytest.raises(TypeError, match="PointMass"):
        fitted_map.reduce()
    reduced = fitted_meanfield.reduce(rule="plain")
    assert reduced.fit_state.pruning[-1].rule == "bmr" and reduced.fit_state.pruning[-1].options == {"rule": "plain"}
    assert not fitted_meanfield.fit_state.pruning  # the original is untouched
    assert isinstance(reduced.fit_state.pruning[-1], PruningRecord)


def test_load_of_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RunError, match="is not a saved bnnzoo posterior"):
        bnnzoo.load(tmp_path)
    with pytest.raises(RunError, match="is not a saved bnnzoo posterior"):
        bnnzoo.load(tmp_path / "missing")


def test_save_needs_a_fitted_posterior(tmp_path):
    post = bnnzoo.create("map", "regression", (3,), 1, device="cpu")
    with pytest.raises(RuntimeError, match="not fitted"):
        post.save(tmp_path / "run")
    with pytest.raises(RuntimeError, match="not fitted"):
        post.predict(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------ bad input
def test_wrong_input_shape(fitted_meanfield, fitted_classifier):
    with pytest.raises(ValueError, match=r"shape \(12,\).*expects \(13,\)"):
        fitted_meanfield.predict(torch.randn(5, 12))
    with pytest.raises(ValueError, match=r"expects \(1, 28, 28\)"):
        fitted_classifier.predict(torch.rand(5, 784))
    post = bnnzoo.create("map", "regression", (13,), 1, device="cpu")
    with pytest.raises(ValueError, match=r"expects \(13,\)"):
        post.fit(torch.randn(20, 4), torch.randn(20), progress=False)
    with pytest.raises(DataError, match="at least 2 dimensions"):
        fitted_meanfield.predict(torch.randn(13))


def test_nan_and_bad_labels(fitted_meanfield, fitted_classifier, boston):
    x = boston.x_test.clone()
    x[3, 2] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fitted_meanfield.predict(x)
    with pytest.raises(DataError, match="NaN"):
        bnnzoo.create("map", "regression", (13,), 1, device="cpu").fit(x, boston.y_test, progress=False)
    y = torch.tensor([0, 3, 10, 2, 1])
    with pytest.raises(DataError, match=r"out of range \[0, 10\)"):
        fitted_classifier.evaluate(torch.rand(5, 1, 28, 28), y)
    with pytest.raises(DataError, match="out of range"):
        fitted_classifier.log_likelihood(torch.rand(5, 1, 28, 28), -y)


def test_bad_prediction_arguments(fitted_meanfield, boston):
    for kwargs in ({"num_samples": 0}, {"chunk_size": 0}, {"num_samples": -3}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            fitted_meanfield.predict(boston.x_test, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        fitted_meanfield.log_likelihood(boston.x_test, boston.y_test, num_samples=0)


def test_unknown_names_and_options(boston):
    with pytest.raises(KeyError, match="Did you mean 'meanfield-vi'"):
        bnnzoo.get_entry("meanfeild-vi")
    with pytest.raises(KeyError, match="unknown model 'mapp'"):
        bnnzoo.fit("mapp", boston, progress=False)
    with pytest.raises(TypeError, match="'epoch'.*did you mean epochs"):
        bnnzoo.fit("map", boston, epoch=3, device="cpu", progress=False)
    with pytest.raises(TypeError, match="'weight_decay'"):
        bnnzoo.create("meanfield-vi", "regression", (13,), 1, weight_decay=1.0, device="cpu")
    with pytest.raises(ValueError, match="supports regression, classification, not ranking"):
        bnnzoo.create("map", "ranking", (13,), 1, device="cpu")


def test_bad_prior_scale():
    for bad in (-1.0, 0.0, float("nan"), float("inf"), "abc", [1.0]):
        with pytest.raises(ConfigError, match="prior_scale"):
            bnnzoo.create("meanfield-vi", "regression", (13,), 1, prior_scale=bad, device="cpu")
    with pytest.raises(ValueError, match="init_scale"):
        bnnzoo.create("meanfield-vi", "regression", (13,), 1, init_scale=0.0, device="cpu")
    with pytest.raises(ConfigError, match="noise_scale"):
        bnnzoo.create("map", "regression", (13,), 1, noise_scale=-2.0, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_raises(boston):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        bnnzoo.fit("map", boston, device="cuda", progress=False, epochs=1)
    with pytest.raises(ValueError, match="unknown device"):
        bnnzoo.create("map", "regression", (13,), 1, device="tpu:x")


# --------------------------------------------------------------------------------------- metrics
def test_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8], [0.7, 0.3]])
    y = torch.tensor([0, 1, 1, 1, 0])
    # confidences 0.9, 0.6, 0.55, 0.8, 0.7 (correct: 1, 0, 1, 1, 1); with 5 bins (0.2 wide):
    #   (0.4, 0.6]: 0.6 (wrong), 0.55 (right) -> |mean conf 0.575 - acc 0.5| * 2/5
    #   (0.6, 0.8]: 0.8, 0.7 (both right)    -> |0.75 - 1| * 2/5
    #   (0.8, 1.0]: 0.9 (right)              -> |0.9 - 1| * 1/5
    expected = 0.075 * 2 / 5 + 0.25 * 2 / 5 + 0.1 / 5
    assert metrics.expected_calibration_error(probs, y, num_bins=5) == pytest.approx(expected, abs=1e-6)
    curve = metrics.reliability_curve(probs, y, num_bins=5)
    assert curve["count"] == [0, 0, 2, 2, 1]
    assert curve["accuracy"][2:] == pytest.approx([0.5, 1.0, 1.0])
    assert curve["confidence"][2:] == pytest.approx([0.575, 0.75, 0.9])
    # a confidence exactly on a bin edge belongs to the lower bin: (b/B, (b+1)/B]
    edge = torch.tensor([[0.6, 0.4]])
    assert metrics.reliability_curve(edge, torch.tensor([1]), num_bins=5)["count"] == [0, 0, 1, 0, 0]
    # perfectly calibrated: ECE 0
    assert metrics.expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_classification_metrics_closed_forms():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    y = torch.tensor([0, 1, 1])
    assert metrics.accuracy(probs, y) == pytest.approx(2 / 3)
    assert metrics.nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3, rel=1e-6)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2) + (0.25**2 + 0.5**2 + 0.25**2)) / 3
    assert metrics.brier(probs, y) == pytest.approx(brier, rel=1e-6)
    assert math.isfinite(metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))
    m = metrics.classification_metrics(probs, y)
    assert set(m) == {"accuracy", "nll", "ece", "brier"}
    assert metrics.rmse(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0])) == pytest.approx(math.sqrt(13 / 3))


# ---------------------------------------------------------------------------------- standardizer
def test_standardizer_uses_training_statistics_only(fitted_meanfield, boston):
    s = fitted_meanfield.standardizer
    torch.testing.assert_close(s.x_mean, boston.x_train.mean(0))
    torch.testing.assert_close(s.x_std, boston.x_train.std(0))
    torch.testing.assert_close(s.y_mean, boston.y_train.mean())
    assert s.y_scale == pytest.approx(float(boston.y_train.std()))
    assert not torch.allclose(s.x_mean, boston.x_test.mean(0))
    y = boston.y_test
    torch.testing.assert_close(s.y_inverse(s.y(y)), y)
    z = s.x(boston.x_train)
    torch.testing.assert_close(z.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(13), atol=1e-5, rtol=0)


def test_standardizer_images_constant_features_and_state():
    x = torch.rand(20, 1, 4, 4)
    s = Standardizer.from_data(x, torch.zeros(20, dtype=torch.long), "classification")
    assert s.x_mean.shape == () and s.y_mean is None and s.y_scale == 1.0
    y = torch.arange(5)
    assert torch.equal(s.y(y), y) and torch.equal(s.y_inverse(y), y)
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    s = Standardizer.from_data(x, torch.tensor([1.0, 2.0, 6.0]), "regression")
    torch.testing.assert_close(s.x(x), torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    back = Standardizer.from_state_dict(s.state_dict())
    assert torch.equal(back.x(x), s.x(x)) and torch.equal(back.y_inverse(x[:, 0]), s.y_inverse(x[:, 0]))


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_fit_predict_save_load_on_cuda(boston, mnist_small, tmp_path):
    post = bnnzoo.fit("meanfield-vi", boston, epochs=3, device="cuda", progress=False, seed=0)
    assert post.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in post.guide.parameters())
    assert all(t.device.type == "cuda" for t in post.model.state_dict().values())
    pred = post.predict(boston.x_test, num_samples=10, return_samples=True)
    assert pred.mean.device.type == "cuda" and pred.std.device.type == "cuda"
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=10)
    assert all(math.isfinite(v) for v in m.values())
    post.save(tmp_path / "run")
    back = bnnzoo.load(tmp_path / "run", device="cuda")
    assert torch.equal(back.predict(boston.x_test, num_samples=10).mean, pred.mean)
    cpu = bnnzoo.load(tmp_path / "run", device="cpu")
    assert cpu.device.type == "cpu" and all(p.device.type == "cpu" for p in cpu.guide.parameters())
    assert cpu.predict(boston.x_test, num_samples=2).mean.device.type == "cpu"
    cls = bnnzoo.fit("meanfield-vi", mnist_small, network={"arch": "lenet5"}, epochs=2, batch_size=50, lr=1e-2,
                     device="cuda", progress=False)
    assert all(p.device.type == "cuda" for p in cls.guide.parameters())
    m = cls.evaluate(mnist_small.x_test, mnist_small.y_test, num_samples=5)
    assert m["accuracy"] > 0.3
    probs = cls.predict(mnist_small.x_test, num_samples=5).probs
    assert probs.device.type == "cuda"


@pytest.mark.parametrize("name", ["meanfield-vi", "em-tdamp"])
def test_a_fit_that_fails_leaves_an_unfitted_posterior(name, boston, tmp_path):
    """A fit stopped by an error (a divergence, an interrupt, a failing callback) is not fitted: it
    neither predicts nor saves."""
    posterior = bnnzoo.create(name, "regression", input_shape=(13,), output_dim=1, epochs=3)

    def stop(epoch, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        posterior.fit(boston.x_train, boston.y_train, progress=False, callback=stop)
    assert not posterior.is_fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        posterior.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()
