"""Shared small fixtures: data subsets, tiny models, and posteriors fitted once per session.

Tests marked ``@pytest.mark.cuda`` are skipped on machines without CUDA.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import pytest
import torch
from hypothesis import settings

import bnnzoo
from bnnzoo import distributed
from bnnzoo.data import load_dataset, load_mnist
from bnnzoo.models import (
    BayesianNeuralNetwork,
    GaussianLikelihood,
    GaussianPrior,
    make_likelihood,
)
from bnnzoo.models.networks import mlp

# The test networks are tiny: one thread is faster than two, and on a busy machine a second
# OpenMP thread spin-waits for a core (tiny fits then run 10-40 times slower).
torch.set_num_threads(1)

# Property-based tests draw the same examples on every run (a failure in CI reproduces locally);
# BNNZOO_HYPOTHESIS_PROFILE_GLOBAL=explore draws new ones.
settings.register_profile("suite", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("BNNZOO_HYPOTHESIS_PROFILE_GLOBAL", "suite"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_model(net, prior_scale: float = 1.0, task: str = "regression", noise_scale: float = 0.5):
    """A Bayesian network over ``net`` with a ``N(0, prior_scale^2)`` prior."""
    kwargs = {"noise_scale": noise_scale} if task == "regression" else {}
    return BayesianNeuralNetwork(net, GaussianPrior(net, prior_scale), make_likelihood(task, **kwargs))


def randomise_guide(guide, loc_scale: float = 0.5, log_scale_range: tuple[float, float] = (-2.0, -0.5), seed: int = 0):
    """Give a mean-field guide spread-out means and scales, so that its KL and variances are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = log_scale_range
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if name.startswith("locs."):
                p.copy_(loc_scale * torch.randn(p.shape, generator=gen))
            elif name.startswith("log_scales."):
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=gen))
    return guide


def dense_layer_float64(out_features: int = 3, in_features: int = 4, batch: int = 5):
    """A dense layer's Gaussian parameters in float64 for gradient checks of the fused layers:
    ``(h, mu, rho, b_mu, b_rho, gen)``, all but ``gen`` requiring gradients; ``gen`` (seeded 0)
    draws whatever else the test needs after them."""
    gen = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    h = torch.randn(batch, in_features, generator=gen, **d).requires_grad_()
    mu, b_mu = torch.randn(out_features, in_features, generator=gen, **d), torch.randn(out_features, generator=gen, **d)
    rho = -1 + 0.3 * torch.randn(out_features, in_features, generator=gen, **d)
    b_rho = -1 + 0.3 * torch.randn(out_features, generator=gen, **d)
    mu, b_mu, rho, b_rho = (t.requires_grad_() for t in (mu, b_mu, rho, b_rho))
    return h, mu, rho, b_mu, b_rho, gen


@pytest.fixture(scope="session")
def boston():
    """The bundled Boston split 0, training part cut to 200 rows."""
    return load_dataset(None).subset(200, None, seed=0)


@pytest.fixture(scope="session")
def mnist_small():
    return load_mnist().subset(500, 200, seed=0)


@pytest.fixture(scope="session")
def fitted_meanfield(boston):
    return bnnzoo.fit("meanfield-vi", boston, epochs=8, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="session")
def fitted_map(boston):
    return bnnzoo.fit("map", boston, epochs=8, device="cpu", progress=False, seed=0)


@pytest.fixture(scope="session")
def fitted_classifier(mnist_small):
    return bnnzoo.fit("meanfield-vi", mnist_small, network={"arch": "mlp", "hidden": [50]}, epochs=5,
                      batch_size=50, lr=1e-2, device="cpu", progress=False, seed=0, validation_fraction=None)


def spread_state(guide, seed=0, precision=3.0):
    """Give the guide's messages spread-out values so posteriors are neither prior nor point masses
    (message precisions up to ``precision / sigma^2``)."""
    gen = torch.Generator().manual_seed(seed)
    for site, shape in guide.net.sites().items():
        layer = site.rpartition(".")[0]
        s2 = guide.prior.slab_var(layer).reshape((-1,) + (1,) * (len(shape) - 1))
        lam = torch.rand(shape, generator=gen) * precision / s2
        mu = torch.randn(shape, generator=gen) * s2.sqrt()
        eta_view, precision_view = guide.message(site)
        precision_view.copy_(lam)
        eta_view.copy_(lam * mu)
    for layer in guide.net.hidden_layers():
        guide.prior.set_group_parameters(layer.name, logit_rho=torch.randn(layer.num_groups, generator=gen))
    return guide


def assert_chain_matches_gaussian(samples: dict, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """The 600 draws of ``fc1.weight[0, 0]`` and ``fc1.bias[0]`` of a one-weight chain match a 2-D
    Gaussian ``N(mean, cov)``: the mean and every (co)variance within 4 batch-means standard
    errors (20 batches of 30), with standard errors small enough that a 40% error in a (co)variance
    fails."""
    draws = torch.stack([samples["fc1.weight"][:, 0, 0], samples["fc1.bias"][:, 0]], 1).double()
    centred = draws - mean
    stats = torch.cat([draws, centred[:, :1] ** 2, centred[:, :1] * centred[:, 1:], centred[:, 1:] ** 2], 1)
    target = torch.stack([mean[0], mean[1], cov[0, 0], cov[0, 1], cov[1, 1]])
    batches = stats.reshape(20, 30, 5).mean(1)
    estimate, se = batches.mean(0), batches.std(0) / math.sqrt(20)
    assert ((estimate - target).abs() < 4 * se).all(), (estimate, target, se)
    assert (se[2:] < 0.15 * target[2:].abs()).all()


def correlated_gaussian_regression():
    """``(x, y, model, mean, cov)``: Bayesian linear regression ``y = w x + b + N(0, 0.5^2)``, 20
    points, ``(w, b) ~ N(0, I)``, as a one-layer catalog model, with its exact Gaussian posterior over
    ``(w, b)`` (correlation about -0.7)."""
    gen = torch.Generator().manual_seed(0)
    n, noise = 20, 0.5
    x = 1.0 + torch.randn(n, 1, generator=gen)
    y = 0.8 * x[:, 0] - 0.3 + noise * torch.randn(n, generator=gen)
    net = mlp(1, [], 1)
    model = BayesianNeuralNetwork(net, GaussianPrior(net, 1.0), GaussianLikelihood(noise))
    design = torch.stack([x[:, 0], torch.ones(n)], 1).double()
    precision = design.T @ design / noise**2 + torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    mean = cov @ design.T @ y.double() / noise**2
    assert cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt() < -0.6
    return x, y, model, mean, cov


@pytest.fixture
def one_rank_group(monkeypatch):
    """A context manager: inside it this process is the only rank of a gloo process group joined
    through the variables ``torchrun --nproc-per-node 1`` sets, and fits are data-parallel over it."""

    @contextmanager
    def group():
        for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(distributed.free_port())}.items():
            monkeypatch.setenv(var, value)
        with distributed.process_group("cpu") as (parallel, _):
            yield parallel

    return group
