"""LOO of a fitted posterior (``bnnzoo.loo``): PSIS-LOO, and ``az.reloo`` through ``RefitWrapper``,
which replaces the terms of high-Pareto-k points by exact refits without them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import bnnzoo
from bnnzoo.catalog import get_entry
from bnnzoo.loo import RefitWrapper, loo
from bnnzoo.training import set_seed

NUM_SAMPLES = 100


@pytest.fixture(scope="module")
def fitted(boston):
    data = boston.subset(40, 10, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = bnnzoo.fit("meanfield-vi", data, network={"arch": "mlp", "hidden": [8]}, device="cpu",
                          progress=False, seed=0, epochs=30)
    return post, data


def test_wrapper_excludes_exactly_the_chosen_points(fitted):
    post, data = fitted
    wrapper = RefitWrapper(post, data.x_train, data.y_train)
    (x_kept, y_kept), (x_out, y_out) = wrapper.sel_observations(np.array([[4]]))
    assert len(y_kept) == len(data.y_train) - 1 and len(y_out) == 1
    assert torch.equal(x_out[0], data.x_train[4]) and torch.equal(y_out[0], data.y_train[4])
    assert torch.equal(x_kept, torch.cat([data.x_train[:4], data.x_train[5:]]))


def test_reloo_replaces_high_k_terms_by_exact_refits(fitted):
    post, data = fitted
    x, y = data.x_train, data.y_train
    psis = loo(post, x, y, num_samples=NUM_SAMPLES, seed=1)
    k = psis.pareto_k.values
    threshold = float(np.sort(k)[-3])  # refit the two points of highest k
    refitted = loo(post, x, y, reloo=True, k_threshold=threshold, num_samples=NUM_SAMPLES, seed=1)
    chosen = np.flatnonzero(k > threshold)
    assert refitted["refits"] == len(chosen) == 2
    np.testing.assert_array_equal(refitted["pareto_k_psis"].values, k)
    assert (refitted.pareto_k.values[chosen] == 0).all()
    others = np.setdiff1d(np.arange(len(y)), chosen)
    np.testing.assert_allclose(refitted.loo_i.values[others], psis.loo_i.values[others])
    assert refitted.elpd_loo == pytest.approx(refitted.loo_i.values.sum())

    # each refitted term is the log predictive density of the point under a fresh fit without it
    i = int(chosen[0])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[i] = False
    set_seed(post.config["seed"])
    fresh = get_entry(post.name).create(post.config, device="cpu")
    fresh.fit(x[keep], y[keep], progress=False)
    lp = fresh.to_arviz((x[i:i + 1], y[i:i + 1]), num_samples=NUM_SAMPLES, sites=None, seed=1)
    expected = logsumexp(lp.log_likelihood["obs"].values.ravel()) - np.log(NUM_SAMPLES)
    assert refitted.loo_i.values[i] == pytest.approx(expected, abs=1e-5)
    assert abs(refitted.loo_i.values[i] - psis.loo_i.values[i]) > 1e-3  # a refit, not the PSIS term


def test_no_refit_below_the_threshold(fitted):
    post, data = fitted
    result = loo(post, data.x_train, data.y_train, reloo=True, k_threshold=np.inf, num_samples=NUM_SAMPLES)
    assert result["refits"] == 0


def test_diagnose_prints_psis_and_refitted_estimates(fitted, capsys, monkeypatch):
    from bnnzoo import loo as loo_module
    from bnnzoo.commands.diagnose import loo_section

    post, data = fitted
    xy = (data.x_train, data.y_train)
    idata = post.to_arviz(xy, num_samples=NUM_SAMPLES, sites=None, seed=0)
    k = loo(post, *xy, idata=idata).pareto_k.values
    monkeypatch.setattr(loo_module, "K_THRESHOLD", float(np.sort(k)[-2]))  # one refit keeps it quick
    out = loo_section(idata, post, xy, reloo=True, num_samples=NUM_SAMPLES)
    text = capsys.readouterr().out
    assert f"PSIS-LOO on the {len(xy[1])} training points" in text
    assert out["refits"] == 1 and "with exact refits for the 1 points" in text
    assert out["elpd_reloo"] != pytest.approx(out["elpd_loo"])
