"""The node-wise horseshoe: closed-form KLs, the auxiliary Half-Cauchy construction, the
guide's fast loss against Pyro's TraceMeanField_ELBO, pruning and export, the catalog entry."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import dense_layer_float64
from pyro.infer import Predictive, TraceMeanField_ELBO
from scipy import stats
from torch.distributions import kl_divergence

import bnnzoo
from bnnzoo.guides import HorseshoeGuide, LocalReparamELBO
from bnnzoo.guides.closed_form_kl import kl_lognormal_gamma, kl_lognormal_inverse_gamma
from bnnzoo.guides.sites import get_site
from bnnzoo.methods.horseshoe import HorseshoePosterior
from bnnzoo.models import (
    BayesianNeuralNetwork,
    GaussianPrior,
    HorseshoePrior,
    make_likelihood,
)
from bnnzoo.models.horseshoe import regularised_log_scale
from bnnzoo.models.networks import (
    Activation,
    Conv2d,
    Dense,
    Flatten,
    Network,
    Pool2d,
    mlp,
)
from bnnzoo.models.sparsity import EmptyLayerWarning
from bnnzoo.posterior import FitState


def tiny_convnet() -> Network:
    return Network([
        Conv2d("conv1", 1, 4, 3), Activation("relu"), Pool2d(2),
        Flatten(),
        Dense("fc1", 4 * 3 * 3, 5), Activation("relu"),
        Dense("fc2", 5, 3),
    ], (1, 8, 8), name="tiny-conv")


def horseshoe_model(net, task="regression", **prior):
    kwargs = {"noise_scale": 0.7} if task == "regression" else {}
    return BayesianNeuralNetwork(net, HorseshoePrior(net, **prior), make_likelihood(task, **kwargs))


def spread_guide(guide, seed=0):
    """Move the guide away from its initialisation so every term of the loss is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if name.startswith("locs."):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.startswith("log_scales."):
                p.copy_(-1.5 + torch.rand(p.shape, generator=gen))
            elif name == "scale_params":  # row 0: means of ln v (over scale_gain), row 1: log sds
                p[0].add_(0.05 * torch.randn(p.shape[1], generator=gen))
                p[1].copy_(-1.2 + 0.8 * torch.rand(p.shape[1], generator=gen))
    return guide


def switch_off(guide, layer, groups):
    """Put the local scales of ``groups`` of ``layer`` far below everything else, and their
    decentred weights' q at ``N(0, 0.5^2)`` (data-free: removing them raises the evidence)."""
    first = len(guide.hidden) + guide.group_offsets[guide.hidden.index(layer)]
    guide.scale_params[0, first + torch.tensor(groups)] = -30.0 / guide.scale_gain  # lambda_a
    for param in ("weight", "bias"):
        get_site(guide.locs, f"{layer}.{param}")[groups] = 0.0
        get_site(guide.log_scales, f"{layer}.{param}")[groups] = math.log(0.5)


# ------------------------------------------------------------------------------------------ KLs
@pytest.mark.parametrize("a,b", [(0.5, 1.0), (0.5, 1e4), (2.0, 6.0)])
def test_closed_form_kls_match_monte_carlo(a, b):
    torch.manual_seed(0)
    m = torch.tensor([-3.0, -0.5, 0.0, 1.2])
    log_s = torch.tensor([-1.0, 0.2, -2.5, -0.3])
    q = dist.LogNormal(m, log_s.exp())
    x = q.sample((200_000,))
    for p, closed in ((dist.Gamma(a, b), kl_lognormal_gamma(m, log_s, a, b)),
                      (dist.InverseGamma(a, b), kl_lognormal_inverse_gamma(m, log_s, a, b))):
        terms = q.log_prob(x) - p.log_prob(x)
        mc, se = terms.mean(0), terms.std(0) / math.sqrt(len(x))
        assert torch.all((mc - closed).abs() < 5 * se + 1e-4), (mc, closed, se)
        # registered with torch: kl_divergence finds them, also through Pyro's expand/to_event
        assert torch.allclose(kl_divergence(q, p), closed)
        batched = kl_divergence(q.to_event(1), p.expand([4]).to_event(1))
        assert torch.allclose(batched, closed.sum())


def test_closed_form_kl_gradients_match_autograd_of_the_formula():
    # d KL / d m at the optimum of KL(LogNormal || Gamma(a, rate r)) in m: -a + r E[x] = 0
    a, r, log_s = 0.5, 2.0, torch.tensor(-1.0)
    m = (torch.log(torch.tensor(a / r)) - 0.5 * torch.exp(2 * log_s)).requires_grad_()
    kl_lognormal_gamma(m, log_s, a, r).backward()
    assert abs(float(m.grad)) < 1e-6


# ------------------------------------------------------------------------- the prior's construction
def _prior_draws(prior, layer, n=20_000, seed=0):
    pyro.set_rng_seed(seed)
    return {var: prior.site_distribution(f"{layer}.{var}").sample((n,))
            for var in ("tau_a", "tau_b", "lambda_a", "lambda_b", "c2")}


@pytest.mark.parametrize("tau0", [1.0, 0.05])
def test_auxiliary_half_cauchy_marginals_ks(tau0):
    net = mlp(3, [4], 1)
    prior = HorseshoePrior(net, tau0=tau0)
    d = _prior_draws(prior, "fc1")
    tau = (d["tau_a"] * d["tau_b"]).sqrt().numpy()
    lam = (d["lambda_a"] * d["lambda_b"]).sqrt()[:, 0].numpy()
    assert stats.kstest(tau, stats.halfcauchy(scale=tau0).cdf).pvalue > 1e-3
    assert stats.kstest(lam, stats.halfcauchy().cdf).pvalue > 1e-3
    # the test has power: one auxiliary alone is not Half-Cauchy
    assert stats.kstest(np.sqrt(d["tau_a"].numpy()), stats.halfcauchy(scale=tau0).cdf).pvalue < 1e-6


def test_noncentred_weight_marginal_matches_direct_construction():
    """w = s * beta from the model's sites against the regularised horseshoe built from scipy's
    Half-Cauchy, inverse-gamma and normal samplers (two-sample KS on s and on w)."""
    net = mlp(3, [4], 1)
    prior = HorseshoePrior(net, tau0=0.3)
    n = 20_000
    pyro.set_rng_seed(1)
    with torch.no_grad():
        values = {site: prior.site_distribution(site).sample((n,)) for site in prior.sites()}
        weights = prior.weights(values)
        s = prior.log_scale("fc1", values).exp()[:, 0].numpy()
    w = weights["fc1.weight"][:, 0, 0].numpy()
    rng = np.random.default_rng(2)
    tau = stats.halfcauchy(scale=0.3).rvs(n, random_state=rng)
    lam = stats.halfcauchy().rvs(n, random_state=rng)
    c2 = stats.invgamma(2.0, scale=6.0).rvs(n, random_state=rng)
    s_ref = np.sqrt(c2 * tau**2 * lam**2 / (c2 + tau**2 * lam**2))
    w_ref = s_ref * rng.standard_normal(n)
    assert stats.ks_2samp(s, s_ref).pvalue > 1e-3
    assert stats.ks_2samp(w, w_ref).pvalue > 1e-3
    # the slab caps the scale: s < c always, and s -> c as tau * lambda -> infinity
    assert np.all(s <= np.sqrt(values["fc1.c2"].numpy()) + 1e-6)
    # a Gaussian with the same median absolute value is rejected (the test tells shapes apart)
    gauss = rng.standard_normal(n) * np.median(np.abs(w_ref)) / 0.6745
    assert stats.ks_2samp(w, gauss).pvalue < 1e-6


def test_regularised_log_scale_formula():
    log_u = torch.linspace(-20, 20, 41)
    log_c2 = torch.tensor(math.log(3.0))
    s2 = regularised_log_scale(log_u, log_c2).mul(2).exp()
    u, c2 = log_u.double().exp(), 3.0
    assert torch.allclose(s2.double(), c2 * u / (c2 + u), rtol=1e-5)


# ------------------------------------------------------------------------------ the Pyro guide
@pytest.mark.parametrize("net_fn,task", [(lambda: mlp(5, [7, 4], 1), "regression"),
                                         (tiny_convnet, "classification")])
def test_every_site_has_a_closed_form_kl(net_fn, task):
    net = net_fn()
    model = horseshoe_model(net, task)
    guide = spread_guide(HorseshoeGuide(model))
    x = torch.randn(6, *net.input_shape)
    y = torch.randn(6) if task == "regression" else torch.randint(0, 3, (6,))
    guide_trace = pyro.poutine.trace(guide).get_trace(x, y, 50)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, guide_trace)).get_trace(x, y, 50)
    latent = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
    assert latent == list(model.prior.sites())
    total = 0.0
    for name in latent:
        q, p = guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]
        assert q.event_shape == p.event_shape and q.batch_shape == p.batch_shape, name
        total = total + kl_divergence(q, p)  # raises NotImplementedError if any is missing
    assert torch.allclose(total, guide.kl_divergence(), rtol=1e-5)
    # the model records the effective weights as deterministic sites
    for site in net.sites():
        assert model_trace.nodes[site]["value"].shape == net.sites()[site]


@pytest.mark.parametrize("net_fn,task", [(lambda: mlp(5, [7, 4], 1), "regression"),
                                         (tiny_convnet, "classification")])
def test_fast_loss_agrees_with_trace_meanfield_elbo(net_fn, task):
    torch.manual_seed(0)
    net = net_fn()
    model = horseshoe_model(net, task)
    guide = spread_guide(HorseshoeGuide(model), seed=1)
    x = torch.randn(8, *net.input_shape)
    y = torch.randn(8) if task == "regression" else torch.randint(0, 3, (8,))
    reps = 150
    with torch.no_grad():
        pyro_loss = torch.stack([TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, 200)
                                 for _ in range(reps)])
        fast = torch.stack([LocalReparamELBO().differentiable_loss(model, guide, x, y, 200) for _ in range(reps)])
    se = math.sqrt(pyro_loss.var() / reps + fast.var() / reps)
    assert abs(float(pyro_loss.mean() - fast.mean())) < 4 * se, (pyro_loss.mean(), fast.mean(), se)


def test_fused_scaled_dense_gradients():
    from bnnzoo.guides.scaled_dense import ScaledLocalReparamDense

    h, mu, rho, b_mu, b_rho, gen = dense_layer_float64()
    d = dict(dtype=torch.float64)
    s = (0.5 + torch.rand(3, generator=gen, **d)).requires_grad_()
    eps = torch.randn(5, 3, generator=gen, **d)

    def fn(*args):
        return ScaledLocalReparamDense.apply(*args, eps, 0.7)

    assert torch.autograd.gradcheck(fn, (h, mu, rho, b_mu, b_rho, s))
    # the forward pass against the plain formula
    out, kl = fn(h, mu, rho, b_mu, b_rho, s)
    var, b_var = torch.exp(2 * rho), torch.exp(2 * b_rho)
    expected = s * (h @ mu.T + b_mu + (h**2 @ var.T + b_var).sqrt() * eps)
    assert torch.allclose(out, expected)
    ref = kl_divergence(dist.Normal(torch.cat([mu.flatten(), b_mu]), torch.cat([var.flatten(), b_var]).sqrt()),
                        dist.Normal(0.0, 0.7)).sum()
    assert torch.allclose(kl, ref)


@pytest.mark.parametrize("hidden", [[7, 4], [3, 5, 2], [200, 120]])
def test_fused_scale_block_matches_the_elementwise_formulas(hidden):
    """HorseshoeScales (one autograd node) against scale_kl + sample_log_scales (autograd of the
    formulas) with the same noise: values and gradients, and gradcheck in double precision."""
    from bnnzoo.guides.horseshoe_scales import HorseshoeScales

    net = mlp(5, hidden, 1)
    guide = spread_guide(HorseshoeGuide(horseshoe_model(net)), seed=3)
    torch.manual_seed(0)
    guide.sample_outputs_and_kl(guide.prior, torch.randn(3, 5))  # builds the cached references in float32
    guide = guide.double()  # .to() must rebuild them
    params = guide.scale_params
    eps = torch.randn(guide.scale_width + len(hidden), dtype=torch.float64)
    const = guide.step_plan().scales
    assert const.sign.dtype == const.spread.dtype == torch.float64
    # every group in exactly one layer, each layer with its own number of groups
    assert torch.equal(const.spread.sum(1), torch.ones(sum(hidden), dtype=torch.float64))
    assert const.spread.sum(0).tolist() == hidden
    s, kl = HorseshoeScales.apply(params, eps, const)
    # the same draw through the autograd path: sample_log_scales reads its noise from torch.randn
    original = torch.randn
    try:
        torch.randn = lambda *args, **kwargs: eps.clone()
        log_s = guide.sample_log_scales(())
    finally:
        torch.randn = original
    ref_s, ref_kl = torch.cat([log_s[name] for name in guide.hidden]).exp(), guide.scale_kl()
    assert torch.allclose(s, ref_s) and torch.allclose(kl, ref_kl)
    # the KL against torch's registry (closed_form_kl registers LogNormal-Gamma / -InverseGamma)
    registry = sum(kl_divergence(guide.site_distribution(site), guide.prior.site_distribution(site))
                   for site in guide.prior.scale_sites())
    assert torch.allclose(kl, registry)
    weights = torch.randn_like(s)
    grad = torch.autograd.grad((s * weights).sum() + 0.3 * kl, params)
    ref = torch.autograd.grad((ref_s * weights).sum() + 0.3 * ref_kl, params)
    assert torch.allclose(grad[0], ref[0])
    assert torch.autograd.gradcheck(lambda p: HorseshoeScales.apply(p, eps, const), (params,))


def _network_reference(guide, x, y, log_noise, eps, weights):
    """The fused network step's quantities by autograd of the plain formulas, with the same noise."""
    plan = guide.step_plan().mlp
    original = torch.randn
    try:
        torch.randn = lambda *args, **kwargs: eps[:plan.scale_noise].clone()
        log_s = guide.sample_log_scales(())
    finally:
        torch.randn = original
    scales = [log_s[name].exp() for name in guide.hidden] + [guide.output_units]
    h, start = x.reshape(len(x), -1), plan.scale_noise
    for j, layer in enumerate(guide.net.param_layers):
        mu, rho = guide.locs[layer.name]["weight"], guide.log_scales[layer.name]["weight"]
        b_mu, b_rho = guide.locs[layer.name]["bias"], guide.log_scales[layer.name]["bias"]
        noise = eps[start:start + len(x) * len(mu)].view(len(x), len(mu))
        start += noise.numel()
        z = h @ mu.T + b_mu + (h**2 @ torch.exp(2 * rho).T + torch.exp(2 * b_rho)).sqrt() * noise
        h = z * scales[j] if j == len(scales) - 1 else torch.relu(z * scales[j])
    kl = guide.kl_divergence()
    if y is None:
        return h, kl
    return -weights[0] * dist.Normal(h.squeeze(-1), log_noise.exp()).log_prob(y).sum() + weights[1] * kl


@pytest.mark.parametrize("hidden", [[7], [6, 4]])
def test_fused_network_step_matches_autograd_of_the_formulas(hidden):
    """HorseshoeMLP (the whole step of a small dense ReLU network in one autograd node) against
    autograd of the formulas with the same noise: the loss, the outputs and KL, every gradient,
    and gradcheck in double precision."""
    from bnnzoo.guides.horseshoe_mlp import HorseshoeMLP

    torch.manual_seed(0)
    guide = spread_guide(HorseshoeGuide(horseshoe_model(mlp(5, hidden, 1))), seed=3).double()
    plan = guide.step_plan().mlp
    assert plan is not None
    params = plan.params
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    log_noise = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(plan.scale_noise + 6 * sum(plan.widths), dtype=torch.float64)
    weights = (3.0, 0.2)
    loss = HorseshoeMLP.apply(x, y, log_noise, eps, plan, weights, *params)
    ref = _network_reference(guide, x, y, log_noise, eps, weights)
    assert torch.allclose(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (log_noise, *params)), torch.autograd.grad(ref, (log_noise, *params))):
        assert torch.allclose(a, b)
    f, kl = HorseshoeMLP.apply(x, None, None, eps, plan, weights, *params)
    ref_f, ref_kl = _network_reference(guide, x, None, None, eps, weights)
    assert torch.allclose(f, ref_f) and torch.allclose(kl, ref_kl)
    w = torch.randn_like(f)
    grads = torch.autograd.grad((f * w).sum() + 0.7 * kl, params)
    for a, b in zip(grads, torch.autograd.grad((ref_f * w).sum() + 0.7 * ref_kl, params)):
        assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(lambda ln, *p: HorseshoeMLP.apply(x, y, ln, eps, plan, weights, *p),
                                    (log_noise, *params))
    # the input's gradient too (an image flattened on the way in keeps its shape)
    images = x.reshape(6, 1, 1, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: HorseshoeMLP.apply(a, y, log_noise, eps, plan, weights, *params),
                                    (images,))


def test_fused_network_step_is_used_only_where_it_applies():
    """Small dense ReLU networks (an image input flattened first) take the one-node step; a pruned
    guide, a conv net, another activation or a large network take the per-layer path."""
    from bnnzoo.guides import TemperedLocalReparamELBO
    from bnnzoo.guides.horseshoe_mlp import HorseshoeMLP

    image_mlp = Network([Flatten(), *mlp(16, [5], 1).layers], (1, 4, 4))
    assert HorseshoeGuide(horseshoe_model(image_mlp)).step_plan().mlp is not None
    for net in (tiny_convnet(), mlp(5, [7], 1, activation="tanh"), mlp(200, [100], 1)):
        assert HorseshoeGuide(horseshoe_model(net, "classification")).step_plan().mlp is None
    model = horseshoe_model(mlp(5, [7], 1))
    guide = HorseshoeGuide(model)
    elbo = TemperedLocalReparamELBO(0.2)
    x, y = torch.randn(4, 5), torch.randn(4)
    assert type(elbo.differentiable_loss(model, guide, x, y, 40).grad_fn).__name__ == "HorseshoeMLPBackward"
    keep = torch.tensor([True] * 5 + [False] * 2)
    guide.set_masks({"fc1.weight": keep[:, None].expand(7, 5).clone(), "fc1.bias": keep})
    loss = elbo.differentiable_loss(model, guide, x, y, 40)
    assert type(loss.grad_fn).__name__ != "HorseshoeMLPBackward" and torch.isfinite(loss)
    assert HorseshoeMLP is not None


def _pruned_guide(hidden=(8, 5), inputs=6, outputs=3, seed=0):
    """A float64 horseshoe guide on a dense chain, pruned by groups and by single weights: in every
    hidden layer two groups removed, one more emptied weight by weight (bias too), one with all its
    weights removed but its bias kept, and a fifth of the rest removed at random."""
    g = torch.Generator().manual_seed(seed)
    guide = spread_guide(HorseshoeGuide(horseshoe_model(mlp(inputs, list(hidden), outputs), "classification")),
                         seed=seed).double()
    masks, n_in = {}, inputs
    for i, width in enumerate(hidden):
        w = torch.rand(width, n_in, generator=g) > 0.2
        b = torch.ones(width, dtype=torch.bool)
        w[[0, 3]], b[[0, 3]] = False, False  # groups removed
        w[1], b[1] = False, False  # emptied weight by weight
        w[2] = False  # no weights, the bias kept: the unit still outputs its bias
        masks[f"fc{i + 1}.weight"], masks[f"fc{i + 1}.bias"] = w, b
        n_in = width
    guide.set_masks(masks)
    return guide


def test_masks_are_closed_over_removed_groups():
    """Every weight fed by a removed group is removed too (the physically smaller network's
    weights), in the next layer and, where that empties a group, further on; the sparsity report
    counts the same weights before and after."""
    from bnnzoo.models.sparsity import sparsity_report

    guide = _pruned_guide()
    # fc1's groups 0, 1, 3 are removed: fc2's columns 0, 1, 3 go; fc2's groups 0, 1, 3: fc3's columns
    assert not guide.mask("fc2.weight")[:, [0, 1, 3]].any()
    assert not guide.mask("fc3.weight")[:, [0, 1, 3]].any() and guide.mask("fc3.weight")[:, [2, 4]].all()
    assert guide.mask("fc1.weight")[4:].sum() > 0  # the kept groups keep their masks' weights
    report = sparsity_report(guide.net, dict(guide.masks.items()))
    kept = sum(int(guide.mask(f"{name}.{p}").sum()) for name in ("fc1", "fc2", "fc3") for p in ("weight", "bias")
               if guide.mask(f"{name}.{p}") is not None)
    kept += 0 if guide.mask("fc3.bias") is not None else guide.net.layer("fc3").num_groups
    assert report["weights_kept"] == kept


def test_pruned_dense_chain_trains_on_its_kept_blocks(monkeypatch):
    """A pruned dense chain's step runs on the smaller network its masks keep: the outputs, the KL
    and every parameter's gradient equal those of the masked full-size layers with the same noise
    (the removed units' noise dropped), the KL equals the guide's closed form, and the removed
    weights' gradients are 0."""
    import bnnzoo.guides.horseshoe as horseshoe_guides
    import bnnzoo.guides.scaled_dense as scaled_dense

    guide = _pruned_guide()
    fast = guide.step_plan()
    assert fast.kept is not None and fast.kept["fc1"].shape == (5, 6) and fast.kept["fc1"].cols is None and fast.kept["fc2"].shape == (2, 5)
    x = torch.randn(7, 6, dtype=torch.float64)
    full = [torch.randn(7, k, dtype=torch.float64) for k in (8, 5, 3)]
    rows = [fast.kept[name].rows for name in ("fc1", "fc2", "fc3")]

    def run(kept):
        calls = iter(range(3))

        def noise(shape, device=None, dtype=None):
            i = next(calls)
            return full[i] if shape[-1] == full[i].shape[-1] else full[i][:, rows[i]]

        monkeypatch.setattr(horseshoe_guides, "example_noise", noise)
        monkeypatch.setattr(scaled_dense, "example_noise", noise)
        guide.step_plan().kept = kept
        torch.manual_seed(5)  # the scales' draw
        f, kl = guide.sample_outputs_and_kl(None, x)
        w = torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)
        params = list(guide.parameters())
        return f, kl, torch.autograd.grad((f * w).sum() + 0.7 * kl, params)

    kept = guide.step_plan().kept
    f, kl, grads = run(kept)
    ref_f, ref_kl, ref_grads = run(None)  # the generic masked layers
    assert torch.allclose(f, ref_f) and torch.allclose(kl, ref_kl)
    assert torch.allclose(kl, guide.kl_divergence())
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b)
    grad = dict(zip([n for n, _ in guide.named_parameters()], grads))
    for site in ("fc1.weight", "fc2.weight", "fc3.weight"):
        layer, param = site.split(".")
        removed = ~guide.mask(site)
        assert removed.any() and not grad[f"locs.{layer}.{param}"][removed].any()
        assert not grad[f"log_scales.{layer}.{param}"][removed].any()


@pytest.mark.cuda
def test_pruned_dense_chain_step_on_cuda():
    """The kept-block step of a pruned dense chain runs on CUDA tensors: its plan lives there, and
    its KL (closed form) equals the CPU's."""
    guide = _pruned_guide()
    x = torch.randn(7, 6, dtype=torch.float64)
    _, kl = guide.sample_outputs_and_kl(None, x)
    cuda_guide = copy.deepcopy(guide).cuda()
    assert cuda_guide.step_plan().kept["fc1"].rows.is_cuda
    f, cuda_kl = cuda_guide.sample_outputs_and_kl(None, x.cuda())
    grads = torch.autograd.grad(f.sum() + cuda_kl, list(cuda_guide.parameters()))
    assert f.is_cuda and torch.isfinite(f).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.allclose(cuda_kl.cpu(), kl)


def test_copies_of_the_guide_rebuild_the_step_plan():
    """Copies and pickles of the guide drop the cached step plan and rebuild it: same draws and KL."""
    import copy

    from bnnzoo.guides.horseshoe_scales import HorseshoeScales

    guide = spread_guide(HorseshoeGuide(horseshoe_model(mlp(5, [7, 4], 1))), seed=4)
    eps = torch.randn(guide.scale_width + 2)
    const = guide.step_plan().scales
    clone = copy.deepcopy(guide)
    assert clone.step_plan().scales.spread is not const.spread and torch.equal(clone.scale_params, guide.scale_params)
    s, kl = HorseshoeScales.apply(guide.scale_params, eps, const)
    s_clone, kl_clone = HorseshoeScales.apply(clone.scale_params, eps, clone.step_plan().scales)
    assert torch.equal(s, s_clone) and torch.equal(kl, kl_clone)


def test_gaussian_likelihood_term_of_the_tempered_elbo():
    from bnnzoo.guides.tempered_elbo import ScaledGaussianNLL

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(6, 1, generator=gen, dtype=torch.float64).requires_grad_()
    y = torch.randn(6, generator=gen, dtype=torch.float64)
    log_noise = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    nll = ScaledGaussianNLL.apply(f, y, log_noise, 2.5)
    ref = -2.5 * dist.Normal(f.squeeze(-1), log_noise.exp()).log_prob(y).sum()
    assert torch.allclose(nll, ref)
    assert torch.autograd.gradcheck(lambda a, b: ScaledGaussianNLL.apply(a, y, b, 2.5), (f, log_noise))


def test_tempered_elbo_weights_the_kl_only():
    from bnnzoo.guides import TemperedLocalReparamELBO

    net = mlp(5, [7], 1)
    model = horseshoe_model(net)
    guide = spread_guide(HorseshoeGuide(model))
    x, y = torch.randn(10, 5), torch.randn(10)
    losses = []
    for elbo in (LocalReparamELBO(), TemperedLocalReparamELBO(1.0), TemperedLocalReparamELBO(0.25)):
        torch.manual_seed(3)
        losses.append(elbo.differentiable_loss(model, guide, x, y, 100).detach())
    kl = guide.kl_divergence().detach()
    assert torch.allclose(losses[0], losses[1])
    assert torch.allclose(losses[0] - losses[2], 0.75 * kl, rtol=1e-5)
    with pytest.raises(ValueError, match="kl_weight"):
        TemperedLocalReparamELBO(0.0)


def test_draw_posterior_mean_and_pyro_guide_agree():
    torch.manual_seed(0)
    net = mlp(4, [6], 2)
    model = horseshoe_model(net, "classification")
    guide = spread_guide(HorseshoeGuide(model), seed=2)
    n, m = 2000, 300
    with torch.no_grad():
        draws = [guide.draw() for _ in range(n)]
        mc = {s: torch.stack([d[s] for d in draws]) for s in net.sites()}
        mean = guide.posterior_mean()
        pyro_draws = Predictive(model, guide=guide, num_samples=m, return_sites=["fc1.weight"])(torch.zeros(1, 4))
        log_s = guide.sample_log_scales((200_000,))["fc1"]
        log_mean = guide.log_scale_mean("fc1")
    for site, values in mc.items():
        se = values.std(0) / math.sqrt(n)
        assert torch.all((values.mean(0) - mean[site]).abs() < 5 * se + 1e-6), site
    # the Pyro guide (replayed through the model) and draw() give the same effective weights
    pw = pyro_draws["fc1.weight"].reshape(m, 6, 4)
    for a, b in ((pw, mc["fc1.weight"]), (pw.abs(), mc["fc1.weight"].abs())):
        se = (a.var(0) / m + b.var(0) / n).sqrt()
        assert torch.all((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-6)
    # Gauss-Hermite E_q[ln s] against Monte Carlo
    assert torch.all((log_mean - log_s.mean(0)).abs() < 5 * log_s.std(0) / math.sqrt(len(log_s)))


def test_untempered_variance_is_the_conjugate_posterior_variance():
    from bnnzoo.guides import untempered_variance

    # y_n ~ N(x_n w, sigma^2), w ~ N(0, s0^2): the posterior precision is 1/s0^2 + sum x^2 / sigma^2;
    # the tempered (KL weighted by T) one counts the likelihood 1/T times
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, generator=gen, dtype=torch.float64)
    sigma2, s0sq = 0.7, 2.5
    curvature = float((x * x).sum()) / sigma2
    for temperature in (0.2, 0.5, 1.0):
        tempered = 1.0 / (1.0 / s0sq + curvature / temperature)
        exact = 1.0 / (1.0 / s0sq + curvature)
        assert untempered_variance(tempered, temperature, s0sq) == pytest.approx(exact, rel=1e-12)
    # a factor the data do not touch keeps the prior; with a flat prior the variance widens by 1/T
    assert untempered_variance(s0sq, 0.2, s0sq) == pytest.approx(s0sq)
    assert untempered_variance(torch.tensor([0.01, 0.3]), 0.25).tolist() == pytest.approx([0.04, 1.2])
    with pytest.raises(ValueError, match="kl_weight"):
        untempered_variance(1.0, 0.0)


def test_untempered_draws_widen_every_gaussian_factor():
    from bnnzoo.guides import untempered_variance

    net = mlp(4, [6], 1)
    guide = spread_guide(HorseshoeGuide(horseshoe_model(net, output_scale=0.8)), seed=4)
    n, kl_weight = 20_000, 0.25
    with torch.no_grad():  # a wide slab: ln s_k = (ln tau^2 + ln lambda_k^2) / 2, linear in q's Gaussians
        guide.scale_params[0, 2 * guide.scale_width:] = 40.0 / guide.scale_gain
    with torch.no_grad():
        torch.manual_seed(0)
        q = [guide.draw() for _ in range(n)]
        torch.manual_seed(0)
        same = [guide.draw(1.0) for _ in range(3)]
        wide = [guide.draw(kl_weight) for _ in range(n)]
        log_s = guide.sample_log_scales((n,), kl_weight=kl_weight)["fc1"]
        log_s_q = guide.sample_log_scales((n,))["fc1"]
    assert all(torch.equal(a["fc2.weight"], b["fc2.weight"]) for a, b in zip(q, same))  # default: q itself
    # the output layer's weights are output_unit * beta with beta's prior N(0, output_prior_scale^2)
    v_q = get_site(guide.log_scales, "fc2.weight").exp().detach() ** 2
    expected = untempered_variance(v_q, kl_weight, guide.output_prior_scale**2) * guide.output_unit**2
    got = torch.stack([d["fc2.weight"] for d in wide]).var(0)
    assert torch.allclose(got, expected, rtol=0.05)
    assert torch.allclose(torch.stack([d["fc2.weight"] for d in q]).var(0), v_q * guide.output_unit**2, rtol=0.05)
    # the log scales' spread doubles at T = 1/4 (flat prior on the log scale); their means stay
    assert torch.allclose(log_s.std(0), 2 * log_s_q.std(0), rtol=0.05)
    assert torch.allclose(log_s.mean(0), log_s_q.mean(0), atol=5 * float(log_s.std(0).max()) / math.sqrt(n))


def test_guide_starts_at_pytorch_scale_and_rejects_other_priors():
    net = mlp(100, [50], 1)
    model = horseshoe_model(net)
    guide = HorseshoeGuide(model)
    mean = guide.scale_mean("fc1")
    assert torch.allclose(mean, torch.full_like(mean, 0.1), rtol=0.02)  # s ~ 1/sqrt(fan_in)
    with pytest.raises(TypeError, match="HorseshoePrior"):
        HorseshoeGuide(BayesianNeuralNetwork(net, GaussianPrior(net), make_likelihood("regression")))
    with pytest.raises(ValueError, match="hidden layer"):
        HorseshoePrior(mlp(3, [], 1))
    with pytest.raises(ValueError, match="tau0"):
        HorseshoePrior(net, tau0=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        HorseshoeGuide(model, init_scale=-1.0)


def test_prior_buffers_move_with_the_module():
    prior = HorseshoePrior(mlp(3, [4], 1), tau0=0.2)
    names = dict(prior.named_buffers())
    assert {"tau0", "slab_shape", "slab_scale", "output_scale"} <= set(names)
    half = prior.to(torch.float64)
    assert half.site_distribution("fc1.tau_a").rate.dtype == torch.float64


# ------------------------------------------------------------------------------ pruning and export
@pytest.fixture(scope="module")
def fitted_dense(boston):
    return bnnzoo.fit("horseshoe-svi", boston, epochs=30, prune=False, device="cpu", progress=False, seed=0)


def _group_savage_dickey(post, layer):
    """Each group's dF, computed here from the guide's decentred q(beta) against N(0, 1)."""
    total = 0.0
    for param in ("weight", "bias"):
        mu = get_site(post.guide.locs, f"{layer}.{param}").detach()
        var = torch.exp(2 * get_site(post.guide.log_scales, f"{layer}.{param}").detach())
        d_f = 0.5 * torch.log(1 / var) - 0.5 * mu**2 / var
        total = total + d_f.reshape(d_f.shape[0], -1).sum(1)
    return total


@pytest.mark.parametrize("rule", ["evidence", "scale"])
def test_prune_removes_exactly_the_groups_its_rule_names(fitted_dense, boston, rule):
    post = copy.deepcopy(fitted_dense)
    assert post.sparsity()["weights_pruned_fraction"] == 0.0
    # force three neurons off and check the rule removes them (and whatever else it decides) exactly
    with torch.no_grad():
        switch_off(post.guide, "fc1", [3, 7, 11])
    if rule == "scale":
        expected = post.log_signal()["fc1"] < math.log(post.config["train"]["prune_threshold"])
    else:
        expected = _group_savage_dickey(post, "fc1") > 0
        assert torch.allclose(post.group_evidence_changes()["fc1"].float(), _group_savage_dickey(post, "fc1"),
                              rtol=1e-4, atol=1e-3)
    assert expected[[3, 7, 11]].all() and not expected.all()
    pruned = post.prune(rule=rule, data=(boston.x_train, boston.y_train))
    assert post.sparsity()["weights_pruned_fraction"] == 0.0  # the original is untouched
    sp = pruned.sparsity()
    assert torch.equal(sp["keep"]["fc1"], ~expected)
    assert sp["layers"]["fc1"]["groups_kept"] == int((~expected).sum())
    assert sp["architecture"] == f"13-{int((~expected).sum())}-1"
    # pruned groups are zero in every draw and in the mean
    for params in [pruned.posterior_mean(), next(iter(pruned.draw_weights(1)))]:
        assert torch.all(params["fc1.weight"][expected] == 0) and torch.all(params["fc1.bias"][expected] == 0)
    # the exported smaller module computes what the masked full network computes
    module = pruned.to_torch(pruned=True)
    assert module[0].out_features == int((~expected).sum())
    x = pruned.standardizer.x(boston.x_test)
    with torch.no_grad():
        assert torch.allclose(module(x), pruned.net(x, pruned.posterior_mean()), atol=1e-5)
    # the pruned network is measured, not assumed: its metrics are finite and differ from the dense
    assert math.isfinite(pruned.evaluate(boston.x_test, boston.y_test)["rmse"])
    with pytest.raises(ValueError, match="threshold"):
        post.prune(rule="scale", threshold=0.0)
    with pytest.raises(ValueError, match="rule"):
        post.prune(rule="median")
    with pytest.raises(ValueError, match="no threshold"):
        post.prune(rule="evidence", threshold=0.5)
    # a threshold alone means the scale rule (the only one that has one)
    assert post.prune(threshold=1.0, data=(boston.x_train, boston.y_train)).fit_state.pruning[-1].rule == "threshold"


def test_the_evidence_rule_after_a_weight_reduction_counts_the_kept_weights_only(fitted_dense, boston):
    """A weight-level BMR reduction leaves pruned weights at a point mass at zero; removing a group
    then changes the evidence by its kept weights' dF only (the pruned ones are at zero already).
    Summing the point masses' own (huge) Savage-Dickey ratios would remove every group that lost a
    weight."""
    reduced = fitted_dense.reduce(rule="plain", level="weight", data=(boston.x_train, boston.y_train))
    keep_w, keep_b = reduced.guide.mask("fc1.weight"), reduced.guide.mask("fc1.bias")
    kept = torch.cat([keep_w, keep_b.unsqueeze(1)], 1)
    partial = kept.any(1) & ~kept.all(1)
    total = 0.0
    for param, keep in (("weight", keep_w), ("bias", keep_b)):
        mu = get_site(fitted_dense.guide.locs, f"fc1.{param}").detach()
        var = torch.exp(2 * get_site(fitted_dense.guide.log_scales, f"fc1.{param}").detach())
        d_f = (0.5 * torch.log(1 / var) - 0.5 * mu**2 / var) * keep
        total = total + d_f.reshape(d_f.shape[0], -1).sum(1)
    # groups that lost some weights, and whose kept weights still carry evidence: they must stay
    assert (partial & (total <= 0)).any()
    d_f = reduced.group_evidence_changes()["fc1"]
    assert torch.isposinf(d_f[~kept.any(1)]).all()
    assert torch.allclose(d_f[kept.any(1)].float(), total[kept.any(1)], rtol=1e-4, atol=1e-3)
    pruned = reduced.prune(data=(boston.x_train, boston.y_train))
    assert torch.equal(pruned.sparsity()["keep"]["fc1"], kept.any(1) & ~(total > 0))


def test_reduce_at_reduces_once_then_trains_the_reduced_network(boston):
    """``reduce_at``: after that fraction of the epochs the groups go by the prune rule and single
    weights by BMR (dF > 0); the remaining epochs train the reduced network (kept weights move,
    pruned ones stay zero in every draw), and the closing prune follows."""
    snapshots = {}

    def callback(epoch, loss):
        if epoch + 1 == 4:
            snapshots["masks"] = {k: v.clone() for k, v in post.guide.masks.items()}
            snapshots["loc"] = get_site(post.guide.locs, "fc1.weight").detach().clone()

    post = bnnzoo.create("horseshoe-svi", "regression", boston.input_shape, 1, dataset=boston.name, device="cpu",
                         seed=0, epochs=8, reduce_at=0.5)
    assert post.config["train"]["min_steps"] is None  # epochs asked for: 8 epochs, the reduction after 4
    post.fit(boston.x_train, boston.y_train, progress=False, callback=callback)
    assert post.reduction_epoch() == 4
    rules = [(r.rule, r.options.get("epoch")) for r in post.fit_state.pruning]
    assert rules == [("evidence", None), ("bmr", 4), ("evidence", None)]
    keep = snapshots["masks"]["fc1.weight"]
    partial = keep.any(1) & ~keep.all(1)
    assert partial.any()  # single weights of kept neurons were pruned, not only whole neurons
    final_keep = post.guide.mask("fc1.weight")
    assert not (final_keep & ~keep).any()  # masks only shrink
    moved = (get_site(post.guide.locs, "fc1.weight").detach() - snapshots["loc"]).abs()
    assert moved[final_keep].max() > 0  # the reduced network was trained on
    for params in [post.posterior_mean(), next(iter(post.draw_weights(1)))]:
        assert torch.all(params["fc1.weight"][~final_keep] == 0)
    assert post.fit_state.pruning[1].summary["weights_pruned_fraction"] > 0
    # the noise was refitted for the reduced network (regression)
    assert math.isfinite(post.evaluate(boston.x_test, boston.y_test, num_samples=10)["log_likelihood"])
    plain = bnnzoo.create("horseshoe-svi", "regression", boston.input_shape, 1, dataset=boston.name, device="cpu",
                          seed=0, epochs=8)
    assert plain.reduction_epoch() is None


def test_a_rule_that_would_empty_a_layer_keeps_its_best_group(fitted_dense, boston):
    post = copy.deepcopy(fitted_dense)
    with torch.no_grad():
        switch_off(post.guide, "fc1", list(range(50)))
        get_site(post.guide.locs, "fc1.weight")[17] = 0.3       # the least bad group: dF smallest
    with pytest.warns(EmptyLayerWarning, match="fc1"):
        pruned = post.prune(data=(boston.x_train, boston.y_train))
    assert pruned.sparsity()["architecture"] == "13-1-1" and pruned.sparsity()["keep"]["fc1"][17]
    emptied = post.prune(data=(boston.x_train, boston.y_train), allow_empty=True)
    assert emptied.sparsity()["architecture"] == "13-0-1"


def test_the_evidence_rule_does_not_depend_on_the_number_of_inputs():
    """The former scale rule's statistic shifts by 0.5 ln(fan_in); the evidence rule's does not: the
    same q(beta) per group gives the same decision whatever the number of inputs."""
    decisions = []
    for d in (2, 4, 16, 64):
        post = bnnzoo.create("horseshoe-svi", "regression", (d,), 1, network={"arch": "mlp", "hidden": [6]})
        with torch.no_grad():
            for param, width in (("weight", d), ("bias", None)):
                loc, log_scale = get_site(post.guide.locs, f"fc1.{param}"), get_site(post.guide.log_scales, f"fc1.{param}")
                loc.zero_()
                log_scale.fill_(math.log(0.5))
                loc[:3] = 2.0 / math.sqrt(width or 1)     # three groups carry a signal of the same size
                log_scale[:3] = math.log(0.05)
        decisions.append(post.group_evidence_changes()["fc1"] > 0)
    assert all(torch.equal(dec, torch.tensor([False] * 3 + [True] * 3)) for dec in decisions)


def test_prune_conv_filters_and_export():
    torch.manual_seed(0)
    x = torch.randn(40, 1, 8, 8)
    y = torch.randint(0, 3, (40,))
    # a tiny conv net through the entry's own create (the configuration carries the network spec)
    entry = bnnzoo.get_entry("horseshoe-svi")
    config = entry.configure("classification", (1, 8, 8), 3, epochs=1, batch_size=20, prune=False)
    config["network_spec"] = tiny_convnet().spec()
    post = entry.create(config, device="cpu")
    post.fit(x, y, progress=False)
    with torch.no_grad():
        switch_off(post.guide, "conv1", [0, 2])
        switch_off(post.guide, "fc1", [1])
    pruned = post.prune(rule="scale")
    keep = pruned.sparsity()["keep"]
    assert not keep["conv1"][0] and not keep["conv1"][2] and not keep["fc1"][1]
    module = pruned.to_torch(pruned=True)
    xs = pruned.standardizer.x(x)
    with torch.no_grad():
        assert torch.allclose(module(xs), pruned.net(xs, pruned.posterior_mean()), atol=1e-5)
    assert module[0].out_channels == int(keep["conv1"].sum())


def test_prediction_uses_the_untempered_draws_where_configured(fitted_dense, boston):
    post = fitted_dense
    assert post.untempered and post.fit_state.temperature == 0.2
    wide = post.predict(boston.x_test, num_samples=300).std
    torch.manual_seed(0)
    tau_wide = post.arviz_hyperparameters(4000)["fc1.tau"].log()
    post.untempered = False
    try:
        narrow = post.predict(boston.x_test, num_samples=300).std
        torch.manual_seed(0)
        tau_q = post.arviz_hyperparameters(4000)["fc1.tau"].log()
    finally:
        post.untempered = True
    # ArviZ's scale draws widen with the weights: ln tau's spread by sqrt(1 / kl_weight)
    assert float(tau_wide.std() / tau_q.std()) == pytest.approx(math.sqrt(5), rel=1e-4)
    noise = post.noise_scale(original_units=True)
    # the epistemic part of the predictive variance grows (by about 1/kl_weight where data dominate)
    ratio = (wide**2 - noise**2) / (narrow**2 - noise**2)
    assert float(ratio.median()) > 2.0
    assert bnnzoo.get_entry("horseshoe-svi").defaults["classification"]["train"]["untempered"] is False


def test_the_fitted_temperature_is_saved_and_is_what_prediction_undoes(fitted_dense, boston, tmp_path):
    post = fitted_dense
    assert post.fit_state.temperature == 0.2  # the ELBO's kl_weight, recorded by the fit
    back = bnnzoo.load(post.save(tmp_path / "run"))
    assert back.fit_state.temperature == 0.2 and back.untempered
    x = boston.x_test
    wide = post.predict(x, num_samples=50, seed=1).std
    torch.testing.assert_close(back.predict(x, num_samples=50, seed=1).std, wide)
    # prediction reads the temperature from the fit state, not from the config
    back.config["train"]["kl_weight"] = 1.0
    torch.testing.assert_close(back.predict(x, num_samples=50, seed=1).std, wide)
    back.fit_state.temperature = 1.0  # nothing to undo: the draws are q's own
    at_one = back.predict(x, num_samples=50, seed=1).std
    back.fit_state.temperature, back.untempered = 0.2, False
    torch.testing.assert_close(back.predict(x, num_samples=50, seed=1).std, at_one)
    assert float((wide - at_one).abs().max()) > 1e-3


def test_scales_summary(fitted_dense):
    scales = fitted_dense.scales()
    assert list(scales) == ["fc1"] and scales["fc1"].shape == (50,) and torch.all(scales["fc1"] > 0)
    log_mean = fitted_dense.scales("log_mean")["fc1"]
    assert torch.all(log_mean <= scales["fc1"].log() + 1e-5)  # Jensen
    with pytest.raises(ValueError, match="statistic"):
        fitted_dense.scales("median")


# ------------------------------------------------------------------------------ the catalog entry
def test_catalog_fit_predict_save_load_regression(boston, tmp_path):
    post = bnnzoo.fit("horseshoe-svi", boston, epochs=30, device="cpu", progress=False, seed=0)
    assert "horseshoe-svi" in bnnzoo.list_models("regression")
    m = post.evaluate(boston.x_test, boston.y_test)
    assert m["rmse"] < 6.0 and m["log_likelihood"] > -4.0
    post.save(tmp_path / "run")
    back = bnnzoo.load(tmp_path / "run")
    assert back.sparsity()["architecture"] == post.sparsity()["architecture"]
    for site, keep in post.masks().items():
        assert torch.equal(back.masks()[site], keep)
    a = post.predict(boston.x_test, num_samples=20, seed=3)
    b = back.predict(boston.x_test, num_samples=20, seed=3)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)


def test_catalog_fit_classification(mnist_small):
    post = bnnzoo.fit("horseshoe-svi", mnist_small, network={"arch": "mlp", "hidden": [50]}, epochs=5,
                      batch_size=50, device="cpu", progress=False, seed=0)
    m = post.evaluate(mnist_small.x_test, mnist_small.y_test, num_samples=20)
    assert m["accuracy"] > 0.6 and set(m) == {"accuracy", "nll", "ece", "brier"}
    with pytest.raises(TypeError, match="no option"):
        bnnzoo.create("horseshoe-svi", "classification", (784,), 10, tau_zero=1.0)


@pytest.mark.cuda
def test_fit_and_predict_on_cuda(boston):
    post = bnnzoo.fit("horseshoe-svi", boston, epochs=5, device="cuda", progress=False, seed=0)
    assert post.model.prior.tau0.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in post.guide.parameters())
    pred = post.predict(boston.x_test, num_samples=10)
    assert pred.mean.device.type == "cuda"
    cpu = post.to("cpu").predict(boston.x_test, num_samples=10)
    assert cpu.mean.device.type == "cpu"


def test_scale_folded_into_the_weights_is_the_same_draw_and_gradient():
    """weight_scaled_local_reparam_dense (the scale on the weights) against scaled_local_reparam_dense
    (the scale on the outputs) for the same noise, on token-shaped inputs: outputs, KL and the
    gradients of every input agree."""
    from bnnzoo.guides.horseshoe import weight_scaled_local_reparam_dense
    from bnnzoo.guides.scaled_dense import scaled_local_reparam_dense

    gen = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    h = torch.randn(3, 5, 4, generator=gen, **d)
    mu, b_mu = torch.randn(6, 4, generator=gen, **d), torch.randn(6, generator=gen, **d)
    rho, b_rho = -1 + 0.3 * torch.randn(6, 4, generator=gen, **d), -1 + 0.3 * torch.randn(6, generator=gen, **d)
    s = 0.5 + torch.rand(6, generator=gen, **d)
    results = []
    for fn in (scaled_local_reparam_dense, weight_scaled_local_reparam_dense):
        inputs = [t.clone().requires_grad_() for t in (h, mu, rho, b_mu, b_rho, s)]
        torch.manual_seed(1)
        out, kl = fn(*inputs, 0.7)
        weights = torch.linspace(-1, 1, out.numel(), **d).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum() + 0.3 * kl, inputs)
        results.append((out, kl, grads))
    (out_a, kl_a, grads_a), (out_b, kl_b, grads_b) = results
    assert out_a.shape == (3, 5, 6)
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(kl_b, kl_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)


def _reduce_select_posterior(boston, validation: float | None = 0.2):
    """A regression horseshoe fit of 8 epochs on Boston that chooses on its validation fifth whether
    to reduce after 4 of them."""
    return bnnzoo.create("horseshoe-svi", "regression", boston.input_shape, 1, dataset=boston.name, device="cpu",
                         seed=0, epochs=8, reduce_at=0.5, reduce_select=True, validation_fraction=validation,
                         select_epochs=False)


@pytest.mark.parametrize("winner", [0, 1])
def test_reduce_select_fits_the_candidate_that_the_held_out_rows_choose(boston, monkeypatch, winner):
    """``reduce_select``: both candidates (no reduction; reducing at ``reduce_at``) are fitted on the
    other rows and scored on the validation fifth; the fit then runs the winner: a reduction record
    at its epoch for reduce_at, none otherwise. The scores are replaced here so that either wins."""
    scores = iter([-1.0, -2.0] if winner == 0 else [-2.0, -1.0])
    seen = []

    def fake_log_likelihood(self, x, y, num_samples=None, seed=None, **kwargs):
        seen.append((self.config["train"]["reduce_at"], self.config["train"]["validation_fraction"], len(x)))
        return torch.full((len(x),), next(scores))

    monkeypatch.setattr(HorseshoePosterior, "log_likelihood", fake_log_likelihood)
    post = _reduce_select_posterior(boston).fit(boston.x_train, boston.y_train, progress=False)
    n_val = round(0.2 * len(boston.x_train))
    assert seen == [(None, None, n_val), (0.5, None, n_val)]  # each twin, without a validation part of its own
    selection = post.fit_state.option_selection
    assert [c["options"]["reduce_at"] for c in selection["candidates"]] == [None, 0.5]
    assert selection["options"]["reduce_at"] == [None, 0.5][winner]
    rules = [(r.rule, r.options.get("epoch")) for r in post.fit_state.pruning]
    assert rules == ([("evidence", None)] if winner == 0 else [("evidence", None), ("bmr", 4), ("evidence", None)])
    assert post.reduction_epoch() == (None if winner == 0 else 4)


def test_reduce_select_scores_the_twins_by_held_out_log_density(boston):
    """Unpatched, the recorded scores are the twins' mean held-out log densities (finite, the winner's
    the highest); the choice survives saving and loading; without a validation part the fit does not
    reduce."""
    post = _reduce_select_posterior(boston)
    post.fit(boston.x_train, boston.y_train, progress=False)
    selection = post.fit_state.option_selection
    scores = [c["score"] for c in selection["candidates"]]
    assert all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
    later = selection["candidates"][1]
    assert later["advantage"] == pytest.approx(scores[1] - scores[0], abs=1e-6) and later["advantage_se"] > 0
    assert selection["options"] == selection["candidates"][scores.index(max(scores))]["options"]
    restored = FitState.from_dict(json.loads(json.dumps(post.fit_state.to_dict())))
    assert restored.option_selection == selection
    alone = _reduce_select_posterior(boston, validation=None)
    alone.fit(boston.x_train, boston.y_train, progress=False)
    assert alone.fit_state.option_selection is None and alone.reduction_epoch() is None
    assert [r.rule for r in alone.fit_state.pruning] == ["evidence"]
    unpruned = _reduce_select_posterior(boston)
    unpruned.prune_at_end = False  # train.prune off: a fit asked to stay unpruned neither selects nor reduces
    assert unpruned.validation_candidates() == [] and unpruned.reduction_epoch() is None


def test_classification_default_lets_the_validation_part_choose_the_reduction():
    config = bnnzoo.create("horseshoe-svi", "classification", (4,), 3, device="cpu").config["train"]
    assert config["reduce_at"] == 0.75 and config["reduce_select"] and config["validation_fraction"]
    regression = bnnzoo.create("horseshoe-svi", "regression", (4,), 1, device="cpu").config["train"]
    assert regression["reduce_at"] is None and not regression["reduce_select"]
