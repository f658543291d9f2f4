"""What each catalog entry's ArviZ export holds: the groups, the method's own variables (inclusion
probabilities, noise variance, pruning masks and dF, sampler statistics under ArviZ's names), the
prior groups drawn from the model, predictions for new data, feature names as coordinates, the short
summary, and MAP as a point estimate. Every check runs on both ArviZ lines (through
:mod:`bnnzoo.arviz_compat` where their APIs differ)."""

from __future__ import annotations

import math
import warnings

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner

import bnnzoo
from bnnzoo import arviz_compat, diagnostics
from bnnzoo.cli import main
from bnnzoo.errors import ConfigError
from bnnzoo.loo import loo

matplotlib.use("Agg")

PRIOR_DRAWS = 40
NUM_SAMPLES = 30
FEATURES = [f"x{i}" for i in range(13)]
# the smallest fit of each entry that runs its machinery; spike-slab-sghmc: 2 chains of 14 stored draws (PSIS-LOO
# needs 25 draws in all)
TINY = {"spike-slab-sghmc": {"epochs": 21, "cycles": 3, "warmup_cycles": 1, "samples_per_cycle": 7, "thinning": 1,
                             "em_start": 1, "prune_start": 1, "num_chains": 2}}
ALL_GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "constant_data", "prior",
              "prior_predictive", "predictions", "predictions_constant_data", "training"}


def quietly(fn, *args, **kwargs):
    """Tiny fits: ArviZ warns about high Pareto k and short chains."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny(boston):
    return boston.subset(60, 30, seed=1)


@pytest.fixture(scope="module")
def exports(tiny):
    """``{name: (posterior, export)}`` for every entry, fitted and exported once."""
    out = {}
    for name in bnnzoo.list_models():
        post = quietly(bnnzoo.fit, name, tiny, network={"arch": "mlp", "hidden": [6]}, device="cpu", progress=False,
                       seed=0, **TINY.get(name, {"epochs": 2}))
        idata = quietly(post.to_arviz, (tiny.x_train, tiny.y_train), num_samples=NUM_SAMPLES, new_data=tiny.x_test,
                        prior_samples=PRIOR_DRAWS, feature_names=FEATURES)
        out[name] = post, idata
    return out


@pytest.mark.parametrize("name", bnnzoo.list_models())
def test_every_entry_exports_its_groups_and_arviz_reads_them(name, exports, tiny):
    post, idata = exports[name]
    assert set(arviz_compat.groups(idata)) >= ALL_GROUPS
    chains, draws = int(idata.posterior.sizes["chain"]), int(idata.posterior.sizes["draw"])
    assert idata.prior["fc1.weight"].shape == (1, PRIOR_DRAWS, 6, 13)
    assert idata.prior_predictive["obs"].shape == (1, PRIOR_DRAWS, 60)
    assert idata.predictions["new_obs"].dims == ("chain", "draw", "pred_id")
    assert idata.predictions["new_obs"].shape[2] == 30
    np.testing.assert_allclose(idata.predictions_constant_data["new_x"].values, tiny.x_test.numpy())
    assert list(idata.posterior["fc1.weight"].coords["fc1.in"].values) == FEATURES

    table = diagnostics.summary(idata)
    assert len(table) < post.net.num_weights() / 10 and np.isfinite(table["mean"].to_numpy()).all()
    fig = quietly(arviz_compat.plot_ppc, idata, num_pp_samples=5)
    assert fig.axes
    if post.point_estimate:
        assert name == "map" and draws == 1
        with pytest.raises(ConfigError, match="point estimate"):
            loo(post, tiny.x_train, tiny.y_train, idata=idata)
    else:
        assert draws == (NUM_SAMPLES if chains == 1 else draws) and "point_estimate" not in idata.posterior.attrs
        fields = arviz_compat.loo_fields(quietly(arviz_compat.loo, idata))
        assert math.isfinite(fields.elpd)


def test_map_is_a_point_estimate(exports, tiny):
    post, idata = exports["map"]
    assert idata.posterior.attrs["point_estimate"] == 1 and diagnostics.is_point_estimate(idata)
    assert idata.posterior.sizes["draw"] == 1 and "point estimate" in idata.attrs["inference"]
    mean = post.posterior_mean()
    np.testing.assert_allclose(idata.posterior["fc1.weight"].values[0, 0], mean["fc1.weight"].detach().numpy(), rtol=1e-6)
    # the predictive at the point is still a distribution: NUM_SAMPLES replicas of the one draw
    reps = idata.posterior_predictive["obs"].values
    assert reps.shape == (1, NUM_SAMPLES, 60) and (reps.std(axis=1) > 0).all()
    assert idata.log_likelihood["obs"].shape == (1, 1, 60)
    table = diagnostics.summary(idata)
    assert not {"ess_bulk", "ess_tail", "r_hat", "mcse_mean"} & set(table.columns)


def test_diagnose_reports_a_map_run_as_a_point_estimate(tmp_path):
    runner = CliRunner()
    run = tmp_path / "map"
    fitted = runner.invoke(main, ["fit", "map", "--epochs", "2", "--device", "cpu", "--out", str(run)])
    assert fitted.exit_code == 0, fitted.output
    result = quietly(runner.invoke, main, ["diagnose", str(run), "--num-samples", "10"])
    assert result.exit_code == 0, result.output
    assert "point estimate" in result.output
    assert "PSIS-LOO on" not in result.output and "ess_bulk" not in result.output and "r_hat" not in result.output


def test_em_tdamp_exports_inclusion_probabilities_and_noise_variance(exports):
    post, idata = exports["em-tdamp"]
    incl = idata.constant_data["fc1.inclusion_probability"]
    assert incl.dims == ("fc1.out",)
    np.testing.assert_allclose(incl.values, post.inclusion()["fc1"].numpy(), rtol=1e-6)
    assert ((incl.values >= 0) & (incl.values <= 1)).all()
    noise = idata.constant_data["noise_variance"].values.item()  # 0.x stores a scalar as shape (1,)
    assert noise == pytest.approx(float(post.guide.noise_var()) * post.standardizer.y_scale ** 2, rel=1e-5)


@pytest.mark.parametrize("name", ["bmr", "bmr-iterative"])
def test_bmr_exports_masks_and_evidence_changes(name, exports):
    post, idata = exports[name]
    masks = post.masks()
    for site, keep in masks.items():
        exported = idata.constant_data[f"{site}.mask"]
        assert exported.dims == tuple(diagnostics.site_dims(post.net, site))
        np.testing.assert_array_equal(exported.values.astype(bool), keep.numpy())
    d_f = idata.constant_data["fc1.weight.delta_f"].values
    keep = masks["fc1.weight"].numpy()
    assert d_f.shape == (6, 13) and np.isinf(d_f[~keep]).all() and np.isfinite(d_f[keep]).all()
    if name == "bmr":  # the post-hoc reduction of the tiny fit prunes weights: the +inf check bites
        assert not keep.all()


def test_sghmc_exports_lp_and_its_sampler_statistics(exports):
    post, idata = exports["spike-slab-sghmc"]
    stats = idata.sample_stats
    assert {"lp", "step_size"} <= set(stats.data_vars) and "potential" not in stats.data_vars
    assert stats["lp"].dims == ("chain", "draw") and stats["lp"].shape == (2, 14)
    records = post.history.extra["chains"]
    for c, record in enumerate(records):
        kept = [-u for u, warm in zip(record["potential"], record["warmup"]) if not warm]
        np.testing.assert_allclose(stats["lp"].values[c], kept, rtol=1e-6)
    assert (stats["step_size"].values > 0).all()


def test_prior_groups_are_draws_of_the_model(exports):
    post, idata = exports["meanfield-vi"]
    scale = post.config["model"]["prior_scale"]
    w = idata.prior["fc1.weight"].values
    assert abs(w.mean()) < 0.1 * scale and w.std() == pytest.approx(scale, rel=0.1)
    assert idata.prior["fc1.group_norm"].dims == ("chain", "draw", "fc1.out")
    # prior replicas are in the original units of y: centred near the training mean, wider than the data
    reps = idata.prior_predictive["obs"].values
    assert reps.std() > idata.observed_data["obs"].values.std()


def test_predictions_follow_the_posterior_predictive(exports, tiny):
    post, idata = exports["map"]
    reps = idata.predictions["new_obs"].values.reshape(-1, 30)
    mean = post.predict(tiny.x_test, num_samples=1).mean.numpy().reshape(-1)
    noise = post.noise_scale(original_units=True)
    assert np.abs(reps.mean(0) - mean).max() < 4 * noise / math.sqrt(len(reps)) + 1e-4


def test_feature_names_label_the_input_dimension(exports, tiny):
    post, _ = exports["meanfield-vi"]
    plain = post.to_arviz(num_samples=2)
    assert list(plain.posterior["fc1.weight"].coords["fc1.in"].values) == list(range(13))
    with pytest.raises(ConfigError, match="feature_names"):
        post.to_arviz(num_samples=2, feature_names=FEATURES[:5])


def test_short_and_full_summaries(exports):
    post, idata = exports["horseshoe-svi"]
    short, full = diagnostics.summary_variables(idata), diagnostics.summary_variables(idata, full=True)
    assert set(short) < set(full) and not any(v.endswith((".weight", ".bias")) for v in short)
    rows = len(quietly(diagnostics.summary, idata, full=True))
    assert rows > post.net.num_weights() > 10 * len(quietly(diagnostics.summary, idata))


def test_new_groups_survive_netcdf(exports, tmp_path):
    for name in ("map", "bmr", "em-tdamp", "spike-slab-sghmc"):
        _, idata = exports[name]
        back = diagnostics.load(diagnostics.save(idata, tmp_path / f"{name}.nc"))
        assert set(arviz_compat.groups(back)) == set(arviz_compat.groups(idata))
        assert diagnostics.is_point_estimate(back) == (name == "map")
        for group in ("constant_data", "prior", "predictions"):
            for var in idata[group].data_vars:
                np.testing.assert_array_equal(back[group][var].values, idata[group][var].values)
