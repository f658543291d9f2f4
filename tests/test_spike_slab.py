"""The group spike-and-slab prior, its EM, the SGHMC kernel and the ``spike-slab-sghmc`` entry."""

from __future__ import annotations

import copy
import math
import pickle

import pyro
import pyro.infer.mcmc.api as mcmc_api
import pyro.poutine as poutine
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_chain_matches_gaussian, correlated_gaussian_regression
from pyro.infer import MCMC, Predictive

import bnnzoo
from bnnzoo.cli import main
from bnnzoo.guides import SGHMC, SpikeSlabEM
from bnnzoo.guides.sghmc import cyclical_step_size
from bnnzoo.guides.spike_slab_em import (
    group_decay,
    inclusion_probability,
    inclusion_rate,
)
from bnnzoo.guides.training import DivergenceError
from bnnzoo.models import (
    BayesianNeuralNetwork,
    CategoricalLikelihood,
    GaussianLikelihood,
    HorseshoePrior,
    SpikeSlabPrior,
)
from bnnzoo.models.networks import mlp


def spike_slab_model(net, noise_scale=0.7, **prior):
    kw = {"slab_scale": 1.0, "spike_scale": 0.1, "a": 2.0, "b": 3.0, **prior}
    return BayesianNeuralNetwork(net, SpikeSlabPrior(net, **kw), GaussianLikelihood(noise_scale))


def regression_data(n, p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=gen)
    return x, y


# ---- the prior and the E/M steps ------------------------------------------------------------------
def test_groups_of_the_prior():
    net = mlp(3, [4, 2], 1)
    prior = SpikeSlabPrior(net)
    assert [(g.layer, g.axis, g.num_groups, g.size) for g in prior.layouts] == [("fc1", "out", 4, 4), ("fc2", "out", 2, 5)]
    inputs = SpikeSlabPrior(net, first_layer="inputs")
    assert [(g.layer, g.axis, g.num_groups, g.size) for g in inputs.layouts] == [("fc1", "in", 3, 4), ("fc2", "out", 2, 5)]
    params = net.init_params()
    lay = inputs.layouts[0]
    torch.testing.assert_close(lay.squared_norms(params), params["fc1.weight"].pow(2).sum(0))
    lay = prior.layouts[1]
    torch.testing.assert_close(lay.squared_norms(params),
                               params["fc2.weight"].pow(2).sum(1) + params["fc2.bias"].pow(2))
    scaled = SpikeSlabPrior(net, slab_scale=2.0, spike_scale=0.5, scaling="fan_in")
    gamma = torch.tensor([1.0, 0.0, 1.0, 0.0])
    scale = scaled.site_distribution("fc1.weight", gamma).base_dist.scale
    torch.testing.assert_close(scale[:, 0], torch.tensor([2.0, 0.5, 2.0, 0.5]) / math.sqrt(3))
    assert scaled.scales("fc2") == pytest.approx((0.5 / 2, 2.0 / 2))
    assert scaled.site_distribution("fc3.weight").base_dist.scale.unique().tolist() == pytest.approx([2.0 / math.sqrt(2)])


def test_prior_samples_have_the_spike_and_slab_scales():
    """Monte Carlo: a group's weights have variance s1^2 given gamma = 1 and s0^2 given gamma = 0."""
    net = mlp(200, [400], 1)
    prior = SpikeSlabPrior(net, slab_scale=1.5, spike_scale=0.02, a=3.0, b=2.0)
    pyro.set_rng_seed(0)
    trace = poutine.trace(prior).get_trace()
    gamma = trace.nodes["fc1.gamma"]["value"].bool()
    w = trace.nodes["fc1.weight"]["value"]
    assert 0 < gamma.sum() < 400
    slab, spike = w[gamma], w[~gamma]
    for values, scale in ((slab, 1.5), (spike, 0.02)):
        n = values.numel()
        var = values.pow(2).mean()
        # the sample variance of n normals has standard deviation var * sqrt(2/n)
        assert abs(var / scale**2 - 1) < 5 * math.sqrt(2 / n)
    assert trace.nodes["fc2.weight"]["fn"].base_dist.scale.unique().tolist() == [1.5]  # output layer: slab, unpruned


def test_e_step_equals_bayes_rule():
    """p_g = pi N(theta_g; 0, s1^2) / (pi N(theta_g; 0, s1^2) + (1 - pi) N(theta_g; 0, s0^2))."""
    gen = torch.Generator().manual_seed(1)
    m, s0, s1 = 7, 0.08, 1.3
    theta = torch.randn(50, m, generator=gen, dtype=torch.float64) * torch.logspace(-2, 0, 50, dtype=torch.float64)[:, None]
    for pi in (0.1, 0.5, 0.93):
        zero = torch.zeros((), dtype=torch.float64)
        slab = torch.distributions.Normal(zero, zero + s1).log_prob(theta).sum(-1) + math.log(pi)
        spike = torch.distributions.Normal(zero, zero + s0).log_prob(theta).sum(-1) + math.log(1 - pi)
        direct = torch.exp(slab - torch.logaddexp(slab, spike))
        got = inclusion_probability(theta.pow(2).sum(-1), m, torch.tensor(pi, dtype=torch.float64), s0, s1)
        torch.testing.assert_close(got, direct, rtol=1e-9, atol=1e-12)
        assert direct.min() < 0.01 and direct.max() > 0.99  # the test spans both components


def _keep_norm(prior: SpikeSlabPrior, layer: str) -> float:
    """The norm of a neuron's group (weights and bias) at which the E-step gives p = 1/2 with pi = 1/2."""
    s0, s1 = prior.scales(layer)
    size = prior.layout(layer).size
    sq_norm = torch.linspace(1e-4, 100.0, 200001, dtype=torch.float64)
    p = inclusion_probability(sq_norm, size, torch.tensor(0.5, dtype=torch.float64), s0, s1)
    return math.sqrt(float(sq_norm[(p >= 0.5).nonzero()[0, 0]]))


def test_regression_default_keeps_a_neuron_by_a_norm_that_does_not_grow_with_its_inputs():
    """With the regression defaults a hidden neuron leaves the slab below a norm of its weights
    that is the same (up to its bias's share) for 4 or 64 inputs; absolute scales put it 3.6x higher
    at 64 inputs, where a dense teacher's neurons (norm about 1 whatever the inputs) were pruned."""
    def norms(**scales):
        return [_keep_norm(bnnzoo.create("spike-slab-sghmc", "regression", (d,), 1, **scales).model.prior, "fc1")
                for d in (4, 16, 64)]

    default = norms()
    assert max(default) / min(default) < 1.15
    assert 0.5 < min(default) < 1.0  # below the teacher's neuron norm of about 1
    absolute = norms(scaling="absolute", spike_scale=0.2, slab_scale=1.0)
    assert absolute[2] / absolute[0] > 3.0


def test_m_step_maximises_the_expected_log_prior():
    """d_g is the curvature of E_gamma[-ln p(theta_g | gamma)]; pi maximises the expected complete
    log prior plus the Beta prior (checked on a grid)."""
    gen = torch.Generator().manual_seed(2)
    s0, s1 = 0.1, 2.0
    p = torch.rand(30, generator=gen, dtype=torch.float64)
    theta = torch.randn(30, 4, generator=gen, dtype=torch.float64).requires_grad_()
    zero = torch.zeros((), dtype=torch.float64)
    expected = -(p[:, None] * torch.distributions.Normal(zero, zero + s1).log_prob(theta)
                 + (1 - p[:, None]) * torch.distributions.Normal(zero, zero + s0).log_prob(theta)).sum()
    (grad,) = torch.autograd.grad(expected, theta)
    torch.testing.assert_close(grad, group_decay(p, s0, s1)[:, None] * theta.detach())
    a, b = 2.5, 4.0
    grid = torch.linspace(1e-4, 1 - 1e-4, 200001, dtype=torch.float64)
    objective = (p.sum() + a - 1) * grid.log() + (len(p) - p.sum() + b - 1) * torch.log1p(-grid)
    best = grid[objective.argmax()]
    assert abs(float(inclusion_rate([p[:10], p[10:]], a, b)) - float(best)) < 1e-4


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_potential_is_minus_the_pyro_log_joint_surrogate(task):
    """U(theta) = -E_gamma[ln p(y_B, theta, gamma | pi, x_B)] (Pyro's trace, the data plate scaled
    to N/B) up to a constant in theta; the kernel's deterministic step (its fast minibatch term) is a
    gradient step on it."""
    net = mlp(3, [4], 3 if task == "classification" else 1)
    lik = GaussianLikelihood(0.7) if task == "regression" else CategoricalLikelihood()
    model = BayesianNeuralNetwork(net, SpikeSlabPrior(net, slab_scale=1.0, spike_scale=0.1, a=2.0, b=3.0), lik)
    x, y = regression_data(10, 3)
    if task == "classification":
        y = (y > 0).long() + (y > 1).long()
    kernel = SGHMC(model, batch_size=10, precondition="none", friction=1.0, temperature=0.0, step_size=0.05,
                   em=SpikeSlabEM(model.prior, start=10**9), learn_noise=False)
    kernel.setup(0, x, y)
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(4, generator=gen)
    pi = torch.tensor(0.3)
    kernel.em.decay["fc1"].copy_(group_decay(p, *model.prior.scales("fc1")))
    xb, yb = x[:4], y[:4]

    def log_joint(params, gamma, xs, ys):
        data = {**params, "pi": pi, "fc1.gamma": gamma}
        return poutine.trace(poutine.condition(model, data=data)).get_trace(xs, ys, num_data=10).log_prob_sum()

    def surrogate(params, xs, ys):  # E over independent gamma_g ~ Bernoulli(p_g): linear in each gamma_g
        zero = torch.zeros(4)
        base = log_joint(params, zero, xs, ys)
        return base + sum(p[g] * (log_joint(params, torch.eye(4)[g], xs, ys) - base) for g in range(4))

    thetas = [{s: v + 0.3 * torch.randn(v.shape, generator=gen) for s, v in net.init_params(gen).items()}
              for _ in range(2)]
    u = [kernel.potential(xb, yb, t) for t in thetas]
    q = [surrogate(t, xb, yb) for t in thetas]
    torch.testing.assert_close(u[0] - u[1], -(q[0] - q[1]), rtol=1e-4, atol=1e-3)
    # one step with friction 1, no noise, no preconditioner: theta <- theta - (eps/N) grad U (full batch)
    start = {s: v.clone().requires_grad_() for s, v in thetas[0].items()}
    kernel.initial_params = thetas[0]
    kernel.setup(0, x, y)
    kernel.em.decay["fc1"].copy_(group_decay(p, *model.prior.scales("fc1")))
    grads = torch.autograd.grad(-surrogate(start, x, y), list(start.values()))
    kernel.sample({})
    for (site, before), g in zip(start.items(), grads):
        torch.testing.assert_close(kernel.weights()[site], before.detach() - 0.05 / 10 * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_fast_minibatch_gradient_equals_the_log_prob_gradient(task):
    """The kernel's minibatch term (squared residuals for a Gaussian likelihood) has the gradient of
    -(N/B) sum log_prob, the likelihood's own pointwise log density."""
    net = mlp(3, [4], 3 if task == "classification" else 1)
    lik = GaussianLikelihood(0.7) if task == "regression" else CategoricalLikelihood()
    model = BayesianNeuralNetwork(net, SpikeSlabPrior(net), lik)
    x, y = regression_data(30, 3)
    if task == "classification":
        y = (y > 0).long() + (y > 1).long()
    kernel = SGHMC(model, batch_size=8)
    kernel.setup(0, x, y)
    xb, yb = x[:8], y[:8]
    grads, stat = kernel.minibatch_gradient(xb, yb)
    params = kernel.weights()
    leaves = [params[s].clone().requires_grad_() for s in kernel.sites]
    log_prob = lik.log_prob(net(xb, dict(zip(kernel.sites, leaves))), yb)
    expected = torch.autograd.grad(-(30 / 8) * log_prob.sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel._nll(stat.detach(), 8), -log_prob.sum().detach(), rtol=1e-5, atol=1e-5)


# ---- the sampler --------------------------------------------------------------------------------
@pytest.mark.parametrize("precondition", ["warmup", "none"])
def test_stationary_distribution_on_a_correlated_gaussian(precondition):
    """Bayesian linear regression has a Gaussian posterior over (w, b), here with correlation about
    -0.7. Full-batch SGHMC draws must match its mean and covariance within 4 Monte Carlo standard
    errors (batch means over 20 batches; the draws, 8 steps apart, are nearly independent)."""
    x, y, model, mean, cov = correlated_gaussian_regression()
    n = len(x)
    step = 0.01 if precondition == "warmup" else 0.02
    kernel = SGHMC(model, step_size=step, friction=0.3, batch_size=n, precondition=precondition, thinning=8,
                   learn_noise=False)
    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=600, warmup_steps=100, disable_progbar=True)
    mcmc.run(x, y)
    assert_chain_matches_gaussian(mcmc.get_samples(), mean, cov)


def test_cyclical_step_size_formula():
    assert cyclical_step_size(1, 0.1, 10) == pytest.approx(0.1)
    assert cyclical_step_size(6, 0.1, 10) == pytest.approx(0.05)
    assert cyclical_step_size(10, 0.1, 10) == pytest.approx(0.05 * (math.cos(math.pi * 0.9) + 1))
    assert cyclical_step_size(11, 0.1, 10) == pytest.approx(0.1)  # the next cycle
    assert cyclical_step_size(7, 0.1, None) == 0.1


def test_samples_are_the_last_points_of_each_cycle():
    net = mlp(3, [4], 1)
    x, y = regression_data(40, 3)
    kernel = SGHMC(spike_slab_model(net), batch_size=10, cycle_length=20, samples_per_cycle=3, thinning=2)
    mcmc = MCMC(kernel, num_samples=6, warmup_steps=3, disable_progbar=True)
    mcmc.run(x, y)
    history = kernel.diagnostics()["history"]
    assert history["step"] == [16, 18, 20, 36, 38, 40, 56, 58, 60]
    assert history["warmup"] == [True] * 3 + [False] * 6
    assert history["step_size"][2] == pytest.approx(cyclical_step_size(20, 1e-3, 20))
    assert len(kernel.diagnostics()["epochs"].epoch_seconds) == 60 // 4


def test_get_samples_holds_only_the_requested_sites():
    net = mlp(3, [4], 1)
    x, y = regression_data(40, 3)
    kernel = SGHMC(spike_slab_model(net), batch_size=10, thinning=3)
    mcmc = MCMC(kernel, num_samples=5, warmup_steps=2, disable_progbar=True)
    mcmc.run(x, y)
    s = mcmc.get_samples()
    assert set(s) == set(net.sites())
    assert s["fc1.weight"].shape == (5, 4, 3) and s["fc2.bias"].shape == (5, 1)
    assert mcmc.get_samples(group_by_chain=True)["fc1.weight"].shape == (1, 5, 4, 3)
    kernel = SGHMC(spike_slab_model(net), batch_size=10, thinning=3)
    mcmc = MCMC(kernel, num_samples=4, warmup_steps=1, disable_progbar=True,
                save_params=["pi", "fc1.weight", "fc1.inclusion_prob"])
    mcmc.run(x, y)
    s = mcmc.get_samples()
    assert set(s) == {"pi", "fc1.weight", "fc1.inclusion_prob"}
    assert s["pi"].shape == (4,) and s["fc1.inclusion_prob"].shape == (4, 4)
    assert (s["fc1.inclusion_prob"] >= 0).all() and (s["fc1.inclusion_prob"] <= 1).all()
    with pytest.raises(KeyError, match="unknown sites"):
        MCMC(SGHMC(spike_slab_model(net)), num_samples=2, save_params=["fc9.weight"])


def test_predictive_on_the_samples():
    """The Pyro model predicts from the kernel's samples: Predictive's "f" is the network at each draw."""
    net = mlp(3, [4], 1)
    model = spike_slab_model(net)
    x, y = regression_data(40, 3)
    mcmc = MCMC(SGHMC(model, batch_size=10, thinning=2), num_samples=3, warmup_steps=1, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    f = Predictive(model, posterior_samples=samples)(x)["f"]
    assert f.shape[0] == 3 and f[0].numel() == 40
    for i in range(3):
        torch.testing.assert_close(f[i].reshape(40, 1), net(x, {s: v[i] for s, v in samples.items()}))


def test_a_pruned_group_stays_exactly_zero():
    net = mlp(3, [6], 1)
    model = spike_slab_model(net, spike_scale=0.05, a=1.0, b=1.0)
    x, y = regression_data(64, 3)
    init = net.init_params(torch.Generator().manual_seed(0))
    init["fc1.weight"][0] = 0.0
    init["fc1.bias"][0] = 0.0
    kernel = SGHMC(model, step_size=1e-3, batch_size=16,
                   em=SpikeSlabEM(model.prior, start=1, every=2, prune_threshold=1e-3), thinning=4)
    kernel.initial_params = init
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=2, disable_progbar=True)
    mcmc.run(x, y)
    s = mcmc.get_samples()
    assert (s["fc1.weight"][:, 0] == 0).all() and (s["fc1.bias"][:, 0] == 0).all()
    assert (s["fc1.weight"][:, 1:].abs().sum((1, 2)) > 0).all()
    assert (s["fc1.weight"][0, 1:] != s["fc1.weight"][-1, 1:]).any()  # the other groups do move
    keep = kernel.masks()["fc1.bias"]
    assert not keep[0] and keep.any()
    assert (s["fc1.weight"][-1][~keep] == 0).all() and (kernel._momentum[0][~keep] == 0).all()
    history = kernel.diagnostics()["history"]
    assert history["groups_pruned_fraction"][-1] == pytest.approx(float((~keep).float().mean()))


def test_state_is_at_most_three_times_the_weights():
    net = mlp(5, [8], 1)
    x, y = regression_data(32, 5)
    for precondition in ("warmup", "always", "none"):
        kernel = SGHMC(spike_slab_model(net), batch_size=8, precondition=precondition)
        MCMC(kernel, num_samples=2, warmup_steps=2, disable_progbar=True).run(x, y)
        size = kernel.state_bytes()
        weights = 4 * net.num_weights()
        assert size["weights"] == weights
        assert size["momentum"] + size["preconditioner"] <= 2 * weights
        assert size["em"] == 8 * (4 + 4 + 1) + 4  # per group: decay, preconditioner offset, mask; pi


def test_the_kernel_pickles_without_its_data():
    net = mlp(3, [4], 1)
    x, y = regression_data(40, 3)
    kernel = SGHMC(spike_slab_model(net), batch_size=10)
    kernel.on_epoch_end = lambda *args: None
    MCMC(kernel, num_samples=2, warmup_steps=0, disable_progbar=True).run(x, y)
    copy = pickle.loads(pickle.dumps(kernel))
    assert copy._x is None and copy.on_epoch_end is None
    MCMC(copy, num_samples=2, warmup_steps=1, disable_progbar=True).run(x, y)


def test_noise_m_step_is_the_mean_squared_residual():
    net = mlp(3, [4], 1)
    model = spike_slab_model(net, noise_scale=3.0)
    x, y = regression_data(40, 3)
    init = net.init_params(torch.Generator().manual_seed(4))
    kernel = SGHMC(model, batch_size=40, temperature=0.0, step_size=1e-3)
    kernel.initial_params = init
    kernel.setup(0, x, y)
    kernel.sample({})  # one full-batch step = one epoch
    expected = (y - net(x, init).squeeze(-1)).pow(2).mean().sqrt()
    torch.testing.assert_close(model.likelihood.noise_scale.detach(), expected, rtol=1e-4, atol=1e-6)


def test_a_diverging_chain_stops_with_the_method_and_epoch():
    """A step size far too large makes the loss NaN in the first epoch: the epoch loop stops the
    chain there with a DivergenceError naming the method and the epoch."""
    net = mlp(3, [4], 1)
    x, y = regression_data(40, 3)
    seen = []
    kernel = SGHMC(spike_slab_model(net), step_size=1e20, batch_size=10)
    kernel.on_epoch_end = lambda epoch, loss: seen.append(epoch)
    with pytest.raises(DivergenceError, match=r"SGHMC: the fit diverged in epoch 1 \(the loss is not finite") as err:
        MCMC(kernel, num_samples=4, warmup_steps=0, disable_progbar=True).run(x, y)
    assert err.value.method == "SGHMC" and err.value.epoch == 0 and math.isnan(err.value.loss)
    assert seen == []  # the callback never saw the diverged epoch
    calls = []
    ok = SGHMC(spike_slab_model(net), batch_size=10, thinning=4)  # a sample every 4 steps: one epoch
    ok.on_epoch_end = lambda epoch, loss: calls.append((epoch, loss))
    MCMC(ok, num_samples=3, warmup_steps=0, disable_progbar=True).run(x, y)
    epochs = ok.diagnostics()["epochs"]
    assert [e for e, _ in calls] == [0, 1, 2] and [v for _, v in calls] == epochs.loss
    assert all(math.isfinite(v) for v in epochs.loss) and len(epochs.epoch_seconds) == 3


def test_a_diverging_fit_saves_nothing(tmp_path):
    """The catalog entry's fit stops with the entry's name in the error; the command saves no run."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "spike-slab-sghmc", "--epochs", "6", "--lr", "1e20", "--quiet",
                                       "--set", "cycles=3", "--set", "samples_per_cycle=2", "--set", "thinning=1",
                                       "--out", str(out)])
    assert result.exit_code == 1, result.output  # a clear message, not a traceback
    assert "Error: spike-slab-sghmc: the fit diverged in epoch 1" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_divergence_error_survives_pickling():
    """A chain in a worker process sends its DivergenceError back pickled: it must come back whole."""
    err = pickle.loads(pickle.dumps(DivergenceError("spike-slab-sghmc", 3, float("nan"), "the loss is not finite")))
    assert isinstance(err, DivergenceError) and err.method == "spike-slab-sghmc" and err.epoch == 3
    assert "epoch 4" in str(err)


def test_chains_whose_models_share_memory_learn_their_own_noise_scale():
    """A chain in a spawned worker gets a copy of the model that shares its tensors' memory with the
    other chains' copies: each chain's noise M-step must still write to a scale of its own."""
    net = mlp(3, [4], 1)
    x, y = regression_data(40, 3)
    models = [spike_slab_model(net, noise_scale=3.0)]
    models.append(copy.deepcopy(models[0]))
    models[1].likelihood.log_noise_scale.data = models[0].likelihood.log_noise_scale.data  # one storage
    kernels, expected = [], []
    for seed, model in enumerate(models):
        init = net.init_params(torch.Generator().manual_seed(seed))
        kernel = SGHMC(model, batch_size=40, temperature=0.0, step_size=1e-3)
        kernel.initial_params = init
        kernel.setup(0, x, y)
        kernels.append(kernel)
        expected.append(float((y - net(x, init).squeeze(-1)).pow(2).mean().sqrt()))
    for kernel in kernels:
        kernel.sample({})  # one full-batch step = one epoch, then the noise M-step
    got = [kernel.diagnostics()["noise_scale"] for kernel in kernels]
    assert got == pytest.approx(expected, rel=1e-4) and abs(expected[0] - expected[1]) > 0.01


def test_bad_input_gets_clear_errors():
    net = mlp(3, [4], 1)
    with pytest.raises(TypeError, match="GaussianPrior and SpikeSlabPrior"):
        SGHMC(BayesianNeuralNetwork(net, HorseshoePrior(net), GaussianLikelihood()))
    with pytest.raises(ValueError, match="friction"):
        SGHMC(spike_slab_model(net), friction=1.5)
    with pytest.raises(ValueError, match="do not fit"):
        SGHMC(spike_slab_model(net), cycle_length=10, samples_per_cycle=4, thinning=5)
    with pytest.raises(ValueError, match="spike must be narrower"):
        SpikeSlabPrior(net, slab_scale=0.1, spike_scale=0.2)
    with pytest.raises(ValueError, match="no hidden layer"):
        SpikeSlabPrior(mlp(3, [], 1))
    kernel = SGHMC(spike_slab_model(net))
    with pytest.raises(RuntimeError, match="before setup"):
        kernel.sample({})
    with pytest.raises(ValueError, match="same positive number"):
        kernel.setup(0, torch.zeros(5, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        kernel.initial_params = {**net.init_params(), "fc1.weight": torch.zeros(2, 2)}


# ---- the catalog entry ------------------------------------------------------------------------------
QUICK = {"epochs": 8, "cycles": 2, "samples_per_cycle": 2, "thinning": 1, "em_start": 1, "prune_start": 2}


@pytest.fixture(scope="module")
def fitted_spike_slab(boston):
    return bnnzoo.fit("spike-slab-sghmc", boston, device="cpu", progress=False, seed=0, num_chains=2, **QUICK)


def test_fit_predict_save_load(fitted_spike_slab, boston, tmp_path):
    post = fitted_spike_slab
    assert post.num_chains == 2 and post.num_draws == 4
    assert post.samples["fc1.weight"].shape == (2, 2, 50, 13)
    assert not torch.equal(post.samples["fc1.weight"][0], post.samples["fc1.weight"][1])  # two chains
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=4)
    assert m["rmse"] < 8 and m["log_likelihood"] > -4
    assert len(post.history.extra["chains"]) == 2 and len(post.history.epoch_seconds) == 16
    sp = post.sparsity()
    keep = post.masks()["fc1.bias"]
    assert sp["layers"]["fc1"]["groups_kept"] == int(keep.sum())
    for c in range(2):  # each chain's pruned groups are zero in its draws
        pruned = ~post.chain_masks["fc1.bias"][c]
        assert (post.samples["fc1.weight"][c][:, pruned] == 0).all()
    assert_records_belong_to_their_chains(post)
    post.save(tmp_path / "run")
    same = bnnzoo.load(tmp_path / "run")
    a = post.predict(boston.x_test, num_samples=4)
    b = same.predict(boston.x_test, num_samples=4)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.std, b.std)
    assert same.sparsity()["architecture"] == sp["architecture"]


def assert_records_belong_to_their_chains(post):
    """Each chain's end-of-run record (EM state, per-sample history) is that chain's: the inclusion
    probabilities it holds are the E-step on the chain's last stored draw, with its final ``pi``."""
    prior = post.model.prior
    assert len(post.chain_state) == len(post.history.extra["chains"]) == post.num_chains
    for c, state in enumerate(post.chain_state):
        last = {s: v[c, -1] for s, v in post.samples.items()}
        for lay in prior.layouts:
            expected = inclusion_probability(lay.squared_norms(last), lay.size, state["pi"], *prior.scales(lay.layer))
            torch.testing.assert_close(state["inclusion_prob"][lay.layer], expected, rtol=1e-4, atol=1e-6)
        assert state["pi"].item() == pytest.approx(post.history.extra["chains"][c]["pi"][-1], rel=1e-6)
    first, second = (s["inclusion_prob"]["fc1"] for s in post.chain_state[:2])
    assert not torch.allclose(first, second)  # the chains differ, so the check tells them apart


@pytest.mark.parametrize("mp_context", [None, "spawn"])
def test_chains_in_worker_processes(boston, monkeypatch, mp_context):
    """Where the machine has the cores, MCMC runs the chains in worker processes (forced here; forked
    by default, spawned on CUDA): each chain's record comes back through the MCMC hook and is matched
    to its chain's draws, and each chain learns its own noise scale (the posterior's is their
    geometric mean), even where the spawned chains share the model's memory."""
    monkeypatch.setattr(mcmc_api.mp, "cpu_count", lambda: 8)
    post = bnnzoo.fit("spike-slab-sghmc", boston, device="cpu", progress=False, seed=1, num_chains=2,
                      mp_context=mp_context, **QUICK)
    assert post.num_chains == 2 and len(post.history.loss) == 16
    assert_records_belong_to_their_chains(post)
    final = [record["noise_scale"][-1] for record in post.history.extra["chains"]]
    assert post.noise_scale() == pytest.approx(math.sqrt(final[0] * final[1]), rel=1e-5)
    for c in range(2):
        pruned = ~post.chain_masks["fc1.bias"][c]
        assert (post.samples["fc1.weight"][c][:, pruned] == 0).all()


def test_one_shot_pruning(fitted_spike_slab, boston):
    post = fitted_spike_slab
    probs = post.inclusion_probabilities()["fc1"]
    assert probs.shape == (2, 50) and ((probs >= 0) & (probs <= 1)).all()
    pruned = post.prune(threshold=0.9, data=(boston.x_train, boston.y_train))
    expected_keep = (probs >= 0.9).any(0) & post.masks()["fc1.bias"]
    assert torch.equal(pruned.masks()["fc1.bias"], expected_keep)
    assert (pruned.samples["fc1.weight"][:, :, ~expected_keep] == 0).all()
    assert pruned.sparsity()["hidden_groups_pruned_fraction"] >= post.sparsity()["hidden_groups_pruned_fraction"]
    assert torch.equal(post.masks()["fc1.bias"], fitted_spike_slab.masks()["fc1.bias"])  # original untouched
    assert pruned.to_torch()[0].out_features == int(expected_keep.sum())
    assert pruned.config == post.config  # pruning is recorded in the fit state, not in the config
    assert pruned.fit_state.pruning[-1].rule == "threshold" and pruned.fit_state.pruning[-1].options == {"threshold": 0.9, "allow_empty": False}
    assert post.fit_state.pruning == []


def test_classification_entry(mnist_small):
    post = bnnzoo.fit("spike-slab-sghmc", mnist_small, network={"arch": "mlp", "hidden": [20]}, device="cpu",
                      progress=False, seed=0, epochs=4, cycles=2, samples_per_cycle=1, em_start=1, prune_start=1,
                      batch_size=50)
    m = post.evaluate(mnist_small.x_test, mnist_small.y_test, num_samples=2)
    assert m["accuracy"] > 0.6 and 0 <= m["ece"] <= 1
    assert post.samples["fc2.weight"].shape == (1, 1, 10, 20)


@pytest.mark.cuda
def test_spike_slab_on_cuda(boston):
    post = bnnzoo.fit("spike-slab-sghmc", boston, device="cuda", progress=False, seed=0, **QUICK)
    assert post.samples["fc1.weight"].device.type == "cuda"
    assert all(m.device.type == "cuda" for m in post.chain_masks.values())
    m = post.evaluate(boston.x_test, boston.y_test, num_samples=2)
    assert math.isfinite(m["log_likelihood"])
