"""ArviZ conversion (``Posterior.to_arviz``), netCDF round trips and ``bnnzoo diagnose``: layout for
every catalog model, the pointwise log-likelihood against closed forms and ``Posterior.log_likelihood``,
the (chain, draw) layout, site selection, bad input, and the command's tables and plots."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

import bnnzoo
from bnnzoo import arviz_compat, diagnostics
from bnnzoo.arviz_compat import MIN_PSIS_DRAWS, group, groups
from bnnzoo.data import load_dataset
from bnnzoo.diagnostics import stored_draw_records
from bnnzoo.errors import ConfigError
from bnnzoo.guides.training import TrainingHistory
from bnnzoo.variational import VariationalPosterior

FORMAT1 = Path(__file__).parent / "data" / "runs-format1"
SAMPLE_GROUPS = {"posterior", "log_likelihood", "posterior_predictive"}
DATA_GROUPS = {"observed_data", "constant_data", "training"}

# the tiniest fit of each catalog model that still exercises its machinery (1-2 epochs, a few draws)
TINY = {
    # 2 chains of 4 stored draws (R-hat needs 4 a chain)
    "spike-slab-sghmc": dict(epochs=6, cycles=3, warmup_cycles=1, samples_per_cycle=2, thinning=1, em_start=1,
                             prune_start=1, num_chains=2),
}


# the per-group variable a method adds (the forest plot's); the others get the group norms
GROUP_VARIABLE = {"horseshoe-svi": "fc1.scale", "spike-slab-sghmc": "fc1.inclusion_probability"}


@pytest.fixture(scope="module")
def tiny(boston):
    return boston.subset(60, 30, seed=1)


def fit_tiny(name, data, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnnzoo.fit(name, data, network={"arch": "mlp", "hidden": [6]}, device="cpu", progress=False, seed=0,
                          **{**TINY.get(name, {"epochs": 2}), **options})


def arviz_quietly(fn, *args, **kwargs):
    """ArviZ warns for R-hat of one chain and for high Pareto k: expected with tiny fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_same_data(a, b):
    assert set(groups(a)) == set(groups(b))
    for name in groups(a):
        xr.testing.assert_identical(group(a, name).drop_attrs(), group(b, name).drop_attrs())


# ------------------------------------------------------------------------------- every catalog model
# map exports a point estimate (one draw, no LOO): tests/test_exports.py checks it
@pytest.mark.parametrize("name", [n for n in bnnzoo.list_models() if n != "map"])
def test_every_catalog_model_converts(name, tiny, tmp_path):
    post = fit_tiny(name, tiny)
    idata = post.to_arviz((tiny.x_train, tiny.y_train), num_samples=MIN_PSIS_DRAWS)
    chains = post.num_chains
    draws = idata.posterior.sizes["draw"]
    assert set(groups(idata)) >= SAMPLE_GROUPS | DATA_GROUPS
    assert idata.posterior.sizes["chain"] == chains and draws == (MIN_PSIS_DRAWS if chains == 1 else draws)

    # weights by named dims with coords; per-group and per-layer variables
    w = idata.posterior["fc1.weight"]
    assert w.dims == ("chain", "draw", "fc1.out", "fc1.in") and w.shape == (chains, draws, 6, 13)
    assert idata.posterior["fc2.bias"].dims == ("chain", "draw", "fc2.out")
    assert list(idata.posterior["fc1.out"].values) == list(range(6))
    assert idata.posterior["fc1.group_norm"].dims == ("chain", "draw", "fc1.out")
    assert idata.posterior["fc1.rms"].dims == ("chain", "draw")
    for var in idata.posterior.data_vars.values():
        assert var.dims[:2] == ("chain", "draw")
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")
    assert idata.log_likelihood["obs"].shape == (chains, draws, 60)
    assert idata.posterior_predictive["obs"].shape == (chains, draws, 60)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, tiny.y_train.numpy())
    assert idata.constant_data["fc1.keep"].dims == ("fc1.out",)
    assert np.isfinite(idata.log_likelihood["obs"].values).all()
    assert idata.training["loss"].size == len(post.history.loss)
    assert idata.attrs["bnnzoo_model"] == name and idata.attrs["num_chains"] == chains
    group_var = GROUP_VARIABLE.get(name, "fc1.group_norm")
    assert diagnostics.group_variable(idata, "fc1") == group_var
    assert idata.posterior[group_var].dims == ("chain", "draw", "fc1.out")
    if chains > 1:  # a sampler: per-draw statistics of every chain
        assert idata.sample_stats["step_size"].dims == ("chain", "draw")

    # ArviZ's diagnostics run on it, through the same calls on both ArviZ lines
    names = diagnostics.summary_variables(idata)
    summary = arviz_quietly(az.summary, idata, var_names=names)
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(summary.columns) and len(summary) >= 2
    table = arviz_quietly(arviz_compat.summary, idata, names)
    assert list(table.index) == names and list(table.columns) == [
        "mean", "sd", "eti_3%", "eti_97%", "mcse_mean", "ess_bulk", "ess_tail", *(["r_hat"] if chains > 1 else [])]
    np.testing.assert_allclose(table["mean"], [float(idata.posterior[n].mean()) for n in names], atol=1e-4)
    assert (table["ess_bulk"] > 0).all()
    if chains * draws >= MIN_PSIS_DRAWS:
        loo = arviz_compat.loo_fields(arviz_compat.loo(idata))
        assert math.isfinite(loo.elpd) and loo.pareto_k.shape == loo.pointwise.shape == (60,)
    else:  # too few stored draws to smooth: one error naming the option, on both lines
        with pytest.raises(ConfigError, match=f"PSIS-LOO needs at least {MIN_PSIS_DRAWS} posterior draws"):
            arviz_compat.loo(idata)
    rhat = arviz_quietly(az.rhat, idata, var_names=["fc2.bias"])["fc2.bias"].values  # the output layer is never pruned
    assert (np.isfinite(rhat) if chains > 1 else np.isnan(rhat)).all()

    # netCDF round trip
    path = diagnostics.save(idata, tmp_path / "posterior.nc")
    back = diagnostics.load(path)
    assert_same_data(idata, back)
    assert back.attrs["bnnzoo_model"] == name


# ------------------------------------------------------------------------------------ the numbers
def test_map_log_likelihood_and_replicas_closed_form(fitted_map, boston):
    """A point mass: every draw is the MAP network, the log-likelihood is the Gaussian density of y
    in original units, and the replicas are that Gaussian's draws."""
    post = fitted_map
    idata = post.to_arviz((boston.x_train, boston.y_train), num_samples=40)
    std = post.standardizer
    with torch.no_grad():
        f = post.net(std.x(boston.x_train), post.posterior_mean()).squeeze(-1) * std.y_std + std.y_mean
    noise = post.noise_scale() * std.y_scale
    expected = torch.distributions.Normal(f, noise).log_prob(boston.y_train).numpy()
    ll = idata.log_likelihood["obs"].values
    np.testing.assert_allclose(ll, np.broadcast_to(expected, ll.shape), rtol=1e-4, atol=1e-4)
    z = (idata.posterior_predictive["obs"].values - f.numpy()) / noise  # 40 x 200 standard normals
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.var() - 1) < 6 * math.sqrt(2 / z.size)
    assert idata.attrs["noise_scale"] == pytest.approx(noise)


@pytest.mark.parametrize("which", ["fitted_meanfield", "fitted_classifier"])
def test_log_likelihood_uses_the_posteriors_own_draws(which, request, boston, mnist_small):
    """log mean_s exp(log p(y_n | w_s)) over the draws is the posterior's own pointwise predictive
    log-likelihood with the same seed (same weight draws, same units)."""
    post = request.getfixturevalue(which)
    data = boston if post.task == "regression" else mnist_small
    x, y = data.x_test[:60], data.y_test[:60]
    idata = post.to_arviz((x, y), num_samples=25, seed=7, sites=None)
    ll = idata.log_likelihood["obs"].values.reshape(25, -1)
    lpd = np.logaddexp.reduce(ll, axis=0) - math.log(25)
    np.testing.assert_allclose(lpd, post.log_likelihood(x, y, num_samples=25, seed=7).numpy(), rtol=1e-4, atol=1e-4)
    reps = idata.posterior_predictive["obs"].values
    if post.task == "classification":
        assert reps.dtype.kind == "i" and reps.min() >= 0 and reps.max() < 10
    else:  # replicas spread around the data with the predictive's scale
        pred = post.predict(x, num_samples=25, seed=7)
        assert np.abs(reps.reshape(25, -1).mean(0) - pred.mean.numpy()).max() < 4 * pred.std.max().item()


def test_group_norms_and_layer_rms(fitted_meanfield):
    idata = fitted_meanfield.to_arviz(num_samples=5)
    post = idata.posterior
    w, b = post["fc1.weight"].values, post["fc1.bias"].values
    norms = np.sqrt((w**2).sum(-1) + b**2)
    np.testing.assert_allclose(post["fc1.group_norm"].values, norms, rtol=1e-5)
    np.testing.assert_allclose(post["fc1.rms"].values, np.sqrt((norms**2).sum(-1) / (w[0, 0].size + b[0, 0].size)),
                               rtol=1e-5)
    assert "log_likelihood" not in groups(idata)  # no data: no likelihood groups


def test_seeded_conversion_is_reproducible_and_leaves_the_global_state(fitted_meanfield, boston):
    state = torch.get_rng_state()
    a = fitted_meanfield.to_arviz((boston.x_test, boston.y_test), num_samples=4, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    b = fitted_meanfield.to_arviz((boston.x_test, boston.y_test), num_samples=4, seed=3)
    c = fitted_meanfield.to_arviz((boston.x_test, boston.y_test), num_samples=4, seed=4)
    for name in ("posterior", "log_likelihood", "posterior_predictive"):
        xr.testing.assert_identical(group(a, name).drop_attrs(), group(b, name).drop_attrs())
    assert not np.array_equal(a.posterior["fc1.weight"].values, c.posterior["fc1.weight"].values)
    # independent guide draws differ from one another
    assert not np.array_equal(a.posterior["fc1.weight"].values[0, 0], a.posterior["fc1.weight"].values[0, 1])


# ---------------------------------------------------------------------------- chains and hooks
@pytest.mark.skipif("horseshoe-svi" not in bnnzoo.list_models(), reason="no horseshoe entry")
def test_horseshoe_scale_draws_match_the_guides_quadrature(tiny):
    """Monte Carlo means of the drawn group scales s_k against E_q[s_k] by Gauss-Hermite quadrature."""
    post = fit_tiny("horseshoe-svi", tiny, epochs=3, prune=False)
    idata = post.to_arviz(num_samples=2000, sites=None, seed=2)
    draws = idata.posterior["fc1.scale"].values.reshape(2000, -1)
    quadrature = post.scales("mean")["fc1"].detach().numpy()
    tolerance = 5 * draws.std(0) / math.sqrt(2000)
    assert (np.abs(draws.mean(0) - quadrature) < tolerance).all()
    tau, c, lam = (idata.posterior[f"fc1.{v}"].values.reshape(2000, -1) for v in ("tau", "c", "lambda"))
    u = (tau * lam) ** 2  # s^2 = c^2 u / (c^2 + u)
    np.testing.assert_allclose(draws**2, c**2 * u / (c**2 + u), rtol=1e-4)


@pytest.mark.skipif("spike-slab-sghmc" not in bnnzoo.list_models(), reason="no spike-and-slab entry")
def test_spike_slab_chains_draws_and_records(tiny):
    post = fit_tiny("spike-slab-sghmc", tiny)
    idata = post.to_arviz(num_samples=5, sites=["fc1"])
    stored = post.samples["fc1.weight"]
    assert idata.posterior.sizes["chain"] == stored.shape[0] == 2
    np.testing.assert_array_equal(idata.posterior["fc1.weight"].values, stored.numpy())  # every stored draw, in order
    probs = idata.posterior["fc1.inclusion_probability"].mean("draw").values
    np.testing.assert_allclose(probs, post.inclusion_probabilities()["fc1"].numpy(), rtol=1e-5)
    for c, record in enumerate(post.history.extra["chains"]):
        kept = [v for v, warm in zip(record["step_size"], record["warmup"]) if not warm]
        np.testing.assert_allclose(idata.sample_stats["step_size"].values[c], kept, rtol=1e-6)
    assert idata.training["chains.step_size"].dims == ("chain", "sample")
    assert idata.training["loss"].dims == ("chain", "epoch") and idata.training["loss"].shape == (2, 6)
    np.testing.assert_allclose(idata.training["loss"].values.ravel(), post.history.loss)
    assert np.isfinite(arviz_quietly(az.rhat, idata, var_names=["fc2.rms"])["fc2.rms"].values).all()


class Chains(VariationalPosterior):
    """A posterior with 2 chains of 3 stored draws: draw ``j`` (chain-major) is the MAP weights + j."""

    stores_samples = True

    def __init__(self, post, hyper=None):
        super().__init__(post.model, post.guide, name=post.name, config=post.config)
        self.standardizer = post.standardizer
        self.hyper = hyper

    @property
    def num_chains(self):
        return 2

    def arviz_draws_per_chain(self, num_samples):
        return 3

    def draw_weights(self, num_samples):
        mean = self.posterior_mean()
        for j in range(num_samples):
            yield {s: v + j for s, v in mean.items()}

    def arviz_hyperparameters(self, num_draws):
        return self.hyper if self.hyper is not None else {}

    def arviz_sample_stats(self):
        return {"step_size": torch.full((2, 3), 0.01)}


def test_chains_are_laid_out_chain_by_chain(fitted_map, boston):
    scale = torch.rand(2, 3, 50)
    post = Chains(fitted_map, {"fc1.scale": scale, "tau": torch.rand(2, 3)})
    idata = post.to_arviz((boston.x_test, boston.y_test), num_samples=100)
    assert dict(idata.posterior.sizes)["chain"] == 2 and idata.posterior.sizes["draw"] == 3
    mean = fitted_map.posterior_mean()["fc2.bias"].detach().numpy()
    offsets = idata.posterior["fc2.bias"].values[..., 0] - mean[0]
    np.testing.assert_allclose(offsets, [[0, 1, 2], [3, 4, 5]], atol=1e-5)
    assert idata.posterior["fc1.scale"].dims == ("chain", "draw", "fc1.out")
    np.testing.assert_array_equal(idata.posterior["fc1.scale"].values, scale.numpy())
    assert idata.posterior["tau"].dims == ("chain", "draw")
    assert idata.sample_stats["step_size"].dims == ("chain", "draw")
    assert diagnostics.group_variable(idata, "fc1") == "fc1.scale"
    assert diagnostics.group_variable(idata, "fc2") == "fc2.group_norm"
    assert diagnostics.summary_variables(idata) == ["tau", "fc1.rms", "fc2.rms"]
    assert idata.attrs["inference"] == "stored samples"


def test_bad_hooks_and_chains_are_named(fitted_map):
    with pytest.raises(ValueError, match=r"Chains.arviz_hyperparameters returned 'tau' with shape \(3,\)"):
        Chains(fitted_map, {"tau": torch.zeros(3)}).to_arviz()

    class NoDraws(VariationalPosterior):
        num_chains = 2

    post = NoDraws(fitted_map.model, fitted_map.guide, name="map", config=fitted_map.config)
    post.standardizer = fitted_map.standardizer
    with pytest.raises(TypeError, match="2 chains"):
        post.to_arviz()


class HookOnly:
    """Not a Posterior: only the members of the ArviZ export protocol, over the pieces of a fitted
    MAP posterior. Two chains of two draws, the MAP weights scaled by 1, 2, 3, 4."""

    stores_samples = True
    num_chains = 2
    is_fitted = True

    def __init__(self, post):
        self.name, self.config, self.device = "hook-only", {"note": "duck-typed"}, post.device
        self.task, self.net, self.model, self.standardizer = post.task, post.net, post.model, post.standardizer
        self.history = TrainingHistory(loss=[3.0, 2.0, 1.5, 1.0], epoch_seconds=[0.1] * 4,
                                       extra={"chains": [{"step_size": [0.1, 0.2], "warmup": [False, False]},
                                                         {"step_size": [0.3, 0.4], "warmup": [False, False]}],
                                              "pruned": [0.0, 0.5]})
        self._post = post

    def validate(self, x, y=None, what="data"):
        return self._post.validate(x, y, what)

    def draw_weights(self, num_samples):
        mean = self._post.posterior_mean()
        for j in range(num_samples):
            yield {s: v * (j + 1) for s, v in mean.items()}

    def sparsity(self):
        return self._post.sparsity()

    def noise_scale(self):
        return 0.5

    def arviz_draws_per_chain(self, num_samples):
        return 2

    def arviz_hyperparameters(self, num_draws):
        return {"tau": torch.arange(4.0).reshape(2, 2)}

    def arviz_sample_stats(self):
        return stored_draw_records(self.history.extra["chains"], 2)


def test_the_export_protocol_is_the_interface(fitted_map, boston):
    """to_arviz needs nothing of a posterior but the ArvizExportable protocol: a duck-typed object
    that is no Posterior converts, with its hooks' draws, statistics and history."""
    hook = HookOnly(fitted_map)
    assert isinstance(hook, diagnostics.ArvizExportable) and not isinstance(hook, bnnzoo.Posterior)
    assert isinstance(fitted_map, diagnostics.ArvizExportable)
    idata = diagnostics.to_arviz(hook, (boston.x_test, boston.y_test))
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 2
    bias = fitted_map.posterior_mean()["fc2.bias"].item()
    np.testing.assert_allclose(idata.posterior["fc2.bias"].values[..., 0], [[bias, 2 * bias], [3 * bias, 4 * bias]],
                               rtol=1e-5)
    np.testing.assert_array_equal(idata.posterior["tau"].values, [[0, 1], [2, 3]])
    np.testing.assert_allclose(idata.sample_stats["step_size"].values, [[0.1, 0.2], [0.3, 0.4]])
    assert idata.training["loss"].dims == ("chain", "epoch") and idata.training["loss"].shape == (2, 2)
    assert idata.training["pruned"].dims == ("pruned_step",)
    assert idata.training["chains.step_size"].dims == ("chain", "sample")
    assert idata.attrs["inference"] == "stored samples" and idata.attrs["bnnzoo_model"] == "hook-only"
    assert idata.attrs["noise_scale"] == pytest.approx(0.5 * fitted_map.standardizer.y_scale)
    assert idata.log_likelihood["obs"].shape == (2, 2, len(boston.y_test))

    class Partial:  # a posterior's pieces without the hook
        name, task, is_fitted = "partial", "regression", True

    with pytest.raises(TypeError, match="ArvizExportable: Partial lacks .*arviz_draws_per_chain.*stores_samples"):
        diagnostics.to_arviz(Partial())


@pytest.mark.parametrize("name", ["spike-slab-sghmc", "meanfield-vi", "em-tdamp"])
def test_runs_saved_in_format_1_convert(name, boston):
    """A run saved by the previous layout (history a plain dict) loads into a typed history and
    converts: its epochs, and a sampler's per-sample records and per-draw statistics."""
    post = bnnzoo.load(FORMAT1 / name)
    assert isinstance(post.history, TrainingHistory) and post.history.loss
    idata = arviz_quietly(post.to_arviz, (boston.x_test[:20], boston.y_test[:20]), num_samples=4)
    assert idata.training["loss"].size == len(post.history.loss)
    np.testing.assert_allclose(idata.training["loss"].values.ravel(), post.history.loss)
    if post.stores_samples:
        records = post.history.extra["chains"]
        kept = [v for v, warm in zip(records[0]["step_size"], records[0]["warmup"]) if not warm]
        np.testing.assert_allclose(idata.sample_stats["step_size"].values[0], kept, rtol=1e-6)
        assert idata.training["chains.potential"].dims == ("chain", "sample")
        assert idata.training["chains.potential"].shape[1] == len(records[0]["potential"])
        assert idata.attrs["inference"] == "stored samples"
    else:
        assert "sample_stats" not in groups(idata)
        assert idata.attrs["inference"] == "independent draws of a guide"


# ------------------------------------------------------------------------------ sites and input
def test_site_selection(fitted_classifier, fitted_map):
    net = fitted_classifier.net  # 784-50-10: above the automatic limit
    assert net.num_weights() > diagnostics.MAX_AUTO_WEIGHTS
    idata = fitted_classifier.to_arviz(num_samples=3)
    assert not any(v.endswith((".weight", ".bias")) for v in idata.posterior.data_vars)
    assert "no weights" in idata.attrs["weights"] and str(diagnostics.MAX_AUTO_WEIGHTS) in idata.attrs["weights"]
    assert "fc1.group_norm" in idata.posterior  # the per-neuron summaries are always there
    idata = fitted_classifier.to_arviz(num_samples=3, sites=["fc2", "fc1.bias"])
    assert {v for v in idata.posterior.data_vars if v.endswith((".weight", ".bias"))} == {
        "fc1.bias", "fc2.weight", "fc2.bias"}
    assert diagnostics.select_sites(fitted_map.net, "auto")[0] == list(fitted_map.net.sites())
    assert diagnostics.select_sites(fitted_map.net, None)[0] == []
    with pytest.raises(ValueError, match="unknown layer or site 'fc3'"):
        fitted_map.to_arviz(sites=["fc3"])
    with pytest.raises(ValueError, match="sites must be"):
        fitted_map.to_arviz(sites="some")


def test_bad_input_gets_a_clear_error(fitted_map, boston):
    with pytest.raises(RuntimeError, match="not fitted"):
        bnnzoo.create("map", "regression", (13,), 1, device="cpu").to_arviz()
    with pytest.raises(TypeError, match=r"pair \(x, y\)"):
        fitted_map.to_arviz(boston.x_test)
    with pytest.raises(ValueError, match="expects"):
        fitted_map.to_arviz((boston.x_test[:, :5], boston.y_test))
    with pytest.raises(ValueError, match="num_samples"):
        fitted_map.to_arviz(num_samples=0)
    with pytest.raises(FileNotFoundError):
        diagnostics.load("/nonexistent/posterior.nc")
    diverged = copy.deepcopy(fitted_map)
    with torch.no_grad():
        diverged.guide.locs["fc2"]["bias"].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="invalid network outputs"):
        diverged.to_arviz((boston.x_test, boston.y_test))
    with torch.no_grad():
        diverged.model.likelihood.log_noise_scale.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="log_noise_scale is not finite"):
        diverged.to_arviz((boston.x_test, boston.y_test))


# --------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, boston):
    post = fit_tiny("meanfield-vi", boston, epochs=3)
    return post.save(tmp_path_factory.mktemp("run") / "meanfield")


def test_diagnose_command_writes_tables_and_plots(saved_run, tmp_path, monkeypatch):
    from bnnzoo.cli import main

    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "diag"
    result = CliRunner().invoke(main, ["diagnose", str(saved_run), "--out", str(out), "--num-samples", "30"])
    assert result.exit_code == 0, result.output
    text = result.output
    n_train = len(load_dataset(None).x_train)  # the run recorded its data: Boston split 0
    for expected in ("hyperparameters and per-layer scales", "fc1.rms", "ess_bulk", f"PSIS-LOO on the {n_train} training",
                     "Pareto k:", "held-out log-likelihood", "90% central predictive interval"):
        assert expected in text, expected
    for png in ("forest", "trace", "trace_posterior", "ppc", "loo_pit"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
    back = diagnostics.load(out / "posterior.nc")
    assert back.posterior.sizes["draw"] == 30 and "training" in groups(back)


def test_diagnose_classification_reliability(fitted_classifier, mnist_small, tmp_path, capsys):
    from bnnzoo.commands.diagnose import calibration_section

    written = []
    calibration_section(fitted_classifier, mnist_small, 5, tmp_path, written)
    text = capsys.readouterr().out
    assert "ECE (15 bins)" in text and (tmp_path / "reliability.png").is_file()
    ece = bnnzoo.metrics.expected_calibration_error(fitted_classifier.predict(mnist_small.x_test, 5).probs,
                                                    mnist_small.y_test)
    assert f"ECE (15 bins) {ece:.4f}" in text


def test_diagnose_refuses_what_is_not_a_run(tmp_path):
    from bnnzoo.cli import main

    result = CliRunner().invoke(main, ["diagnose", str(tmp_path)])
    assert result.exit_code != 0 and "not a saved bnnzoo posterior" in result.output


# --------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_conversion_on_cuda(boston):
    post = bnnzoo.fit("meanfield-vi", boston, epochs=2, device="cuda", progress=False, seed=0)
    idata = post.to_arviz((boston.x_test, boston.y_test), num_samples=10, seed=1)
    ll = idata.log_likelihood["obs"].values.reshape(10, -1)
    lpd = np.logaddexp.reduce(ll, axis=0) - math.log(10)
    expected = post.log_likelihood(boston.x_test, boston.y_test, num_samples=10, seed=1).cpu().numpy()
    np.testing.assert_allclose(lpd, expected, rtol=1e-4, atol=1e-4)


def test_diagnose_reports_a_point_estimate_as_one(boston, tmp_path, monkeypatch):
    """MAP exports one draw: the report gives its values, says it is a point estimate, and claims no
    ESS, R-hat or LOO; the plots that need draws (posterior trace, LOO-PIT) are not written."""
    from bnnzoo.cli import main

    monkeypatch.setenv("MPLBACKEND", "Agg")
    run = fit_tiny("map", boston).save(tmp_path / "map")
    out = tmp_path / "diag"
    result = CliRunner().invoke(main, ["diagnose", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "a point estimate" in text and "LOO: none for a point estimate" in text
    assert "ess_bulk" not in text and "r_hat" not in text and "PSIS-LOO on" not in text
    assert "fc1.rms" in text and "value" in text
    written = {p.name for p in out.iterdir()}
    assert {"forest.png", "ppc.png", "posterior.nc"} <= written
    assert not {"trace_posterior.png", "loo_pit.png"} & written


def test_diagnose_summary_is_short_unless_full_is_asked(boston, tmp_path, monkeypatch):
    """The default summary has the per-layer and hyper-parameter rows only; ``--full`` adds one row
    per weight."""
    from bnnzoo.cli import main

    monkeypatch.setenv("MPLBACKEND", "Agg")
    run = fit_tiny("meanfield-vi", boston).save(tmp_path / "mf")
    short = CliRunner().invoke(main, ["diagnose", str(run), "--out", str(tmp_path / "a"), "--num-samples", "30"])
    full = CliRunner().invoke(main, ["diagnose", str(run), "--out", str(tmp_path / "b"), "--num-samples", "30",
                                     "--full"])
    assert short.exit_code == 0 and full.exit_code == 0, short.output + full.output
    assert "fc1.rms" in short.output and "fc1.weight[" not in short.output
    assert full.output.count("fc1.weight[") == 13 * 6  # the network is 13-6-1
