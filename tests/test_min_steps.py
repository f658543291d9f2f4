"""``train.min_steps``: the number of epochs as a rule of the number of training rows."""

import pytest
import torch

import bnnzoo


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1) + 0.1 * torch.randn(n, generator=g)


@pytest.mark.parametrize(("rows", "expected"), [(20, 3), (40, 2), (400, 2)])
def test_min_steps_raises_the_epochs_of_a_small_data_set(rows, expected):
    # batch 10: 2, 4 and 40 steps per epoch; at least 6 steps and 2 epochs
    x, y = _data(rows)
    post = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, seed=0, epochs=2, min_steps=6, batch_size=10,
                         network={"arch": "mlp", "hidden": [4]}, prune=False)
    post.fit(x, y, progress=False)
    assert post.fit_epochs == expected
    assert len(post.history.loss) == expected


def test_without_min_steps_the_fit_runs_its_epochs():
    x, y = _data(20)
    post = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, seed=0, epochs=2, batch_size=10,
                         network={"arch": "mlp", "hidden": [4]}, prune=False)
    post.fit(x, y, progress=False)
    assert post.fit_epochs == 2 and len(post.history.loss) == 2


def test_asked_for_epochs_switch_the_default_rule_off():
    default = bnnzoo.create("horseshoe-svi", "regression", (3,), 1)
    assert default.config["train"]["min_steps"] == 6000
    asked = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, epochs=5)
    assert asked.config["train"]["min_steps"] is None
    both = bnnzoo.create("horseshoe-svi", "regression", (3,), 1, epochs=5, min_steps=100)
    assert both.config["train"]["min_steps"] == 100


def _spike_slab(**options):
    # batch 10; cycles of 4 // 2 = 2 epochs, the last state of each cycle kept, one warm-up cycle
    return bnnzoo.create("spike-slab-sghmc", "regression", (3,), 1, seed=0, epochs=4, cycles=2, batch_size=10,
                         samples_per_cycle=1, thinning=1, em_start=1, prune_start=1,
                         network={"arch": "mlp", "hidden": [4]}, **options)


@pytest.mark.parametrize(("rows", "cycles"), [(20, 3), (30, 2), (200, 2)])
def test_spike_slab_min_steps_adds_cycles_on_few_rows(rows, cycles):
    # 2, 3 and 20 steps per epoch, 4, 6 and 40 a cycle: at least 12 steps takes 3, 2 and 2 cycles
    x, y = _data(rows)
    post = _spike_slab(min_steps=12)
    assert post.schedule(rows)["cycles"] == cycles
    post.fit(x, y, progress=False)
    assert len(post.history.loss) == 2 * cycles  # epochs run: whole cycles of two epochs
    assert all(v.shape[1] == cycles - 1 for v in post.samples.values())  # one state per cycle after warm-up


def test_spike_slab_asked_for_epochs_or_cycles_switch_the_rule_off():
    assert _spike_slab().config["train"]["min_steps"] is None  # epochs and cycles were asked for
    default = bnnzoo.create("spike-slab-sghmc", "regression", (3,), 1)
    assert default.config["train"]["min_steps"] == 36000
    # batch 32: 455 rows (Boston) make 15 steps an epoch, 1,500 a cycle of 100 epochs: 24 cycles;
    # 45,730 rows (protein) make 1,430 an epoch: the 6 cycles run 858,000 steps
    assert default.schedule(455)["cycles"] == 24 and default.schedule(45730)["cycles"] == 6
    for asked in ({"cycles": 3}, {"epochs": 300}):
        assert bnnzoo.create("spike-slab-sghmc", "regression", (3,), 1, **asked).config["train"]["min_steps"] is None
