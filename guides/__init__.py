"""How each posterior is found: guides (and, later, kernels) over a network's weights.

Import as ``bnnzoo.guides``.
"""

from .delta import PointMass
from .elbo import LocalReparamELBO
from .meanfield import MeanFieldNormal, kl_normal_zero_mean
from .weight_guide import WeightGuide

__all__ = ["LocalReparamELBO", "MeanFieldNormal", "PointMass", "WeightGuide", "kl_normal_zero_mean"]
