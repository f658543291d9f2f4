"""``train.lr_schedule`` of the SVI entries: the learning rate of every epoch, and a cosine fit's resume."""

import math

import pytest
import torch

import bnnzoo
from bnnzoo.errors import ConfigError
from bnnzoo.guides import training


def _data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1) + 0.1 * torch.randn(n, generator=g)


def _capture_optimizer(monkeypatch) -> dict:
    """``{"optimizer": ...}``, filled with the Adam optimiser of the next SVI fit."""
    seen, real = {}, training.make_adam

    def make_adam(params, lr):
        seen["optimizer"] = real(params, lr)
        return seen["optimizer"]

    monkeypatch.setattr(training, "make_adam", make_adam)
    return seen


def _rates_per_epoch(monkeypatch, name: str, epochs: int, **options) -> list[float]:
    """The learning rate of each epoch of a fit of ``name``: the optimiser's rate when the epoch starts."""
    seen = _capture_optimizer(monkeypatch)
    rates = []
    real_minibatches = training.minibatches

    def minibatches(*args, **kwargs):
        rates.append(seen["optimizer"].param_groups[0]["lr"])
        yield from real_minibatches(*args, **kwargs)

    monkeypatch.setattr(training, "minibatches", minibatches)
    x, y = _data()
    post = bnnzoo.create(name, "regression", (3,), 1, seed=0, epochs=epochs, batch_size=10,
                         network={"arch": "mlp", "hidden": [4]}, **options)
    post.fit(x, y, progress=False)
    return rates


@pytest.mark.parametrize("name", ["horseshoe-svi", "meanfield-vi"])
def test_cosine_anneals_the_rate_along_half_a_cosine(monkeypatch, name):
    epochs, lr = 8, 0.01
    rates = _rates_per_epoch(monkeypatch, name, epochs, lr=lr, lr_schedule="cosine", **_no_prune(name))
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert rates[0] == lr and rates[-1] < 0.05 * lr


@pytest.mark.parametrize("name", ["horseshoe-svi", "meanfield-vi"])
def test_constant_keeps_the_rate(monkeypatch, name):
    rates = _rates_per_epoch(monkeypatch, name, 5, lr=0.01, lr_schedule="constant", **_no_prune(name))
    assert rates == [0.01] * 5


def _no_prune(name: str) -> dict:
    return {"prune": False} if name == "horseshoe-svi" else {}


def test_a_bad_schedule_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="lr_schedule.*'constant', 'cosine'"):
        bnnzoo.create("horseshoe-svi", "regression", (3,), 1, lr_schedule="linear")
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        training.lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "step", 3)


def test_a_configuration_saved_without_the_option_trains_at_a_constant_rate(monkeypatch):
    # a run saved before the option existed has no lr_schedule in its train section
    x, y = _data()
    post = bnnzoo.create("meanfield-vi", "regression", (3,), 1, seed=0, epochs=3, batch_size=10,
                         network={"arch": "mlp", "hidden": [4]})
    del post.config["train"]["lr_schedule"]
    seen = _capture_optimizer(monkeypatch)
    post.fit(x, y, progress=False)
    assert seen["optimizer"].param_groups[0]["lr"] == post.config["train"]["lr"]


def test_cosine_is_refused_where_the_epochs_are_chosen_on_held_out_rows():
    with pytest.raises(ConfigError, match="anneals over the fit's epochs"):
        bnnzoo.create("meanfield-vi", "regression", (3,), 1, lr_schedule="cosine", validation_fraction=0.2)
    with pytest.raises(ConfigError, match="anneals over the fit's epochs"):
        bnnzoo.create("meanfield-vi", "regression", (3,), 1, lr_schedule="cosine", validation_fraction=0.2,
                      select_folds=5)
    # held-out rows that choose no epochs (a calibrated classification fit) are fine
    post = bnnzoo.create("horseshoe-svi", "classification", (3,), 4, lr_schedule="cosine")
    assert post.config["train"]["lr_schedule"] == "cosine"
