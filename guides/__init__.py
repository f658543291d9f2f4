"""How each posterior is found: guides over a network's weights, the loops that fit them, and
Bayesian model reduction of a guide with Gaussian weights (:mod:`bnnzoo.guides.bmr`).

Import as ``bnnzoo.guides``; of the rest of bnnzoo it imports only the layer below, ``bnnzoo.models``.
"""

from . import (
    bmr,
    bmr_rhs,
    closed_form_kl,  # noqa: F401  (registers the closed-form KLs with torch)
    predictive_moments,
    temperature_scaling,
)
from .delta import PointMass
from .elbo import LocalReparamELBO
from .horseshoe import HorseshoeGuide
from .meanfield import MeanFieldNormal, kl_normal_zero_mean
from .sghmc import SGHMC
from .spike_slab_em import SpikeSlabEM
from .tdamp import TDAMPGuide
from .tempered_elbo import TemperedLocalReparamELBO, untempered_variance
from .weight_guide import PyroAutoGuide, WeightGuide

__all__ = [
    "SGHMC",
    "HorseshoeGuide",
    "LocalReparamELBO",
    "MeanFieldNormal",
    "PointMass",
    "PyroAutoGuide",
    "SpikeSlabEM",
    "TDAMPGuide",
    "TemperedLocalReparamELBO",
    "WeightGuide",
    "bmr",
    "bmr_rhs",
    "kl_normal_zero_mean",
    "predictive_moments",
    "temperature_scaling",
    "untempered_variance",
]
