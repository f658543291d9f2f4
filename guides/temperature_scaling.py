"""Temperature scaling of a classification predictive (Guo et al. 2017, "On calibration of modern
neural networks"), for a predictive that averages the softmax over posterior draws.

With ``S`` draws of the logits ``f_s(x)`` the tempered predictive is

    p_T(y | x) = (1/S) sum_s softmax(f_s(x) / T)_y,

and the temperature ``T > 0`` is the one that maximises the mean log predictive density of held-out
labelled points, ``mean_n log p_T(y_n | x_n)``: one scalar, fitted on data the posterior did not
see, so it corrects a predictive that is over- (``T > 1``) or under-confident (``T < 1``) on average
and leaves every argmax, hence the accuracy of each draw, unchanged. The objective is smooth in
``log T``; it is minimised by L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``) on the
logits' device, from ``T = 1``.
"""

from __future__ import annotations

import math

import torch

#: the temperatures the fit may return (a held-out set that is predicted perfectly, or not at all,
#: would push ``T`` to 0 or infinity)
TEMPERATURE_RANGE = (1e-2, 1e2)


def tempered_log_predictive(logits: torch.Tensor, y: torch.Tensor, temperature) -> torch.Tensor:
    """Pointwise ``log p_T(y_n | x_n)`` of the draw-averaged softmax at ``temperature`` (a float or
    a 0-d tensor, differentiable), for ``logits`` of shape ``(S, N, K)`` and labels ``y`` ``(N,)``."""
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    picked = log_probs.gather(-1, y.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(picked, dim=0) - math.log(logits.shape[0])


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` in :data:`TEMPERATURE_RANGE` that maximises the mean held-out log
    predictive density :func:`tempered_log_predictive` of ``logits`` ``(S, N, K)`` (``S`` posterior
    draws of the logits of ``N`` held-out points) with labels ``y`` ``(N,)``.

    Raises ``ValueError`` for mismatched shapes, no points, or non-finite logits."""
    if logits.dim() != 3 or y.dim() != 1 or logits.shape[1] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"fit_temperature needs logits (S, N, K) and labels (N,) with N >= 1, got "
                         f"{tuple(logits.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("fit_temperature: the logits are not all finite")
    logits = logits.detach()
    y = y.to(logits.device)
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    log_t = torch.zeros((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = -tempered_log_predictive(logits, y, log_t.clamp(low, high).exp()).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(low, high).exp())
