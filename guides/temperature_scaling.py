"""Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") of a
classification predictive given by its class probabilities.

With ``p(k | x)`` the predictive class probabilities (for a Bayesian network, the posterior
predictive: the average over posterior draws of each draw's class probabilities), the tempered
predictive is

    p_T(k | x) = p(k | x)^(1/T) / sum_j p(j | x)^(1/T) = softmax(log p(. | x) / T)_k,

the softmax of the predictive's log-probabilities divided by ``T``. The temperature ``T > 0`` is the
one that maximises the mean log density ``mean_n log p_T(y_n | x_n)`` of held-out labelled points:
one scalar, fitted on data the posterior did not see, so it corrects a predictive that is over-
(``T > 1``) or under-confident (``T < 1``) on average and leaves every prediction's ranking of the
classes, hence its accuracy, unchanged. The objective is smooth and, in ``log T``, has one
maximum (it is the log-likelihood of an exponential family in ``1/T``); it is maximised by L-BFGS
with a strong-Wolfe line search (``torch.optim.LBFGS``) on the inputs' device, from ``T = 1``.
"""

from __future__ import annotations

import math

import torch

#: the temperatures the fit may return (a held-out set that is predicted perfectly, or not at all,
#: would push ``T`` to 0 or infinity)
TEMPERATURE_RANGE = (1e-2, 1e2)


def tempered_log_probs(log_probs: torch.Tensor, temperature) -> torch.Tensor:
    """``log p_T(k | x_n)`` for the predictive's log-probabilities ``log_probs`` ``(N, K)`` at
    ``temperature`` (a float or a 0-d tensor, differentiable): ``log_softmax(log_probs / T)``."""
    return torch.log_softmax(log_probs / temperature, dim=-1)


def fit_temperature(log_probs: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` in :data:`TEMPERATURE_RANGE` that maximises the mean log density
    ``mean_n log p_T(y_n | x_n)`` (:func:`tempered_log_probs`) of ``N`` held-out points, given the
    predictive's log-probabilities ``log_probs`` ``(N, K)`` (finite, or ``-inf`` for a class of
    probability 0) and their labels ``y`` ``(N,)``.

    Raises ``ValueError`` for mismatched shapes, no points, or NaN / ``+inf`` log-probabilities."""
    if log_probs.dim() != 2 or y.dim() != 1 or log_probs.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"fit_temperature needs log-probabilities (N, K) and labels (N,) with N >= 1, got "
                         f"{tuple(log_probs.shape)} and {tuple(y.shape)}")
    if torch.isnan(log_probs).any() or (log_probs == math.inf).any():
        raise ValueError("fit_temperature: the log-probabilities hold NaN or +inf")
    # a class of probability 0 stays at 0 at every temperature; a large finite floor keeps the
    # arithmetic finite without moving the others
    log_probs = log_probs.detach().clamp_min(torch.finfo(log_probs.dtype).min / 1e4)
    y = y.to(log_probs.device).long()
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    log_t = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        tempered = tempered_log_probs(log_probs, log_t.clamp(low, high).exp())
        loss = -tempered.gather(-1, y.unsqueeze(-1)).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(low, high).exp())
