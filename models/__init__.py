"""Pyro models of bnnzoo: priors over a network's weights and likelihoods for its outputs.

A model says what is believed; it knows nothing of how it is fitted. Import as ``bnnzoo.models``.
"""

from .bnn import BayesianNeuralNetwork
from .likelihoods import CategoricalLikelihood, GaussianLikelihood, Likelihood, make_likelihood
from .priors import GaussianPrior

__all__ = [
    "BayesianNeuralNetwork",
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "GaussianPrior",
    "Likelihood",
    "make_likelihood",
]
