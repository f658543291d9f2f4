"""LOO of a fitted posterior (``bnnzoo.loo``): PSIS-LOO, ``az.reloo`` through ``RefitWrapper``,
which replaces the terms of high-Pareto-k points by exact refits without them, and exact LOO by
vectorised refits of the mean-field baseline (``bnnzoo.exact_loo``)."""

from __future__ import annotations

import copy
import warnings

import click
import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import bnnzoo
from bnnzoo import loo as loo_module
from bnnzoo.arviz_compat import compare, loo_fields
from bnnzoo.catalog import get_entry
from bnnzoo.commands.diagnose import loo_section
from bnnzoo.exact_loo import exact_loo, exact_loo_terms, mean_field_refits
from bnnzoo.guides import LocalReparamELBO
from bnnzoo.guides.training import set_seed
from bnnzoo.loo import RefitWrapper, loo
from bnnzoo.models.standardizer import Standardizer

NUM_SAMPLES = 100


def _fit_small(data, **options):
    """Mean-field VI with one hidden layer of 8 units, quietly (few epochs: convergence warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnnzoo.fit("meanfield-vi", data, network={"arch": "mlp", "hidden": [8]}, device="cpu",
                          progress=False, **options)


@pytest.fixture(scope="module")
def fitted(boston):
    data = boston.subset(40, 10, seed=3)
    return _fit_small(data, seed=0, epochs=30), data


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
    np.testing.assert_allclose(loo_fields(refitted).pointwise[others], loo_fields(psis).pointwise[others])
    assert loo_fields(refitted).elpd == pytest.approx(loo_fields(refitted).pointwise.sum())

    # each refitted term is the log predictive density of the point under a fresh fit without it
    i = int(chosen[0])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[i] = False
    set_seed(post.config["seed"])
    fresh = get_entry(post.name).create(post.config, device="cpu")
    fresh.fit(x[keep], y[keep], progress=False)
    lp = fresh.to_arviz((x[i:i + 1], y[i:i + 1]), num_samples=NUM_SAMPLES, sites=None, seed=1)
    expected = logsumexp(lp.log_likelihood["obs"].values.ravel()) - np.log(NUM_SAMPLES)
    assert loo_fields(refitted).pointwise[i] == pytest.approx(expected, abs=1e-5)
    assert abs(loo_fields(refitted).pointwise[i] - loo_fields(psis).pointwise[i]) > 1e-3  # a refit, not the PSIS term


def test_no_refit_below_the_threshold(fitted):
    post, data = fitted
    result = loo(post, data.x_train, data.y_train, reloo=True, k_threshold=np.inf, num_samples=NUM_SAMPLES)
    assert result["refits"] == 0


def test_diagnose_prints_psis_and_refitted_estimates(fitted, capsys, monkeypatch):
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


# ---- exact LOO by vectorised refits (bnnzoo.exact_loo) ---------------------------------------------
def _spread(refits, seed: int = 0) -> None:
    """Give every refit its own non-trivial parameters (locs, scales and noise scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in refits.locs.values():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for p in refits.log_scales.values():
            p.copy_(-2.0 + 1.5 * torch.rand(p.shape, generator=gen))
        refits.log_noise_scale.copy_(-1.0 + torch.rand(refits.log_noise_scale.shape, generator=gen))


def test_each_batched_refit_has_the_catalog_loss_and_gradients_without_its_point(fitted):
    """Refit r's batched loss, given the same parameters, noise and batch, is the catalog's
    LocalReparamELBO loss on the training data less point r (standardised with its own statistics),
    and its gradients are the catalog's: each batched refit is the catalog fit."""
    post, data = fitted
    x, y = data.x_train, data.y_train
    n, batch = len(y), 12
    points = [3, 11, 25]
    refits = mean_field_refits(post, x, y, points)
    for r, i in enumerate(points):
        assert torch.equal(refits.keep[r], torch.cat([torch.arange(i), torch.arange(i + 1, n)]))
    _spread(refits)
    gen = torch.Generator().manual_seed(1)
    pos = torch.stack([torch.randperm(n - 1, generator=gen)[:batch] for _ in points])  # each refit's own batch
    idx = refits.keep.gather(1, pos)
    widths = [layer.out_features for layer in post.net.param_layers]
    eps = []
    for r in range(len(points)):
        torch.manual_seed(100 + r)  # the draws the catalog's local_reparam_dense makes next, layer by layer
        eps.append([torch.randn(batch, w) for w in widths])
    eps = [torch.stack([e[layer] for e in eps]) for layer in range(len(widths))]
    batched = refits.loss(idx, eps=eps)
    batched.sum().backward()

    for r in range(len(points)):
        catalog = get_entry(post.name).create(post.config, device="cpu")
        with torch.no_grad():
            for site in post.net.sites():
                layer, param = site.rsplit(".", 1)
                catalog.guide.locs[layer][param].copy_(refits.locs[site][r])
                catalog.guide.log_scales[layer][param].copy_(refits.log_scales[site][r])
            catalog.model.likelihood.log_noise_scale.copy_(refits.log_noise_scale[r])
        keep = refits.keep[r]
        std = Standardizer.from_data(x[keep], y[keep], "regression")
        xs, ys = std.x(x[keep]), std.y(y[keep])
        torch.manual_seed(100 + r)
        loss = LocalReparamELBO().differentiable_loss(catalog.model, catalog.guide, xs[pos[r]], ys[pos[r]], n - 1)
        loss.backward()
        assert float(batched[r].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
        for site in post.net.sites():
            layer, param = site.rsplit(".", 1)
            torch.testing.assert_close(refits.locs[site].grad[r], catalog.guide.locs[layer][param].grad,
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(refits.log_scales[site].grad[r], catalog.guide.log_scales[layer][param].grad,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(refits.log_noise_scale.grad[r], catalog.model.likelihood.log_noise_scale.grad,
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fitted_classifier(mnist_small):
    """Mean-field VI on 40 MNIST images with a dense 784-8-10 network (inputs flattened), with no
    temperature fitted on validation rows (exact LOO repeats a fit that made no such choice)."""
    data = mnist_small.subset(40, 10, seed=0)
    return _fit_small(data, seed=2, epochs=5, batch_size=16, validation_fraction=None), data


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_a_chunk_of_one_refit_reproduces_the_catalog_refit(request, task, device):
    """A chunk of one refit draws its initialisation, minibatch orders, noise and posterior draws in
    the catalog's order, so its LOO term is the sequential refit's (RefitWrapper: a full catalog fit
    without the point) up to floating-point summation order."""
    post, data = request.getfixturevalue("fitted" if task == "regression" else "fitted_classifier")
    post = copy.deepcopy(post).to(device)
    x, y = data.x_train, data.y_train
    wrapper = RefitWrapper(post, x, y, num_samples=NUM_SAMPLES, seed=1)
    for i in (4, 17):
        exact = exact_loo_terms(post, x, y, points=[i], chunk_size=1, num_samples=NUM_SAMPLES, seed=1)
        assert exact.device.type == device
        kept, excluded = wrapper.sel_observations(np.array([i]))
        lp = wrapper.log_likelihood__i(excluded, wrapper.sample(kept)).values.ravel()
        expected = logsumexp(lp) - np.log(NUM_SAMPLES)
        assert float(exact[0]) == pytest.approx(expected, abs=1e-4)


def test_batched_refits_agree_with_one_at_a_time_refits(fitted):
    """Refits trained side by side (one chunk, independent noise) against the same refits trained one
    chunk each (each the catalog refit, previous test): the pointwise terms differ by SVI noise only,
    so their mean difference is within 4 standard errors of that noise (estimated from the pointwise
    differences themselves) and the terms are strongly correlated (the point's own fit dominates)."""
    post, data = fitted
    x, y = data.x_train, data.y_train
    points = np.arange(24)
    together = exact_loo_terms(post, x, y, points=points, num_samples=NUM_SAMPLES, seed=1, chunk_size=24).numpy()
    alone = exact_loo_terms(post, x, y, points=points, num_samples=NUM_SAMPLES, seed=1, chunk_size=1).numpy()
    d = together - alone
    assert np.isfinite(d).all() and np.abs(d).max() > 0  # different noise, not the same computation
    assert abs(d.mean()) <= 4 * d.std(ddof=1) / np.sqrt(len(d))
    assert np.corrcoef(together, alone)[0, 1] > 0.9


def test_exact_loo_is_an_arviz_elpd(fitted):
    post, data = fitted
    x, y = data.x_train, data.y_train
    result = loo(post, x, y, method="exact", num_samples=NUM_SAMPLES, seed=1, chunk_size=16)  # three chunks
    n = len(y)
    terms = loo_fields(result).pointwise
    assert result.n_data_points == n == len(terms) and result["refits"] == n and not result.warning
    assert loo_fields(result).elpd == pytest.approx(terms.sum())
    assert result.se == pytest.approx(np.sqrt(n * terms.var()))
    lppd = float(post.log_likelihood(x, y, num_samples=NUM_SAMPLES, seed=1).double().sum())
    assert loo_fields(result).p == pytest.approx(lppd - loo_fields(result).elpd)
    assert (result.pareto_k.values == 0).all()
    # ArviZ reads it as its own LOO: compare it with the PSIS estimate of the same posterior
    psis = loo(post, x, y, num_samples=NUM_SAMPLES, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = compare({"exact": result, "psis": psis})
    assert set(table.index) == {"exact", "psis"}
    assert table.loc["exact", "elpd"] == pytest.approx(loo_fields(result).elpd)


def test_exact_loo_refuses_what_it_cannot_refit(fitted):
    post, data = fitted
    x, y = data.x_train, data.y_train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        map_post = bnnzoo.fit("map", data, network={"arch": "mlp", "hidden": [8]}, device="cpu", progress=False,
                              epochs=1)
    with pytest.raises(TypeError, match="supports the 'meanfield-vi' catalog entry only, not 'map'"):
        loo(map_post, x, y, method="exact")
    conv = bnnzoo.create("meanfield-vi", "classification", (1, 28, 28), 10, network={"arch": "lenet5"}, device="cpu")
    with pytest.raises(TypeError, match="needs a dense network; lenet5 has conv2d, pool2d layers"):
        exact_loo(conv, torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    unfitted = bnnzoo.create("meanfield-vi", "regression", (13,), 1, network={"arch": "mlp", "hidden": [8]},
                             device="cpu")
    with pytest.raises(RuntimeError, match="not fitted yet"):
        exact_loo(unfitted, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chose = bnnzoo.fit("meanfield-vi", data, network={"arch": "mlp", "hidden": [8]}, device="cpu", progress=False,
                           epochs=3, validation_fraction=0.25, patience=2)
    with pytest.raises(TypeError, match="made no choice on validation data"):
        exact_loo(chose, x, y)
    with pytest.raises(ValueError, match="unknown LOO method 'kfold'"):
        loo(post, x, y, method="kfold")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        exact_loo(post, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="points must index the 40 training points"):
        exact_loo_terms(post, x, y, points=[40])
    with pytest.raises(ValueError, match="training data"):
        exact_loo(post, x, y[:-1])


def test_diagnose_prints_the_exact_loo(fitted, capsys):
    post, data = fitted
    xy = (data.x_train, data.y_train)
    idata = post.to_arviz(xy, num_samples=NUM_SAMPLES, sites=None, seed=0)
    out = loo_section(idata, post, xy, exact=True, num_samples=NUM_SAMPLES)
    text = capsys.readouterr().out
    assert f"exact LOO ({len(xy[1])} refits" in text
    expected = loo(post, *xy, method="exact", num_samples=NUM_SAMPLES)
    assert out["elpd_exact"] == pytest.approx(loo_fields(expected).elpd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        map_post = bnnzoo.fit("map", data, network={"arch": "mlp", "hidden": [8]}, device="cpu", progress=False,
                              epochs=1)
        other = bnnzoo.fit("horseshoe-svi", data, network={"arch": "mlp", "hidden": [8]}, device="cpu",
                           progress=False, epochs=1)
    # a point estimate has no LOO at all: the section says so instead of refitting or smoothing one draw
    assert loo_section(map_post.to_arviz(xy, sites=None), map_post, xy, exact=True) == {"point_estimate": True}
    assert "none for a point estimate" in capsys.readouterr().out
    with pytest.raises(click.ClickException, match="supports the 'meanfield-vi' catalog entry only"):
        loo_section(other.to_arviz(xy, num_samples=NUM_SAMPLES, sites=None), other, xy, exact=True,
                    num_samples=NUM_SAMPLES)
