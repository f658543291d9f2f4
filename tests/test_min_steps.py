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
