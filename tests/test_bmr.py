"""Bayesian model reduction: the formulas against exact conjugate answers and quadrature, the
spike-and-slab threshold, ``reduce`` over the GaussianWeights protocol (the three guides that
implement it, a guide that does not), reducing fitted posteriors, iterative BMR, and ``bnnzoo prune``."""

from __future__ import annotations

import copy
import itertools
import json
import math

import numpy as np
import pyro
import pytest
import torch
from click.testing import CliRunner
from conftest import make_model, randomise_guide, spread_state
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from scipy import integrate, optimize, special

import bnnzoo
from bnnzoo.cli import main as cli
from bnnzoo.guides import (
    HorseshoeGuide,
    LocalReparamELBO,
    MeanFieldNormal,
    PointMass,
    TDAMPGuide,
    bmr,
)
from bnnzoo.guides.bmr import GaussianSite, GaussianWeights, Reduction
from bnnzoo.guides.closed_form_kl import kl_lognormal_gamma
from bnnzoo.guides.meanfield import LayerScaleMeanFieldNormal
from bnnzoo.guides.sites import get_site
from bnnzoo.guides.weight_guide import PRUNED_SCALE
from bnnzoo.models import (
    BayesianNeuralNetwork,
    BernoulliGaussianPrior,
    GaussianLikelihood,
    HorseshoePrior,
    make_likelihood,
)
from bnnzoo.models.networks import mlp
from bnnzoo.models.priors import LayerScaleGaussianPrior
from bnnzoo.models.sparsity import EmptyLayerWarning

F64 = torch.float64


# ---- a conjugate model: linear-Gaussian regression with exact evidence ------------------------------
def log_evidence(x, y, noise_var, prior_mean, prior_cov):
    """``ln N(y; X m, X C X' + noise I)``: the exact evidence of ``y = X w + e`` under ``w ~ N(m, C)``."""
    cov = x @ prior_cov @ x.T + noise_var * torch.eye(len(y), dtype=F64)
    return torch.distributions.MultivariateNormal(x @ prior_mean, cov).log_prob(y)


def exact_posterior(x, y, noise_var, prior_mean, prior_cov):
    prec = x.T @ x / noise_var + torch.linalg.inv(prior_cov)
    cov = torch.linalg.inv(prec)
    return cov @ (x.T @ y / noise_var + torch.linalg.solve(prior_cov, prior_mean)), cov


def regression(n=40, d=5, orthogonal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    if orthogonal:  # X'X diagonal: the exact posterior factorises, so mean-field BMR is exact too
        q, _ = torch.linalg.qr(x)
        x = q * torch.linspace(1.0, 4.0, d, dtype=F64)
    w = torch.tensor([1.5, 0.0, -0.8, 0.0, 0.05][:d], dtype=F64)
    y = x @ w + 0.5 * torch.randn(n, generator=gen, dtype=F64)
    return x, y, 0.25


def test_multivariate_matches_exact_evidence_and_posterior():
    x, y, noise = regression()
    d = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    p_mean, p_cov = 0.3 * torch.randn(d, generator=gen, dtype=F64), a @ a.T / d + torch.eye(d, dtype=F64)
    q_mean, q_cov = exact_posterior(x, y, noise, p_mean, p_cov)
    # reduced priors: shrink some weights, move a mean, correlate, all at once
    b = 0.3 * torch.randn(d, d, generator=gen, dtype=F64)
    for r_mean, r_cov in [
        (torch.zeros(d, dtype=F64), torch.diag(torch.tensor([1.0, 1e-3, 1.0, 1e-4, 1.0], dtype=F64))),
        (0.1 * torch.ones(d, dtype=F64), b @ b.T + 0.05 * torch.eye(d, dtype=F64)),
    ]:
        d_f, s_mean, s_cov = bmr.delta_f_multivariate(q_mean, q_cov, p_mean, p_cov, r_mean, r_cov)
        exact = log_evidence(x, y, noise, r_mean, r_cov) - log_evidence(x, y, noise, p_mean, p_cov)
        assert abs(float(d_f - exact)) < 1e-6, (d_f, exact)
        e_mean, e_cov = exact_posterior(x, y, noise, r_mean, r_cov)
        torch.testing.assert_close(s_mean, e_mean, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(s_cov, e_cov, atol=1e-9, rtol=1e-7)


def test_meanfield_matches_exact_evidence_and_posterior_when_posterior_factorises():
    x, y, noise = regression(orthogonal=True)
    d, s2 = x.shape[1], 2.0
    p_cov = s2 * torch.eye(d, dtype=F64)
    q_mean, q_cov = exact_posterior(x, y, noise, torch.zeros(d, dtype=F64), p_cov)
    assert torch.allclose(q_cov, torch.diag(torch.diag(q_cov)), atol=1e-12)
    q_var = torch.diag(q_cov)
    r2 = torch.tensor([s2, 1e-2, 0.5, 1e-6, s2], dtype=F64)
    d_f, mu_r, var_r = bmr.reduced_normal(q_mean, q_var, s2, r2)
    exact = (log_evidence(x, y, noise, torch.zeros(d, dtype=F64), torch.diag(r2))
             - log_evidence(x, y, noise, torch.zeros(d, dtype=F64), p_cov))
    # a group of weights (here: all of them) changes the evidence by the sum of its weights' dF
    assert abs(float(bmr.group_delta_f(d_f.unsqueeze(0)) - exact)) < 1e-6
    assert abs(float(d_f[0])) < 1e-12  # an unchanged prior changes nothing
    e_mean, e_cov = exact_posterior(x, y, noise, torch.zeros(d, dtype=F64), torch.diag(r2))
    torch.testing.assert_close(mu_r, e_mean, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(var_r, torch.diag(e_cov), atol=1e-10, rtol=1e-8)


def test_savage_dickey_is_exact_for_removing_one_weight():
    """Removing weight j is exact with its marginal posterior, even for a correlated posterior."""
    x, y, noise = regression(orthogonal=False, seed=3)
    d, s2 = x.shape[1], 1.5
    q_mean, q_cov = exact_posterior(x, y, noise, torch.zeros(d, dtype=F64), s2 * torch.eye(d, dtype=F64))
    full = log_evidence(x, y, noise, torch.zeros(d, dtype=F64), s2 * torch.eye(d, dtype=F64))
    for j in range(d):
        keep = [i for i in range(d) if i != j]
        xr = x[:, keep]
        reduced = log_evidence(xr, y, noise, torch.zeros(d - 1, dtype=F64), s2 * torch.eye(d - 1, dtype=F64))
        sd = bmr.savage_dickey(q_mean[j], q_cov[j, j], s2)
        assert abs(float(sd - (reduced - full))) < 1e-6
        # the r -> 0 limit of the general formula, and r = 0 itself
        d_f0, mu0, var0 = bmr.reduced_normal(q_mean[j], q_cov[j, j], s2, 0.0)
        assert float(d_f0) == pytest.approx(float(sd), abs=1e-12) and float(mu0) == 0 and float(var0) == 0
        d_small = bmr.delta_f(q_mean[j], q_cov[j, j], s2, 1e-12)
        assert abs(float(d_small - sd)) < 1e-6


# ---- one weight: quadrature -----------------------------------------------------------------------
def _normal_pdf(w, mean, var):
    return math.exp(-0.5 * (w - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)


@pytest.mark.parametrize("mu,sigma,s,r", [
    (0.3, 0.2, 1.0, 0.1), (-1.2, 0.5, 2.0, 0.7), (0.05, 0.8, 1.0, 0.01), (2.0, 0.1, 1.0, 0.5), (0.0, 1.0, 1.0, 1.0),
])
def test_delta_f_and_reduced_posterior_against_quadrature(mu, sigma, s, r):
    def integrand(w, power=0):
        return w**power * _normal_pdf(w, mu, sigma**2) * _normal_pdf(w, 0, r**2) / _normal_pdf(w, 0, s**2)

    lo, hi = mu - 12 * sigma, mu + 12 * sigma
    z = integrate.quad(integrand, lo, hi, points=[0.0] if lo < 0 < hi else None, epsabs=1e-14, epsrel=1e-12,
                       limit=200)[0]
    m1 = integrate.quad(integrand, lo, hi, args=(1,), epsabs=1e-14, epsrel=1e-12, limit=200)[0] / z
    m2 = integrate.quad(integrand, lo, hi, args=(2,), epsabs=1e-14, epsrel=1e-12, limit=200)[0] / z
    d_f, mu_r, var_r = bmr.reduced_normal(torch.tensor(mu, dtype=F64), sigma**2, s**2, r**2)
    assert float(d_f) == pytest.approx(math.log(z), abs=1e-7)
    assert float(mu_r) == pytest.approx(m1, abs=1e-7)
    assert float(var_r) == pytest.approx(m2 - m1**2, rel=1e-6, abs=1e-10)


def test_formulas_broadcast_and_reject_bad_input():
    mu = torch.randn(4, 3, dtype=F64)
    d_f = bmr.delta_f(mu, torch.full((4, 3), 0.1, dtype=F64), 1.0, torch.tensor([0.0, 0.01, 0.5], dtype=F64))
    assert d_f.shape == (4, 3)
    with pytest.raises(ValueError, match="too wide"):  # p + 1/r^2 - 1/s^2 = 0.25 + 0.5 - 1 < 0
        bmr.delta_f(0.1, 4.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="posterior variances"):
        bmr.delta_f(0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="reduced prior variances"):
        bmr.delta_f(0.0, 1.0, 1.0, -0.5)


def test_multivariate_reduces_to_diagonal_form():
    gen = torch.Generator().manual_seed(5)
    d = 6
    mu = torch.randn(d, generator=gen, dtype=F64)
    var = torch.rand(d, generator=gen, dtype=F64) * 0.5 + 0.05
    s2 = torch.rand(d, generator=gen, dtype=F64) + 1.0
    r2 = s2 * torch.rand(d, generator=gen, dtype=F64) * 0.9 + 1e-3
    d_f, mu_r, var_r = bmr.reduced_normal(mu, var, s2, r2)
    zero = torch.zeros(d, dtype=F64)
    mv, m_mean, m_cov = bmr.delta_f_multivariate(mu, torch.diag(var), zero, torch.diag(s2), zero, torch.diag(r2))
    assert float(mv) == pytest.approx(float(d_f.sum()), abs=1e-10)
    torch.testing.assert_close(m_mean, mu_r)
    torch.testing.assert_close(torch.diag(m_cov), var_r)
    torch.testing.assert_close(m_cov, torch.diag(var_r))


# ---- spike-and-slab threshold ------------------------------------------------------------------------

def _ss_equation(zeta: float, d_f: np.ndarray, alpha: float = 1.0, beta: float = 1.0) -> float:
    """The defining equation of the S&S threshold: ``zeta = E[ln pi] - E[ln(1 - pi)]`` under
    ``q(pi) = Beta(alpha + sum q, beta + sum (1 - q))`` with ``q_i = sigmoid(zeta - dF_i)``; returns
    the left side minus the right (``+inf`` entries have ``q_i = 0``)."""
    q = special.expit(zeta - d_f)
    return zeta - (special.digamma(alpha + q.sum()) - special.digamma(beta + (1 - q).sum()))


def test_spike_and_slab_threshold_is_the_fixed_point_of_its_equation():
    """Independent of the iteration: the root of the defining equation by Brent's method (the
    equation's left side minus right side changes sign once on a fine grid, so the root is the
    unique fixed point), against the implementation iterated to convergence."""
    gen = np.random.default_rng(0)
    cases = [gen.normal(0, 3, 500), gen.normal(4, 2, 1000), gen.normal(-6, 1, 50), np.array([0.5]),
             np.concatenate([gen.normal(-5, 1, 30), gen.normal(5, 1, 300)]), np.array([-1.0, 2.0, np.inf, np.inf])]
    grid = np.linspace(-30, 30, 6001)
    for d_f in cases:
        values = np.array([_ss_equation(z, d_f) for z in grid])
        assert np.count_nonzero(np.diff(np.sign(values))) == 1  # one root on [-30, 30]
        root = optimize.brentq(_ss_equation, -30, 30, args=(d_f,), xtol=1e-14)
        zeta = float(bmr.spike_and_slab_threshold(torch.tensor(d_f, dtype=F64), num_iters=500))
        assert zeta == pytest.approx(root, abs=1e-8)
        assert abs(_ss_equation(zeta, d_f)) < 1e-8
    # the default (4 iterations from the prior's zeta = 0) lands near the fixed point of a layer
    # that is mostly prunable or mostly kept: both far from 0, on the right side
    for d_f, sign in ((np.full(100, 30.0), -1), (np.full(100, -30.0), 1)):
        zeta = float(bmr.spike_and_slab_threshold(torch.tensor(d_f)))
        root = optimize.brentq(_ss_equation, -30, 30, args=(d_f,))
        assert sign * zeta > 3 and zeta == pytest.approx(root, abs=0.05)


def test_prune_decision_and_how_pruned_weights_count():
    d_f = torch.tensor([-1.0, 2.0, math.inf, math.inf], dtype=F64)
    prune, zeta = bmr.prune_decision(d_f, "ss")
    assert prune.tolist() == (d_f > zeta).tolist() and prune[2:].all()
    # counted as prior (dF = 0) the pruned weights stay pruned, but pull the threshold less far down
    prune_p, zeta_p = bmr.prune_decision(d_f, "ss", count_pruned="prior")
    assert prune_p[2:].all() and float(zeta_p) > float(zeta)
    one_step = float(bmr.spike_and_slab_threshold(torch.tensor([-1.0, 2.0, 0.0, 0.0], dtype=F64)))
    assert float(zeta_p) == pytest.approx(one_step, abs=1e-12)
    prune, zeta = bmr.prune_decision(torch.tensor([-0.1, 0.1]), "plain")
    assert prune.tolist() == [False, True] and float(zeta) == 0
    with pytest.raises(ValueError, match="unknown BMR rule"):
        bmr.prune_decision(d_f, "lasso")
    with pytest.raises(ValueError, match="count_pruned"):
        bmr.prune_decision(d_f, "ss", count_pruned="maybe")


# ---- reducing a guide in place -----------------------------------------------------------------------
def reduced_copy(guide, **options):
    """``bmr.reduce`` on a deep copy of ``guide``: the copy and the returned reduction."""
    reduced = copy.deepcopy(guide)
    reduction = bmr.reduce(reduced, **options)
    assert isinstance(reduction, Reduction)
    return reduced, reduction


def test_reduce_masks_and_freezes_in_place():
    torch.manual_seed(0)
    model = make_model(mlp(13, [20, 10], 1), prior_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), loc_scale=0.3, log_scale_range=(-3.0, -0.5))
    reduced, reduction = reduced_copy(guide, rule="plain")
    d_f = bmr.evidence_changes(guide)
    assert set(d_f) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # not the output layer
    assert set(reduction.summary()["layers"]) == {"fc1", "fc2"}
    for site, values in d_f.items():
        keep = reduced.mask(site)
        assert torch.equal(keep, ~(values > 0)) and torch.equal(reduction.masks[site], keep)
        assert (get_site(reduced.locs, site)[~keep] == 0).all()
        assert (get_site(reduced.log_scales, site)[~keep] == math.log(PRUNED_SCALE)).all()
        assert torch.equal(get_site(reduced.locs, site)[keep], get_site(guide.locs, site)[keep])
        assert torch.equal(get_site(reduced.log_scales, site)[keep], get_site(guide.log_scales, site)[keep])
        draws = torch.stack([reduced.draw()[site] for _ in range(5)])
        assert (draws[:, ~keep] == 0).all() and (draws[:, keep] != 0).all()
    assert reduced.mask("fc3.weight") is None
    # reducing again changes nothing; masks only ever shrink, and pruned weights count as pruned
    masks = {s: m.clone() for s, m in reduced.masks.items()}
    bmr.reduce(reduced, rule="plain")
    for site in d_f:
        assert torch.equal(reduced.mask(site), masks[site])
    assert all(torch.isinf(v[~masks[s]]).all() for s, v in bmr.evidence_changes(reduced).items())


def test_reduce_with_a_wide_reduced_prior_shrinks_instead():
    model = make_model(mlp(4, [6], 2), prior_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), seed=2)
    reduced, _ = reduced_copy(guide, rule="plain", reduced_var=0.05)
    assert len(reduced.masks) == 0
    mu, var, s2 = guide.gaussian_weights()["fc1.weight"]
    d_f, mu_r, var_r = bmr.reduced_normal(mu.double(), var.double(), s2, 0.05)
    accept = d_f > 0
    assert 0 < int(accept.sum()) < accept.numel()
    new_loc = get_site(reduced.locs, "fc1.weight").double()
    new_var = torch.exp(2 * get_site(reduced.log_scales, "fc1.weight")).double()
    torch.testing.assert_close(new_loc[accept], mu_r[accept], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(new_var[accept], var_r[accept], rtol=1e-5, atol=1e-9)
    assert torch.equal(new_loc[~accept], mu.double()[~accept])


def test_group_level_prunes_whole_neurons():
    model = make_model(mlp(5, [8], 1), prior_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), loc_scale=0.05, log_scale_range=(-3.0, -1.0), seed=1)
    with torch.no_grad():  # two neurons carry strong evidence
        get_site(guide.locs, "fc1.weight")[:2] = 3.0
    reduced, _ = reduced_copy(guide, rule="plain", level="group")
    d_f = bmr.evidence_changes(guide)
    group = bmr.group_delta_f(d_f["fc1.weight"], d_f["fc1.bias"])
    rows = reduced.mask("fc1.weight").all(1)
    assert torch.equal(rows, ~(group > 0)) and torch.equal(reduced.mask("fc1.bias"), rows)
    assert (reduced.mask("fc1.weight").all(1) | ~reduced.mask("fc1.weight").any(1)).all()
    assert rows[:2].all() and not rows.all()


# ---- the GaussianWeights protocol: the three guides, and masks as before the protocol ----------------
def meanfield_guide():
    model = make_model(mlp(6, [8, 5], 1), prior_scale=1.0)
    return randomise_guide(MeanFieldNormal(model), loc_scale=0.3, log_scale_range=(-3.0, -0.5), seed=5)


def horseshoe_guide():
    net = mlp(6, [8, 5], 1)
    guide = HorseshoeGuide(BayesianNeuralNetwork(net, HorseshoePrior(net), make_likelihood("regression", noise_scale=0.7)))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if name.startswith("locs."):
                p.copy_(0.8 * torch.randn(p.shape, generator=gen))
            elif name.startswith("log_scales."):
                p.copy_(-2.0 + 1.8 * torch.rand(p.shape, generator=gen))
    return guide


def tdamp_guide():
    net = mlp(6, [8, 5], 1)
    guide = TDAMPGuide(BayesianNeuralNetwork(net, BernoulliGaussianPrior(net, rho=0.5), GaussianLikelihood(0.5)))
    return spread_state(guide, seed=7)  # messages of precision up to 3 / sigma^2


GUIDES = {"meanfield": meanfield_guide, "horseshoe": horseshoe_guide, "tdamp": tdamp_guide}

# The masks (per site, one string per row, "1" = kept) that BMR gave these guides in the previous
# layout (the isinstance adapters of bnnzoo.methods.bmr), neuron 0 of fc1 pruned beforehand;
# keyed by guide / rule / level / layers reduced. The horseshoe guide's masks are closed over removed
# groups since (closed_over_removed_groups); with fc2's column 0 removed, its ss rule at weight level
# removes two more of fc2's entries.
EXPECTED_MASKS = {
    "meanfield/ss/weight/hidden": {
        "fc1.bias": "00001001",
        "fc1.weight": "000000 000011 000010 000000 000000 010110 100100 000001",
        "fc2.bias": "01000",
        "fc2.weight": "01100000 01001010 00010010 00000011 00110000",
    },
    "meanfield/plain/weight/hidden": {
        "fc1.bias": "00001001",
        "fc1.weight": "000000 010011 100010 000000 000110 010110 100100 001001",
        "fc2.bias": "01000",
        "fc2.weight": "01110000 01001010 00010010 00000011 00110000",
    },
    "meanfield/ss/group/hidden": {
        "fc1.bias": "01100111",
        "fc1.weight": "000000 111111 111111 000000 000000 111111 111111 111111",
        "fc2.bias": "11010",
        "fc2.weight": "11111111 11111111 00000000 11111111 00000000",
    },
    "meanfield/ss/weight/last": {
        "fc1.bias": "00001001",
        "fc1.weight": "000000 000011 000010 000000 000000 010110 100100 000001",
        "fc2.bias": "01000",
        "fc2.weight": "01100000 01001010 00010010 00000011 00110000",
        "fc3.bias": "0",
        "fc3.weight": "11000",
    },
    "horseshoe/ss/weight/hidden": {
        "fc1.bias": "01111110",
        "fc1.weight": "000000 001111 111111 000111 111111 011011 111010 011101",
        "fc2.bias": "11101",  # since the horseshoe's masks are closed: 11111 and all ones before
        "fc2.weight": "11111111 11111111 11111111 11011111 11111111",
    },
    "horseshoe/plain/weight/hidden": {
        "fc1.bias": "01010010",
        "fc1.weight": "000000 000110 011111 000111 111100 001011 011010 011001",
        "fc2.bias": "10101",
        "fc2.weight": "10101010 01110101 01001111 10011001 01111101",
    },
    "horseshoe/ss/group/hidden": {
        "fc1.bias": "01111111",
        "fc1.weight": "000000 111111 111111 111111 111111 111111 111111 111111",
        "fc2.bias": "11111",
        "fc2.weight": "11111111 11111111 11111111 11111111 11111111",
    },
    "horseshoe/ss/weight/last": {
        "fc1.bias": "01111110",
        "fc1.weight": "000000 001111 111111 000111 111111 011011 111010 011101",
        "fc2.bias": "11101",  # since the horseshoe's masks are closed: 11111 and all ones before
        "fc2.weight": "11111111 11111111 11111111 11011111 11111111",
        "fc3.bias": "0",
        "fc3.weight": "00000",
    },
    "tdamp/ss/weight/hidden": {
        "fc1.bias": "01000100",
        "fc1.weight": "000000 000001 000000 000000 000000 001000 000000 000000",
        "fc2.bias": "10001",
        "fc2.weight": "00001000 00000000 00000000 00000000 01000010",
    },
    "tdamp/plain/weight/hidden": {
        "fc1.bias": "01011111",
        "fc1.weight": "000000 011001 000000 001100 010000 101000 001000 011001",
        "fc2.bias": "11111",
        "fc2.weight": "00001000 00000010 00100001 01000100 01000010",
    },
    "tdamp/ss/group/hidden": {
        "fc1.bias": "01010101",
        "fc1.weight": "000000 111111 000000 111111 000000 111111 000000 111111",
        "fc2.bias": "00001",
        "fc2.weight": "00000000 00000000 00000000 00000000 11111111",
    },
    "tdamp/ss/weight/last": {
        "fc1.bias": "01000100",
        "fc1.weight": "000000 000001 000000 000000 000000 001000 000000 000000",
        "fc2.bias": "10001",
        "fc2.weight": "00001000 00000000 00000000 00000000 01000010",
        "fc3.bias": "1",
        "fc3.weight": "11111",
    },
}


def closed_over_removed_groups(expected: dict[str, str], widths=(6, 8, 5, 1)) -> dict[str, str]:
    """The masks of :data:`EXPECTED_MASKS` (as strings) with every weight fed by a removed group
    removed too, as the horseshoe guide closes them (``HorseshoeGuide.close_masks``)."""
    out = dict(expected)
    for i in (2, 3):
        w, b = expected.get(f"fc{i - 1}.weight"), expected.get(f"fc{i - 1}.bias")
        if w is None or b is None:
            continue
        w = out[f"fc{i - 1}.weight"]
        removed = [k for k, row in enumerate(w.split()) if "1" not in row and b[k] == "0"]
        if not removed:
            continue
        rows = out.get(f"fc{i}.weight", " ".join(["1" * widths[i - 1]] * widths[i])).split()
        out[f"fc{i}.weight"] = " ".join("".join("0" if j in removed else v for j, v in enumerate(row)) for row in rows)
    return out


def mask_rows(mask: torch.Tensor) -> str:
    rows = mask.reshape(mask.shape[0], -1) if mask.dim() > 1 else mask.reshape(1, -1)
    return " ".join("".join("1" if v else "0" for v in row.tolist()) for row in rows)


@pytest.mark.parametrize("kind", list(GUIDES))
def test_the_catalog_guides_implement_the_protocol(kind):
    guide = GUIDES[kind]()
    assert isinstance(guide, GaussianWeights)
    weights = guide.gaussian_weights()
    for site, entry in weights.items():
        assert isinstance(entry, GaussianSite)
        assert entry.loc.shape == entry.variance.shape == guide.net.sites()[site]
        assert bool((entry.variance > 0).all()) and bool((torch.as_tensor(entry.prior_variance) > 0).all())
    if kind == "tdamp":  # a bias goes with its neuron: offered at the group level only
        assert {s.rpartition(".")[2] for s in weights} == {"weight"}
        assert set(guide.gaussian_weights("group")) == set(guide.net.sites())
    else:
        assert set(weights) == set(guide.net.sites())


@pytest.mark.parametrize("case", sorted(EXPECTED_MASKS))
def test_reduce_gives_the_masks_of_the_previous_layout(case):
    kind, rule, level, layers = case.split("/")
    guide = GUIDES[kind]()
    rows = torch.arange(8) != 0
    guide.set_masks({"fc1.weight": rows.unsqueeze(1).expand(8, 6).clone(), "fc1.bias": rows})
    # the previous layout had no empty-layer guard (horseshoe/ss/weight/last empties fc3)
    bmr.reduce(guide, rule=rule, level=level, prune_last=layers == "last", allow_empty=True)
    expected = closed_over_removed_groups(EXPECTED_MASKS[case]) if kind == "horseshoe" else EXPECTED_MASKS[case]
    assert {site: mask_rows(m) for site, m in guide.masks.items()} == expected
    assert not guide.mask("fc1.weight")[0].any()  # pruned before: stays pruned
    if kind != "tdamp":  # pruned entries hold the reduced posterior: loc 0, the one pruned scale
        for site, keep in guide.masks.items():
            assert (get_site(guide.locs, site)[~keep] == 0).all()
            assert (get_site(guide.log_scales, site)[~keep] == math.log(PRUNED_SCALE)).all()


def test_a_guide_without_the_protocol_is_refused():
    guide = PointMass(make_model(mlp(4, [6], 1)))
    assert not isinstance(guide, GaussianWeights)
    with pytest.raises(TypeError, match="PointMass guide does not implement the GaussianWeights protocol"):
        bmr.reduce(guide)
    with pytest.raises(TypeError, match="PointMass"):
        bmr.evidence_changes(guide)
    assert len(guide.masks) == 0


def test_any_guide_with_the_protocol_is_reduced_through_it(fitted_meanfield):
    """The protocol is structural: an object with ``net``, ``masks`` and the two methods is reduced
    through them, under the prior variances it reports."""

    class NarrowPrior:  # the same posterior under a much narrower prior: little to gain from keeping weights
        def __init__(self, inner):
            self.inner, self.net, self.masks, self.applied = inner, inner.net, inner.masks, None

        def gaussian_weights(self, level="weight"):
            return {s: GaussianSite(w.loc, w.variance, 1e-6 + 0 * w.variance)
                    for s, w in self.inner.gaussian_weights(level).items()}

        def apply_reduction(self, reduction):
            self.applied = reduction
            self.inner.apply_reduction(reduction)

    guide = copy.deepcopy(fitted_meanfield.guide)
    narrow = NarrowPrior(guide)
    assert isinstance(narrow, GaussianWeights)
    reduction = bmr.reduce(narrow, rule="plain")
    assert narrow.applied is reduction
    mu, var, _ = guide.gaussian_weights()["fc1.weight"]
    assert torch.equal(~guide.mask("fc1.weight"), bmr.delta_f(mu, var, 1e-6 + 0 * var) > 0)


def test_reduce_posterior_evaluates_saves_and_loads(fitted_meanfield, boston, tmp_path):
    before = {k: v.clone() for k, v in fitted_meanfield.guide.state_dict().items()}
    reduced = fitted_meanfield.reduce(rule="ss")
    for k, v in fitted_meanfield.guide.state_dict().items():
        assert torch.equal(v, before[k])
    assert fitted_meanfield.sparsity()["weights_pruned_fraction"] == 0
    sp = reduced.sparsity()
    assert 0 < sp["weights_pruned_fraction"] < 1
    assert sp["layers"]["fc2"]["weights_pruned_fraction"] == pytest.approx(
        1 - sp["layers"]["fc2"]["weights_kept"] / sp["layers"]["fc2"]["weights"])
    keep = reduced.masks()["fc1.weight"]
    for params in reduced.draw_weights(3):
        assert (params["fc1.weight"][~keep] == 0).all()
    m = reduced.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert math.isfinite(m["log_likelihood"]) and m["rmse"] > 0
    record = reduced.fit_state.pruning[-1]
    assert record.rule == "bmr" and record.options["rule"] == "ss"
    assert "fc1" in record.summary["layers"] and "fc2" not in record.summary["layers"]
    reduced.save(tmp_path / "run")
    loaded = bnnzoo.load(tmp_path / "run")
    assert torch.equal(loaded.masks()["fc1.weight"], keep)
    a = reduced.predict(boston.x_test, num_samples=10, seed=3)
    b = loaded.predict(boston.x_test, num_samples=10, seed=3)
    torch.testing.assert_close(a.mean, b.mean)
    exported = reduced.to_torch(pruned=True)
    assert exported[0].out_features == int(reduced.sparsity()["keep"]["fc1"].sum())


def test_reduce_needs_gaussian_weights(fitted_map):
    with pytest.raises(TypeError, match="Gaussian weights"):
        fitted_map.reduce()


def test_iterative_bmr_masks_permanently_and_freezes(boston):
    calls = []
    post = bnnzoo.create("bmr-iterative", "regression", (13,), 1, device="cpu", seed=0, epochs=6, lr=1e-2,
                         init_scale=0.05, warmup_epochs=1)
    post.fit(boston.x_train, boston.y_train, progress=False, callback=lambda e, l: calls.append(e))
    assert calls == list(range(6))
    fractions = post.history.extra["weights_pruned_fraction"]
    assert len(fractions) == 5 and len(post.history.extra["bmr_seconds"]) == 5  # none after the last epoch
    assert all(b >= a for a, b in itertools.pairwise(fractions)) and fractions[-1] > 0.2
    for site, keep in post.masks().items():
        assert site.startswith("fc1.")
        assert (get_site(post.guide.locs, site)[~keep] == 0).all()
        assert (get_site(post.guide.log_scales, site)[~keep] == math.log(PRUNED_SCALE)).all()
    with pytest.raises(ValueError, match="rule"):
        bnnzoo.create("bmr-iterative", "regression", (13,), 1, rule="lasso")
    with pytest.raises(ValueError, match="warmup_epochs"):
        bnnzoo.create("bmr-iterative", "regression", (13,), 1, epochs=3, warmup_epochs=3).fit(
            boston.x_train, boston.y_train, progress=False)


def test_posthoc_entry_fits_then_reduces(boston):
    post = bnnzoo.fit("bmr", boston, epochs=3, device="cpu", progress=False, seed=0, rule="plain", init_scale=0.05)
    assert post.sparsity()["weights_pruned_fraction"] > 0 and len(post.history.extra["bmr_seconds"]) == 1
    record = post.fit_state.pruning[-1]
    assert record.rule == "bmr" and record.options == {"rule": "plain", "level": "weight", "prune_last": False,
                                                       "count_pruned": "prior"}
    assert record.summary["weights_pruned_fraction"] == post.sparsity()["weights_pruned_fraction"]


def test_posthoc_entry_refits_the_reduced_model(boston):
    """refit_fraction=f: the one reduction runs after epoch epochs - r, r = round(f epochs), on the guide
    as it was then, and the last r epochs train the kept weights while the pruned ones stay at the
    point mass at 0."""
    options = dict(device="cpu", progress=False, seed=0, rule="plain", init_scale=0.05, lr=1e-2)
    reduced_at_4 = bnnzoo.fit("bmr", boston, epochs=4, refit_fraction=0.0, **options)
    refitted = bnnzoo.fit("bmr", boston, epochs=6, refit_fraction=1 / 3, **options)
    assert len(refitted.history.epoch_seconds) == 6 and len(refitted.history.extra["bmr_seconds"]) == 1
    assert len(refitted.fit_state.pruning) == 1
    masks, masks_at_4 = refitted.masks(), reduced_at_4.masks()
    assert masks.keys() == masks_at_4.keys() and refitted.sparsity()["weights_pruned_fraction"] > 0.1
    for site, keep in masks.items():
        assert torch.equal(keep, masks_at_4[site])  # the same decision, taken after the same 4 epochs
        assert (get_site(refitted.guide.locs, site)[~keep] == 0).all()
        assert (get_site(refitted.guide.log_scales, site)[~keep] == math.log(PRUNED_SCALE)).all()
        moved = get_site(refitted.guide.locs, site)[keep] - get_site(reduced_at_4.guide.locs, site)[keep]
        assert moved.abs().max() > 1e-4  # the kept weights trained on after the reduction
    with pytest.raises(ValueError, match="refit_fraction"):
        bnnzoo.fit("bmr", boston, epochs=3, refit_fraction=1.0, **options)
    one_epoch = bnnzoo.fit("bmr", boston, epochs=1, refit_fraction=0.9, **options)  # at most epochs - 1: none here
    assert len(one_epoch.history.extra["bmr_seconds"]) == 1 and len(one_epoch.history.epoch_seconds) == 1


# ---- the other guides with Gaussian weights -------------------------------------------------------
def test_horseshoe_guide_weights_are_reduced_as_standardised_gaussians(boston):
    """The horseshoe guide's decentred weights beta (prior N(0, 1)) are what BMR reduces; the
    guide's own group pruning stays, and the scales are untouched."""
    post = bnnzoo.fit("horseshoe-svi", boston, epochs=4, device="cpu", progress=False, seed=0, prune=False)
    guide = post.guide
    rows = torch.arange(50) >= 5  # a few neurons pruned by the method itself
    guide.set_masks({"fc1.weight": rows.unsqueeze(1).expand(50, 13).clone(), "fc1.bias": rows})
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    reduced = post.reduce(rule="plain")
    for k, v in guide.state_dict().items():
        assert torch.equal(v, before[k])
    mu = get_site(guide.locs, "fc1.weight").detach()
    var = torch.exp(2 * get_site(guide.log_scales, "fc1.weight").detach())
    expected = bmr.delta_f(mu, var, 1.0) > 0
    keep = reduced.masks()["fc1.weight"]
    assert torch.equal(keep, ~expected & rows.unsqueeze(1)) and 0 < expected[5:].float().mean() < 1
    assert not reduced.masks()["fc1.bias"][:5].any()  # pruned before: stays pruned
    # the output layer is left alone but for the inputs of removed groups (the masks are closed)
    fed = keep.any(1) | reduced.masks()["fc1.bias"]
    assert torch.equal(reduced.masks()["fc2.weight"], fed.unsqueeze(0)) and "fc2.bias" not in reduced.masks()
    for name, value in reduced.guide.state_dict().items():
        if name == "scale_params":  # the horseshoe scales are not reduced
            assert torch.equal(value, before[name])
    assert (get_site(reduced.guide.locs, "fc1.weight")[~keep] == 0).all()
    for params in reduced.draw_weights(3):
        assert (params["fc1.weight"][~keep] == 0).all()
    assert math.isfinite(reduced.evaluate(boston.x_test, boston.y_test, num_samples=10)["log_likelihood"])
    # the reduced copy predicts as the entry does: from the untempered widening of its guide
    assert reduced.config["train"]["untempered"] and reduced.config["train"]["kl_weight"] == 0.2
    torch.manual_seed(0)
    widened = torch.stack([reduced.guide.draw(0.2)["fc2.weight"] for _ in range(200)])
    torch.manual_seed(0)
    used = torch.stack([p["fc2.weight"] for p in reduced.draw_weights(200)])
    assert torch.equal(used, widened)


@pytest.fixture(scope="module")
def fitted_tdamp(boston):
    return bnnzoo.fit("em-tdamp", boston, epochs=3, device="cpu", progress=False, seed=0, prune=False)


def test_tdamp_slab_posteriors_are_reduced(fitted_tdamp, boston):
    """TDAMP's Gaussian part: the slab posterior of each weight under the slab prior N(0, sigma_l^2)."""
    post = fitted_tdamp
    state = post.guide.state()
    reduced = post.reduce(rule="plain")
    mu, var = state["slab_mean"]["fc1.weight"], state["slab_var"]["fc1.weight"]
    expected = bmr.delta_f(mu, var, state["prior_var"]["fc1"].unsqueeze(1)) > 0
    keep = reduced.masks()["fc1.weight"]
    assert torch.equal(keep, ~expected) and 0 < expected.float().mean() < 1
    # per weight a bias goes only with its whole neuron (TDAMP ties a bias to its neuron's state)
    assert torch.equal(reduced.masks()["fc1.bias"], keep.any(1))
    assert post.masks() == {} and "fc2.weight" not in reduced.masks()
    for params in reduced.draw_weights(3):
        assert (params["fc1.weight"][~keep] == 0).all()
    assert math.isfinite(reduced.evaluate(boston.x_test, boston.y_test, num_samples=10)["log_likelihood"])

    grouped = post.reduce(rule="plain", level="group")
    b_mu, b_var = state["slab_mean"]["fc1.bias"], state["slab_var"]["fc1.bias"]
    group = bmr.group_delta_f(bmr.delta_f(mu, var, state["prior_var"]["fc1"].unsqueeze(1)),
                              bmr.delta_f(b_mu, b_var, state["prior_var"]["fc1"]))
    assert torch.equal(grouped.masks()["fc1.bias"], ~(group > 0))
    assert torch.equal(grouped.masks()["fc1.weight"], (~(group > 0)).unsqueeze(1).expand_as(mu))


def test_tdamp_shrinking_reduction_sets_the_reduced_slab_posterior(fitted_tdamp, tmp_path):
    post = fitted_tdamp
    state = post.guide.state()
    r2 = 1e-3
    reduced = post.reduce(rule="plain", reduced_var=r2)
    after = reduced.guide.state()
    s2 = state["prior_var"]["fc1"].unsqueeze(1)
    mu, var = state["slab_mean"]["fc1.weight"], state["slab_var"]["fc1.weight"]
    accept = bmr.delta_f(mu, var, s2, r2) > 0
    mu_r, var_r = bmr.reduced_posterior(mu, var, s2, r2)
    assert 0 < accept.float().mean() < 1 and reduced.masks() == {}
    torch.testing.assert_close(after["slab_mean"]["fc1.weight"], torch.where(accept, mu_r, mu), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(after["slab_var"]["fc1.weight"], torch.where(accept, var_r, var), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(after["inclusion"]["fc1"], state["inclusion"]["fc1"], rtol=1e-4, atol=1e-6)
    reduced.save(tmp_path / "run")
    loaded = bnnzoo.load(tmp_path / "run").guide.state()
    for key in ("slab_mean", "slab_var"):
        torch.testing.assert_close(loaded[key]["fc1.weight"], after[key]["fc1.weight"])
    torch.testing.assert_close(loaded["inclusion"]["fc1"], after["inclusion"]["fc1"])


# ---- the command line ----------------------------------------------------------------------------------
def test_prune_command_end_to_end(fitted_meanfield, tmp_path):
    run = tmp_path / "run"
    fitted_meanfield.save(run)
    out = tmp_path / "reduced"
    result = CliRunner().invoke(cli, ["prune", str(run), "--out", str(out), "--rule", "plain",
                                      "--num-samples", "10"])
    assert result.exit_code == 0, result.output
    assert "test metrics after" in result.output and "fc1" in result.output
    report = json.loads((out / "bmr_report.json").read_text())
    assert report["rule"] == "plain" and report["weights_pruned_fraction"]["before"] == 0
    assert 0 < report["weights_pruned_fraction"]["after"] < 1
    assert set(report["layers"]) == {"fc1", "fc2"} and report["layers"]["fc1"]["after"] > 0
    assert {"rmse", "log_likelihood"} <= set(report["test_before"]) and "log_likelihood" in report["test_after"]
    loaded = bnnzoo.load(out)
    assert loaded.sparsity()["weights_pruned_fraction"] == pytest.approx(report["weights_pruned_fraction"]["after"])
    bad = CliRunner().invoke(cli, ["prune", str(tmp_path)])
    assert bad.exit_code != 0 and "not a saved bnnzoo posterior" in bad.output


# ---- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_reduce_on_cuda(fitted_meanfield, boston):
    cpu = fitted_meanfield.reduce(rule="ss")
    reduced = copy.deepcopy(fitted_meanfield).to("cuda").reduce(rule="ss")
    assert all(m.device.type == "cuda" for m in reduced.masks().values())
    d_f = bmr.evidence_changes(reduced.guide)
    assert all(v.device.type == "cuda" for v in d_f.values())
    for site, keep in reduced.masks().items():
        assert torch.equal(keep.cpu(), cpu.masks()[site])
    m = reduced.evaluate(boston.x_test, boston.y_test, num_samples=10)
    assert math.isfinite(m["log_likelihood"])


# ---- the paper's model: a learned scale per layer, dF on the standardised weights ------------------
def layer_scale_guide(net, seed=0, **kwargs):
    model = BayesianNeuralNetwork(net, LayerScaleGaussianPrior(net, **kwargs), make_likelihood("regression",
                                                                                              noise_scale=0.5))
    torch.manual_seed(seed)
    return LayerScaleMeanFieldNormal(model)


def test_layer_scale_delta_f_is_the_exact_evidence_change():
    """A conjugate model where the learned scale matters: ``y = X w + e`` with ``w = f c z``,
    ``z ~ N(0, I)``, ``X'X`` diagonal (the exact posterior factorises). With the guide's ``q(z)`` set
    to the exact posterior of ``z`` given the layer's fitted scale ``f c``, BMR's per-weight ``dF``
    (computed on ``z`` under ``N(0, 1)``) equals ``ln Z(without x_j) - ln Z(full)``, and a neuron's
    dF (the sum) equals removing every weight at once. Under the fixed ``N(0, 1)`` prior on ``w``
    the same posterior would give other numbers (the test would fail without the scale)."""
    x, y, noise = regression(orthogonal=True)
    d = x.shape[1]
    guide = layer_scale_guide(mlp(d, [1], 1))  # fc1's single neuron: the linear model's weights
    with torch.no_grad():  # a learned layer scale: c^-2 ~ LogNormal(m, s) with s tiny, c = exp(-m / 2)
        guide.scale_locs["fc1"].fill_(math.log(1 / 9.0))  # c = 3, f c = 0.3
        guide.scale_log_scales["fc1"].fill_(math.log(1e-6))
    scale = float(guide.mean_scales()["fc1"].detach())
    assert scale == pytest.approx(0.3, rel=1e-6)
    w_cov = scale ** 2 * torch.eye(d, dtype=F64)
    w_mean, w_post = exact_posterior(x, y, noise, torch.zeros(d, dtype=F64), w_cov)
    with torch.no_grad():
        get_site(guide.locs, "fc1.weight").copy_((w_mean / scale).unsqueeze(0))
        get_site(guide.log_scales, "fc1.weight").copy_((0.5 * torch.log(torch.diag(w_post) / scale ** 2)).unsqueeze(0))
    guide = guide.double()
    d_f = bmr.evidence_changes(guide)["fc1.weight"].reshape(-1)
    full = log_evidence(x, y, noise, torch.zeros(d, dtype=F64), w_cov)
    for j in range(d):
        keep = [i for i in range(d) if i != j]
        reduced = log_evidence(x[:, keep], y, noise, torch.zeros(d - 1, dtype=F64), w_cov[:-1, :-1])
        assert float(d_f[j]) == pytest.approx(float(reduced - full), abs=1e-5)
    empty = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=F64),
                                                   noise * torch.eye(len(y), dtype=F64)).log_prob(y)
    assert float(d_f.sum()) == pytest.approx(float(empty - full), abs=1e-5)
    # the fixed prior N(0, 1) on w with the same posterior of w gives other evidence changes
    fixed = bmr.delta_f(w_mean, torch.diag(w_post), 1.0)
    assert float((fixed - d_f).abs().max()) > 0.5


def test_layer_scale_guide_moments_and_kl_against_monte_carlo():
    torch.manual_seed(0)
    guide = randomise_guide(layer_scale_guide(mlp(3, [4], 2)), loc_scale=1.0, seed=3)
    with torch.no_grad():
        guide.scale_locs["fc1"].fill_(0.4)
        guide.scale_log_scales["fc1"].fill_(math.log(0.5))
    with torch.no_grad():
        draws = [guide.draw() for _ in range(4000)]
        for site in ("fc1.weight", "fc2.bias"):  # within 5 standard errors of the Monte Carlo estimate
            w = torch.stack([d[site] for d in draws])
            sd = guide.posterior_scale()[site]
            assert bool(((w.mean(0) - guide.posterior_mean()[site]).abs() < 5 * sd / math.sqrt(4000) + 1e-6).all())
            assert bool(((w.std(0) / sd - 1).abs() < 0.05).all())
    # E[f c] = f exp(-m / 2 + s^2 / 8) for c^-2 ~ LogNormal(m, s^2)
        f_c = torch.stack([guide.sample_scales()["fc1"] for _ in range(4000)])
        assert float(f_c.mean()) == pytest.approx(float(guide.mean_scales()["fc1"]), rel=0.015)
        assert float(guide.mean_scales()["fc1"]) == pytest.approx(0.1 * math.exp(-0.2 + 0.25 / 8), rel=1e-6)
    # the KL: z against N(0, 1) plus each scale's LogNormal against Gamma(2, 2), closed form vs Monte Carlo
    q = torch.distributions.LogNormal(torch.tensor(0.4), torch.tensor(0.5))
    u = q.sample((400000,))
    mc = (q.log_prob(u) - torch.distributions.Gamma(2.0, 2.0).log_prob(u)).mean()
    assert float(kl_lognormal_gamma(torch.tensor(0.4), torch.tensor(math.log(0.5)), 2.0, 2.0)) == pytest.approx(
        float(mc), abs=0.01)
    z_kl = sum(torch.distributions.kl_divergence(torch.distributions.Normal(get_site(guide.locs, s),
                                                                            get_site(guide.log_scales, s).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).sum()
               for s in guide.net.sites())
    with torch.no_grad():
        assert float(guide.kl_divergence(guide.prior)) == pytest.approx(float(z_kl + guide.scale_kl()), rel=1e-5)
        # the training step's KL is the same number, and its outputs have the draws' distribution
        x = torch.randn(1, 3)
        # one draw of the layer scales per call: many calls of a small batch
        outs = torch.cat([guide.sample_outputs_and_kl(None, x.expand(4, 3))[0] for _ in range(2000)])
        by_draws = torch.stack([guide.net(x, d) for d in draws]).reshape(-1, 2)
        assert float(guide.sample_outputs_and_kl(None, x)[1]) == pytest.approx(float(z_kl + guide.scale_kl()), rel=1e-5)
    spread = by_draws.std(0)
    assert bool(((outs.mean(0) - by_draws.mean(0)).abs() < 0.1 * spread).all())
    assert bool(((outs.std(0) / spread - 1).abs() < 0.1).all())


def test_layer_scale_entry_fits_reduces_saves_and_loads(boston, tmp_path):
    posterior = bnnzoo.fit("bmr", boston, epochs=3, weight_prior="layer-scale", progress=False)
    assert posterior.config["model"]["weight_prior"] == "layer-scale"
    assert type(posterior.guide).__name__ == "LayerScaleMeanFieldNormal"
    assert posterior.fit_state.pruning[0].rule == "bmr"
    metrics = posterior.evaluate(boston.x_test, boston.y_test, num_samples=20)
    posterior.save(tmp_path / "run")
    same = bnnzoo.load(tmp_path / "run")
    torch.manual_seed(0)
    a = posterior.evaluate(boston.x_test, boston.y_test, num_samples=20)
    torch.manual_seed(0)
    assert same.evaluate(boston.x_test, boston.y_test, num_samples=20) == pytest.approx(a)
    assert metrics["rmse"] < 15
    # the fixed prior is still there, and dF differs between the two models of the same data
    fixed = bnnzoo.fit("bmr", boston, epochs=3, progress=False)  # the default
    assert fixed.config["model"]["weight_prior"] == "fixed" and type(fixed.guide) is MeanFieldNormal
    with pytest.raises(bnnzoo.errors.ConfigError, match="weight_prior"):
        bnnzoo.fit("bmr", boston, epochs=1, weight_prior="cauchy", progress=False)


# ---- no layer is emptied --------------------------------------------------------------------------------
def _prunable_guide(seed=0):
    """A guide whose hidden layer fc1 the plain rule empties entirely (every dF > 0); row 3 has the
    smallest summed dF, so it is the one worth keeping."""
    model = make_model(mlp(4, [6], 1), prior_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), loc_scale=0.01, log_scale_range=(-1.0, -0.5), seed=seed)
    with torch.no_grad():
        get_site(guide.locs, "fc1.weight")[3] = 0.4
    return guide


@pytest.mark.parametrize("level", ["weight", "group"])
def test_a_reduction_never_empties_a_layer(level):
    guide = _prunable_guide()
    d_f = bmr.evidence_changes(guide)
    assert bool((d_f["fc1.weight"] > 0).all()) and bool((d_f["fc1.bias"] > 0).all())  # the rule alone empties fc1
    best = int(torch.argmax(-(d_f["fc1.weight"].sum(1) + d_f["fc1.bias"])))
    assert best == 3
    empty, _ = reduced_copy(guide, rule="plain", level=level, allow_empty=True)
    assert not empty.mask("fc1.weight").any()
    with pytest.warns(EmptyLayerWarning, match="fc1"):
        kept, reduction = reduced_copy(guide, rule="plain", level=level)
    rows = kept.mask("fc1.weight").any(1)
    assert rows.tolist() == [i == best for i in range(6)]
    assert kept.mask("fc1.weight")[best].all() and bool(kept.mask("fc1.bias")[best])
    assert reduction.protected == ["fc1"] and reduction.summary()["protected_layers"] == ["fc1"]


def test_posterior_reduce_passes_allow_empty(boston):
    posterior = bnnzoo.fit("meanfield-vi", boston, epochs=1, progress=False, network={"arch": "mlp", "hidden": [4]})
    with torch.no_grad():  # an uninformative hidden layer: every weight's dF > 0
        for site in ("fc1.weight", "fc1.bias"):
            get_site(posterior.guide.locs, site).fill_(0.0)
            get_site(posterior.guide.log_scales, site).fill_(math.log(0.5))
    with pytest.warns(EmptyLayerWarning):
        kept = posterior.reduce(rule="plain")
    assert kept.sparsity()["layers"]["fc1"]["groups_kept"] == 1
    assert posterior.reduce(rule="plain", allow_empty=True).sparsity()["layers"]["fc1"]["groups_kept"] == 0


def test_layer_scale_model_and_guide_are_plain_pyro():
    """Pyro's Monte Carlo ELBO of the model and guide (every ``c_l^-2`` and weight sampled) agrees
    with the fused training loss (local reparameterisation, closed-form KL) in expectation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    y = x[:, 0] + 0.1 * torch.randn(16, generator=g)
    model, guide, _ = bnnzoo.build("bmr", "regression", input_shape=(3,), output_dim=1,
                                   network={"arch": "mlp", "hidden": [4]}, weight_prior="layer-scale")
    randomise_guide(guide, loc_scale=1.0, log_scale_range=(-3.0, -2.0), seed=1)
    with torch.no_grad():  # scales away from their prior's bulk: a KL the comparison can see
        for layer in ("fc1", "fc2"):
            guide.scale_locs[layer].fill_(2.5)
            guide.scale_log_scales[layer].fill_(math.log(0.3))
    pyro.set_rng_seed(0)
    with torch.no_grad():
        pyro_losses = torch.tensor([TraceMeanField_ELBO().loss(model, guide, x, y) for _ in range(300)])
        fused = torch.tensor([LocalReparamELBO().loss(model, guide, x, y) for _ in range(300)])
    se = math.sqrt(float(pyro_losses.var() + fused.var()) / 300)
    assert abs(float(pyro_losses.mean() - fused.mean())) < 4 * se
    assert 4 * se < float(guide.scale_kl().detach())  # leaving out the scales' KL would fail
    sites = {name for name, node in poutine.trace(guide).get_trace(x, y).nodes.items() if node["type"] == "sample"}
    assert {"fc1.c_inv_sqr", "fc2.c_inv_sqr", "fc1.weight", "fc2.bias"} <= sites


def test_iterative_warmup_is_a_fraction_of_the_epochs_by_default():
    from bnnzoo.methods.bmr import warmup_epochs

    post = bnnzoo.create("bmr-iterative", "regression", (13,), 1)
    train = post.config["train"]
    assert train["warmup_fraction"] == 0.5 and warmup_epochs(train, train["epochs"]) == 100
    short = bnnzoo.create("bmr-iterative", "regression", (13,), 1, epochs=6).config["train"]
    assert warmup_epochs(short, 6) == 3
    asked = bnnzoo.create("bmr-iterative", "regression", (13,), 1, epochs=6, warmup_epochs=2).config["train"]
    assert asked["warmup_fraction"] is None and warmup_epochs(asked, 6) == 2
    with pytest.raises(bnnzoo.errors.ConfigError, match="warmup_fraction"):
        bnnzoo.create("bmr-iterative", "regression", (13,), 1, epochs=1)
