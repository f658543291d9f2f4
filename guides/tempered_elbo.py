"""The local-reparameterisation ELBO with a weight on its KL term (a tempered posterior)."""

from __future__ import annotations

import math

import torch

from ..models.likelihoods import GaussianLikelihood
from .elbo import LocalReparamELBO

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ScaledGaussianNLL(torch.autograd.Function):
    """``-weight * sum_n log N(y_n | f_n, exp(log_noise)^2)`` in one autograd node (the same formula as
    :meth:`GaussianLikelihood.log_prob <bnnzoo.models.GaussianLikelihood.log_prob>`, summed)."""

    @staticmethod
    def forward(ctx, f, y, log_noise, weight: float):
        r = y - f.reshape(y.shape)
        inv_var = torch.exp(-2 * log_noise)
        sq = torch.dot(r, r)
        ctx.save_for_backward(r, inv_var, sq)
        ctx.weight, ctx.f_shape = weight, f.shape
        return weight * (0.5 * inv_var * sq + len(r) * (log_noise + _HALF_LOG_2PI))

    @staticmethod
    def backward(ctx, g):
        r, inv_var, sq = ctx.saved_tensors
        gw = g * ctx.weight
        d_f = (r * (-gw * inv_var)).reshape(ctx.f_shape) if ctx.needs_input_grad[0] else None
        d_log_noise = gw * (len(r) - inv_var * sq) if ctx.needs_input_grad[2] else None
        return d_f, None, d_log_noise, None


def untempered_variance(variance, kl_weight: float, prior_variance=math.inf):
    """The variance a Gaussian factor of ``q`` would have without tempering.

    A Gaussian factor fitted with the KL weighted by ``kl_weight = T`` has precision
    ``1/v_T = P0 + H/T`` (prior precision ``P0 = 1/prior_variance`` plus the likelihood's curvature
    ``H``, counted ``1/T`` times); the untempered posterior has ``P0 + H``, so

        1/v_1 = T/v_T + (1 - T) P0.

    Exact for a Gaussian prior and a Gaussian (or locally quadratic) likelihood. A factor the data
    leave at the prior keeps the prior variance; one the data dominate widens by ``1/T``. With
    ``prior_variance = inf`` (a flat prior) it is ``v_T / T``.
    """
    if not kl_weight > 0:
        raise ValueError(f"kl_weight must be positive, got {kl_weight}")
    return 1.0 / (kl_weight / variance + (1.0 - kl_weight) / prior_variance)


class TemperedLocalReparamELBO(LocalReparamELBO):
    """``loss = kl_weight * KL(q || p) - (N / B) sum_batch log p(y_n | f_n)``.

    With ``kl_weight = 1`` this is :class:`~bnnzoo.guides.LocalReparamELBO` (the negative ELBO). A
    weight ``T < 1`` fits the tempered posterior ``p(w | D)^(1/T)``-style target in which the
    likelihood counts ``1/T`` times (a "cold posterior", Wenzel et al. 2020); in Pyro terms it is
    ``TraceMeanField_ELBO`` with every latent site of model and guide under ``poutine.scale(T)``.
    A Gaussian likelihood's term is computed in one autograd node (small networks spend most of a
    step on per-operation overhead); a guide with a ``gaussian_loss(x, y, log_noise, nll_weight,
    kl_weight)`` method (:class:`~bnnzoo.guides.HorseshoeGuide`) may compute the whole loss in one
    node, returning ``None`` where it cannot.
    """

    def __init__(self, kl_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not kl_weight > 0:
            raise ValueError(f"kl_weight must be positive, got {kl_weight}")
        self.kl_weight = float(kl_weight)

    def differentiable_loss(self, model, guide, x, y, num_data=None):
        num_data = len(x) if num_data is None else num_data
        likelihood = model.likelihood
        fast = type(likelihood) is GaussianLikelihood and y.dim() == 1
        losses = []
        fused = getattr(guide, "gaussian_loss", None) if fast else None
        for _ in range(self.num_particles):
            if fused is not None:  # the guide computes the whole loss in one autograd node where it can
                loss = fused(x, y, likelihood.log_noise_scale, num_data / len(x), self.kl_weight)
                if loss is not None:
                    losses.append(loss)
                    continue
            f, kl = guide.sample_outputs_and_kl(model, x)
            if fast:
                nll = ScaledGaussianNLL.apply(f, y, likelihood.log_noise_scale, num_data / len(x))
            else:
                nll = likelihood.log_prob(f, y).sum() * (-num_data / len(x))
            losses.append(torch.add(nll, kl, alpha=self.kl_weight))
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
