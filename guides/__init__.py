"""How each posterior is found: guides (and, later, kernels) over a network's weights.

Import as ``bnnzoo.guides``.
"""

from . import (  # closed_form_kl registers the closed-form KLs with torch
           bmr,
           closed_form_kl,
)
from .delta import PointMass
from .elbo import LocalReparamELBO
from .horseshoe import HorseshoeGuide
from .meanfield import MeanFieldNormal, kl_normal_zero_mean
from .sghmc import SGHMC
from .spike_slab_em import SpikeSlabEM
from .tdamp import TDAMPGuide
from .tempered_elbo import TemperedLocalReparamELBO, untempered_variance
from .weight_guide import WeightGuide

__all__ = ["bmr", "HorseshoeGuide", "LocalReparamELBO", "MeanFieldNormal", "PointMass", "SGHMC", "SpikeSlabEM", "TDAMPGuide", "TemperedLocalReparamELBO", "untempered_variance",
           "WeightGuide", "kl_normal_zero_mean"]
