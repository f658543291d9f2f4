"""The server's aggregation of local posteriors (federated EM-TDAMP).

Gaussian posteriors combine by a weighted product (a weighted geometric mean when the weights sum
to one): for client posteriors ``N(m_k, v_k)`` and weights ``w_k``,

    precision = sum_k w_k / v_k ;  mean = (sum_k w_k m_k / v_k) / precision.

With a shared prior ``N(m_0, v_0)`` (the global posterior every client started from) it enters with
weight ``1 - sum_k w_k``: with ``w_k = 1`` this is the product of the clients' posteriors divided by
the prior counted ``K - 1`` times too often, i.e. the prior times every client's likelihood.

Inclusion probabilities combine as a product of odds, in log-odds the same weighted sum:

    logit p = sum_k w_k logit p_k + (1 - sum_k w_k) logit p_0.

Pure torch, elementwise over any shape; the client axis is the first.
"""

from __future__ import annotations

import torch


def _weights(weights, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() != 1 or len(w) != like.shape[0]:
        raise ValueError(f"need one weight per client ({like.shape[0]}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("client weights must be finite and non-negative")
    return w.reshape((-1,) + (1,) * (like.dim() - 1))


def gaussian_product(means: torch.Tensor, variances: torch.Tensor, weights, prior_mean: torch.Tensor | None = None,
                     prior_var: torch.Tensor | None = None, min_precision: float | torch.Tensor = 0.0):
    """The weighted product of Gaussians ``prod_k N(m_k, v_k)^{w_k}`` (times the prior to the power
    ``1 - sum w_k`` when ``prior_mean``/``prior_var`` are given), normalised: ``(mean, variance)``.

    ``means``/``variances`` are ``(K, ...)``; the precision is floored at ``min_precision`` (e.g.
    the prior precision ``1/sigma^2`` of a slab posterior), so a product whose precision would not
    be positive stays a proper Gaussian.
    """
    if means.shape != variances.shape or means.dim() < 1:
        raise ValueError(f"means {tuple(means.shape)} and variances {tuple(variances.shape)} must match, "
                         "clients on the first axis")
    if bool((variances <= 0).any()):
        raise ValueError("client variances must be positive")
    w = _weights(weights, means)
    precision = (w / variances).sum(0)
    eta = (w * means / variances).sum(0)
    if (prior_mean is None) != (prior_var is None):
        raise ValueError("give both prior_mean and prior_var, or neither")
    if prior_mean is not None:
        rest = 1.0 - w.sum(0)
        precision = precision + rest / prior_var
        eta = eta + rest * prior_mean / prior_var
    floor = torch.as_tensor(min_precision, dtype=precision.dtype, device=precision.device)
    floor = torch.maximum(floor, torch.full_like(floor, torch.finfo(precision.dtype).tiny))
    precision = torch.maximum(precision, floor)
    return eta / precision, precision.reciprocal()


def product_of_odds(probs: torch.Tensor, weights, prior: torch.Tensor | None = None, eps: float = 1e-7) -> torch.Tensor:
    """Inclusion probabilities combined as a weighted product of odds (the prior ``prior`` with
    weight ``1 - sum w_k`` when given). Probabilities are clamped to ``[eps, 1 - eps]`` first."""
    w = _weights(weights, probs)
    log_odds = (w * torch.logit(probs, eps)).sum(0)
    if prior is not None:
        log_odds = log_odds + (1.0 - w.sum(0)) * torch.logit(prior, eps)
    return torch.sigmoid(log_odds)
