"""bnnzoo: a catalog of sparse Bayesian neural networks on Pyro and PyTorch.

Pick a model by name (:func:`list_models`), :func:`fit` it, then ``predict``, ``evaluate``,
``sparsity``, ``save`` and :func:`load` the returned :class:`Posterior`.
"""

__version__ = "0.1.0"

from .api import create, fit, load
from .catalog import get_entry, list_models
from .data import Dataset, load_dataset
from .posterior import Posterior, Prediction

__all__ = ["Dataset", "Posterior", "Prediction", "create", "fit", "get_entry", "list_models", "load", "load_dataset"]
