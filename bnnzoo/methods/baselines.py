"""The baselines users compare against: MAP and mean-field Gaussian VI (local reparameterisation).

Also the model builder the SVI and sampling entries share (:func:`build_network_of`, :func:`build_model`).
"""

from __future__ import annotations

from ..catalog import (
    CALIBRATED,
    NO_FOLDS,
    TRAINING_OPTIONS,
    VALIDATION_OFF,
    VALIDATION_OPTIONS,
    CatalogEntry,
    Option,
    register,
)
from ..guides import MeanFieldNormal, PointMass
from ..models import BayesianNeuralNetwork, GaussianPrior, make_likelihood
from ..models.likelihoods import FLOAT32_SCALE_RANGE
from ..models.module_network import ModuleNetwork
from ..models.networks import Network, build_network
from ..models.priors import SCALINGS
from ..networks import check_saved_sites, is_module_config, module_network
from ..variational import LR_SCHEDULE_OPTION, VariationalPosterior, check_lr_schedule


def build_network_of(config: dict) -> Network | ModuleNetwork:
    """The network a configuration describes: its ``network_spec`` where it carries one (a saved
    run's exact network), else built from ``network``, ``input_shape`` and ``output_dim``; a user's
    module (``network = {"arch": "module", ...}``) is the one supplied to this call
    (:func:`bnnzoo.networks.module_network`). The configuration is not modified."""
    if is_module_config(config):
        return module_network(config)
    saved = config.get("network_spec")
    if saved is not None and "layers" in saved:
        return Network.from_spec(saved)
    spec = config["network"]
    net = build_network(spec["arch"], tuple(config["input_shape"]), config["output_dim"], spec.get("hidden"),
                        spec.get("activation", "relu"))
    if saved is not None:  # a catalog module architecture, rebuilt by name: its sites must match
        check_saved_sites(net, saved, spec["arch"])
    return net


def build_model(config: dict, prior_factory) -> BayesianNeuralNetwork:
    """The Pyro model (network, ``prior_factory(net)``, likelihood) that a configuration describes
    (the configuration is not modified)."""
    net = build_network_of(config)
    lik_kwargs = {"noise_scale": config["model"]["noise_scale"]} if config["task"] == "regression" else {}
    return BayesianNeuralNetwork(net, prior_factory(net), make_likelihood(config["task"], **lik_kwargs))


def _create_meanfield(config: dict, device="cpu") -> VariationalPosterior:
    model = build_model(config, lambda net: GaussianPrior(net, config["model"]["prior_scale"]))
    guide = MeanFieldNormal(model, init_scale=config["guide"]["init_scale"])
    return VariationalPosterior(model, guide, name="meanfield-vi", config=config, device=device)


def _create_map(config: dict, device="cpu") -> VariationalPosterior:
    # a configuration saved before the option has the absolute scale it was fitted with
    scaling = config["model"].get("prior_scaling", "absolute")
    model = build_model(config, lambda net: GaussianPrior(net, config["model"]["prior_scale"], scaling))
    posterior = VariationalPosterior(model, PointMass(model), name="map", config=config, device=device)
    posterior.point_estimate = True  # a point mass: one draw for ArviZ, no ESS or LOO
    return posterior


#: the options of the Gaussian-prior SVI entries (map, meanfield-vi, and bmr's base)
def scale_option(help: str, **kwargs) -> Option:
    """The schema of a scale-like option (a standard deviation, a variance, a temperature): a float
    inside :data:`~bnnzoo.models.likelihoods.FLOAT32_SCALE_RANGE`, the values whose square and inverse
    square float32 can hold, so that a fit never starts from an overflowing variance or precision."""
    low, high = FLOAT32_SCALE_RANGE
    return Option(float, ge=low, le=high, help=help,
                  why="a scale outside it gives a variance or precision that float32 cannot hold", **kwargs)


GAUSSIAN_SVI_OPTIONS = {
    **TRAINING_OPTIONS,
    "lr_schedule": LR_SCHEDULE_OPTION,
    "prior_scale": scale_option(help="standard deviation of the N(0, s^2) prior on every weight and bias"),
    "noise_scale": scale_option(help="regression: the Gaussian noise scale the fit starts from (standardised "
                                            "targets); it is learned (null is refused)"),
    "init_scale": scale_option(help="the guide's initial standard deviation of every weight"),
    **VALIDATION_OPTIONS,
}

#: map's options: the Gaussian SVI entries' and how the prior's scale depends on the layer
MAP_OPTIONS = {
    **GAUSSIAN_SVI_OPTIONS,
    "prior_scaling": Option(str, choices=SCALINGS,
                            help="absolute: N(0, s^2) on every weight and bias; fan_in: N(0, s^2 / fan_in) in a "
                                 "layer whose neurons read fan_in inputs"),
}

_REGRESSION_TRAIN = {"epochs": 100, "batch_size": 32, "lr": 3e-3, **VALIDATION_OFF, **NO_FOLDS}
_CLASSIFICATION_TRAIN = {"epochs": 20, "batch_size": 128, "lr": 1e-3, "augment": None, **VALIDATION_OFF,
                         **NO_FOLDS}
#: map's regression prior: N(0, 2^2 / fan_in) per layer, chosen among the same scale in every
#: layer (the former N(0, 1)) and per fan-in scales on validation parts (suite ``map-select-prior``;
#: docs/methods/map-meanfield.md)
_MAP_REGRESSION_PRIOR = {"prior_scale": 2.0, "prior_scaling": "fan_in"}
#: MAP has no posterior spread to absorb a misfit: run to the end, it drives the learned noise below
#: the held-out residuals (Boston: validation LL best near epoch 30 of 100), so its epochs are chosen
#: on held-out rows, at most 300 at lr 1e-3 (suite ``map-select``), by the pooled score of five
#: folds run in step, each row held out once, which also sets the predictive noise
#: (docs/methods/map-meanfield.md)
_MAP_REGRESSION_TRAIN = {**_REGRESSION_TRAIN, "epochs": 300, "lr": 1e-3, "validation_fraction": 0.2, "select_folds": 5}

register(CatalogEntry(
    name="meanfield-vi",
    summary="Mean-field Gaussian VI (Bayes by backprop) with local reparameterisation and analytic KL",
    paper="Blundell et al. 2015, Weight uncertainty in neural networks; Kingma, Salimans & Welling 2015, "
          "Variational dropout and the local reparameterization trick",
    tasks=("regression", "classification"),
    create=_create_meanfield,
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5}, "guide": {"init_scale": 1e-3},
                       "train": {**_REGRESSION_TRAIN, "lr_schedule": "constant"}},
        "classification": {"model": {"prior_scale": 1.0}, "guide": {"init_scale": 1e-3},
                           "train": {**_CLASSIFICATION_TRAIN, "lr_schedule": "constant", **CALIBRATED}},
    },
    options=GAUSSIAN_SVI_OPTIONS,
    checks=(check_lr_schedule,),
))

register(CatalogEntry(
    name="map",
    summary="Maximum a posteriori weights under a Gaussian prior (weight decay), a point-mass guide",
    paper="MacKay 1992, A practical Bayesian framework for backpropagation networks",
    tasks=("regression", "classification"),
    create=_create_map,
    defaults={
        "regression": {"model": {**_MAP_REGRESSION_PRIOR, "noise_scale": 0.5},
                       "guide": {}, "train": dict(_MAP_REGRESSION_TRAIN)},
        "classification": {"model": {"prior_scale": 1.0, "prior_scaling": "absolute"}, "guide": {},
                           "train": dict(_CLASSIFICATION_TRAIN)},
    },
    options=MAP_OPTIONS,
))
