"""Deep AMP as TDAMP's Module A: the Onsager term against the exact cavity, the messages' ``g`` and
``G`` against finite differences of ``log Z``, a two-layer toy against exact enumeration, the turbo
loop's criterion and cap, and the options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bnnzoo
from bnnzoo.guides import TDAMPGuide
from bnnzoo.guides.deep_amp import (
    amp_message_pass,
    batch_deep_amp,
    belief_change,
    onsager_correction,
)
from bnnzoo.guides.group_sparse_messages import group_posterior
from bnnzoo.guides.moment_propagation import gaussian_log_evidence_and_grads
from bnnzoo.models import (
    BayesianNeuralNetwork,
    BernoulliGaussianPrior,
    GaussianLikelihood,
    ProbitProductLikelihood,
)
from bnnzoo.models.errors import ConfigError
from bnnzoo.models.networks import Activation, Dense, Network, mlp

D = torch.float64


def _random_layer_state(k, i, seed):
    gen = torch.Generator().manual_seed(seed)
    lam = 0.5 + 2.5 * torch.rand(k, i + 1, generator=gen, dtype=D)
    eta = torch.randn(k, i + 1, generator=gen, dtype=D) * lam
    return eta, lam


# ------------------------------------------------------------------ (a) the Onsager term
@pytest.mark.parametrize("known_inputs", [True, False])
def test_onsager_term_is_the_first_order_exact_cavity(known_inputs):
    """Remove example n's message (times eps) from the state, recompute Module B's beliefs and the
    pre-activation mean: the Onsager-corrected mean of the full state agrees to second order in eps
    (the error falls ~16-fold when eps falls 4-fold), the uncorrected one only to first order."""
    k, i, b = 3, 4, 3
    gen = torch.Generator().manual_seed(1)
    eta, lam = _random_layer_state(k, i, 0)
    logit_rho = torch.tensor([0.2, -0.5, 1.0], dtype=D)  # inclusions strictly inside (0, 1)
    s2 = torch.full((k,), 0.8, dtype=D)
    x = torch.cat([torch.randn(b, i, generator=gen, dtype=D), torch.ones(b, 1, dtype=D)], 1)
    u = None if known_inputs else torch.cat([0.5 * torch.rand(b, i, generator=gen, dtype=D),
                                            torch.zeros(b, 1, dtype=D)], 1)
    g = torch.randn(b, k, generator=gen, dtype=D)
    g_tau = -0.5 * torch.rand(b, k, generator=gen, dtype=D)
    curv = g * g - 2 * g_tau
    base = group_posterior(logit_rho, s2, eta, lam)
    m_base = base.weight_moments[0]
    second = x * x if u is None else x * x + u
    for n in range(b):
        errors, naive = [], []
        for eps in (2e-2, 5e-3):
            c = curv[n].unsqueeze(1) * second[n].unsqueeze(0)
            d = g[n].unsqueeze(1) * x[n].unsqueeze(0)
            if u is not None:
                d = d + 2 * g_tau[n].unsqueeze(1) * m_base * u[n].unsqueeze(0)
            full = group_posterior(logit_rho, s2, eta + eps * (c * m_base + d), lam + eps * c)
            omega_full = x[n] @ full.weight_moments[0].t()
            omega_exact = x[n] @ m_base.t()  # the cavity: the state without example n's message
            corr = onsager_correction(x[n:n + 1], None if u is None else u[n:n + 1], full, g[n:n + 1],
                                      g_tau[n:n + 1], curv[n:n + 1], eps).squeeze(0)
            errors.append(float((omega_full + corr - omega_exact).abs().max()))
            naive.append(float((omega_full - omega_exact).abs().max()))
        assert errors[0] < 0.05 * naive[0]
        assert errors[1] < errors[0] / 10  # second order: 16x for a 4x smaller message
        assert naive[1] > naive[0] / 6  # the uncorrected mean is off to first order (4x)


def test_onsager_term_of_a_gaussian_belief_is_the_textbook_one():
    """With the slab always on (the output layer) the term is -g sum_i V x^2 - 2 g_tau sum_i V M x u."""
    eta, lam = _random_layer_state(2, 3, 2)
    post = group_posterior(torch.full((2,), math.inf, dtype=D), torch.ones(2, dtype=D), eta, lam)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4, 3, generator=gen, dtype=D), torch.ones(4, 1, dtype=D)], 1)
    u = torch.cat([torch.rand(4, 3, generator=gen, dtype=D), torch.zeros(4, 1, dtype=D)], 1)
    g, g_tau = torch.randn(4, 2, generator=gen, dtype=D), -torch.rand(4, 2, generator=gen, dtype=D)
    m, v = post.weight_moments
    expected = -0.7 * (g * ((x * x) @ v.t()) + 2 * g_tau * ((x * u) @ (v * m).t()))
    got = onsager_correction(x, u, post, g, g_tau, g * g - 2 * g_tau, 0.7)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _beliefs(net, seed, rho=0.6):
    posts = {}
    for j, layer in enumerate(net.param_layers):
        k, i = layer.weight_shape
        eta, lam = _random_layer_state(k, i, seed + j)
        last = j == len(net.param_layers) - 1
        logit = torch.full((k,), math.inf if last else math.log(rho / (1 - rho)), dtype=D)
        posts[layer.name] = group_posterior(logit, torch.full((k,), 1.0 / i, dtype=D) * 2, eta, lam)
    return posts


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_amp_messages_g_and_curvature_match_finite_differences(task):
    """g = d log Z_n / d omega at every layer (central differences of log Z in the cavity means, the
    Onsager terms on and held at their values, as the backward pass holds them), and at the output
    G = -d g / d omega."""
    net = mlp(3, [4, 3], 1 if task == "regression" else 3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, generator=gen, dtype=D)
    if task == "regression":
        y = torch.randn(5, generator=gen, dtype=D)

        def grads(mean, var):
            return gaussian_log_evidence_and_grads(y, mean, var, torch.tensor(0.3, dtype=D))
    else:
        y = torch.randint(0, 3, (5,), generator=gen)
        lik = ProbitProductLikelihood(1.0).to(D)

        def grads(mean, var):
            return lik.log_evidence_and_grads(mean, var, y)
    posts = _beliefs(net, 10)
    _, _, _, first = amp_message_pass(net, x, posts, grads)
    corrections = {}
    _, _, _, msgs = amp_message_pass(net, x, posts, grads, previous=first, weight=0.7, corrections_out=corrections)
    assert all(float(c.abs().max()) > 1e-3 for c in corrections.values())  # the terms are not negligible here
    eps = 1e-6
    out_name = net.param_layers[-1].name
    for layer in net.param_layers:
        k = layer.weight_shape[0]
        for n, unit in [(0, 0), (3, k - 1), (4, k // 2)]:
            def probe(delta, name=layer.name, n=n, unit=unit):
                off = {key: c.clone() for key, c in corrections.items()}
                off[name][n, unit] += delta
                return amp_message_pass(net, x, posts, grads, offsets=off)
            lz_p, _, _, m_p = probe(eps)
            lz_m, _, _, m_m = probe(-eps)
            fd = float(lz_p[n] - lz_m[n]) / (2 * eps)
            assert fd == pytest.approx(float(msgs[layer.name].pre_grad[n, unit]), rel=1e-5, abs=1e-8)
            if layer.name == out_name:
                fd_g = float(m_p[out_name].pre_grad[n, unit] - m_m[out_name].pre_grad[n, unit]) / (2 * eps)
                assert -fd_g == pytest.approx(float(msgs[out_name].example_curv[n, unit]), rel=1e-5, abs=1e-8)


# ------------------------------------------------------------------ (b) a two-layer toy, exactly
PIN = 1e6  # precision of the pseudo-messages that hold weights at known values


def _toy(seed, m=12, v=0.05, i=3):
    """Inputs 2i -> 2 hidden (identity) -> 1; hidden group k sees input block k (the other block's
    weights held at 0 by pseudo-messages), the output weights are known."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * i, generator=gen, dtype=D)
    w2 = torch.tensor([1.0, -0.8], dtype=D)
    w1 = torch.zeros(2, 2 * i + 1, dtype=D)
    w1[0, :i], w1[0, -1] = torch.randn(i, generator=gen, dtype=D), 0.3
    if seed % 2:
        w1[1, i:2 * i], w1[1, -1] = torch.randn(i, generator=gen, dtype=D), -0.2
    y = (torch.cat([x, torch.ones(m, 1, dtype=D)], 1) @ w1.t()) @ w2 + math.sqrt(v) * torch.randn(m, generator=gen,
                                                                                                  dtype=D)
    lam0 = torch.zeros(2, 2 * i + 1, dtype=D)
    lam0[0, i:2 * i] = PIN
    lam0[1, :i] = PIN
    net = Network([Dense("fc1", 2 * i, 2), Activation("identity"), Dense("fc2", 2, 1)], (2 * i,), "toy")
    return net, x, y, w2, lam0


def _exact_toy(x, y, w2, lam0, logit_rho, s2, v):
    """The exact posterior of the hidden layer (group spike-and-slab prior times the pseudo-messages
    times the linear-Gaussian likelihood) by enumerating the 4 group supports, Gaussian algebra on each."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
    d = xa.shape[1]
    log_w, means, supports = [], [], []
    for s in itertools.product([0, 1], repeat=2):
        on = [k for k in range(2) if s[k]]
        lw, mean = len(on) * logit_rho, torch.zeros(2, d, dtype=D)
        if on:
            a = torch.cat([w2[k] * xa for k in on], 1)
            precision = torch.eye(a.shape[1], dtype=D) / s2 + torch.diag(torch.cat([lam0[k] for k in on])) + a.t() @ a / v
            h = a.t() @ y / v
            mu = torch.linalg.solve(precision, h)
            lw += -0.5 * a.shape[1] * math.log(s2) + 0.5 * float(h @ mu) - 0.5 * float(torch.logdet(precision))
            for j, k in enumerate(on):
                mean[k] = mu[j * d:(j + 1) * d]
        log_w.append(lw)
        means.append(mean)
        supports.append(s)
    w = torch.softmax(torch.tensor(log_w, dtype=D), 0)
    return (w[:, None, None] * torch.stack(means)).sum(0), (w[:, None] * torch.tensor(supports, dtype=D)).sum(0)


def _toy_fit(seed, onsager, v=0.05, s2=1.0, i=3):
    net, x, y, w2, lam0 = _toy(seed, v=v, i=i)
    # logit rho offsets the pins' log-likelihood ratio (0.5 log(1 + s2 PIN) per held weight): prior rate 1/2
    logit_rho = i * 0.5 * math.log(1 + s2 * PIN)
    exact_mean, exact_pi = _exact_toy(x, y, w2, lam0, logit_rho, s2, v)
    known = (torch.cat([w2, torch.zeros(1, dtype=D)]).unsqueeze(0) * 1e8, torch.full((1, 3), 1e8, dtype=D))
    posts, _ = batch_deep_amp(
        net, x, {"fc1": torch.full((2,), logit_rho, dtype=D), "fc2": torch.tensor([math.inf], dtype=D)},
        {"fc1": torch.full((2,), s2, dtype=D), "fc2": torch.ones(1, dtype=D)},
        lambda mean, var: gaussian_log_evidence_and_grads(y, mean, var, torch.tensor(v, dtype=D)),
        prior_messages={"fc1": (torch.zeros_like(lam0), lam0), "fc2": known}, onsager=onsager,
        iterations=3000, damping=0.5, tol=1e-10)
    mean = posts["fc1"].weight_moments[0]
    nmse = float(((mean - exact_mean) ** 2).sum() / (exact_mean ** 2).sum())
    return nmse, posts["fc1"].inclusion, exact_pi


@pytest.mark.parametrize("seed", [1, 3])
def test_two_layer_deep_amp_is_exact_where_both_groups_are_on(seed):
    """Both hidden neurons on (exact inclusion 1): the hidden layer's posterior given its support is
    Gaussian, which deep AMP's fixed point reproduces through the second layer (NMSE < 1e-8 to the
    enumerated posterior mean; measured 1e-11 to 1e-13); without the Onsager term (moment
    propagation's message at the beliefs' own means) the fixed point is a re-weighted ridge
    (NMSE > 1e-4; measured 5e-4 and 0.41)."""
    nmse, pi, exact_pi = _toy_fit(seed, onsager=True)
    assert nmse < 1e-8
    assert float((pi - exact_pi).abs().max()) < 1e-3
    assert _toy_fit(seed, onsager=False)[0] > 1e-4


@pytest.mark.parametrize("seed", [2, 4])
def test_two_layer_deep_amp_finds_the_exact_support(seed):
    """One neuron off in the data: deep AMP's support (inclusion > 1/2) is the enumerated marginal
    one, inclusion within 0.01 of the exact (0.003 and 0.002 there), and its means are closer to the
    exact posterior mean than moment propagation's (NMSE 2e-8 against 4e-5 and 3e-5). Where the
    exact inclusion is not decisive (0.37 in seed 6) both variants miss it alike: Module B sums the
    weights' evidence as if their messages were independent."""
    nmse, pi, exact_pi = _toy_fit(seed, onsager=True)
    assert torch.equal(pi > 0.5, exact_pi > 0.5)
    assert float((pi - exact_pi).abs().max()) < 0.01
    assert nmse < 1e-6
    assert nmse < _toy_fit(seed, onsager=False)[0] / 100


# ------------------------------------------------------------------ (c) the turbo loop
def _guide(net, **kw):
    model = BayesianNeuralNetwork(net, BernoulliGaussianPrior(net, rho=0.5), GaussianLikelihood(0.5))
    torch.manual_seed(0)
    return TDAMPGuide(model, **kw)


@pytest.mark.parametrize("module_a", ["adf", "amp"])
def test_turbo_loop_stops_on_its_criterion_and_respects_the_cap(module_a):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(64, generator=gen)
    net = mlp(4, [8], 1)
    counts = {}
    for tol in (1e9, None, 0.1):
        guide = _guide(net, module_a=module_a, turbo_iterations=6, turbo_tolerance=tol, memory=10.0)
        for _ in range(3):
            guide.reset_statistics()
            for start in range(0, 64, 16):
                guide.update(x[start:start + 16], y[start:start + 16], 64)
            counts[tol] = guide.mean_turbo_iterations()
        guide.check_finite()
    assert counts[1e9] == 1.0  # converged at once: the first check stops the loop
    assert counts[None] == 6.0  # no tolerance: always the cap
    assert 1.0 < counts[0.1] < 6.0  # stops in between once the beliefs settle (third pass)


def test_belief_change_is_the_largest_inclusion_or_standardised_mean_change():
    eta, lam = _random_layer_state(3, 2, 4)
    logit = torch.tensor([0.0, 1.0, -math.inf], dtype=D)  # the third neuron pruned
    s2 = torch.ones(3, dtype=D)
    before = {"fc": group_posterior(logit, s2, eta, lam)}
    eta2 = eta.clone()
    eta2[1, 0] += 0.3 * lam[1, 0]
    after = {"fc": group_posterior(logit, s2, eta2, lam)}
    m0, m1, v1 = before["fc"].weight_slab[0], after["fc"].weight_slab[0], after["fc"].weight_slab[1]
    expected = max(float(((m1 - m0).abs() / v1.sqrt()).max()),
                   float((after["fc"].inclusion[:2] - before["fc"].inclusion[:2]).abs().max()))
    assert float(belief_change(before, after)) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.01


def test_amp_fit_records_turbo_iterations(boston):
    post = bnnzoo.fit("em-tdamp", boston, epochs=3, batch_size=32, validation_fraction=None, progress=False,
                      seed=0, module_a="amp", turbo_iterations=4, turbo_tolerance=1e-2)
    its = post.history.extra["turbo_iterations"]
    assert len(its) == 3 and all(1.0 <= t <= 4.0 for t in its)
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=20)
    assert math.isfinite(m["rmse"]) and m["rmse"] < 8.0


# ------------------------------------------------------------------ (d) options
def test_bad_module_a_options_are_refused(boston):
    net = mlp(3, [4], 1)
    with pytest.raises(ConfigError, match="module_a"):
        _guide(net, module_a="deep")
    with pytest.raises(ValueError, match="turbo_tolerance"):
        _guide(net, turbo_tolerance=0.0)
    with pytest.raises(ConfigError, match="module_a"):
        bnnzoo.fit("em-tdamp", boston, epochs=1, progress=False, module_a="ep")
    with pytest.raises(ConfigError, match="turbo_tolerance"):
        bnnzoo.fit("em-tdamp", boston, epochs=1, progress=False, turbo_tolerance=-1.0)
