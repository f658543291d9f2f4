"""Module B of TDAMP: exact sum-product on the group-sparse Bernoulli-Gaussian prior.

Group ``g`` (one neuron: a weight row and its bias entry) has the prior

    p(W_g) = rho_g N(W_g; 0, sigma_g^2 I) + (1 - rho_g) delta(W_g)

and every weight ``i`` of the group receives a Gaussian message ``N(w_i; mu_i, t_i)`` from Module A,
held in natural parameters (precision ``lam = 1/t``, precision-mean ``eta = mu/t``; ``lam = 0`` is
a flat message). The factor graph of one group is a tree (the indicator ``s_g`` joined to each
weight), so sum-product is exact:

    log LR_i   = log N(0; mu_i, t_i + sigma^2) - log N(0; mu_i, t_i)
               = -1/2 log(1 + sigma^2 lam_i) + 1/2 eta_i^2 sigma^2 / (1 + sigma^2 lam_i)
    logit P(s_g = 1 | messages) = logit rho_g + sum_{i in g} log LR_i
    extrinsic (to weight i):      logit pi_{g\\i} = logit rho_g + sum_{j != i} log LR_j   (leave-one-out)

Weight ``i``'s posterior is its extrinsic prior ``pi_{g\\i} N(0, sigma^2) + (1 - pi_{g\\i}) delta``
times its own message: inclusion ``pi' = P(s_g = 1 | messages)`` (the same for every weight of the
group) and, on the slab, ``N(sigma^2 eta / (1 + sigma^2 lam), sigma^2 / (1 + sigma^2 lam))``:

    mean = pi' m_slab ;  var = pi' (v_slab + m_slab^2) - mean^2

Everything is computed in log-odds, so no probability underflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _per_group(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-group tensor ``(K,)`` against per-weight ``like`` ``(K, ...)``."""
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def _slab_terms(eta: torch.Tensor, lam: torch.Tensor, slab_var: torch.Tensor):
    """Slab posterior mean ``m`` and variance ``v`` and ``eta m - log P``, sharing their terms: with
    the slab precision ``P = lam + 1/s^2``, ``v = 1/P``, ``m = eta / P`` and
    ``log LR = (eta m - log P - log s^2) / 2`` (as ``log(1 + s^2 lam) = log s^2 + log P``)."""
    precision = lam + _per_group(slab_var.reciprocal(), eta)
    var = precision.reciprocal()
    mean = var * eta
    return mean, var, eta * mean - torch.log(precision)


def _slab_terms_into(eta: torch.Tensor, lam: torch.Tensor, slab_var: torch.Tensor, out: dict[str, torch.Tensor]):
    """:func:`_slab_terms` for a ``(K, n)`` layer written into the preallocated tensors of ``out``
    (:func:`make_workspace`), returning the per-group sums ``sum_i (eta_i m_i - log P_i)`` instead
    of the elementwise terms (row sums as matrix-vector products with ``out["ones"]``)."""
    precision, var, mean, scratch, ones = out["precision"], out["var"], out["mean"], out["terms"], out["ones"]
    torch.add(lam, _per_group(slab_var.reciprocal(), eta), out=precision)
    torch.reciprocal(precision, out=var)
    torch.mul(var, eta, out=mean)
    log_sum = torch.mv(torch.log(precision, out=scratch), ones)
    return mean, var, torch.mv(torch.mul(eta, mean, out=scratch), ones) - log_sum


def log_likelihood_ratio(eta: torch.Tensor, lam: torch.Tensor, slab_var: torch.Tensor) -> torch.Tensor:
    """``log N(0; mu, t + s^2) - log N(0; mu, t)`` for a message ``N(mu, t)`` in natural parameters."""
    return 0.5 * (_slab_terms(eta, lam, slab_var)[2] - _per_group(torch.log(slab_var), eta))


def slab_posterior(eta: torch.Tensor, lam: torch.Tensor, slab_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``N(0, s^2)`` times the message: mean ``s^2 eta / (1 + s^2 lam)``, variance ``s^2 / (1 + s^2 lam)``."""
    mean, var, _ = _slab_terms(eta, lam, slab_var)
    return mean, var


def group_log_odds(logit_rho: torch.Tensor, *log_lrs: torch.Tensor) -> torch.Tensor:
    """``logit P(s_g = 1 | messages)``: the prior log-odds plus every weight's log LR of the group
    (each ``log_lr`` has the group on its first axis: a weight row ``(K, I)`` or a bias ``(K,)``)."""
    out = logit_rho
    for llr in log_lrs:
        out = out + llr.reshape(llr.shape[0], -1).sum(1)
    return out


def extrinsic_log_odds(posterior_log_odds: torch.Tensor, log_lr: torch.Tensor) -> torch.Tensor:
    """Leave-one-out log-odds sent to each weight: the group's log-odds without its own log LR."""
    return _per_group(posterior_log_odds, log_lr) - log_lr


def bernoulli_gaussian_posterior(prior_log_odds: torch.Tensor, eta: torch.Tensor, lam: torch.Tensor,
                                 slab_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One weight with prior ``pi N(0, s^2) + (1 - pi) delta`` (``prior_log_odds = logit pi``,
    per weight) times the message ``(eta, lam)``: posterior log-odds, mean and variance."""
    post = prior_log_odds + log_likelihood_ratio(eta, lam, slab_var)
    m, v = slab_posterior(eta, lam, slab_var)
    pi = torch.sigmoid(post)
    mean = pi * m
    return post, mean, pi * v + pi * (1.0 - pi) * m * m


@dataclass
class GroupPosterior:
    """Module B's output for one layer: per group the inclusion log-odds, per weight and bias the
    slab posterior and the Bernoulli-Gaussian posterior mean and variance."""

    log_odds: torch.Tensor
    weight_slab: tuple[torch.Tensor, torch.Tensor]
    bias_slab: tuple[torch.Tensor, torch.Tensor] | None
    weight_moments: tuple[torch.Tensor, torch.Tensor]
    bias_moments: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def inclusion(self) -> torch.Tensor:
        return torch.sigmoid(self.log_odds)


def _moments(pi: torch.Tensor, slab: tuple[torch.Tensor, torch.Tensor],
             out: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``pi m`` and variance ``pi (v + (1 - pi) m^2)`` of ``pi N(m, v) + (1 - pi) delta``."""
    m, v = slab
    pi = _per_group(pi, m)
    if out is None:
        return pi * m, pi * torch.addcmul(v, m * m, 1.0 - pi)
    mean, var = out["post_mean"], out["post_var"]
    torch.mul(m, pi, out=mean)
    torch.mul(m, 1.0 - pi, out=var).mul_(mean).addcmul_(v, pi)  # (1 - pi) m (pi m) + pi v
    return mean, var


def group_posterior(logit_rho: torch.Tensor, slab_var: torch.Tensor, weight_eta: torch.Tensor,
                    weight_lam: torch.Tensor, bias_eta: torch.Tensor | None = None, bias_lam: torch.Tensor | None = None,
                    keep: torch.Tensor | None = None, workspace: dict[str, torch.Tensor] | None = None,
                    ) -> GroupPosterior:
    """Sum-product on one layer's groups (rows of ``weight_*``, with the matching ``bias_*`` entries
    when given).

    ``logit_rho`` and ``slab_var`` are per group ``(K,)``; ``keep`` (bool ``(K,)``), if given, fixes
    the groups it excludes at the spike (pruned: inclusion 0). ``workspace`` (see
    :func:`make_workspace`), if given, receives the weight tensors of the result, which are then
    overwritten by the next call with the same workspace.
    """
    if workspace is None:
        w_m, w_v, w_terms = _slab_terms(weight_eta, weight_lam, slab_var)
        terms = w_terms.reshape(len(logit_rho), -1).sum(1)
    else:
        w_m, w_v, terms = _slab_terms_into(weight_eta, weight_lam, slab_var, workspace)
    size = w_m[0].numel()  # weights per group
    if bias_eta is not None:
        b_m, b_v, b_terms = _slab_terms(bias_eta, bias_lam, slab_var)
        terms = terms + b_terms
        size += 1
    log_odds = logit_rho + 0.5 * (terms - size * torch.log(slab_var))
    if keep is not None:
        log_odds = log_odds.masked_fill(~keep, -torch.inf)
    pi = torch.sigmoid(log_odds)
    w_slab = (w_m, w_v)
    if bias_eta is None:
        return GroupPosterior(log_odds, w_slab, None, _moments(pi, w_slab, workspace), None)
    b_slab = (b_m, b_v)
    return GroupPosterior(log_odds, w_slab, b_slab, _moments(pi, w_slab, workspace), _moments(pi, b_slab))


def make_workspace(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Preallocated tensors for :func:`group_posterior` on ``(K, n)`` weights shaped like ``like``
    (and scratch space for the guide's state update), with ``ones`` (``(n,)``) for row sums."""
    out = {k: torch.empty_like(like) for k in ("precision", "var", "mean", "terms", "post_mean", "post_var", "curv")}
    out["ones"] = like.new_ones(like.shape[1])
    return out
