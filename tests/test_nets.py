"""Networks: site shapes, forward pass against the exported torch module, pruned export, specs and
sparsity counts checked by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnnzoo.models.networks import (
    Activation,
    Conv2d,
    Dense,
    Flatten,
    Network,
    Pool2d,
    build_network,
    lenet5,
    lenet_300_100,
    mlp,
)
from bnnzoo.models.sparsity import group_keep, sparsity_report


def tiny_convnet() -> Network:
    """conv(1->4, 3x3) relu maxpool2 conv(4->5, 3x3) relu flatten dense(20->6) relu dense(6->3) on 1x10x10."""
    return Network([
        Conv2d("conv1", 1, 4, 3), Activation("relu"), Pool2d(2),
        Conv2d("conv2", 4, 5, 3), Activation("relu"),
        Flatten(),
        Dense("fc1", 5 * 2 * 2, 6), Activation("relu"),
        Dense("fc2", 6, 3),
    ], (1, 10, 10), name="tiny-conv")


def random_params(net: Network, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(shape, generator=gen) * 0.5 for s, shape in net.sites().items()}


def group_masks(net: Network, pruned: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Masks that remove whole groups (weight rows and bias entries) of the named layers."""
    out = {}
    for name, groups in pruned.items():
        layer = net.layer(name)
        w = torch.ones(layer.weight_shape, dtype=torch.bool)
        b = torch.ones(layer.num_groups, dtype=torch.bool)
        w[groups] = False
        b[groups] = False
        out[f"{name}.weight"], out[f"{name}.bias"] = w, b
    return out


# ---------------------------------------------------------------------------------------- sites
def test_sites_mlp():
    net = mlp(13, [50, 20], 1)
    assert net.sites() == {
        "fc1.weight": (50, 13), "fc1.bias": (50,),
        "fc2.weight": (20, 50), "fc2.bias": (20,),
        "fc3.weight": (1, 20), "fc3.bias": (1,),
    }
    assert list(net.sites()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert net.num_weights() == 50 * 13 + 50 + 20 * 50 + 20 + 20 + 1
    assert [l.name for l in net.hidden_layers()] == ["fc1", "fc2"]
    assert net.output_dim == 1


def test_sites_lenet_300_100():
    net = lenet_300_100()
    assert net.sites() == {
        "fc1.weight": (300, 784), "fc1.bias": (300,),
        "fc2.weight": (100, 300), "fc2.bias": (100,),
        "fc3.weight": (10, 100), "fc3.bias": (10,),
    }
    assert net.num_weights() == 266_610  # the count the compression literature quotes


def test_sites_lenet5():
    net = lenet5()
    assert net.sites() == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,),
        "fc2.weight": (10, 500), "fc2.bias": (10,),
    }
    assert net.num_weights() == 431_080  # LeNet-5-Caffe
    out = net(torch.rand(2, 1, 28, 28), net.init_params())
    assert out.shape == (2, 10)


def test_build_network_images_into_mlp_flattens():
    net = build_network("lenet-300-100", (1, 28, 28), 10)
    assert isinstance(net.layers[0], Flatten)
    assert net.input_shape == (1, 28, 28)
    assert net(torch.rand(3, 1, 28, 28), net.init_params()).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("resnet", (13,), 1)
    with pytest.raises(ValueError, match="image inputs"):
        build_network("lenet5", (13,), 1)


def test_bad_networks_are_refused():
    with pytest.raises(ValueError, match="positive"):
        mlp(3, [0], 1)
    with pytest.raises(ValueError, match="unique"):
        Network([Dense("a", 2, 2), Dense("a", 2, 1)], (2,))
    with pytest.raises(ValueError, match="unknown activation"):
        Network([Dense("a", 2, 2), Activation("gelu2"), Dense("b", 2, 1)], (2,))


# ------------------------------------------------------------------------------ forward / export
@pytest.mark.parametrize("net", [mlp(7, [9, 5], 3, activation="tanh"), lenet5(), tiny_convnet()],
                         ids=["mlp", "lenet5", "tiny-conv"])
def test_forward_equals_exported_module(net):
    params = random_params(net)
    x = torch.randn(4, *net.input_shape)
    module = net.to_torch(params)
    assert isinstance(module, torch.nn.Sequential)
    torch.testing.assert_close(module(x), net(x, params), atol=1e-6, rtol=1e-6)
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == net.num_weights()


def test_forward_with_leading_sample_dims():
    """Flatten keeps any leading (sample, batch) dims of a conv map and only flattens (C, H, W)."""
    h = torch.arange(2 * 3 * 4 * 2 * 2.0).reshape(2, 3, 4, 2, 2)
    assert Flatten()(h).shape == (2, 3, 16)
    assert torch.equal(Flatten()(h)[1, 2], h[1, 2].flatten())
    assert Flatten()(torch.zeros(5, 7)).shape == (5, 7)


def test_pruned_export_equals_masked_network():
    """Removing groups (conv filters feeding the flatten->dense, dense units) gives a smaller module
    whose outputs equal the full network's with those groups' weights zeroed."""
    net = tiny_convnet()
    params = random_params(net, seed=1)
    pruned = {"conv1": [1, 3], "conv2": [0, 2], "fc1": [2]}
    masks = group_masks(net, pruned)
    masked = {s: v * masks[s] if s in masks else v for s, v in params.items()}
    keep = group_keep(net, masks)
    assert keep["conv1"].tolist() == [True, False, True, False]
    assert keep["conv2"].tolist() == [False, True, False, True, True]
    assert keep["fc2"].all()

    small = net.to_torch(params, keep)
    shapes = [tuple(p.shape) for p in small.parameters()]
    assert shapes == [(2, 1, 3, 3), (2,), (3, 2, 3, 3), (3,), (5, 12), (5,), (3, 5), (3,)]
    x = torch.randn(6, 1, 10, 10)
    full = net(x, masked)
    torch.testing.assert_close(small(x), full, atol=1e-5, rtol=1e-5)
    # and the zeroing matters: the unmasked network differs
    assert not torch.allclose(net(x, params), full, atol=1e-3)


def test_pruned_export_lenet5_through_pool_and_flatten():
    net = lenet5()
    params = net.init_params(torch.Generator().manual_seed(3))
    masks = group_masks(net, {"conv1": [0, 7], "conv2": [1, 2, 49], "fc1": list(range(0, 500, 3))})
    masked = {s: v * masks[s] if s in masks else v for s, v in params.items()}
    small = net.to_torch(params, group_keep(net, masks))
    assert [tuple(m.weight.shape) for m in small if hasattr(m, "weight")] == [
        (18, 1, 5, 5), (47, 18, 5, 5), (333, 47 * 16), (10, 333)]
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(small(x), net(x, masked), atol=1e-5, rtol=1e-4)


def test_pruned_export_dense_only():
    net = mlp(4, [6, 5], 2)
    params = random_params(net, seed=2)
    masks = group_masks(net, {"fc1": [0, 5], "fc2": [3]})
    masked = {s: v * masks[s] if s in masks else v for s, v in params.items()}
    small = net.to_torch(params, group_keep(net, masks))
    assert [tuple(m.weight.shape) for m in small if isinstance(m, torch.nn.Linear)] == [(4, 4), (4, 4), (2, 4)]
    x = torch.randn(10, 4)
    torch.testing.assert_close(small(x), net(x, masked), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("net", [mlp(5, [4], 2, activation="swish"), lenet5(), tiny_convnet(),
                                 build_network("mlp", (1, 6, 6), 3, [8])], ids=["mlp", "lenet5", "conv", "flat"])
def test_spec_round_trip(net):
    spec = json.loads(json.dumps(net.spec()))  # as saved in config.json
    back = Network.from_spec(spec)
    assert back.spec() == net.spec()
    assert back.sites() == net.sites()
    assert back.input_shape == net.input_shape
    params = random_params(net)
    x = torch.randn(2, *net.input_shape)
    assert torch.equal(back(x, params), net(x, params))


# -------------------------------------------------------------------------------------- sparsity
def test_sparsity_report_by_hand_dense():
    net = mlp(4, [3, 2], 2)  # 12+3 + 6+2 + 4+2 = 29 weights
    masks = group_masks(net, {"fc1": [1]})
    masks["fc1.weight"][0, 0] = False  # one more single weight
    masks["fc2.weight"] = torch.ones(2, 3, dtype=torch.bool)
    masks["fc2.weight"][1, 2] = False
    r = sparsity_report(net, masks)
    # fc1: row 1 (4) and w[0,0] gone, bias 1 gone -> 7 + 2 kept of 15
    # fc2: column 1 (fed by fc1's pruned unit: 2 weights) and w[1,2] gone -> 3 + 2 kept of 8
    # fc3: all 6 kept
    assert r["layers"]["fc1"]["weights_kept"] == 9
    assert r["layers"]["fc2"]["weights_kept"] == 5
    assert r["layers"]["fc3"]["weights_kept"] == 6
    assert (r["weights"], r["weights_kept"]) == (29, 20)
    assert r["weights_pruned_fraction"] == pytest.approx(9 / 29)
    assert r["compression_ratio"] == pytest.approx(29 / 20)
    assert r["architecture"] == "4-2-2-2"
    assert r["hidden_groups"] == 5
    assert r["hidden_groups_pruned_fraction"] == pytest.approx(1 / 5)
    assert r["layers"]["fc1"]["groups_pruned_fraction"] == pytest.approx(1 / 3)

    # now also remove unit 0 of fc2: its row and bias, and fc3's column 0
    masks["fc2.weight"][0] = False
    masks["fc2.bias"] = torch.tensor([False, True])
    r = sparsity_report(net, masks)
    # fc2 keeps w[1,0] and b[1]; fc3 keeps column 1 and both biases
    assert [r["layers"][n]["weights_kept"] for n in ("fc1", "fc2", "fc3")] == [9, 2, 4]
    assert r["weights_kept"] == 15
    assert r["architecture"] == "4-2-1-2"
    assert r["hidden_groups_pruned_fraction"] == pytest.approx(2 / 5)
    # the exported network holds exactly the weights of the kept groups
    small = net.to_torch(random_params(net), r["keep"])
    assert sum(p.numel() for p in small.parameters()) == (4 * 2 + 2) + (2 * 1 + 1) + (1 * 2 + 2)


def test_sparsity_report_by_hand_conv():
    net = tiny_convnet()
    r0 = sparsity_report(net, {})
    assert r0["weights_kept"] == r0["weights"] == net.num_weights()
    assert r0["architecture"] == "1x10x10-4-5-6-3"
    assert r0["hidden_groups_pruned_fraction"] == 0.0 and r0["compression_ratio"] == 1.0

    r = sparsity_report(net, group_masks(net, {"conv2": [1]}))
    # conv2 loses filter 1 (4*9 weights + 1 bias); fc1 loses the 4 flattened inputs (2x2 map) of that filter
    assert r["layers"]["conv2"]["weights_kept"] == 5 * 4 * 9 + 5 - 37
    assert r["layers"]["fc1"]["weights_kept"] == 6 * 20 + 6 - 6 * 4
    assert r["layers"]["conv1"]["weights_kept"] == 4 * 9 + 4
    assert r["weights"] - r["weights_kept"] == 37 + 24
    assert r["architecture"] == "1x10x10-4-4-6-3"
    assert r["hidden_groups"] == 4 + 5 + 6
    assert r["hidden_groups_pruned_fraction"] == pytest.approx(1 / 15)


def test_group_kept_while_bias_or_a_weight_survives():
    net = mlp(3, [2], 1)
    masks = {"fc1.weight": torch.zeros(2, 3, dtype=torch.bool), "fc1.bias": torch.tensor([True, False])}
    keep = group_keep(net, masks)
    assert keep["fc1"].tolist() == [True, False]
    masks["fc1.weight"][1, 2] = True
    assert group_keep(net, masks)["fc1"].tolist() == [True, True]
    assert math.isclose(sparsity_report(net, masks)["hidden_groups_pruned_fraction"], 0.0)
