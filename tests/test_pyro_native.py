"""The catalog's models and guides in plain Pyro: SVI with pyro.optim, Predictive, autoguides, build."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

import bnnzoo
from bnnzoo.errors import ConfigError
from bnnzoo.guides import PyroAutoGuide

NETWORK = {"arch": "mlp", "hidden": [8]}


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(64, generator=g)
    return x, y


@pytest.mark.parametrize("name", ["meanfield-vi", "map", "horseshoe-svi"])
def test_plain_pyro_svi_trains_every_guide_parameter(name, data):
    x, y = data
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, standardizer = bnnzoo.build(name, "regression", input_shape=(5,), output_dim=1, data=(x, y),
                                              network=NETWORK)
    xs, ys = standardizer.x(x), standardizer.y(y)
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    noise_before = model.likelihood.log_noise_scale.detach().clone()
    assert before
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.02}), TraceMeanField_ELBO(num_particles=4))
    losses = [svi.step(xs, ys) for _ in range(40)]
    unchanged = [k for k, v in guide.named_parameters() if torch.equal(v.detach(), before[k])]
    assert unchanged == []
    assert not torch.equal(model.likelihood.log_noise_scale.detach(), noise_before)  # the model's parameter too
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_a_second_guide_of_the_same_name_trains_without_clearing_the_store(data):
    x, y = data
    for _ in range(2):  # the second guide's names are already in the param store
        model, guide, _ = bnnzoo.build("map", "regression", input_shape=(5,), output_dim=1, network=NETWORK)
        before = {k: v.detach().clone() for k, v in guide.named_parameters()}
        SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), TraceMeanField_ELBO()).step(x, y)
        assert all(not torch.equal(v.detach(), before[k]) for k, v in guide.named_parameters())


@pytest.mark.parametrize("task,output_dim", [("regression", 1), ("classification", 3)])
def test_predictive_returns_the_observed_site(task, output_dim, data):
    x, _ = data
    model, guide, _ = bnnzoo.build("meanfield-vi", task, input_shape=(5,), output_dim=output_dim, network=NETWORK)
    samples = Predictive(model, guide=guide, num_samples=6, return_sites=["obs", "fc1.weight"])(x[:10])
    assert samples["obs"].shape == (6, 10)
    assert samples["fc1.weight"].shape[-2:] == (8, 5)
    if task == "classification":
        assert set(samples["obs"].unique().tolist()) <= {0, 1, 2}
    prior = Predictive(model, num_samples=3)(x[:10])  # the prior predictive: the model alone
    assert prior["obs"].shape == (3, 10)


def test_poutine_handlers_on_a_catalog_model(data):
    x, y = data
    model, guide, _ = bnnzoo.build("horseshoe-svi", "regression", input_shape=(5,), output_dim=1, network=NETWORK)
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    for site in ("fc1.weight_decentered", "fc1.tau_a", "fc2.weight"):  # the model ran on the guide's draws
        assert torch.equal(model_trace.nodes[site]["value"], guide_trace.nodes[site]["value"])
    assert torch.isfinite(model_trace.log_prob_sum())
    assert "model$$$likelihood.log_noise_scale" in model_trace.nodes  # the model's parameter is a param site
    zero = {site: torch.zeros(shape) for site, shape in model.net.sites().items()}
    f = poutine.trace(poutine.condition(model, data=zero)).get_trace(x).nodes["f"]["value"]
    assert torch.equal(f, torch.zeros_like(f))  # all weights zero: outputs zero


def test_an_autoguide_trains_on_a_catalog_model_with_plain_svi(data):
    x, y = data
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, _, std = bnnzoo.build("meanfield-vi", "regression", input_shape=(5,), output_dim=1, data=(x, y),
                                 network=NETWORK)
    autoguide = AutoNormal(model)
    svi = SVI(model, autoguide, pyro.optim.ClippedAdam({"lr": 0.02}), Trace_ELBO(num_particles=4))
    losses = [svi.step(std.x(x), std.y(y)) for _ in range(40)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert set(autoguide.median()) == set(model.net.sites())


def test_build_standardizer_and_refusals(data):
    x, y = data
    built = bnnzoo.build("map", "regression", input_shape=(5,), output_dim=1, data=(x, y), network=NETWORK)
    assert torch.allclose(built.standardizer.y(y).mean(), torch.zeros(()), atol=1e-5)
    assert bnnzoo.build("map", "regression", input_shape=(5,), output_dim=1).standardizer is None
    with pytest.raises(ConfigError, match="data must be"):
        bnnzoo.build("map", "regression", input_shape=(5,), output_dim=1, data=[x, y])
    with pytest.raises(ConfigError, match="not fitted through a Pyro guide"):
        bnnzoo.build("spike-slab-sghmc", "regression", input_shape=(5,), output_dim=1)


@pytest.mark.parametrize("name,autoguide", [("meanfield-vi", AutoNormal), ("map", AutoDelta)])
def test_autoguide_in_place_of_the_entrys_guide(name, autoguide, data):
    x, y = data
    posterior = bnnzoo.create(name, "regression", input_shape=(5,), output_dim=1, network=NETWORK,
                              guide=autoguide, epochs=30, batch_size=32, lr=0.01, device="cpu")
    assert isinstance(posterior.guide, PyroAutoGuide)
    posterior.fit(x, y, progress=False)
    loss = posterior.history.to_dict()["loss"]
    assert loss[-1] < loss[0]
    pred = posterior.predict(x[:7], num_samples=5)
    assert pred.mean.shape == (7,)
    with pytest.raises(ConfigError, match="cannot be saved"):
        posterior.guide.state_dict()


def test_autoguide_refused_where_the_method_needs_its_own_guide():
    with pytest.raises(ConfigError, match="cannot fit an autoguide"):
        bnnzoo.create("horseshoe-svi", "regression", input_shape=(5,), output_dim=1, guide=AutoNormal)
    with pytest.raises(ConfigError, match="checkpoint"):
        bnnzoo.fit("map", guide=AutoDelta, run_dir="unused")
