"""Guides: analytic KL against Monte Carlo, local reparameterisation against explicit weight draws,
the fast ELBO against Pyro's ``TraceMeanField_ELBO``, and compatibility with Pyro's machinery."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import dense_layer_float64, make_model, randomise_guide
from pyro import poutine
from pyro.infer import Predictive, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from bnnzoo.guides import (
    HorseshoeGuide,
    LocalReparamELBO,
    MeanFieldNormal,
    PointMass,
    kl_normal_zero_mean,
)
from bnnzoo.guides.weight_guide import PRUNED_SCALE
from bnnzoo.models import (
    BayesianNeuralNetwork,
    GaussianPrior,
    HorseshoePrior,
    make_likelihood,
)
from bnnzoo.models.errors import ConfigError
from bnnzoo.models.networks import Conv2d, Dense, Flatten, Network, mlp


def mc_kl(guide, prior, num_draws: int = 20000, masks: dict | None = None):
    """Monte Carlo ``E_q[log q(w) - log p(w)]`` (over kept weights only) and its standard error."""
    total = torch.zeros(num_draws)
    guide.requires_grad_(False)
    for site in guide.net.sites():
        q = guide.site_distribution(site).base_dist
        p = prior.site_distribution(site).base_dist
        w = q.sample((num_draws,))
        term = q.log_prob(w) - p.log_prob(w)
        if masks and site in masks:  # a pruned weight's guide scale is ~0: its log density is not finite
            term = torch.where(masks[site], term, torch.zeros(()))
        total += term.reshape(num_draws, -1).sum(-1)
    guide.requires_grad_(True)
    return total.mean(), total.std() / math.sqrt(num_draws)


def moments(draws: torch.Tensor):
    """Sample mean and variance over dim 0, with the standard errors of both (Gaussian draws)."""
    n = draws.shape[0]
    mean, var = draws.mean(0), draws.var(0)
    return mean, var, (var / n).sqrt(), var * math.sqrt(2 / (n - 1))


def assert_moments_match(a: torch.Tensor, b: torch.Tensor, z: float = 5.0):
    ma, va, sma, sva = moments(a)
    mb, vb, smb, svb = moments(b)
    assert ((ma - mb).abs() <= z * (sma**2 + smb**2).sqrt() + 1e-6).all(), (ma - mb).abs().max()
    assert ((va - vb).abs() <= z * (sva**2 + svb**2).sqrt() + 1e-6).all(), (va - vb).abs().max()


@pytest.fixture
def small_mlp_guide():
    torch.manual_seed(0)
    model = make_model(mlp(3, [4], 2), prior_scale=0.7)
    return model, randomise_guide(MeanFieldNormal(model))


# -------------------------------------------------------------------------------------------- KL
def test_kl_normal_zero_mean_against_torch():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(7, 5, generator=gen)
    log_scale = torch.rand(7, 5, generator=gen) * 2 - 1.5
    for s in (0.1, 1.0, 3.0):
        prior_scale = torch.tensor(s)
        ours = kl_normal_zero_mean(loc, torch.exp(2 * log_scale), log_scale, prior_scale)
        ref = torch.distributions.kl_divergence(dist.Normal(loc, log_scale.exp()), dist.Normal(0.0, prior_scale)).sum()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_analytic_kl_against_monte_carlo(small_mlp_guide):
    model, guide = small_mlp_guide
    torch.manual_seed(1)
    kl = guide.kl_divergence(model)
    estimate, se = mc_kl(guide, model.prior)
    assert abs(float(kl.detach()) - float(estimate)) < 4 * float(se), (kl, estimate, se)
    # the KL that comes with the local-reparameterised outputs is the same number
    _, kl2 = guide.sample_outputs_and_kl(model, torch.randn(5, 3))
    torch.testing.assert_close(kl2, kl)


def test_pruned_weights_carry_no_kl(small_mlp_guide):
    model, guide = small_mlp_guide
    full = dict(model.prior.net.sites())
    per_weight = {}
    for site in full:
        q, p = guide.site_distribution(site).base_dist, model.prior.site_distribution(site).base_dist
        per_weight[site] = torch.distributions.kl_divergence(q, p).detach()
    gen = torch.Generator().manual_seed(3)
    masks = {"fc1.weight": torch.rand(4, 3, generator=gen) > 0.5, "fc1.bias": torch.tensor([True, False, True, True])}
    guide.set_masks(masks)
    expected = sum(float((per_weight[s] * masks[s]).sum()) if s in masks else float(per_weight[s].sum())
                   for s in full)
    kl = guide.kl_divergence(model)
    assert float(kl.detach()) == pytest.approx(expected, rel=1e-5)
    _, kl2 = guide.sample_outputs_and_kl(model, torch.randn(5, 3))
    torch.testing.assert_close(kl2, kl)
    # the pruned weights' parameters do not matter any more
    with torch.no_grad():
        guide.locs["fc1"]["weight"].add_(torch.where(masks["fc1.weight"], 0.0, 5.0))
        guide.log_scales["fc1"]["bias"].add_(torch.where(masks["fc1.bias"], 0.0, 2.0))
    torch.testing.assert_close(guide.kl_divergence(model), kl)
    # and Monte Carlo over the kept weights agrees
    torch.manual_seed(2)
    estimate, se = mc_kl(guide, model.prior, masks=masks)
    assert abs(float(kl.detach()) - float(estimate)) < 4 * float(se)


class SiteScalePrior(nn.Module):
    """A zero-mean Gaussian prior with one scale per site (the KL's non-scalar-prior path)."""

    def __init__(self, net, scales: dict[str, float]):
        super().__init__()
        self.net, self.scales = net, scales

    def site_distribution(self, site):
        shape = self.net.sites()[site]
        return dist.Normal(torch.zeros(shape), torch.full(shape, self.scales[site])).to_event(len(shape))

    def forward(self):
        return {s: pyro.sample(s, self.site_distribution(s)) for s in self.net.sites()}


def test_kl_with_per_site_prior_against_monte_carlo():
    torch.manual_seed(0)
    net = mlp(2, [3], 1)
    scales = {"fc1.weight": 0.3, "fc1.bias": 2.0, "fc2.weight": 1.5, "fc2.bias": 0.8}
    model = BayesianNeuralNetwork(net, SiteScalePrior(net, scales), make_likelihood("regression"))
    guide = randomise_guide(MeanFieldNormal(model))
    guide.set_masks({"fc2.weight": torch.tensor([[True, False, True]])})
    estimate, se = mc_kl(guide, model.prior, masks={"fc2.weight": torch.tensor([[True, False, True]])})
    kl = guide.kl_divergence(model)
    assert abs(float(kl.detach()) - float(estimate)) < 4 * float(se)
    _, kl2 = guide.sample_outputs_and_kl(model, torch.randn(4, 2))
    torch.testing.assert_close(kl2, kl)


def fan_in_model(net, scale: float = 2.0):
    return BayesianNeuralNetwork(net, GaussianPrior(net, scale, scaling="fan_in"), make_likelihood("regression"))


def test_fan_in_prior_density_is_the_closed_form_per_layer():
    """``scaling="fan_in"``: every weight and bias of a layer reading ``m`` inputs is ``N(0, s^2 / m)``."""
    torch.manual_seed(0)
    net = Network([Conv2d("conv1", 1, 2, 3), Flatten(), Dense("fc1", 8, 3)], (1, 4, 4))
    prior = GaussianPrior(net, 2.0, scaling="fan_in")
    fan_in = {"conv1": 9, "fc1": 8}
    for site, shape in net.sites().items():
        w = torch.randn(shape)
        var = 4.0 / fan_in[site.split(".")[0]]
        expected = float((-0.5 * w.pow(2) / var - 0.5 * math.log(2 * math.pi * var)).sum())
        assert float(prior.site_distribution(site).log_prob(w)) == pytest.approx(expected, rel=1e-5)
        assert prior.site_scale(site) == pytest.approx(math.sqrt(var))
    assert GaussianPrior(net, 2.0).site_scale("conv1.weight") == 2.0
    with pytest.raises(ConfigError, match="scaling"):
        GaussianPrior(net, 2.0, scaling="per-layer")


@pytest.mark.parametrize("masked", [False, True])
def test_kl_under_a_fan_in_prior_against_monte_carlo(masked):
    """The fused dense path (one prior scale per layer), the masked one and the generic one all use
    the layer's scale ``s / sqrt(fan_in)``."""
    torch.manual_seed(0)
    model = fan_in_model(mlp(3, [4], 2))
    guide = randomise_guide(MeanFieldNormal(model))
    masks = {"fc1.weight": torch.rand(4, 3) > 0.3} if masked else None
    if masks:
        guide.set_masks(masks)
    estimate, se = mc_kl(guide, model.prior, masks=masks)
    kl = guide.kl_divergence(model)
    assert abs(float(kl.detach()) - float(estimate)) < 4 * float(se)
    _, fused = guide.sample_outputs_and_kl(model, torch.randn(5, 3))
    torch.testing.assert_close(fused, kl)


def test_point_mass_objective_under_a_fan_in_prior():
    model = fan_in_model(mlp(3, [4], 1), scale=0.5)
    guide = PointMass(model)
    _, neg_log_prior = guide.sample_outputs_and_kl(model, torch.randn(2, 3))
    params = guide.posterior_mean()
    expected = -sum(float(dist.Normal(0.0, 0.5 / math.sqrt(3 if s.startswith("fc1") else 4)).log_prob(v.detach()).sum())
                    for s, v in params.items())
    assert float(neg_log_prior.detach()) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ local reparameterisation
def explicit_outputs(guide, x: torch.Tensor, num_draws: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([guide.net(x, guide.draw()) for _ in range(num_draws)])


def local_reparam_outputs(model, guide, x: torch.Tensor, num_draws: int) -> torch.Tensor:
    """Local-reparameterised draws: each example repeated, one independent draw per copy."""
    with torch.no_grad():
        f, _ = guide.sample_outputs_and_kl(model, x.repeat(num_draws, *([1] * (x.dim() - 1))))
    return f.reshape(num_draws, *f.shape[1:]) if x.shape[0] == 1 else f.reshape(num_draws, x.shape[0], *f.shape[1:])


def test_local_reparam_dense_layer():
    torch.manual_seed(0)
    net = Network([mlp(4, [], 3).layers[0]], (4,))
    model = make_model(net)
    guide = randomise_guide(MeanFieldNormal(model), log_scale_range=(-1.5, 0.0))
    guide.set_masks({"fc1.weight": torch.tensor([[True] * 4, [True, False, True, False], [True] * 4])})
    x = torch.randn(5, 4) * 2
    a = local_reparam_outputs(model, guide, x, 8000)
    b = explicit_outputs(guide, x, 8000)
    assert a.shape == b.shape == (8000, 5, 3)
    assert_moments_match(a, b)
    # the exact moments: mean h @ loc^T + b, variance h^2 @ scale^2^T + b_scale^2
    loc, scale = guide.posterior_mean(), guide.posterior_scale()
    mean = x @ loc["fc1.weight"].T + loc["fc1.bias"]
    var = (x * x) @ (scale["fc1.weight"] ** 2).T + scale["fc1.bias"] ** 2
    ma, va, sma, sva = moments(a)
    assert ((ma - mean).abs() < 5 * sma).all() and ((va - var).abs() < 5 * sva).all()


def test_local_reparam_conv_layer():
    torch.manual_seed(0)
    net = Network([Conv2d("conv1", 2, 3, 3, stride=1, padding=1)], (2, 5, 5))
    model = make_model(net)
    guide = randomise_guide(MeanFieldNormal(model), log_scale_range=(-1.5, -0.5))
    x = torch.randn(2, 2, 5, 5)
    a = local_reparam_outputs(model, guide, x, 3000)
    # explicit weight draws, all 3000 filter banks stacked into one convolution
    with torch.no_grad():
        draws = [guide.draw() for _ in range(3000)]
        w = torch.cat([d["conv1.weight"] for d in draws])
        bias = torch.cat([d["conv1.bias"] for d in draws])
        b = net.layer("conv1").op(x, w, bias).reshape(2, 3000, 3, 5, 5).transpose(0, 1)
        torch.testing.assert_close(b[7], net(x, draws[7]))
    assert a.shape == b.shape == (3000, 2, 3, 5, 5)
    assert_moments_match(a, b)


def test_local_reparam_mlp_first_layer_and_outputs(monkeypatch):
    torch.manual_seed(0)
    model = make_model(mlp(3, [6, 4], 2))
    guide = randomise_guide(MeanFieldNormal(model), log_scale_range=(-1.5, -0.5))
    x = torch.randn(4, 3)
    first = []
    apply = guide.net.apply

    def recording_apply(h, linear):
        def record(layer, h_in):
            out = linear(layer, h_in)
            if layer.name == "fc1":
                first.append(out)
            return out
        return apply(h, record)

    monkeypatch.setattr(guide.net, "apply", recording_apply)
    a = local_reparam_outputs(model, guide, x, 6000)
    monkeypatch.undo()
    a1 = first[0].reshape(6000, 4, 6)
    with torch.no_grad():
        draws = [guide.draw() for _ in range(6000)]
        b1 = torch.stack([x @ d["fc1.weight"].T + d["fc1.bias"] for d in draws])
        b = torch.stack([guide.net(x, d) for d in draws])
    assert_moments_match(a1, b1)
    # one example's outputs have the same distribution either way (exact for dense networks); the
    # outputs are not Gaussian, so only the means are compared at the Gaussian error bars
    ma, va, sma, _ = moments(a)
    mb, vb, smb, _ = moments(b)
    assert ((ma - mb).abs() < 5 * (sma**2 + smb**2).sqrt()).all()
    assert ((va - vb).abs() < 0.15 * vb + 1e-3).all()


def test_fast_elbo_estimates_the_trace_mean_field_elbo():
    """LocalReparamELBO and Pyro's TraceMeanField_ELBO are unbiased estimates of the same loss."""
    torch.manual_seed(0)
    model = make_model(mlp(3, [8], 1), prior_scale=0.7, noise_scale=1.0)
    guide = randomise_guide(MeanFieldNormal(model), log_scale_range=(-1.5, -0.5))
    x, y, num_data = torch.randn(20, 3), torch.randn(20), 60
    with torch.no_grad():
        pyro_losses = torch.stack([TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, num_data)
                                   for _ in range(400)])
        fast_losses = torch.stack([LocalReparamELBO().differentiable_loss(model, guide, x, y, num_data)
                                   for _ in range(3000)])
        # the loss of the posterior mean alone: leaving out the weight noise is a visible bias
        f_mean = guide.net(x, guide.posterior_mean())
        no_noise = guide.kl_divergence(model) - num_data / len(x) * model.likelihood.log_prob(f_mean, y).sum()
    se = math.sqrt(pyro_losses.var() / len(pyro_losses) + fast_losses.var() / len(fast_losses))
    diff = float(pyro_losses.mean() - fast_losses.mean())
    assert abs(diff) < 4 * se, (diff, se)
    assert float(fast_losses.mean() - no_noise) > 10 * se


def test_fast_elbo_gradients_flow_and_particles_average():
    torch.manual_seed(0)
    model = make_model(mlp(3, [4], 1), prior_scale=0.7)
    guide = randomise_guide(MeanFieldNormal(model))
    x, y = torch.randn(6, 3), torch.randn(6)
    loss = LocalReparamELBO(num_particles=3)(model, guide)(x, y, 30)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in guide.parameters())
    assert model.likelihood.log_noise_scale.grad is not None
    # three particles = the mean of three one-particle losses on the same random stream
    with torch.no_grad():
        torch.manual_seed(5)
        three = LocalReparamELBO(num_particles=3).differentiable_loss(model, guide, x, y, 30)
        torch.manual_seed(5)
        ones = [LocalReparamELBO().differentiable_loss(model, guide, x, y, 30) for _ in range(3)]
    torch.testing.assert_close(three, sum(ones) / 3)
    # the minibatch loss scales the likelihood by num_data / batch size, the KL not at all
    with torch.no_grad():
        torch.manual_seed(6)
        f, kl = guide.sample_outputs_and_kl(model, x)
        expected = kl - 5 * model.likelihood.log_prob(f, y).sum()
        torch.manual_seed(6)
        torch.testing.assert_close(LocalReparamELBO().differentiable_loss(model, guide, x, y, 30), expected)
        torch.manual_seed(6)
        assert LocalReparamELBO().loss(model, guide, x, y, 30) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(TypeError, match="without traces"):
        LocalReparamELBO()._get_trace(model, guide, (x, y), {})


def test_unmasked_and_masked_code_paths_agree():
    """The unpruned guide may take a fused dense path; an all-True mask forces the generic one. With
    the same random stream both give the same loss and the same gradients."""
    torch.manual_seed(0)
    model = make_model(mlp(3, [6, 4], 1), prior_scale=0.7)
    plain = randomise_guide(MeanFieldNormal(model))
    masked = copy.deepcopy(plain)
    masked.set_masks({"fc1.bias": torch.ones(6, dtype=torch.bool)})
    x, y = torch.randn(9, 3), torch.randn(9)
    results = []
    for guide in (plain, masked):
        torch.manual_seed(3)
        loss = LocalReparamELBO().differentiable_loss(model, guide, x, y, 40)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in guide.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-4)


def test_pruned_dense_layers_match_the_generic_masked_formulas():
    """A pruned mean-field guide's dense layers take one fused node each: the outputs, the KL and
    every gradient equal those of the generic masked formulas (``masked_moments``,
    ``local_reparam_draw``, ``kl_divergence``) with the same noise, and removed weights get
    gradient 0; new masks are picked up."""
    from bnnzoo.guides.meanfield import local_reparam_draw

    torch.manual_seed(0)
    model = make_model(mlp(5, [7, 6], 2), prior_scale=0.7)
    guide = randomise_guide(MeanFieldNormal(model)).double()
    g = torch.Generator().manual_seed(1)
    masks = {"fc1.weight": torch.rand(7, 5, generator=g) > 0.3, "fc1.bias": torch.tensor([1, 1, 0, 1, 1, 1, 0]).bool(),
             "fc2.weight": torch.rand(6, 7, generator=g) > 0.5}
    x = torch.randn(9, 5, dtype=torch.float64)

    def reference():
        def linear(layer, h):
            moments = []
            for param in ("weight", "bias"):
                _, loc, var, _, _ = guide.masked_moments(layer.name, param)
                moments.append((loc, var))
            return local_reparam_draw(layer, h, moments)
        return guide.net.apply(x, linear), guide.kl_divergence(model)

    params = list(guide.parameters())
    for stage in (masks, {"fc3.weight": torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]]).bool()}):
        guide.set_masks(stage)
        torch.manual_seed(3)
        f, kl = guide.sample_outputs_and_kl(model, x)
        assert type(f.grad_fn).__name__.endswith("ScaledLocalReparamDenseBackward")  # one fused node
        torch.manual_seed(3)
        ref_f, ref_kl = reference()
        torch.testing.assert_close(f, ref_f)
        torch.testing.assert_close(kl, ref_kl)
        w = torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)
        grads = torch.autograd.grad((f * w).sum() + 0.3 * kl, params)
        ref_grads = torch.autograd.grad((ref_f * w).sum() + 0.3 * ref_kl, params)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
        by_name = dict(zip([n for n, _ in guide.named_parameters()], grads))
        for site, keep in guide.masks.items():
            layer, param = site.split(".")
            assert not by_name[f"locs.{layer}.{param}"][~keep].any()


def test_meanfield_draws_have_the_guide_moments(small_mlp_guide):
    _, guide = small_mlp_guide
    guide.set_masks({"fc2.weight": torch.tensor([[True, False, True, True], [False, True, True, True]])})
    with torch.no_grad():
        draws = torch.stack([guide.draw()["fc2.weight"] for _ in range(5000)])
    assert (draws[:, 0, 1] == 0).all() and (draws[:, 1, 0] == 0).all()
    mean, scale = guide.posterior_mean()["fc2.weight"], guide.posterior_scale()["fc2.weight"]
    assert (mean[0, 1] == 0) and (scale[0, 1] == 0)
    ma, va, sma, sva = moments(draws)
    assert ((ma - mean).abs() <= 5 * sma + 1e-7).all()
    assert ((va - scale**2).abs() <= 5 * sva + 1e-7).all()


def test_masks_validate_and_only_shrink(small_mlp_guide):
    _, guide = small_mlp_guide
    with pytest.raises(KeyError, match="unknown site 'fc9.weight'"):
        guide.set_masks({"fc9.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(3, 4\), expected \(4, 3\)"):
        guide.set_masks({"fc1.weight": torch.ones(3, 4, dtype=torch.bool)})
    guide.set_masks({"fc1.bias": torch.tensor([True, False, True, True])})
    guide.set_masks({"fc1.bias": torch.tensor([False, True, True, True])})
    assert guide.mask("fc1.bias").tolist() == [False, False, True, True]
    assert guide.mask("fc1.weight") is None


# ------------------------------------------------------------------------------------ point mass
def test_point_mass_objective_is_the_negative_log_prior():
    torch.manual_seed(0)
    model = make_model(mlp(3, [4], 1), prior_scale=0.5)
    guide = PointMass(model)
    mask = torch.tensor([True, False, True, True])
    guide.set_masks({"fc1.bias": mask})
    x = torch.randn(7, 3)
    f, neg_log_prior = guide.sample_outputs_and_kl(model, x)
    params = guide.posterior_mean()
    assert params["fc1.bias"][1] == 0
    expected = -sum(float(dist.Normal(0.0, 0.5).log_prob(v.detach()).sum()) for v in params.values())
    expected += float(dist.Normal(0.0, 0.5).log_prob(torch.zeros(())))  # the pruned bias carries no prior term
    assert float(neg_log_prior.detach()) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(f, guide.net(x, params))
    assert all(torch.equal(guide.draw()[s], v) for s, v in params.items())


# -------------------------------------------------------------------------- Pyro compatibility
@pytest.mark.parametrize("guide_cls", [MeanFieldNormal, PointMass])
def test_guide_trace_samples_every_model_site(guide_cls):
    torch.manual_seed(0)
    model = make_model(mlp(3, [5], 1))
    guide = guide_cls(model)
    x, y = torch.randn(6, 3), torch.randn(6)
    guide_trace = poutine.trace(guide).get_trace(x, y, 6)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, 6)
    latent = {n: s for n, s in model_trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    sampled = {n: s for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    assert set(latent) == set(sampled) == set(model.net.sites())
    for name, shape in model.net.sites().items():
        assert tuple(sampled[name]["value"].shape) == shape
        assert sampled[name]["fn"].event_shape == latent[name]["fn"].event_shape == shape
        assert sampled[name]["fn"].batch_shape == latent[name]["fn"].batch_shape == ()
    # the replayed model used the guide's weights
    assert torch.equal(model_trace.nodes["f"]["value"], model.net(x, {n: s["value"] for n, s in sampled.items()}))
    assert model_trace.nodes["obs"]["fn"].batch_shape == (6,)


def test_predictive_matches_posterior_predict(fitted_meanfield, boston):
    post = fitted_meanfield
    x_raw = boston.x_test[:10]
    x = post.standardizer.x(x_raw)
    torch.manual_seed(0)
    out = Predictive(post.model, guide=post.guide, num_samples=800, return_sites=["f", "obs"])(x)
    # "f" lies outside the data plate: Pyro pads it with one plate dim, (samples, 1, N, out)
    assert out["f"].shape == (800, 1, 10, 1)
    assert out["obs"].shape == (800, 10)
    f = post.standardizer.y_inverse(out["f"].reshape(800, 10))
    pred = post.predict(x_raw, num_samples=800, return_samples=True, seed=1)
    se = (f.var(0) / 800 + pred.samples.squeeze(-1).var(0) / 800).sqrt()
    assert ((f.mean(0) - pred.mean).abs() < 5 * se).all()
    # "obs" adds the likelihood's noise: its spread is the predictive std
    obs = post.standardizer.y_inverse(out["obs"])
    assert torch.allclose(obs.std(0), pred.std, rtol=0.15)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("masked", [False, True])
def test_guides_run_on_cuda(masked):
    torch.manual_seed(0)
    model = make_model(mlp(3, [5], 1)).to("cuda")
    guide = randomise_guide(MeanFieldNormal(model)).to("cuda")
    if masked:
        guide.set_masks({"fc1.bias": torch.tensor([True, False, True, True, True])})
    assert guide.mask("fc1.bias") is None or guide.mask("fc1.bias").device.type == "cuda"
    x, y = torch.randn(8, 3, device="cuda"), torch.randn(8, device="cuda")
    f, kl = guide.sample_outputs_and_kl(model, x)
    assert f.device.type == kl.device.type == "cuda"
    torch.testing.assert_close(kl, guide.kl_divergence(model))
    loss = LocalReparamELBO()(model, guide)(x, y, 16)
    loss.backward()
    assert all(p.grad.device.type == "cuda" for p in guide.parameters())
    assert all(v.device.type == "cuda" for v in guide.draw().values())
    point = PointMass(model).to("cuda")
    f, neg_log_prior = point.sample_outputs_and_kl(model, x)
    assert f.device.type == neg_log_prior.device.type == "cuda"
    trace = poutine.trace(guide).get_trace(x)
    assert all(trace.nodes[s]["value"].device.type == "cuda" for s in model.net.sites())


def test_pruned_guide_works_under_pyro_elbos():
    """Once pruned, the guide is still a valid Pyro guide: pruned entries sample (numerically) zero
    and Pyro's trace ELBOs give a finite loss whose gradient reaches the kept parameters only."""
    torch.manual_seed(0)
    model = make_model(mlp(3, [4], 1), prior_scale=0.7)
    guide = randomise_guide(MeanFieldNormal(model))
    site = next(iter(model.net.sites()))
    keep = torch.rand(model.net.sites()[site]) > 0.5
    guide.set_masks({site: keep})
    x, y = torch.randn(16, model.net.input_shape[0]), torch.randn(16)
    tr = poutine.trace(guide).get_trace(x)
    assert tr.nodes[site]["value"][~keep].abs().max() < 1e-9
    for elbo in (TraceMeanField_ELBO(), pyro.infer.Trace_ELBO()):
        guide.zero_grad()
        loss = elbo.differentiable_loss(model, guide, x, y, 100)
        assert torch.isfinite(loss)
        loss.backward()
        layer, param = site.rsplit(".", 1)
        grad = guide.locs[layer][param].grad
        assert torch.all(grad[~keep] == 0) and grad[keep].abs().sum() > 0


def test_pruned_weights_share_one_guide_scale():
    """Both Gaussian weight guides give a pruned weight the one PRUNED_SCALE in their Pyro sites,
    small enough to sample zero and large enough that its square stays a normal float32."""
    assert torch.tensor(PRUNED_SCALE**2, dtype=torch.float32) >= torch.finfo(torch.float32).tiny
    net = mlp(4, [6], 1)
    keep = torch.arange(6) >= 2
    for guide, site in ((MeanFieldNormal(make_model(net)), "fc1.weight"),
                        (HorseshoeGuide(BayesianNeuralNetwork(net, HorseshoePrior(net), make_likelihood("regression"))),
                         "fc1.weight_decentered")):
        guide.set_masks({"fc1.weight": keep.unsqueeze(1).expand(6, 4).clone()})
        d = guide.site_distribution(site)
        while not isinstance(d, dist.Normal):  # Independent, and MaskedDistribution where the guide masks
            d = d.base_dist
        scale = d.scale
        assert (scale[~keep] == PRUNED_SCALE).all() and (scale[keep] > 1e-6).all()


def test_fused_local_reparam_dense_gradients():
    """LocalReparamDense's hand-written backward pass against autograd's (gradcheck in double
    precision), and its forward pass and KL against the plain formulas, for the same noise."""
    from torch.distributions import Normal, kl_divergence

    from bnnzoo.guides.local_reparam import LocalReparamDense

    h, mu, rho, b_mu, b_rho, gen = dense_layer_float64()
    eps = torch.randn(5, 3, generator=gen, dtype=torch.float64)

    def fn(*args):
        return LocalReparamDense.apply(*args, eps, 0.7)

    assert torch.autograd.gradcheck(fn, (h, mu, rho, b_mu, b_rho))
    out, kl = fn(h, mu, rho, b_mu, b_rho)
    var, b_var = torch.exp(2 * rho), torch.exp(2 * b_rho)
    torch.testing.assert_close(out, h @ mu.T + b_mu + (h**2 @ var.T + b_var).sqrt() * eps)
    ref = kl_divergence(Normal(torch.cat([mu.flatten(), b_mu]), torch.cat([var.flatten(), b_var]).sqrt()),
                        Normal(0.0, 0.7)).sum()
    torch.testing.assert_close(kl, ref)
