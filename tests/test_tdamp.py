"""EM-TDAMP: moment propagation against Monte Carlo, Module B against direct enumeration,
the spike-and-slab and probit-product model parts, the guide's samples, the one-layer reduction to
Bernoulli-Gaussian turbo GAMP, numerical safety, and the catalog entry."""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from conftest import spread_state
from pyro.infer import Predictive
from scipy import stats

import bnnzoo
from bnnzoo.guides import TDAMPGuide
from bnnzoo.guides.group_sparse_messages import (
    bernoulli_gaussian_posterior,
    extrinsic_log_odds,
    group_posterior,
    log_likelihood_ratio,
)
from bnnzoo.guides.moment_propagation import (
    inverse_mills_ratio,
    linear_moments,
    propagate,
    relu_moments,
    weight_messages,
)
from bnnzoo.guides.tdamp import linear_tdamp
from bnnzoo.guides.tdamp_em import NOISE_BRACKET, m_step, probit_noise_m_step
from bnnzoo.guides.training import DivergenceError
from bnnzoo.models import (
    BayesianNeuralNetwork,
    BernoulliGaussianPrior,
    GaussianLikelihood,
    GaussianPrior,
    GroupBernoulliGaussian,
    ProbitProduct,
    ProbitProductLikelihood,
)
from bnnzoo.models.errors import ConfigError
from bnnzoo.models.networks import Activation, Conv2d, Dense, Flatten, Network, mlp
from bnnzoo.models.probit_product import log_normal_cdf


def tdamp_model(net, task="regression"):
    lik = GaussianLikelihood(0.5) if task == "regression" else ProbitProductLikelihood(1.0)
    return BayesianNeuralNetwork(net, BernoulliGaussianPrior(net, rho=0.5), lik)


# ------------------------------------------------------------------------- Module A: moments
@pytest.mark.parametrize("mean,var", [(-1.5, 0.3), (-1.0, 1.0), (0.0, 2.0), (0.5, 0.1), (2.0, 4.0), (5.0, 1.0)])
def test_relu_moments_match_monte_carlo(mean, var):
    gen = torch.Generator().manual_seed(0)
    z = mean + math.sqrt(var) * torch.randn(1_000_000, generator=gen, dtype=torch.float64)
    r = z.clamp_min(0)
    m, v = relu_moments(torch.tensor([mean], dtype=torch.float64), torch.tensor([var], dtype=torch.float64))
    se_m = float(r.std()) / 1000
    se_v = float(((r - r.mean()) ** 2).std()) / 1000
    assert abs(float(m) - float(r.mean())) < 5 * se_m + 1e-12
    assert abs(float(v) - float(r.var())) < 5 * se_v + 1e-12


def test_relu_moments_are_exact_in_the_tails():
    """Against the closed form in float64 (scipy): mean sd [alpha Phi + phi], second moment
    (m^2 + s) Phi + m sd phi, down to Phi(alpha) ~ 1e-100."""
    m = np.array([-20.0, -8.0, -3.0, 0.0, 3.0, 30.0])
    s = np.array([1.0, 0.5, 2.0, 1.0, 0.01, 1.0])
    sd = np.sqrt(s)
    a = m / sd
    mean = m * stats.norm.cdf(a) + sd * stats.norm.pdf(a)
    second = (m**2 + s) * stats.norm.cdf(a) + m * sd * stats.norm.pdf(a)
    out_m, out_v = relu_moments(torch.tensor(m), torch.tensor(s))
    np.testing.assert_allclose(out_m.numpy(), mean, rtol=1e-6, atol=1e-300)
    ref_var = second - mean**2
    ok = ref_var > 1e-12 * s  # where the float64 reference itself does not cancel
    np.testing.assert_allclose(out_v.numpy()[ok], ref_var[ok], rtol=1e-5)
    assert (out_v.numpy() >= 0).all()


def test_inverse_mills_ratio_matches_scipy_far_in_the_tail():
    a = np.array([-1e4, -100.0, -31.0, -10.5, -9.5, -5.0, 0.0, 5.0])
    ref = np.exp(stats.norm.logpdf(a) - stats.norm.logcdf(a))
    np.testing.assert_allclose(inverse_mills_ratio(torch.tensor(a, dtype=torch.float32)).numpy(), ref, rtol=2e-5)


def test_relu_moment_gradients_are_the_closed_forms():
    gen = torch.Generator().manual_seed(1)
    m = (3 * torch.randn(25, generator=gen, dtype=torch.float64)).requires_grad_()
    v = (0.05 + 4 * torch.rand(25, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(relu_moments, (m, v))


def test_linear_moments_match_monte_carlo():
    gen = torch.Generator().manual_seed(2)
    n_in, n_out = 4, 3
    m_in, v_in = torch.randn(1, n_in, generator=gen), torch.rand(1, n_in, generator=gen)
    w_m, w_v = torch.randn(n_out, n_in, generator=gen), 0.3 * torch.rand(n_out, n_in, generator=gen)
    b_m, b_v = torch.randn(n_out, generator=gen), 0.2 * torch.rand(n_out, generator=gen)
    mean, var = linear_moments(m_in, v_in, w_m, w_v, b_m, b_v)
    s = 400_000
    h = m_in + v_in.sqrt() * torch.randn(s, n_in, generator=gen)
    w = w_m + w_v.sqrt() * torch.randn(s, n_out, n_in, generator=gen)
    b = b_m + b_v.sqrt() * torch.randn(s, n_out, generator=gen)
    z = (w @ h.unsqueeze(-1)).squeeze(-1) + b
    torch.testing.assert_close(mean.squeeze(0), z.mean(0), atol=0.02, rtol=0.01)
    torch.testing.assert_close(var.squeeze(0), z.var(0), atol=0.03, rtol=0.02)
    # deterministic inputs: the input-variance terms vanish
    mean0, var0 = linear_moments(m_in, None, w_m, w_v, b_m, b_v)
    torch.testing.assert_close(var0, (m_in**2) @ w_v.t() + b_v)


def test_network_propagation_matches_monte_carlo_through_relu():
    """Two dense layers with a ReLU between, random Gaussian weights: output moments vs sampling
    (the moment-matched hidden layer is an approximation; with many hidden units it is accurate)."""
    net = mlp(3, [40], 2)
    gen = torch.Generator().manual_seed(3)
    moments = {}
    for layer in net.param_layers:
        k, i = layer.weight_shape
        moments[layer.name] = (torch.randn(k, i, generator=gen) / math.sqrt(i), 0.1 * torch.rand(k, i, generator=gen) / i,
                               0.1 * torch.randn(k, generator=gen), 0.01 * torch.rand(k, generator=gen))
    x = torch.randn(2, 3, generator=gen)
    augmented = {name: (torch.cat([w_m, b_m.unsqueeze(1)], 1), torch.cat([w_v, b_v.unsqueeze(1)], 1))
                 for name, (w_m, w_v, b_m, b_v) in moments.items()}  # the bias as the last column
    with torch.no_grad():
        mean, var, _ = propagate(net, x, augmented)
    s = 100_000
    params = {}
    for layer in net.param_layers:
        w_m, w_v, b_m, b_v = moments[layer.name]
        params[f"{layer.name}.weight"] = w_m + w_v.sqrt() * torch.randn(s, *w_m.shape, generator=gen)
        params[f"{layer.name}.bias"] = b_m + b_v.sqrt() * torch.randn(s, *b_m.shape, generator=gen)
    h = torch.relu(torch.einsum("ski,ni->snk", params["fc1.weight"], x) + params["fc1.bias"].unsqueeze(1))
    f = torch.einsum("ski,sni->snk", params["fc2.weight"], h) + params["fc2.bias"].unsqueeze(1)
    torch.testing.assert_close(mean, f.mean(0), atol=0.02, rtol=0.03)
    torch.testing.assert_close(var, f.var(0), atol=0.02, rtol=0.08)


def test_weight_message_is_the_exact_gaussian_update_for_a_linear_output():
    """One linear layer, one example, Gaussian likelihood: the message curvature is a^2 / (v + tau)
    and its mean M + (a r / s) / (a^2 / s): the exact Kalman (ADF) quantities."""
    a = torch.tensor([[0.5, -1.0, 2.0]])
    w_m, w_v = torch.tensor([[0.1, 0.2, -0.3]]), torch.tensor([[0.5, 0.1, 0.2]])
    y, v = torch.tensor([1.0]), torch.tensor(0.3)
    from bnnzoo.guides.moment_propagation import gaussian_log_evidence
    from bnnzoo.guides.tdamp import propagate_linear

    with torch.enable_grad():
        p, tau, records = propagate_linear(a, w_m, w_v, torch.zeros(1))
        msg = weight_messages(records, gaussian_log_evidence(y, p, tau, v), {"x": w_m})["x"]
    s = v + (a**2 * w_v).sum()
    r = y - (a * w_m).sum()
    torch.testing.assert_close(msg.curv, a**2 / s)
    torch.testing.assert_close(msg.grad, a * r / s)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_closed_form_message_pass_matches_autograd(task):
    """The training loop's backward pass in closed form (message_pass) gives the same log evidence
    and messages as autograd through the moment propagation (weight_messages)."""
    from bnnzoo.guides.moment_propagation import message_pass

    net = mlp(4, [7, 5], 3 if task == "classification" else 1)
    guide = spread_state(TDAMPGuide(tdamp_model(net, task)), seed=4).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen) if task == "classification" else torch.randn(9, generator=gen,
                                                                                           dtype=torch.float64)
    posts = guide.layer_posteriors()
    moments = {name: p.weight_moments for name, p in posts.items()}
    with torch.enable_grad():
        f_mean, f_var, records = propagate(net, x, moments)
        log_z = guide.log_evidence(f_mean, f_var, y)
        expected = weight_messages(records, log_z, {n: m for n, (m, _) in moments.items()})
    ours_log_z, ours_mean, ours_var, ours = message_pass(net, x, moments,
                                                         lambda m, v: guide.log_evidence_and_grads(m, v, y))
    torch.testing.assert_close(ours_log_z, log_z.detach())
    torch.testing.assert_close(ours_mean, f_mean.detach())
    torch.testing.assert_close(ours_var, f_var.detach())
    assert set(ours) == set(expected)
    for name, msg in expected.items():
        torch.testing.assert_close(ours[name].grad, msg.grad)
        torch.testing.assert_close(ours[name].curv, msg.curv)
        torch.testing.assert_close(ours[name].example_curv, msg.example_curv)


def _reference_relu_moments(m, v):
    """Plain closed forms (twice differentiable by autograd): mean sd (a Phi + phi), second moment
    (m^2 + v) Phi + m sd phi."""
    sd = v.sqrt()
    a = m / sd
    cdf, pdf = 0.5 * torch.erfc(-a / math.sqrt(2)), torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    mean = m * cdf + sd * pdf
    return mean, (m * m + v) * cdf + m * sd * pdf - mean * mean


def test_hidden_layer_curvature_matches_the_exact_hessian(boston):
    """G = g^2 - 2 g_tau against the exact diagonal Hessian of the moment-propagated log evidence
    with respect to a hidden layer's pre-activation means, for a fitted network's beliefs (for the
    output layer the identity is exact). float64, reference ReLU moments differentiated twice."""
    from bnnzoo.guides.moment_propagation import gaussian_log_evidence

    post = bnnzoo.fit("em-tdamp", boston, epochs=10, device="cpu", progress=False, seed=0, prune=False,
                      network={"arch": "mlp", "hidden": [6]})
    guide = post.guide
    posts = {n: tuple(t.double() for t in p.weight_moments) for n, p in guide.layer_posteriors().items()}
    x = post.standardizer.x(boston.x_train[:64]).double()
    y = post.standardizer.y(boston.y_train[:64]).double()
    (m1, v1), (m2, v2) = posts["fc1"], posts["fc2"]
    p, tau = linear_moments(x, None, m1[:, :-1], v1[:, :-1], m1[:, -1], v1[:, -1])
    p, tau = p.requires_grad_(), tau.requires_grad_()
    h_mean, h_var = _reference_relu_moments(p, tau)
    out_mean, out_var = linear_moments(h_mean, h_var, m2[:, :-1], v2[:, :-1], m2[:, -1], v2[:, -1])
    log_z = gaussian_log_evidence(y, out_mean, out_var, guide.noise_var().double())
    g, g_tau = torch.autograd.grad(log_z.sum(), [p, tau], create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[:, k].sum(), p, retain_graph=True)[0][:, k] for k in range(6)], 1)
    identity = (g * g - 2 * g_tau).detach()
    assert float((identity + hess).abs().sum() / hess.abs().sum()) < 0.1
    # and the guide's own (closed-form backward) gradients are these g, g_tau
    with torch.enable_grad():
        f_mean, f_var, records = guide.propagate(x.float())
        ours = torch.autograd.grad(guide.log_evidence(f_mean, f_var, y.float()).sum(), [records[0].mean])[0]
    torch.testing.assert_close(ours.double(), g.detach(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------- numerical safety
@pytest.mark.parametrize("scale", [1e4, 1e8, 1e15])
def test_no_nan_on_saturated_units(scale):
    m = torch.tensor([scale, -scale, scale, -scale, 0.0], requires_grad=True)
    v = torch.tensor([0.0, 0.0, 1e6, 1e-30, 0.0], requires_grad=True)
    out_m, out_v = relu_moments(m, v)
    (out_m.sum() + out_v.sum()).backward()
    for t in (out_m, out_v, m.grad, v.grad):
        assert torch.isfinite(t).all()
    assert float(out_m[0].detach()) == pytest.approx(scale) and float(out_m[1].detach()) == 0.0
    assert torch.isfinite(log_normal_cdf(torch.tensor([-1e5, -50.0, 0.0, 1e5]))).all()


def test_guide_messages_are_finite_with_huge_inputs():
    net = mlp(5, [8], 3)
    model = tdamp_model(net, "classification")
    guide = TDAMPGuide(model, memory=1.0)
    x = torch.randn(16, 5) * 1e6
    y = torch.randint(0, 3, (16,))
    guide.update(x, y, 16)
    guide.check_finite()


def test_nan_is_an_error_not_replaced(boston):
    guide = TDAMPGuide(tdamp_model(mlp(13, [4], 1)))
    guide.message("fc1.weight")[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="fc1"):
        guide.check_finite()


# ------------------------------------------------------------------ Module B: enumeration
def _enumerate_group(rho, s2, mu, t):
    """Exact posterior of one group by enumerating s in {0, 1} with joint Gaussian marginals
    (MultivariateNormal) and Gaussian conditioning: an independent code path."""
    n = len(mu)
    on = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64),
                                                torch.diag(t + s2)).log_prob(mu) + math.log(rho)
    off = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64),
                                                 torch.diag(t)).log_prob(mu) + math.log(1 - rho)
    p_on = torch.sigmoid(on - off)
    cov = torch.linalg.inv(torch.eye(n, dtype=torch.float64) / s2 + torch.diag(1 / t))
    m_on = cov @ (mu / t)
    mean = p_on * m_on
    second = p_on * (torch.diagonal(cov) + m_on**2)
    return p_on, mean, second - mean**2


def test_group_posterior_matches_direct_enumeration():
    gen = torch.Generator().manual_seed(4)
    k, n = 5, 3
    s2 = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.3], dtype=torch.float64)
    rho = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    mu = torch.randn(k, n + 1, generator=gen, dtype=torch.float64) * 1.5
    t = 0.2 + torch.rand(k, n + 1, generator=gen, dtype=torch.float64)
    lam, eta = 1 / t, mu / t
    post = group_posterior(torch.logit(rho), s2, eta[:, :n], lam[:, :n], eta[:, n], lam[:, n])
    for g in range(k):
        p_on, mean, var = _enumerate_group(float(rho[g]), float(s2[g]), mu[g], t[g])
        assert float(post.inclusion[g]) == pytest.approx(float(p_on), rel=1e-9)
        got_mean = torch.cat([post.weight_moments[0][g], post.bias_moments[0][g:g + 1]])
        got_var = torch.cat([post.weight_moments[1][g], post.bias_moments[1][g:g + 1]])
        torch.testing.assert_close(got_mean, mean)
        torch.testing.assert_close(got_var, var)


def test_extrinsic_messages_are_leave_one_out():
    """The weight posterior from its extrinsic (leave-one-out) prior and its own message has the
    group's inclusion probability and the group posterior's moments."""
    gen = torch.Generator().manual_seed(5)
    eta, lam = torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.rand(3, 6, generator=gen, dtype=torch.float64)
    s2 = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    logit_rho = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    post = group_posterior(logit_rho, s2, eta, lam)
    llr = log_likelihood_ratio(eta, lam, s2)
    ext = extrinsic_log_odds(post.log_odds, llr)
    # leave-one-out by brute force
    for i in range(6):
        others = [j for j in range(6) if j != i]
        torch.testing.assert_close(ext[:, i], logit_rho + llr[:, others].sum(1))
    log_odds, mean, var = bernoulli_gaussian_posterior(ext, eta, lam, s2)
    torch.testing.assert_close(log_odds, post.log_odds.unsqueeze(1).expand_as(log_odds))
    torch.testing.assert_close(mean, post.weight_moments[0])
    torch.testing.assert_close(var, post.weight_moments[1])


def test_single_weight_posterior_matches_importance_sampling():
    gen = torch.Generator().manual_seed(6)
    pi, s2, mu, t = 0.4, 1.5, 0.8, 0.3
    s = 2_000_000
    on = torch.rand(s, generator=gen, dtype=torch.float64) < pi
    w = on * math.sqrt(s2) * torch.randn(s, generator=gen, dtype=torch.float64)
    weights = torch.exp(-0.5 * (w - mu) ** 2 / t)
    weights = weights / weights.sum()
    lam, eta = torch.tensor(1 / t, dtype=torch.float64), torch.tensor(mu / t, dtype=torch.float64)
    log_odds, mean, var = bernoulli_gaussian_posterior(torch.logit(torch.tensor(pi, dtype=torch.float64)), eta, lam,
                                                       torch.tensor(s2, dtype=torch.float64))
    assert float(torch.sigmoid(log_odds)) == pytest.approx(float((weights * on).sum()), abs=3e-3)
    assert float(mean) == pytest.approx(float((weights * w).sum()), abs=3e-3)
    assert float(var) == pytest.approx(float((weights * w**2).sum() - (weights * w).sum() ** 2), abs=5e-3)


# ------------------------------------------------------------------------- the model parts
def test_group_bernoulli_gaussian_distribution():
    probs = torch.tensor([0.2, 0.7, 1.0])
    loc, scale = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]]), torch.tensor([[0.5, 1.0], [0.2, 0.3], [1.0, 1.0]])
    d = GroupBernoulliGaussian(probs, loc, scale)
    torch.manual_seed(0)
    x = d.sample((100_000,))
    assert x.shape == (100_000, 3, 2)
    rows_on = (x != 0).any(-1).float().mean(0)
    torch.testing.assert_close(rows_on, probs, atol=0.01, rtol=0)
    assert ((x == 0).all(-1) | (x != 0).all(-1)).all()  # a row is off or on as a whole
    torch.testing.assert_close(x.mean(0), d.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(x.var(0), d.variance, atol=0.03, rtol=0.02)
    v = torch.tensor([[0.0, 0.0], [0.4, 1.0], [0.3, -0.2]])
    expected = (math.log(0.8) + math.log(0.7) + torch.distributions.Normal(loc[1], scale[1]).log_prob(v[1]).sum()
                + torch.distributions.Normal(loc[2], scale[2]).log_prob(v[2]).sum())
    assert float(d.log_prob(v)) == pytest.approx(float(expected), rel=1e-6)
    assert float(GroupBernoulliGaussian(torch.tensor([0.0]), loc[:1], scale[:1]).log_prob(v[1:2])) == -math.inf


def test_prior_samples_groups_under_pyro():
    net = mlp(4, [6], 2)
    prior = BernoulliGaussianPrior(net, rho=0.5)
    torch.manual_seed(1)
    for _ in range(20):
        trace = poutine.trace(prior).get_trace()
        w, b = trace.nodes["fc1.weight"]["value"], trace.nodes["fc1.bias"]["value"]
        assert ((w != 0).any(1) == (b != 0)).all()  # the bias is on exactly with its row
        assert (trace.nodes["fc2.weight"]["value"] != 0).all()  # output neurons are always kept
        assert torch.isfinite(trace.log_prob_sum())
    with pytest.raises(ValueError, match="rho"):
        BernoulliGaussianPrior(net, rho=0.0)


def test_probit_product_likelihood():
    f = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    lik = ProbitProductLikelihood(noise_var=0.5)
    y = torch.tensor([0, 2])
    manual = torch.stack([
        torch.log(torch.tensor(stats.norm.cdf((2.0 - 0.5) / math.sqrt(0.5)) * stats.norm.cdf(3.0 / math.sqrt(0.5)))),
        torch.log(torch.tensor(0.25)),
    ]).float()
    torch.testing.assert_close(lik.log_prob(f, y), manual)
    torch.testing.assert_close(lik.class_probs(f).sum(-1), torch.ones(2))
    two = ProbitProduct(torch.tensor([[0.3, -0.4]]), 1.0)
    torch.testing.assert_close(two.log_prob(torch.tensor([0])).exp() + two.log_prob(torch.tensor([1])).exp(),
                               torch.ones(1))  # normalised for two classes


def test_probit_log_evidence_matches_monte_carlo():
    gen = torch.Generator().manual_seed(7)
    lik = ProbitProductLikelihood(noise_var=0.7)
    mean = torch.tensor([[1.0, -0.5, 0.3, 0.0], [3.0, 1.0, -2.0, 0.5]])
    var = torch.tensor([[0.5, 1.0, 0.2, 2.0], [4.0, 0.1, 1.0, 0.3]])
    y = torch.tensor([2, 0])
    z = mean + var.sqrt() * torch.randn(400_000, 2, 4, generator=gen)
    mc = ProbitProduct(z, 0.7).log_prob(y.expand(400_000, 2)).exp().mean(0).log()
    torch.testing.assert_close(lik.log_evidence(mean, var, y), mc, atol=0.01, rtol=0.01)


# ------------------------------------------------------------------------------- the guide
def test_guide_samples_have_the_posterior_moments():
    net = mlp(3, [4], 2)
    model = tdamp_model(net)
    guide = spread_state(TDAMPGuide(model))
    mean, var = guide.posterior_mean(), guide.posterior_var()
    torch.manual_seed(0)
    draws = list(guide.draws(40_000))
    for site in net.sites():
        d = torch.stack([p[site] for p in draws])
        torch.testing.assert_close(d.mean(0), mean[site], atol=0.01, rtol=0.02)
        torch.testing.assert_close(d.var(0), var[site], atol=0.01, rtol=0.03)
    # the Pyro guide draws from the same posterior
    traced = torch.stack([poutine.trace(guide).get_trace().nodes["fc1.weight"]["value"] for _ in range(4000)])
    torch.testing.assert_close(traced.mean(0), mean["fc1.weight"], atol=0.05, rtol=0.05)
    inclusion = guide.inclusion()["fc1"]
    torch.testing.assert_close((traced != 0).any(-1).float().mean(0), inclusion, atol=0.03, rtol=0)


def test_predictive_works_with_the_guide():
    net = mlp(3, [4], 1)
    model = tdamp_model(net)
    guide = spread_state(TDAMPGuide(model))
    x = torch.randn(7, 3)
    out = Predictive(model, guide=guide, num_samples=5, return_sites=["obs", "f", "fc1.weight"])(x)
    # "f" and the weights lie outside the data plate: Pyro pads them with one plate dimension
    assert out["obs"].shape == (5, 7) and out["f"].shape == (5, 1, 7, 1) and out["fc1.weight"].shape == (5, 1, 4, 3)
    elbo = pyro.infer.Trace_ELBO().loss(model, guide, x, torch.randn(7))
    assert math.isfinite(elbo)


def test_state_round_trip_and_set_posterior():
    net = mlp(3, [4], 2)
    a = spread_state(TDAMPGuide(tdamp_model(net)), seed=1)
    b = TDAMPGuide(tdamp_model(net))
    b.set_state(a.state())
    for site in net.sites():
        torch.testing.assert_close(b.posterior_mean()[site], a.posterior_mean()[site])
    # a posterior given by its slab moments and inclusion probabilities (a federated server's product)
    st = a.state()
    c = TDAMPGuide(tdamp_model(net))
    c.set_posterior(st["slab_mean"], st["slab_var"], {"fc1": st["inclusion"]["fc1"].clamp(0.01, 0.99)})
    torch.testing.assert_close(c.state()["slab_mean"]["fc1.weight"], st["slab_mean"]["fc1.weight"])
    torch.testing.assert_close(c.inclusion()["fc1"], st["inclusion"]["fc1"].clamp(0.01, 0.99))
    with pytest.raises(ValueError, match="shape"):
        b.set_state({"message_eta": {"fc1.weight": torch.zeros(2, 2)}})


def test_guide_rejects_what_it_cannot_handle():
    net = mlp(3, [4], 1)
    with pytest.raises(TypeError, match="BernoulliGaussianPrior"):
        TDAMPGuide(BayesianNeuralNetwork(net, GaussianPrior(net), GaussianLikelihood()))
    conv = Network([Conv2d("c", 1, 2, 3), Activation("relu"), Flatten(), Dense("fc", 2 * 4 * 4, 2)], (1, 6, 6))
    with pytest.raises(ValueError, match="dense networks"):
        TDAMPGuide(tdamp_model(conv, "classification"))
    with pytest.raises(ValueError, match="damping"):
        TDAMPGuide(tdamp_model(net), damping=1.5)
    with pytest.raises(ValueError, match="batch"):
        TDAMPGuide(tdamp_model(net)).update(torch.randn(5, 3), torch.randn(5), 3)


def test_constrained_m_step_keeps_the_target_fraction():
    net = mlp(3, [10], 1)
    guide = spread_state(TDAMPGuide(tdamp_model(net)), seed=2)
    m_step(guide, keep=0.3, learn_noise=False)
    assert int((guide.inclusion()["fc1"] > 0.5).sum()) == 3


# --------------------------------------------------------- one linear layer: turbo GAMP
def _exact_bg_mean(A, y, rho, s2, v, log_evidence=False):
    m, n = A.shape
    logw, means = [], []
    for support in itertools.product([0, 1], repeat=n):
        idx = [i for i in range(n) if support[i]]
        k = len(idx)
        cols = A[:, idx]
        cov = v * torch.eye(m, dtype=A.dtype) + s2 * cols @ cols.t()
        logw.append(k * math.log(rho) + (n - k) * math.log(1 - rho)
                    + float(torch.distributions.MultivariateNormal(torch.zeros(m, dtype=A.dtype), cov).log_prob(y)))
        mu = torch.zeros(n, dtype=A.dtype)
        if k:
            mu[idx] = torch.linalg.solve(cols.t() @ cols / v + torch.eye(k, dtype=A.dtype) / s2, cols.t() @ y / v)
        means.append(mu)
    logw = torch.tensor(logw, dtype=A.dtype)
    w = torch.softmax(logw, 0)
    out = (w[:, None] * torch.stack(means)).sum(0), w, means
    return out + (float(torch.logsumexp(logw, 0)),) if log_evidence else out


def _exact_inclusion(weights, means):
    """Marginal inclusion probabilities ``P(x_i != 0 | y)`` from the enumerated supports."""
    supports = torch.stack([(mu != 0) for mu in means]).to(weights.dtype)
    return (weights[:, None] * supports).sum(0)


def _sparse_linear_problem(n, m, k, v, seed):
    """``y = A x + N(0, v)`` with ``A`` iid ``N(0, 1/m)`` and ``k`` non-zeros of size 0.7 to 1.5."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    x = torch.zeros(n, dtype=torch.float64)
    idx = torch.randperm(n, generator=gen)[:k]
    x[idx] = (0.7 + 0.8 * torch.rand(k, generator=gen, dtype=torch.float64)) \
        * torch.sign(torch.randn(k, generator=gen, dtype=torch.float64))
    return A, x, A @ x + math.sqrt(v) * torch.randn(m, generator=gen, dtype=torch.float64)


def _nmse(estimate, reference):
    return float(((estimate - reference) ** 2).sum() / (reference**2).sum())


@pytest.mark.parametrize("method", ["gamp", "ep", "ep-clamped"])
def test_one_linear_layer_recovers_a_sparse_vector_like_exact_inference(method):
    gen = torch.Generator().manual_seed(11)
    n, m, rho, s2, v = 8, 16, 0.3, 1.0, 0.01
    A = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    x = torch.zeros(n, dtype=torch.float64)
    x[[1, 4, 6]] = torch.tensor([1.2, -0.9, 0.7], dtype=torch.float64)
    y = A @ x + math.sqrt(v) * torch.randn(m, generator=gen, dtype=torch.float64)
    exact, w, means = _exact_bg_mean(A, y, rho, s2, v)
    out = linear_tdamp(A, y, rho, s2, v, damping=0.5, method=method)
    assert bool(out["converged"])
    assert _nmse(out["mean"], exact) < 1e-4  # measured 6e-7, 1e-7, 2e-8 (gamp, ep, ep-clamped); ridge 0.026
    torch.testing.assert_close(out["inclusion"], _exact_inclusion(w, means), atol=0.02, rtol=0)  # 7e-3, 1e-3, 4e-5
    assert ((out["inclusion"] > 0.5) == (x != 0)).all()


# The harder family: 10 unknowns, 8 rows, 2 non-zeros, v = 1e-3, rho = 2/10; the problems of seeds 0
# to 5, the first six, fixed before any result was seen.
HARD = {"n": 10, "m": 8, "k": 2, "s2": 1.0, "v": 1e-3}
HARD_SEEDS = range(6)


@functools.lru_cache(maxsize=None)
def _hard_problem(seed):
    """A problem of the harder family with its enumerated posterior mean, inclusion marginals and
    log evidence."""
    n, m, k, s2, v = HARD["n"], HARD["m"], HARD["k"], HARD["s2"], HARD["v"]
    A, _, y = _sparse_linear_problem(n, m, k, v, seed)
    exact, w, means, log_evidence = _exact_bg_mean(A, y, k / n, s2, v, log_evidence=True)
    return A, y, exact, _exact_inclusion(w, means), log_evidence


def _hard_fit(seed, method, **options):
    A, y, exact, exact_inclusion, _ = _hard_problem(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # EP reaches its fixed point
        out = linear_tdamp(A, y, HARD["k"] / HARD["n"], HARD["s2"], HARD["v"], damping=0.5, method=method, **options)
    assert bool(out["converged"]), (seed, method)
    assert ((out["inclusion"] > 0.5) == (exact_inclusion > 0.5)).all(), (seed, method)
    return _nmse(out["mean"], exact), float((out["inclusion"] - exact_inclusion).abs().max())


def test_one_linear_layer_clamped_ep_matches_exact_inference_with_fewer_rows_than_weights():
    """EP with each inclusion clamped in turn (``method="ep-clamped"``) on every problem of the
    harder family (default tolerance): NMSE below 1e-4 against the enumerated posterior mean
    (measured 9e-9, 2e-9, 5e-8, 6e-8, 3e-11, 2.3e-5) and every inclusion probability within 0.01 of
    the enumerated marginal (measured at most 1e-4, 2e-4, 5e-5, 3e-4, 4e-6, 2.0e-3)."""
    errors, inclusion_errors = zip(*[_hard_fit(seed, "ep-clamped", iterations=10000) for seed in HARD_SEEDS])
    assert max(errors) < 1e-4, errors
    assert max(inclusion_errors) < 0.01, inclusion_errors


def test_one_linear_layer_exact_cavities_beat_gamp_with_fewer_rows_than_weights():
    """The same problems with one Gaussian message per unknown. Exact cavities (``method="ep"``):
    NMSE below 1e-4 on every problem (measured 4e-8, 8e-7, 4e-7, 1e-7, 6e-11, 7.9e-5), inclusion
    probabilities within 0.01 on five (1e-4 to 8.3e-3) and 6.4e-2 on the sixth, where two unknowns
    compete to explain the same data (clamping fixes it, above). GAMP's large-system cavities are
    within 1e-3 (median below 1e-4) but 1.7e-4 off on seed 5, with an inclusion probability off by
    0.12; the Gaussian-prior posterior mean (ridge) is off by 8e-3 to 0.3."""
    ep_errors, ep_inclusion = zip(*[_hard_fit(seed, "ep", iterations=10000, tol=1e-8) for seed in HARD_SEEDS])
    gamp_errors, gamp_inclusion = zip(*[_hard_fit(seed, "gamp", iterations=2000, tol=1e-12) for seed in HARD_SEEDS])
    assert max(ep_errors) < 1e-4, ep_errors
    assert max(ep_inclusion) < 0.07 and sorted(ep_inclusion)[-2] < 0.01, ep_inclusion
    assert max(gamp_errors) < 1e-3 and statistics.median(gamp_errors) < 1e-4, gamp_errors
    assert max(gamp_inclusion) < 0.15 and statistics.median(gamp_inclusion) < 0.03, gamp_inclusion
    assert max(ep_errors) < max(gamp_errors) and max(ep_inclusion) < max(gamp_inclusion)
    for seed in HARD_SEEDS:
        A, y, exact, _, _ = _hard_problem(seed)
        n, s2, v = HARD["n"], HARD["s2"], HARD["v"]
        ridge = torch.linalg.solve(A.t() @ A / v + torch.eye(n, dtype=A.dtype) / s2, A.t() @ y / v)
        assert _nmse(ridge, exact) > 1e-3, seed


def test_one_linear_layer_ep_log_evidence():
    """EP's log evidence: exact for a Gaussian prior (``log N(y; 0, v I + s^2 A A^T)``, measured
    5e-14 at rho = 1 - 1e-12), and within 0.1 nats of the enumerated ``log p(y)`` on the harder family
    (measured 1e-4 to 8.6e-3, and 5.0e-2 on seed 5 whose marginals EP misses most)."""
    gen = torch.Generator().manual_seed(3)
    n, m, s2, v = 10, 6, 1.0, 0.05
    A = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    y = A @ torch.randn(n, generator=gen, dtype=torch.float64) + math.sqrt(v) * torch.randn(m, generator=gen,
                                                                                            dtype=torch.float64)
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(m, dtype=A.dtype),
                                                      v * torch.eye(m, dtype=A.dtype) + s2 * A @ A.t())
    out = linear_tdamp(A, y, 1 - 1e-12, s2, v, iterations=2000, tol=1e-12, method="ep")
    assert float(out["log_evidence"]) == pytest.approx(float(gaussian.log_prob(y)), abs=1e-9)
    for seed in HARD_SEEDS:
        A, y, _, _, exact = _hard_problem(seed)
        k, n = HARD["k"], HARD["n"]
        out = linear_tdamp(A, y, k / n, HARD["s2"], HARD["v"], iterations=10000, tol=1e-8, method="ep")
        assert float(out["log_evidence"]) == pytest.approx(exact, abs=0.1), seed


def test_one_linear_layer_halves_the_damping_of_an_oscillating_iteration():
    """The seed-10 problem of the harder family: at damping 0.5 GAMP's iteration does not settle
    (without the halving it runs to the cap of 2000 iterations unconverged, measured); the damping is
    halved after ``STALL_ITERATIONS`` iterations without a new smallest change and the iteration
    converges (measured: damping 0.0625, 1267 iterations). Starting from the damping it ends with,
    it converges to the same fixed point."""
    A, _, y = _sparse_linear_problem(10, 8, 2, 1e-3, 10)
    out = linear_tdamp(A, y, 0.2, 1.0, 1e-3, damping=0.5, iterations=2000, tol=1e-12)
    assert bool(out["converged"]) and float(out["damping"]) < 0.5 and int(out["iterations"]) < 2000
    again = linear_tdamp(A, y, 0.2, 1.0, 1e-3, damping=float(out["damping"]), iterations=4000, tol=1e-12)
    assert bool(again["converged"])
    torch.testing.assert_close(again["mean"], out["mean"], rtol=0, atol=1e-8)


def test_one_linear_layer_ep_without_a_fixed_point_warns():
    """The seed-29 problem of the harder family: EP's step of Module B's messages would leave the
    Gaussian part indefinite, is held back, and the iteration stops on messages whose Gaussian
    marginals do not match Module B's moments: not EP's fixed point, reported, never silent."""
    A, _, y = _sparse_linear_problem(10, 8, 2, 1e-3, 29)
    with pytest.warns(RuntimeWarning, match="without a fixed point"):
        out = linear_tdamp(A, y, 0.2, 1.0, 1e-3, damping=0.5, iterations=2000, tol=1e-10, method="ep")
    assert not bool(out["converged"])


def test_one_linear_layer_rejects_bad_options():
    A, y = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="unknown method 'vamp'"):
        linear_tdamp(A, y, 0.5, 1.0, 0.1, method="vamp")
    with pytest.raises(ConfigError, match="iterations"):
        linear_tdamp(A, y, 0.5, 1.0, 0.1, iterations=0)
    with pytest.raises(ConfigError, match="tol"):
        linear_tdamp(A, y, 0.5, 1.0, 0.1, tol=-1.0)
    with pytest.raises(ConfigError, match="ep-clamped"):
        linear_tdamp(A, y, 0.5, 1.0, 0.1, method="ep-clamped", learn_rho=True)


@pytest.mark.parametrize("method", ["gamp", "ep"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_linear_layer_is_exact_for_a_gaussian_prior(seed, method):
    """With rho -> 1 the prior is Gaussian, and the GAMP fixed point (Onsager-corrected outputs) is
    the exact posterior mean (A^T A / v + I / s^2)^-1 A^T y / v, also with fewer rows than unknowns
    (measured NMSE ~1e-25); without the Onsager term the fixed point would be a ridge regression
    weighted by 1 / (v + tau_n), off by far more than this. EP's Gaussian part is then the exact
    posterior."""
    gen = torch.Generator().manual_seed(5 + seed)
    n, m, s2, v = (6, 12, 1.0, 0.05) if seed == 0 else (10, 6, 1.0, 0.05)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    y = A @ torch.randn(n, generator=gen, dtype=torch.float64) + math.sqrt(v) * torch.randn(m, generator=gen,
                                                                                            dtype=torch.float64)
    exact = torch.linalg.solve(A.t() @ A / v + torch.eye(n, dtype=torch.float64) / s2, A.t() @ y / v)
    out = linear_tdamp(A, y, 1 - 1e-12, s2, v, damping=0.5, iterations=2000, tol=1e-12, method=method)
    assert _nmse(out["mean"], exact) < 1e-12
    torch.testing.assert_close(out["mean"], exact, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------- the catalog entry
def test_catalog_entry_regression_fit_predict_save_load(boston, tmp_path):
    post = bnnzoo.fit("em-tdamp", boston, epochs=4, keep=0.5, device="cpu", progress=False, seed=0,
                      network={"arch": "mlp", "hidden": [10]})
    assert len(post.history.epoch_seconds) == 4 and all(s > 0 for s in post.history.epoch_seconds)
    assert all(math.isfinite(v) for v in post.history.loss)
    sp = post.sparsity()
    assert sp["architecture"] == "13-5-1"
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert m["rmse"] < 1.2 * float(boston.y_test.std())
    loaded = bnnzoo.load(post.save(tmp_path / "run"))
    a = post.predict(boston.x_test[:10], num_samples=5, seed=3)
    b = loaded.predict(boston.x_test[:10], num_samples=5, seed=3)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.std, b.std)
    assert loaded.sparsity()["architecture"] == "13-5-1"
    assert post.to_torch()(loaded.standardizer.x(boston.x_test[:3])).shape == (3, 1)


def test_pruning_follows_the_posterior_and_never_empties_a_layer(boston):
    """The default rule keeps the neurons with inclusion probability >= 1/2; a layer the rule would
    empty keeps its most probable neuron with an EmptyLayerWarning, unless allow_empty."""
    from bnnzoo.models.sparsity import EmptyLayerWarning

    post = bnnzoo.fit("em-tdamp", boston, epochs=3, prune=False, device="cpu", progress=False, seed=0,
                      network={"arch": "mlp", "hidden": [6]})
    data = (boston.x_train, boston.y_train)
    inclusion = post.inclusion()["fc1"]
    by_rule = post.prune(data=data)
    kept = by_rule.guide.mask("fc1.bias")
    assert torch.equal(kept, inclusion >= 0.5) and by_rule.fit_state.pruning[-1].rule == "threshold"
    # every neuron below 1/2: the rule alone would cut the network in two
    shift = float(post.guide.group_posteriors()["fc1"].log_odds.max()) + 5.0
    post.model.prior.set_group_parameters("fc1", logit_rho=post.model.prior.logit_rho("fc1") - shift)
    inclusion = post.inclusion()["fc1"]
    assert bool((inclusion < 0.5).all())
    with pytest.warns(EmptyLayerWarning, match="fc1"):
        guarded = post.prune(data=data)
    assert guarded.sparsity()["architecture"] == "13-1-1"
    assert bool(guarded.guide.mask("fc1.bias")[int(torch.argmax(inclusion))])
    assert math.isfinite(guarded.evaluate(boston.x_test, boston.y_test, num_samples=5)["rmse"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)
        emptied = post.prune(data=data, allow_empty=True)
    assert emptied.sparsity()["architecture"] == "13-0-1"
    assert emptied.fit_state.pruning[-1].options["allow_empty"] is True


def test_passes_run_in_the_shared_epoch_loop(boston):
    post = bnnzoo.create("em-tdamp", "regression", (13,), 1, network={"arch": "mlp", "hidden": [6]}, epochs=3,
                         validation_fraction=None, batch_size=32, device="cpu")
    calls = []
    post.fit(boston.x_train[:80], boston.y_train[:80], progress=False, callback=lambda e, loss: calls.append((e, loss)))
    assert calls == list(enumerate(post.history.loss)) and len(calls) == 3
    assert len(post.history.extra["kept_fraction"]) == 3 and len(post.history.extra["noise_var"]) == 3
    # a pass whose evidence is not finite stops the fit, naming the method and the pass
    broken = bnnzoo.create("em-tdamp", "regression", (13,), 1, network={"arch": "mlp", "hidden": [6]}, epochs=3,
                           device="cpu")
    reset = broken.guide.reset_statistics

    def poisoned() -> None:
        reset()
        broken.guide.log_evidence_sum.fill_(float("nan"))

    broken.guide.reset_statistics = poisoned
    with pytest.raises(DivergenceError, match="em-tdamp: the fit diverged in epoch 1"):
        broken.fit(boston.x_train[:80], boston.y_train[:80], progress=False)


def test_catalog_entry_classification(mnist_small):
    post = bnnzoo.fit("em-tdamp", mnist_small, epochs=2, batch_size=100, device="cpu", progress=False, seed=0,
                      network={"arch": "mlp", "hidden": [30]})
    pred = post.predict(mnist_small.x_test[:50], num_samples=10)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(50))
    m = post.evaluate(mnist_small.x_test, mnist_small.y_test, num_samples=10)
    assert m["accuracy"] > 0.5
    ll = post.log_likelihood(mnist_small.x_test[:20], mnist_small.y_test[:20], num_samples=5)
    assert torch.isfinite(ll).all() and (ll <= 0).all()


def test_catalog_entry_rejects_bad_options(boston):
    with pytest.raises(ValueError, match="keep"):
        bnnzoo.create("em-tdamp", "regression", (13,), 1, keep=1.5)
    with pytest.raises(ValueError, match="dense ReLU"):
        bnnzoo.create("em-tdamp", "classification", (1, 28, 28), 10, network={"arch": "lenet5"})


@pytest.mark.cuda
def test_tdamp_on_cuda(boston):
    post = bnnzoo.fit("em-tdamp", boston, epochs=2, keep=0.5, device="cuda", progress=False, seed=0,
                      network={"arch": "mlp", "hidden": [8]})
    assert post.guide.message("fc1.weight")[0].device.type == "cuda"
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=5)
    assert math.isfinite(m["rmse"])
    cpu = post.to("cpu")
    assert cpu.guide.posterior_mean()["fc1.weight"].device.type == "cpu"


# ------------------------------------------------------------------------- the fuller M-step
def test_probit_noise_m_step_finds_the_grid_maximum():
    """The probit-product variance maximises the summed log evidence: against a brute-force grid of
    4001 points in log v over the same bracket."""
    gen = torch.Generator().manual_seed(0)
    lik = ProbitProductLikelihood(1.0).to(torch.float64)
    mean = 2.0 * torch.randn(300, 4, generator=gen, dtype=torch.float64)
    var = 0.5 * torch.rand(300, 4, generator=gen, dtype=torch.float64)
    # labels from a noisier probit than v = 1: the maximum lies inside the bracket, above 1
    z = mean + var.sqrt() * torch.randn(300, 4, generator=gen, dtype=torch.float64)
    y = (z + 1.5 * torch.randn(300, 4, generator=gen, dtype=torch.float64)).argmax(-1)
    grid = torch.linspace(-math.log(NOISE_BRACKET), math.log(NOISE_BRACKET), 4001, dtype=torch.float64)
    values = []
    for lv in grid:
        lik.noise_var.copy_(torch.exp(lv))
        values.append(float(lik.log_evidence(mean, var, y).sum()))
    lik.noise_var.fill_(1.0)
    v = probit_noise_m_step(lik, mean, var, y)
    best = float(torch.exp(grid[int(np.argmax(values))]))
    assert float(lik.noise_var) == pytest.approx(float(v))
    assert 1.5 < best < 50  # an interior maximum
    assert float(v) == pytest.approx(best, rel=0.01)
    lik.noise_var.copy_(v)
    assert float(lik.log_evidence(mean, var, y).sum()) >= max(values) - 1e-6 * abs(max(values))


def test_group_rate_m_step_sets_each_rate_to_its_inclusion():
    net = mlp(3, [6], 1)
    model = tdamp_model(net)
    torch.manual_seed(0)
    guide = TDAMPGuide(model)
    before = guide.inclusion()["fc1"].clone()
    out = m_step(guide, rate_level="group", learn_noise=False)
    torch.testing.assert_close(torch.sigmoid(out["logit_rho.fc1"]), before.clamp(1e-6, 1 - 1e-6))
    torch.testing.assert_close(torch.sigmoid(model.prior.logit_rho("fc1")), before.clamp(1e-6, 1 - 1e-6))
    assert float(before.std()) > 1e-3  # the rates differ per neuron (a layer rate would be one value)
    with pytest.raises(bnnzoo.errors.ConfigError, match="rate_level"):
        m_step(guide, rate_level="neuron")


def test_learned_probit_noise_and_slab_variance_in_fits(boston, mnist_small):
    post = bnnzoo.fit("em-tdamp", mnist_small, epochs=2, batch_size=100, progress=False, seed=0,
                      learn_probit_noise=True, network={"arch": "mlp", "hidden": [20]})
    noise = post.history.extra["noise_var"]
    assert len(noise) == 2 and noise[0] != 1.0 and all(math.isfinite(v) and v > 0 for v in noise)
    for module_a in ("adf", "amp"):
        post = bnnzoo.fit("em-tdamp", boston, epochs=3, batch_size=32, validation_fraction=None, progress=False,
                          seed=0, learn_slab_var=True, module_a=module_a, turbo_iterations=3)
        s2 = post.model.prior.slab_var("fc1")
        assert bool(torch.isfinite(s2).all()) and abs(float(s2[0]) - 1.0 / 13) > 1e-4  # learned, away from 1/fan_in
        assert math.isfinite(post.evaluate(boston.x_test, boston.y_test, num_samples=10)["rmse"])
