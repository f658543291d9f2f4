"""Baselines: mean-field VI and MAP on MNIST train5k -> t10k and Boston housing.

Suite ``map-select``: how map's regression defaults were chosen, on validation data only
(:func:`benchmarks.select_defaults.select_defaults`: fit on 80% of each training split of the five
small UCI sets, a dense teacher and a near-linear set, score on the other 20%; the candidate with the
highest validation log-likelihood averaged over the sets is chosen). The candidates of
:data:`MAP_CANDIDATES` change one setting of the defaults each: the prior scale (weight decay), the
learning rate, and how many epochs the validation-chosen number may reach. Suite
``map-select-prior``, the same protocol: whether the prior's scale is the same in every layer or
divided by the square root of the layer's fan-in (:data:`MAP_PRIOR_CANDIDATES`). Suite
``map-select-prior-teachers``: the same candidates and ``meanfield-vi`` on the validation parts of
targets where every input is relevant (:func:`benchmarks.select_defaults.teacher_check`); the prior
is the candidate with the highest mean validation log-likelihood of ``map-select-prior`` among those
whose validation MSE stays within 20% of ``meanfield-vi``'s on every one of them
(:func:`benchmarks.select_defaults.choice_within_tolerance`), the rule that chose horseshoe-svi's
step size.
"""

from __future__ import annotations

from .harness import mnist_protocol, uci_protocol
from .select_defaults import select_defaults, teacher_check


def mnist(device) -> dict:
    out = {}
    for name in ("meanfield-vi", "map"):
        out[f"{name}-mnist-lenet-300-100"] = mnist_protocol(name, arch="lenet-300-100", device=device, epochs=20,
                                                            batch_size=128)
    return out


def boston(device) -> dict:
    return {f"{name}-boston": uci_protocol(name, "boston", device=device, baseline="adam", progress=True)
            for name in ("meanfield-vi", "map")}


#: the candidates of ``map-select`` (options over map's regression defaults)
MAP_CANDIDATES = {
    "defaults": {},
    "prior_scale 0.3": {"prior_scale": 0.3},
    "prior_scale 0.1": {"prior_scale": 0.1},
    "lr 1e-3, epochs <= 300": {"lr": 1e-3, "epochs": 300},
    "epochs <= 300, patience 30": {"epochs": 300, "patience": 30},
}


def map_select(device) -> dict:
    return select_defaults("map", MAP_CANDIDATES, "map-select", device)


#: the candidates of ``map-select-prior``: the prior scale the same in every layer (the former
#: default), or divided by the square root of the layer's fan-in, at three scales
MAP_PRIOR_CANDIDATES = {
    "absolute, s = 1 (former)": {"prior_scaling": "absolute", "prior_scale": 1.0},
    "fan_in, s = 0.5": {"prior_scaling": "fan_in", "prior_scale": 0.5},
    "fan_in, s = 1": {"prior_scaling": "fan_in", "prior_scale": 1.0},
    "fan_in, s = 2": {"prior_scaling": "fan_in", "prior_scale": 2.0},
}


def map_select_prior(device) -> dict:
    return select_defaults("map", MAP_PRIOR_CANDIDATES, "map-select-prior", device)


def map_select_prior_teachers(device) -> dict:
    return teacher_check("map", MAP_PRIOR_CANDIDATES, "map-select-prior-teachers", device)


SUITES = {"baselines-mnist": mnist, "baselines-boston": boston, "map-select": map_select,
          "map-select-prior": map_select_prior, "map-select-prior-teachers": map_select_prior_teachers}
