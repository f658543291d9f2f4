"""Ke & Fan's adaptive preconditioner in the SGHMC kernel (``preconditioner="ke-fan"``), their input
groups (``groups="input"``), and pruning that never empties a layer."""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from conftest import assert_chain_matches_gaussian, correlated_gaussian_regression
from pyro.infer import MCMC

import bnnzoo
from bnnzoo.errors import ConfigError
from bnnzoo.guides import SGHMC, SpikeSlabEM
from bnnzoo.guides.sghmc import ke_fan_rho_gradient
from bnnzoo.models import (
    BayesianNeuralNetwork,
    GaussianLikelihood,
    GaussianPrior,
    SpikeSlabPrior,
)
from bnnzoo.models.networks import lenet5, mlp
from bnnzoo.models.sparsity import EmptyLayerWarning
from bnnzoo.models.spike_slab import dead_units


# ---- (a) one update against a hand computation --------------------------------------------------------
def test_two_ke_fan_steps_by_hand():
    """f = w1 x1 + w2 x2 + b, Gaussian noise sigma, prior N(0, 0.8^2): two full-batch steps written
    out. Step 1 has no previous draws (xi_0 = 0); step 2's rho step reads step 1's draws."""
    n, sigma, prior_scale = 6, 0.5, 0.8
    eps, alpha, temp, eta_rho = 0.05, 0.3, 0.7, 0.2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=gen)
    y = torch.randn(n, generator=gen)
    net = mlp(2, [], 1)
    model = BayesianNeuralNetwork(net, GaussianPrior(net, prior_scale), GaussianLikelihood(sigma))
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)  # w1, w2, b
    kernel = SGHMC(model, step_size=eps, friction=alpha, temperature=temp, batch_size=n, precondition="always",
                   preconditioner="ke-fan", tau_lr=eta_rho, learn_noise=False)
    kernel.initial_params = {"fc1.weight": theta0[:2].float().view(1, 2), "fc1.bias": theta0[2:].float()}
    kernel.setup(0, x, y)

    X = torch.cat([x, torch.ones(n, 1)], 1).double()  # design matrix: the columns of w1, w2, b
    d = 1.0 / prior_scale**2
    s = eps**0.75 / math.sqrt(n)  # Ke & Fan's s = T C^(3/2), T = N^(-1/2), C = sqrt(eps)

    def lik_grad(theta):  # -(N/B) d/dtheta sum ln N(y | X theta, sigma^2), B = N
        return -(X.T @ (y.double() - X @ theta)) / sigma**2

    def flat(d):
        return torch.cat([d["fc1.weight"].reshape(-1), d["fc1.bias"].reshape(-1)]).double()

    def check(theta, tau):
        torch.testing.assert_close(flat(kernel.weights()), theta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flat(kernel.tau()), tau, atol=1e-6, rtol=1e-5)

    # step 1: rho_1 = -eta (s^2 (d/N) tau_0 + 0 - 1/(N tau_0)), tau_0 = 1/2
    kernel.sample()
    tau0 = torch.full((3,), 0.5, dtype=torch.float64)
    rho1 = -eta_rho * (s**2 * (d / n) * tau0 - 1.0 / (n * tau0))
    tau1 = torch.sigmoid(rho1)
    xi1 = flat(kernel.draws())
    v1 = -(eps / n) * tau1 * (lik_grad(theta0) + d * theta0) + torch.sqrt(2 * alpha * (eps / n) * tau1 * temp) * xi1
    theta1 = theta0 + v1
    check(theta1, tau1)

    # step 2: rho_2 = rho_1 - eta (s^2 (d/N) tau_1 + s xi_1 g(theta_1)/N - 1/(N tau_1)); momentum carried
    kernel.sample()
    g1 = lik_grad(theta1)
    rho2 = rho1 - eta_rho * (s**2 * (d / n) * tau1 + s * xi1 * g1 / n - 1.0 / (n * tau1))
    tau2 = torch.sigmoid(rho2)
    xi2 = flat(kernel.draws())
    v2 = (1 - alpha) * v1 - (eps / n) * tau2 * (g1 + d * theta1) + torch.sqrt(2 * alpha * (eps / n) * tau2 * temp) * xi2
    check(theta1 + v2, tau2)
    assert not torch.allclose(xi1, xi2)  # fresh draws every step
    # the module's formula for rho's gradient is the one written out above
    torch.testing.assert_close(ke_fan_rho_gradient(tau1, xi1, g1, d, eps, n),
                               s**2 * (d / n) * tau1 + s * xi1 * g1 / n - 1.0 / (n * tau1))


def test_at_temperature_zero_there_is_no_noise_and_no_noise_term():
    n = 8
    x, y = torch.randn(n, 2), torch.randn(n)
    net = mlp(2, [], 1)
    model = BayesianNeuralNetwork(net, GaussianPrior(net, 1.0), GaussianLikelihood(0.5))
    kernel = SGHMC(model, step_size=0.01, temperature=0.0, batch_size=n, precondition="always",
                   preconditioner="ke-fan", learn_noise=False)
    kernel.setup(0, x, y)
    for _ in range(3):
        kernel.sample()
    assert all((xi == 0).all() for xi in kernel.draws().values())
    # rho's steps are then deterministic: the prior and entropy terms only, and tau rises above 1/2
    assert all((t > 0.5).all() for t in kernel.tau().values())


# ---- (b) the equivalence to SGHMC: the chain samples the target -------------------------------------------
@pytest.mark.parametrize("precondition", ["warmup", "always"])
def test_ke_fan_chain_samples_a_correlated_gaussian(precondition):
    """Bayesian linear regression: a 2-D Gaussian posterior over (w, b) with correlation about -0.7,
    exact (full-batch) gradients and the injected Langevin noise. With ``tau`` learned during the
    warm-up and then frozen the chain is SGHMC with the preconditioner ``tau``; adapting throughout,
    ``tau`` moves slowly (rho's steps are O(tau_lr / N)). Either way the draws' mean and covariance
    match the posterior's within 4 Monte Carlo standard errors (batch means over 20 batches)."""
    x, y, model, mean, cov = correlated_gaussian_regression()
    n = len(x)
    kernel = SGHMC(model, step_size=0.02, friction=0.3, batch_size=n, precondition=precondition, thinning=8,
                   preconditioner="ke-fan", learn_noise=False)
    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=600, warmup_steps=100, disable_progbar=True)
    mcmc.run(x, y)
    tau = torch.cat([t.reshape(-1) for t in kernel.tau().values()])
    assert (tau > 0.9).all()  # learned: rho's entropy term has moved tau from 1/2 towards its cap 1
    assert_chain_matches_gaussian(mcmc.get_samples(), mean, cov)


def test_ke_fan_state_is_rho_and_the_draws_while_adapting_and_tau_once_frozen():
    net = mlp(5, [8], 1)
    x, y = torch.randn(32, 5), torch.randn(32)
    model = BayesianNeuralNetwork(net, SpikeSlabPrior(net, spike_scale=0.1), GaussianLikelihood(0.5))
    weights = 4 * net.num_weights()
    kernel = SGHMC(model, batch_size=8, precondition="always", preconditioner="ke-fan")
    MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(x, y)
    assert kernel.state_bytes()["preconditioner"] == 2 * weights  # rho and the previous draws
    assert "tau_mean" in kernel.diagnostics()["history"]
    kernel = SGHMC(model, batch_size=8, precondition="warmup", preconditioner="ke-fan")
    MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(x, y)
    assert kernel.state_bytes()["preconditioner"] == weights  # sqrt(tau) only
    assert kernel.draws() is None and all(((t > 0) & (t < 1)).all() for t in kernel.tau().values())
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        SGHMC(model, preconditioner="adam")


# ---- Ke & Fan's groups ----------------------------------------------------------------------------------
def test_input_groups_are_columns_and_kernels():
    net = mlp(3, [4, 2], 1)
    prior = SpikeSlabPrior(net, groups="input")
    assert [(g.layer, g.axis, g.num_groups, g.size) for g in prior.layouts] == [
        ("fc1", "in", 3, 4), ("fc2", "in", 4, 2), ("fc3", "in", 2, 1)]
    params = net.init_params(torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.layouts[1].squared_norms(params), params["fc2.weight"].pow(2).sum(0))
    assert prior.grouped_site("fc2.bias") is None  # biases get the slab alone
    lenet = lenet5()
    conv = SpikeSlabPrior(lenet, groups="input").layouts[1]  # the second conv layer: 6 input channels
    assert conv.axis == "kernel" and conv.size == math.prod(conv.weight_shape[2:])
    w = torch.randn(2, *conv.weight_shape)  # a leading sample dimension
    torch.testing.assert_close(conv.squared_norms({conv.weight_site: w}), w.pow(2).sum((-2, -1)).flatten(1))
    g = torch.arange(conv.num_groups, dtype=torch.float32)
    assert conv.expand(conv.weight_site, g)[1, 2, 0, 0] == 1 * conv.weight_shape[1] + 2


def test_a_unit_whose_outgoing_groups_are_all_pruned_is_removed():
    net = mlp(3, [4, 2], 1)
    model = BayesianNeuralNetwork(net, SpikeSlabPrior(net, groups="input"), GaussianLikelihood(0.5))
    em = SpikeSlabEM(model.prior)
    em.reset("cpu")
    em.keep["fc2"][torch.tensor([1, 3])] = False  # fc1's units 1 and 3 feed nothing any more
    em.keep["fc3"][0] = False  # fc2's unit 0 feeds nothing
    alive = dead_units(net, model.prior.layouts, em.keep)
    assert alive["fc1"].tolist() == [True, False, True, False] and alive["fc2"].tolist() == [False, True]
    masks = em.masks()
    assert masks["fc1.bias"].tolist() == [True, False, True, False]
    assert not masks["fc1.weight"][1].any() and masks["fc1.weight"][0].all()
    assert not masks["fc2.weight"][0].any() and not masks["fc2.weight"][:, 1].any()
    sparsity = bnnzoo.models.sparsity.sparsity_report(net, masks)
    assert sparsity["architecture"] == "3-2-1-1"


# ---- pruning never empties a layer ---------------------------------------------------------------------------
def test_em_pruning_keeps_the_most_probable_group_of_a_layer():
    net = mlp(3, [4], 1)
    model = BayesianNeuralNetwork(net, SpikeSlabPrior(net, spike_scale=0.1), GaussianLikelihood(0.5))
    params = {s: torch.zeros(shape) for s, shape in net.sites().items()}
    params["fc1.weight"][2] = 0.05  # the largest group, still deep inside the spike
    params["fc1.weight"][1] = 0.04
    em = SpikeSlabEM(model.prior, prune_threshold=0.5)
    em.reset("cpu")
    em.keep["fc1"][2] = False  # pruned earlier: never revived
    with pytest.warns(EmptyLayerWarning, match="'fc1'"):
        em.update(params, step=1)
    assert em.keep["fc1"].tolist() == [False, True, False, False]
    em = SpikeSlabEM(model.prior, prune_threshold=0.5, allow_empty=True)
    em.reset("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        em.update(params, step=1)
    assert not em.keep["fc1"].any()


QUICK = {"epochs": 8, "cycles": 2, "samples_per_cycle": 2, "thinning": 1, "em_start": 1, "prune_start": 2}


def test_entry_with_ke_fan_and_input_groups(boston, monkeypatch, tmp_path):
    post = bnnzoo.fit("spike-slab-sghmc", boston, device="cpu", progress=False, seed=0, preconditioner="ke-fan",
                      friction=0.9, lr=0.03, groups="input", prune_threshold=0.5, **QUICK)
    assert post.config["guide"]["preconditioner"] == "ke-fan" and post.config["model"]["groups"] == "input"
    taus = post.history.extra["chains"][0]["tau_mean"]
    assert 0.5 < taus[-1] < 1
    assert math.isfinite(post.evaluate(boston.x_test, boston.y_test, num_samples=2)["log_likelihood"])
    post.save(tmp_path / "run")
    same = bnnzoo.load(tmp_path / "run")
    assert same.evaluate(boston.x_test, boston.y_test, num_samples=2) == pytest.approx(
        post.evaluate(boston.x_test, boston.y_test, num_samples=2))
    assert same.sparsity()["architecture"] == post.sparsity()["architecture"]
    probs = post.inclusion_probabilities()
    assert probs["fc2"].shape == (1, 50)  # the output layer's input columns: one per hidden unit
    # one-shot pruning of a layer whose every group falls below the threshold keeps the best one
    alive = post._alive_groups(post.model.prior.layout("fc2"))
    best = int(torch.nonzero(alive)[0])
    low = {k: v * 1e-6 for k, v in probs.items()}
    low["fc2"][0, best] = 2e-6 * probs["fc2"].max()
    monkeypatch.setattr(type(post), "inclusion_probabilities", lambda self, per_draw=False: low)
    with pytest.warns(EmptyLayerWarning, match="'fc2'"):
        pruned = post.prune(threshold=0.5, data=(boston.x_train, boston.y_train))
    assert pruned.masks()["fc2.weight"][0].tolist() == [i == best for i in range(50)]
    assert pruned.sparsity()["architecture"] == "13-1-1"  # only the unit feeding the kept column remains
    assert pruned.fit_state.pruning[-1].options == {"threshold": 0.5, "allow_empty": False}
    assert (pruned.samples["fc1.weight"][:, :, [i for i in range(50) if i != best]] == 0).all()
    with pytest.raises(ConfigError, match="preconditioner"):
        bnnzoo.fit("spike-slab-sghmc", boston, progress=False, preconditioner="adam", **QUICK)
