"""bnnzoo: a catalog of sparse Bayesian neural networks on Pyro and PyTorch.

Pick a model by name (:func:`list_models`), :func:`fit` it, then ``predict``, ``evaluate``,
``sparsity``, ``save`` and :func:`load` the returned :class:`Posterior`.

Importing the package registers the built-in catalog entries: each module of :mod:`bnnzoo.methods`
registers its own with :func:`bnnzoo.catalog.register` when imported.
"""

__version__ = "0.1.0"

from .api import BuiltModel, build, create, fit, load
from .catalog import get_entry, list_models
from .data import Dataset, load_dataset
from .methods import (  # importing each registers its catalog entries
    baselines,
    bmr,
    horseshoe,
    spike_slab,
    tdamp,
)
from .posterior import Posterior, Prediction

del baselines, bmr, horseshoe, spike_slab, tdamp  # the method modules stay out of this namespace

__all__ = ["BuiltModel", "Dataset", "Posterior", "Prediction", "build", "create", "fit", "get_entry", "list_models", "load", "load_dataset"]
