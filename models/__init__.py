"""Pyro models of bnnzoo: priors over a network's weights and likelihoods for its outputs.

A model says what is believed; it knows nothing of how it is fitted. Import as ``bnnzoo.models``.
"""

from .bernoulli_gaussian import BernoulliGaussianPrior, GroupBernoulliGaussian
from .bnn import BayesianNeuralNetwork
from .horseshoe import HorseshoePrior
from .likelihoods import (
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    make_likelihood,
)
from .module_network import ModuleNetwork
from .priors import GaussianPrior
from .probit_product import ProbitProduct, ProbitProductLikelihood
from .spike_slab import SpikeSlabPrior

__all__ = [
    "BayesianNeuralNetwork",
    "BernoulliGaussianPrior",
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "GaussianPrior",
    "GroupBernoulliGaussian",
    "HorseshoePrior",
    "Likelihood",
    "ModuleNetwork",
    "ProbitProduct",
    "ProbitProductLikelihood",
    "SpikeSlabPrior",
    "make_likelihood",
]
