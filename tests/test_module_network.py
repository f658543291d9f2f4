"""Any torch.nn.Module as the network: its Linear/Conv layers become weight sites, every other
parameter a point estimate; every method but em-tdamp fits it, saves and loads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnnzoo
from bnnzoo.data import Dataset
from bnnzoo.errors import ConfigError
from bnnzoo.models import ModuleNetwork


class Residual(nn.Module):
    """Two convolutions, a residual addition, a LayerNorm and a linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm = nn.LayerNorm(4 * 4 * 4)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = h + torch.relu(self.conv2(h))
        return self.head(self.norm(nn.functional.avg_pool2d(h, 2).flatten(1)))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _images(n: int = 96, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (2 * n,), generator=g)
    x = 0.3 * torch.rand(2 * n, 1, 8, 8, generator=g)
    x[torch.arange(2 * n), 0, 2 * y + 1, 2 * y + 1] += 1.0  # the class is a bright pixel
    return Dataset("toy-images", "classification", x[:n], y[:n], x[n:], y[n:], num_classes=3)


def test_sites_are_the_modules_linear_and_conv_layers():
    module = Residual()
    net = ModuleNetwork(module, (1, 8, 8))
    assert net.sites() == {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,), "conv2.weight": (4, 4, 3, 3),
                           "conv2.bias": (4,), "head.weight": (3, 64), "head.bias": (3,)}
    assert [l.name for l in net.hidden_layers()] == ["conv1", "conv2"] and net.output_dim == 3
    assert set(net.point_parameters()) == {"norm.weight", "norm.bias"}
    init = net.init_params()
    assert torch.equal(init["conv2.bias"], torch.zeros(4))  # a layer built without a bias gains a zero one
    assert torch.equal(init["conv1.weight"], module.conv1.weight)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(net(x, init), module(x))  # the module's own forward pass, rerouted
    assert module.conv2.bias is None and isinstance(module.conv1.weight, nn.Parameter)  # the original is untouched
    order = []
    net.apply(x, lambda layer, h: order.append(layer.name) or layer.op(h, init[f"{layer.name}.weight"],
                                                                       init[f"{layer.name}.bias"]))
    assert order == ["conv1", "conv2", "head"]
    fresh = net.init_params(torch.Generator().manual_seed(0))
    assert fresh["head.weight"].abs().max() <= 64 ** -0.5 and not torch.equal(fresh["head.weight"], init["head.weight"])


def test_bad_modules_are_named():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        ModuleNetwork(lambda x: x, (3,))
    with pytest.raises(ConfigError, match="no nn.Linear"):
        ModuleNetwork(nn.Sequential(nn.ReLU()), (3,))
    with pytest.raises(ConfigError, match="does not run on inputs of shape"):
        ModuleNetwork(Residual(), (1, 5, 5))
    with pytest.raises(ConfigError, match="padding_mode 'reflect'"):
        ModuleNetwork(nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect", padding=1), nn.Flatten(),
                                    nn.Linear(2 * 16, 2)), (1, 4, 4))
    with pytest.raises(ConfigError, match="not both"):
        bnnzoo.create("map", "classification", (1, 8, 8), 3, module=Residual(), network={"arch": "lenet5"})
    with pytest.raises(ConfigError, match="has 3 outputs, the data need 4"):
        bnnzoo.create("map", "classification", (1, 8, 8), 4, module=Residual())


METHODS = {"map": {}, "meanfield-vi": {}, "bmr": {}, "bmr-iterative": {}, "horseshoe-svi": {},
           "spike-slab-sghmc": {"cycles": 2}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_fits_a_user_module_and_loads_it_back(name, tmp_path):
    data = _images()
    options = {"epochs": 4, "batch_size": 32, **METHODS[name]}
    if "validation_fraction" in bnnzoo.get_entry(name).schema("classification"):
        options["validation_fraction"] = None  # no held-out selection: a quick fit
    post = bnnzoo.fit(name, data, module=Residual(), progress=False, **options)
    assert isinstance(post.net, ModuleNetwork)
    torch.manual_seed(1)
    ref = post.predict(data.x_test, num_samples=4).mean
    assert torch.isfinite(ref).all() and ref.shape == (len(data.x_test), 3)
    post.save(tmp_path / "run")
    back = bnnzoo.load(tmp_path / "run", module=Residual())
    torch.manual_seed(1)
    torch.testing.assert_close(back.predict(data.x_test, num_samples=4).mean, ref)
    with pytest.raises(Exception, match="pass the module again"):
        bnnzoo.load(tmp_path / "run")
    with pytest.raises(Exception, match="does not match the saved run"):
        bnnzoo.load(tmp_path / "run", module=nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))


def test_point_estimates_are_learned_and_the_fit_learns_the_task():
    data = _images(192)
    module = Residual()
    post = bnnzoo.fit("map", data, module=module, epochs=30, batch_size=32, lr=1e-2, progress=False)
    norm = post.net.module.norm
    assert not torch.equal(norm.weight.detach().cpu(), torch.ones(64))  # LayerNorm's scale moved: a point estimate
    assert torch.equal(module.norm.weight, torch.ones(64))  # on the copy, not on the user's module
    assert post.evaluate(data.x_test, data.y_test, num_samples=1)["accuracy"] > 0.9


def test_em_tdamp_refuses_a_module_naming_the_layer():
    with pytest.raises(ConfigError, match="em-tdamp.*'conv1'"):
        bnnzoo.create("em-tdamp", "classification", (1, 8, 8), 3, module=Residual())


def test_pruned_export_equals_the_masked_network():
    net = ModuleNetwork(Residual(), (1, 8, 8))
    params = net.init_params(torch.Generator().manual_seed(2))
    keep = {"conv1": torch.tensor([True, False, True, True]), "conv2": torch.tensor([False, True, True, False])}
    masked = dict(params)
    for layer, k in keep.items():
        masked[f"{layer}.weight"] = params[f"{layer}.weight"] * k.view(-1, 1, 1, 1)
        masked[f"{layer}.bias"] = params[f"{layer}.bias"] * k
    exported = net.to_torch(params, keep)
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(exported(x), net(x, masked))
    # the mask holds through further training of the exported module
    opt = torch.optim.SGD(exported.parameters(), lr=0.1)
    exported(x).sum().backward()
    opt.step()
    assert torch.equal(exported.conv1.weight[1], torch.zeros(1, 3, 3)) and exported.conv2.bias[0] == 0


def test_batch_norm_trains_on_batches_and_predicts_with_running_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 5, generator=g) * 3 + 2
    y = x[:, 0] - x[:, 1] + 0.1 * torch.randn(128, generator=g)
    data = Dataset("toy", "regression", x[:96], y[:96], x[96:], y[96:])
    post = bnnzoo.fit("meanfield-vi", data, module=WithBatchNorm(), epochs=5, batch_size=32, progress=False)
    bn = post.net.module.bn
    assert bn.num_batches_tracked > 0 and not post.model.training
    assert not torch.equal(bn.running_mean, torch.zeros(8))
    # eval mode: an example's prediction does not depend on the batch it comes in
    params = post.guide.posterior_mean()
    xs = post.standardizer.x(data.x_test)
    with torch.no_grad():
        torch.testing.assert_close(post.net(xs[:3], params), post.net(xs, params)[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_user_module_fits_on_cuda():
    post = bnnzoo.fit("meanfield-vi", _images(), module=Residual(), epochs=2, device="cuda", progress=False)
    assert next(post.net.module.parameters()).device.type == "cuda"
    assert post.predict(_images().x_test.cuda(), num_samples=2).mean.device.type == "cuda"


@pytest.mark.parametrize("arch", ["resnet-8", "resnet-20", "resnet-18", "vit-tiny", "mixer-small"])
def test_catalog_module_architectures_build_for_mnist_and_cifar_shapes(arch):
    from bnnzoo.models.architectures import MODULE_ARCHITECTURES
    from bnnzoo.models.networks import build_network

    for shape in ((1, 28, 28), (3, 32, 32)):
        torch.manual_seed(0)
        net = build_network(arch, shape, 10)
        torch.manual_seed(0)
        plain = MODULE_ARCHITECTURES[arch](shape, 10).eval()
        assert isinstance(net, ModuleNetwork) and net.name == arch and net.output_dim == 10
        x = torch.rand(2, *shape)
        net.eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x, net.init_params()), plain(x))
    with pytest.raises(ConfigError, match="image inputs"):
        build_network(arch, (13,), 1)


def test_patch_models_refuse_sides_the_patch_does_not_divide():
    from bnnzoo.models.networks import build_network

    with pytest.raises(ConfigError, match="multiples of 4"):
        build_network("vit-tiny", (3, 30, 30), 10)


def test_a_named_module_architecture_fits_saves_and_loads_without_the_module(tmp_path):
    data = _images(64)
    post = bnnzoo.fit("meanfield-vi", data, network={"arch": "resnet-8"}, epochs=2, batch_size=32,
                      validation_fraction=None, progress=False)
    assert post.net.name == "resnet-8" and isinstance(post.net, ModuleNetwork)
    post.save(tmp_path / "run")
    back = bnnzoo.load(tmp_path / "run")  # rebuilt by name; BatchNorm statistics restored from the run
    torch.manual_seed(0)
    ref = post.predict(data.x_test, num_samples=3).mean
    torch.manual_seed(0)
    torch.testing.assert_close(back.predict(data.x_test, num_samples=3).mean, ref)


def test_a_pruned_user_module_exports_with_its_masks():
    data = _images(96)
    post = bnnzoo.fit("bmr", data, module=Residual(), epochs=4, batch_size=32, validation_fraction=None,
                      progress=False)
    keep = post.sparsity()["keep"]
    exported = post.to_torch().eval()
    assert isinstance(exported, Residual)  # the user's class, with its biases and masks
    xs = post.standardizer.x(data.x_test)
    with torch.no_grad():
        torch.testing.assert_close(exported(xs), post.net(xs, post.posterior_mean()))
    for name in ("conv1", "conv2"):
        gone = ~keep[name]
        assert torch.equal(getattr(exported, name).weight[gone], torch.zeros_like(getattr(exported, name).weight[gone]))


def test_mlp_hidden_units_are_removed_physically_on_export():
    from bnnzoo.models.networks import build_network

    torch.manual_seed(0)
    net = build_network("mixer-small", (1, 8, 8), 3)
    params = net.init_params(torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    keep = {layer.name: torch.rand(layer.num_groups, generator=g) < 0.4 for layer in net.hidden_layers()}
    masked = dict(params)
    for name, k in keep.items():
        shape = (-1,) + (1,) * (params[f"{name}.weight"].dim() - 1)
        masked[f"{name}.weight"] = params[f"{name}.weight"] * k.view(shape)
        masked[f"{name}.bias"] = params[f"{name}.bias"] * k
    exported = net.to_torch(params, keep).eval()
    net.eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x, masked))
    fc1 = exported.blocks[0].channel_mlp.fc1
    assert fc1.out_features == int(keep["blocks.0.channel_mlp.fc1"].sum())  # smaller, not masked
    assert exported.blocks[0].channel_mlp.fc2.in_features == fc1.out_features
    assert not parametrize_is(fc1) and parametrize_is(exported.patches.proj)


def parametrize_is(module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(module)


def test_a_plain_sequential_runs_as_the_built_in_chain(tmp_path):
    from bnnzoo.models.networks import Network

    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    data = _images(64)
    for name in ("em-tdamp", "meanfield-vi"):
        options = {"epochs": 2} if name == "em-tdamp" else {"epochs": 2, "validation_fraction": None}
        post = bnnzoo.fit(name, data, module=seq, progress=False, **options)
        assert isinstance(post.net, Network) and set(post.net.sites()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
        post.save(tmp_path / name)
        back = bnnzoo.load(tmp_path / name)  # a chain is described by the run itself
        torch.manual_seed(0)
        ref = post.predict(data.x_test, num_samples=2).mean
        torch.manual_seed(0)
        torch.testing.assert_close(back.predict(data.x_test, num_samples=2).mean, ref)
    # a Sequential with a layer the chain does not know is a module network
    odd = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 3))
    post = bnnzoo.create("map", "classification", (1, 8, 8), 3, module=odd)
    assert isinstance(post.net, ModuleNetwork)
    with pytest.raises(ConfigError, match="has 5 outputs, the data need 3"):
        bnnzoo.create("map", "classification", (1, 8, 8), 3, module=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))


def test_cli_network_option(tmp_path):
    import json

    from click.testing import CliRunner

    from bnnzoo.cli import main

    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(main, ["fit", "map", "--network", "mlp", "--hidden", "8,4", "--epochs", "1", "--quiet",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["network"] == {"arch": "mlp", "hidden": [8, 4]}
    bad = runner.invoke(main, ["fit", "map", "--network", "lenet5", "--hidden", "8"])
    assert bad.exit_code != 0 and "--hidden sets the widths of --network mlp" in bad.output
    bad = runner.invoke(main, ["fit", "map", "--network", "resnet-21"])
    assert bad.exit_code != 0 and "resnet-20" in bad.output  # the choices are listed


def test_token_linear_layers_take_the_fused_local_reparameterisation(monkeypatch):
    import bnnzoo.guides.meanfield as meanfield

    calls = []
    fused = meanfield.local_reparam_dense
    monkeypatch.setattr(meanfield, "local_reparam_dense", lambda h, *a: calls.append(h.dim()) or fused(h, *a))
    post = bnnzoo.create("meanfield-vi", "classification", (1, 8, 8), 3, network={"arch": "mixer-small"},
                         validation_fraction=None)
    guide, model = post.guide, post.model
    x = torch.rand(5, 1, 8, 8)
    torch.manual_seed(3)
    fused_f, fused_kl = guide.sample_outputs_and_kl(model, x)
    linear = [layer for layer in post.net.param_layers if layer.kind == "linear"]
    assert len(calls) == len(linear) and 3 in calls  # every linear layer, token inputs (B, T, D) included
    # all-ones masks route every layer through the generic path, with the same noise drawn
    guide.set_masks({site: torch.ones(shape, dtype=torch.bool) for site, shape in post.net.sites().items()})
    torch.manual_seed(3)
    plain_f, plain_kl = guide.sample_outputs_and_kl(model, x)
    torch.testing.assert_close(fused_f, plain_f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_kl, plain_kl, rtol=1e-5, atol=1e-3)
    fused_f.sum().backward()  # the fused backward runs on token inputs


def test_residual_inner_channels_are_removed_where_exact():
    """A pruned conv1 channel whose BatchNorm constant the ReLU clips to 0 leaves the exported
    block (conv1, bn1 and conv2 smaller); one whose constant survives stays, masked; the outputs
    equal the masked network's in eval mode."""
    from bnnzoo.models.networks import build_network

    torch.manual_seed(0)
    net = build_network("resnet-8", (3, 8, 8), 4)
    params = net.init_params(torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    blocks = [name[: -len(".conv1")] for name in (layer.name for layer in net.param_layers) if name.endswith("conv1")
              and name.startswith("blocks.")]
    assert blocks
    keep, removable = {}, {}
    with torch.no_grad():
        for b in blocks:
            bn = net.module.get_submodule(f"{b}.bn1")
            bn.running_mean.uniform_(-1.0, 1.0, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
            constant = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
            k = torch.rand(bn.num_features, generator=g) < 0.5
            keep[f"{b}.conv1"] = k
            removable[b] = (~k & (constant <= 0)).sum().item()
    assert sum(removable.values()) > 0 and any((~k).sum() > removable[b] for b, k in
                                              zip(blocks, keep.values()))  # some pruned channels stay masked
    masked = dict(params)
    for name, k in keep.items():
        masked[f"{name}.weight"] = params[f"{name}.weight"] * k.view(-1, 1, 1, 1)
        masked[f"{name}.bias"] = params[f"{name}.bias"] * k
    net.eval()
    exported = net.to_torch(params, keep).eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x, masked))
    for b in blocks:
        block, n = exported.get_submodule(b), int(keep[f"{b}.conv1"].numel())
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == n - removable[b]
        assert block.conv1.weight.shape[0] == n - removable[b] and block.conv2.weight.shape[1] == n - removable[b]
        assert parametrize_is(block.conv1) == bool(n - removable[b] > int(keep[f"{b}.conv1"].sum()))


def test_each_stored_sghmc_draw_keeps_its_own_batchnorm_statistics():
    """BatchNorm's running averages follow the weights: spike-slab-sghmc stores them with every
    draw, and the network predicts each draw with its own (the module's last ones match only the
    last draw)."""
    from bnnzoo.models.networks import build_network

    net = build_network("resnet-8", (1, 8, 8), 3)
    params = net.init_params(torch.Generator().manual_seed(0))
    state = net.state_buffers()
    assert state and all("running" in k for k in state)
    x = torch.rand(4, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        own = net(x, params)
        shifted = {k: v + 0.5 if k.endswith("running_mean") else v * 2.0 for k, v in state.items()}
        with_draw = net(x, {**params, **shifted})
        for name, value in shifted.items():  # the same statistics loaded into the module by hand
            owner, _, attr = name.rpartition(".")
            getattr(net.module.get_submodule(owner), attr).copy_(value)
        by_hand = net(x, params)
        for name, value in state.items():
            owner, _, attr = name.rpartition(".")
            getattr(net.module.get_submodule(owner), attr).copy_(value)
    assert not torch.allclose(with_draw, own)
    torch.testing.assert_close(with_draw, by_hand)
    torch.testing.assert_close(net(x, params), own)  # the module's own statistics are left as they were

    data = _images(64)
    post = bnnzoo.fit("spike-slab-sghmc", data, network={"arch": "resnet-8"}, epochs=4, batch_size=16, cycles=2,
                      samples_per_cycle=2, thinning=1, progress=False, seed=0)
    names = list(post.net.state_buffers())
    assert set(names) <= set(post.samples)
    means = post.samples[names[0]].reshape(post.num_draws, -1)
    assert not torch.allclose(means[0], means[-1])  # recorded at each draw, not once
    xs = post.standardizer.x(data.x_test)
    draws = list(post.draw_weights(post.num_draws))
    first = draws[0]
    module_stats = post.net.state_buffers()
    for name in names:  # the module itself ends with the last draw's statistics
        torch.testing.assert_close(module_stats[name], draws[-1][name])
    with torch.no_grad():
        without = post.net(xs, {k: v for k, v in first.items() if k not in names})
        assert not torch.allclose(post.net(xs, first), without)


class Tokens(nn.Module):
    """A linear layer applied to every token (input ``(B, T, I)``), mean pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x)).mean(1))


def test_horseshoe_token_wise_linear_takes_the_fused_step_with_the_same_draw(monkeypatch):
    """A module's nn.Linear on tokens goes through a fused local-reparameterised layer (the scale
    folded into the weights where a hidden layer has more rows than inputs); with the same random state
    its output and KL equal the generic per-layer path's (one draw per example, token and unit)."""
    from bnnzoo.guides import horseshoe

    calls = []

    def counted(kind, fn):
        def wrapper(h, *args):
            calls.append((kind, tuple(h.shape)))
            return fn(h, *args)
        return wrapper

    for name, kind in (("scaled_local_reparam_dense", "outputs"), ("weight_scaled_local_reparam_dense", "weights")):
        monkeypatch.setattr(horseshoe, name, counted(kind, getattr(horseshoe, name)))
    built = bnnzoo.create("horseshoe-svi", "classification", (4, 6), 3, module=Tokens(), seed=0)
    guide, model = built.guide, built.model
    x = torch.randn(7, 4, 6)
    plan = guide.step_plan()
    assert not plan.pruned
    torch.manual_seed(1)
    fused, fused_kl = guide.sample_outputs_and_kl(model, x)
    plan.pruned = True  # the generic path (the one a pruned guide takes), same parameters
    torch.manual_seed(1)
    generic, generic_kl = guide.sample_outputs_and_kl(model, x)
    # 28 token rows of 6 inputs: the scale on the weights; the output layer (7 rows of 5 inputs)
    # keeps its fixed unit scale on its outputs, where it costs one multiply
    assert fused.shape == (7, 3) and calls == [("weights", (7, 4, 6)), ("outputs", (7, 5))]
    assert torch.allclose(fused, generic, atol=1e-5) and torch.allclose(fused_kl, generic_kl, rtol=1e-5)
    plan.pruned = False
    torch.manual_seed(2)
    assert not torch.allclose(guide.sample_outputs_and_kl(model, x)[0], fused)  # a new draw differs
    calls.clear()
    guide.sample_outputs_and_kl(model, x[:1])  # 4 token rows of 6 inputs, 1 row of 5
    assert calls == [("outputs", (1, 4, 6)), ("outputs", (1, 5))]
