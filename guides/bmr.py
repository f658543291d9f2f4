"""Bayesian model reduction (BMR) of a fitted Gaussian posterior over weights.

Full model: prior ``N(0, s^2)`` and (approximate) posterior ``q = N(mu, sigma^2)``, precision
``p = 1 / sigma^2``. A reduced model differs only in its prior, ``N(0, r^2)``. BMR gives, without
refitting (Friston & Penny 2011; Markovic, Friston & Kiebel 2023):

    p_r     = p + 1/r^2 - 1/s^2,   sigma_r^2 = 1/p_r,   mu_r = sigma_r^2 p mu
    dF      = ln p(y | reduced) - ln p(y | full)
            = 0.5 ln(s^2 / (sigma^2 r^2 p_r)) - 0.5 p mu^2 + 0.5 p_r mu_r^2

``dF > 0`` favours the reduced model. Written with ``t = r^2 p_r = 1 + r^2 (p - 1/s^2)`` the same
formulas are finite at ``r = 0`` (the Savage-Dickey ratio ``ln N(0; mu, sigma^2) - ln N(0; 0, s^2)``,
reduced posterior a point mass at 0), so one code path serves both.

Under a mean-field posterior a group's ``dF`` is the sum of its weights'; :func:`delta_f_multivariate`
is the general form for full covariances (SPM's ``spm_log_evidence``). Which weights to prune:
:func:`spike_and_slab_threshold` (a per-layer Beta(1, 1) prior on the keep probability, "BMR-S&S")
or the plain rule ``dF > 0``, or BMR-RHS (a regularised-horseshoe hyperprior fitted over the ``dF``
surface, :mod:`bnnzoo.guides.bmr_rhs`); :func:`decide_reduction` decides a whole network's reduction at once.

A guide offers its Gaussian weights through the :class:`GaussianWeights` protocol (its means,
variances and prior variances per site, and how to write a :class:`Reduction` back);
:func:`reduce` is the one entry point: it reduces such a guide in place. The catalog's
:class:`~bnnzoo.guides.MeanFieldNormal`, :class:`~bnnzoo.guides.HorseshoeGuide` (decentred weights
under ``N(0, 1)``) and :class:`~bnnzoo.guides.TDAMPGuide` (slab posteriors under the slab prior)
implement it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from ..models.sparsity import protect_layers
from . import bmr_rhs
from .sites import get_site, split_site
from .weight_guide import PRUNED_SCALE

RULES = ("ss", "plain", "rhs")
LEVELS = ("weight", "group")
#: how a weight pruned before enters the S&S threshold: ``"prior"`` with ``dF = 0`` (bmr4pml),
#: ``"pruned"`` with ``dF = +inf`` (counted as certainly pruned)
PRUNED_COUNTS = ("prior", "pruned")


# ---- one weight (elementwise over tensors) ----------------------------------------------------
def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _t(var: torch.Tensor, prior_var: torch.Tensor, reduced_var: torch.Tensor) -> torch.Tensor:
    """``t = r^2 p_r = 1 + r^2 (1/sigma^2 - 1/s^2)``; positive exactly when the reduced posterior exists."""
    t = 1 + reduced_var * (1 / var - 1 / prior_var)
    if not bool(torch.all(t > 0)):
        raise ValueError("the reduced prior is too wide for this posterior (p + 1/r^2 - 1/s^2 <= 0): "
                         "use a reduced prior variance r^2 <= s^2")
    return t


def _check(mu, var, prior_var, reduced_var):
    mu = torch.as_tensor(mu)
    if not mu.is_floating_point():
        mu = mu.double()
    var, prior_var, reduced_var = (_as_tensor(v, mu) for v in (var, prior_var, reduced_var))
    if not bool(torch.all(var > 0)):
        raise ValueError("posterior variances must be positive")
    if not bool(torch.all(prior_var > 0)):
        raise ValueError("prior variances must be positive")
    if not bool(torch.all(reduced_var >= 0)):
        raise ValueError("reduced prior variances must be >= 0 (0 = the weight is removed)")
    return mu, var, prior_var, reduced_var


def _reduced_normal(mu, var, prior_var, reduced_var):
    """The formulas without input checks (internal: the guide's variances are positive)."""
    if isinstance(reduced_var, (int, float)) and reduced_var == 0:  # the common case, in few passes
        d_f = torch.addcdiv(torch.log(prior_var / var), mu * mu, var, value=-1).mul_(0.5)
        return d_f, torch.zeros((), dtype=mu.dtype, device=mu.device), torch.zeros((), dtype=mu.dtype, device=mu.device)
    p = 1 / var
    t = 1 + reduced_var * (p - 1 / prior_var)
    d_f = 0.5 * (torch.log(prior_var / var) - torch.log(t)) - 0.5 * p * mu * mu * (1 - reduced_var / prior_var) / t
    var_r = reduced_var / t
    return d_f, var_r * p * mu, var_r


def reduced_normal(mu, var, prior_var, reduced_var=0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dF, mu_r, var_r)`` for each weight: the change in log evidence when the prior
    ``N(0, prior_var)`` is replaced by ``N(0, reduced_var)``, and the reduced posterior ``N(mu_r, var_r)``.

    All arguments broadcast; ``reduced_var = 0`` is the Savage-Dickey limit (``mu_r = var_r = 0``).
    """
    mu, var, prior_var, reduced_var = _check(mu, var, prior_var, reduced_var)
    _t(var, prior_var, reduced_var)  # the reduced posterior must exist
    d_f, mu_r, var_r = _reduced_normal(mu, var, prior_var, reduced_var)
    return d_f, mu_r.expand_as(d_f), var_r.expand_as(d_f)


def delta_f(mu, var, prior_var, reduced_var=0.0) -> torch.Tensor:
    """``dF = ln p(y | reduced) - ln p(y | full)`` per weight (see :func:`reduced_normal`)."""
    return reduced_normal(mu, var, prior_var, reduced_var)[0]


def reduced_posterior(mu, var, prior_var, reduced_var=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced posterior's mean and variance per weight (see :func:`reduced_normal`)."""
    _, mu_r, var_r = reduced_normal(mu, var, prior_var, reduced_var)
    return mu_r, var_r


def savage_dickey(mu, var, prior_var) -> torch.Tensor:
    """``dF`` for removing a weight (``r -> 0``): ``ln N(0; mu, var) - ln N(0; 0, prior_var)``."""
    mu, var, prior_var, _ = _check(mu, var, prior_var, 0.0)
    return 0.5 * (torch.log(prior_var) - torch.log(var)) - 0.5 * mu * mu / var


def group_delta_f(d_f_weight: torch.Tensor, d_f_bias: torch.Tensor | None = None) -> torch.Tensor:
    """A group's ``dF`` under a mean-field posterior: the sum over its still-kept weights (a row of
    the weight tensor, i.e. an output neuron or filter, plus its bias entry). Weights pruned before
    (``dF = +inf``, as :func:`evidence_changes` marks them) are already at zero and add nothing; a
    group whose every weight is pruned gets ``+inf``."""
    rows = d_f_weight.reshape(d_f_weight.shape[0], -1)
    if d_f_bias is not None:
        rows = torch.cat([rows, d_f_bias.reshape(-1, 1)], 1)
    kept = ~torch.isposinf(rows)
    return torch.where(kept, rows, torch.zeros_like(rows)).sum(1).masked_fill(~kept.any(1), math.inf)


# ---- the multivariate (full covariance) form ----------------------------------------------------
def delta_f_multivariate(q_mean, q_cov, p_mean, p_cov, r_mean, r_cov):
    """BMR for Gaussian prior ``N(pE, pC)``, posterior ``N(qE, qC)`` and reduced prior ``N(rE, rC)``
    (SPM's ``spm_log_evidence``). Returns ``(dF, mean, cov)`` of the reduced model; batch
    dimensions lead (means ``(..., d)``, covariances ``(..., d, d)``), all positive definite.

        P = inv(C);  sP = qP + rP - pP;  sC = inv(sP);  sE = sC (qP qE + rP rE - pP pE)
        dF = 0.5 [ln|rP| + ln|qP| + ln|sC| + ln|pC| - (qE'qP qE + rE'rP rE - pE'pP pE - sE'sP sE)]
    """
    q_mean, q_cov, p_mean, p_cov, r_mean, r_cov = (torch.as_tensor(v) for v in
                                                   (q_mean, q_cov, p_mean, p_cov, r_mean, r_cov))
    inv = torch.linalg.inv
    q_prec, p_prec, r_prec = inv(q_cov), inv(p_cov), inv(r_cov)
    s_prec = q_prec + r_prec - p_prec
    sign, logdet_s = torch.linalg.slogdet(s_prec)
    if not bool(torch.all(sign > 0)):
        raise ValueError("the reduced posterior precision qP + rP - pP is not positive definite")
    s_cov = inv(s_prec)

    def mv(m, v):
        return (m @ v.unsqueeze(-1)).squeeze(-1)

    def quad(v, m):
        return (v * mv(m, v)).sum(-1)

    s_mean = mv(s_cov, mv(q_prec, q_mean) + mv(r_prec, r_mean) - mv(p_prec, p_mean))
    logdet = (torch.linalg.slogdet(r_prec)[1] + torch.linalg.slogdet(q_prec)[1] - logdet_s
              + torch.linalg.slogdet(p_cov)[1])
    d_f = 0.5 * (logdet - (quad(q_mean, q_prec) + quad(r_mean, r_prec) - quad(p_mean, p_prec)
                           - quad(s_mean, s_prec)))
    return d_f, s_mean, s_cov


# ---- which weights to prune ----------------------------------------------------------------------
def spike_and_slab_threshold(d_f: torch.Tensor, num_iters: int = 4, alpha: float = 1.0,
                             beta: float = 1.0, pruned_as_prior: bool = False) -> torch.Tensor:
    """The S&S pruning threshold ``zeta`` for one layer's evidence changes ``d_f`` (any shape).

    A ``Beta(alpha, beta)`` prior on the layer's keep probability ``pi``; each weight is kept with
    posterior probability ``q_i = sigmoid(zeta - dF_i)``, ``zeta = E[ln pi] - E[ln(1 - pi)]``.
    Starting from the prior, iterate ``num_iters`` times: ``a = alpha + sum q``,
    ``b = beta + sum (1 - q)``, ``zeta = digamma(a) - digamma(b)``. Prune weight ``i`` when
    ``dF_i > zeta``. Entries ``+inf`` (weights already pruned) count as pruned (``q_i = 0``), or with
    ``pruned_as_prior`` as ``dF_i = 0`` (``q_i = sigmoid(zeta)``). Stays on the device.
    """
    d_f = d_f.reshape(-1)
    n = d_f.numel()
    n_pruned = torch.isposinf(d_f).sum() if pruned_as_prior else None
    a0 = torch.tensor(alpha, dtype=d_f.dtype, device=d_f.device)
    b0 = torch.tensor(beta, dtype=d_f.dtype, device=d_f.device)
    zeta = torch.digamma(a0) - torch.digamma(b0)
    for _ in range(num_iters):
        kept = torch.sub(zeta, d_f).sigmoid_().sum()
        if n_pruned is not None:  # sigmoid(zeta - inf) = 0 above: add them back at dF = 0
            kept = kept + n_pruned * torch.sigmoid(zeta)
        zeta = torch.digamma(a0 + kept) - torch.digamma(b0 + (n - kept))
    return zeta


def prune_decision(d_f: torch.Tensor, rule: str = "ss", num_iters: int = 4,
                   count_pruned: str = "pruned") -> tuple[torch.Tensor, torch.Tensor]:
    """``(prune, threshold)`` for one layer: prune where ``dF > threshold``; the threshold is the
    S&S ``zeta`` (``rule="ss"``) or 0 (``rule="plain"``). Entries ``+inf`` (weights pruned before)
    are pruned; ``count_pruned`` says how they enter ``zeta``: ``"pruned"`` as ``+inf`` (certainly
    pruned: they pull the threshold down), ``"prior"`` as ``dF = 0`` (the evidence is indifferent
    to a weight whose posterior is its prior; what bmr4pml's code computes, since there a pruned
    weight keeps its standardised ``N(0, 1)`` prior and no likelihood)."""
    if count_pruned not in PRUNED_COUNTS:
        raise ValueError(f"unknown count_pruned {count_pruned!r}; choose one of {PRUNED_COUNTS}")
    if rule == "rhs":
        raise ValueError("rule 'rhs' fits a hyperprior per layer: use decide_reduction or reduce, not prune_decision")
    if rule == "ss":
        zeta = spike_and_slab_threshold(d_f, num_iters, pruned_as_prior=count_pruned == "prior")
    elif rule == "plain":
        zeta = torch.zeros((), dtype=d_f.dtype, device=d_f.device)
    else:
        raise ValueError(f"unknown BMR rule {rule!r}; choose one of {RULES}")
    return d_f > zeta, zeta


# ---- reducing a set of Gaussian weight sites -------------------------------------------------------
class GaussianSite(NamedTuple):
    """One weight site's Gaussian posterior ``N(loc, variance)`` (elementwise) and its zero-mean
    Gaussian prior's variance (a number, or a tensor broadcasting to the site)."""

    loc: torch.Tensor
    variance: torch.Tensor
    prior_variance: float | torch.Tensor


@dataclass
class Reduction:
    """What a reduction decided, per site: ``masks`` (kept = ``True``; weights pruned before stay
    pruned), ``accepted`` (where the reduced prior was accepted: these entries take the reduced
    posterior; with ``reduced_var = 0`` that is the point mass at 0, otherwise ``locs`` /
    ``variances`` hold it) and ``delta_f`` (per-weight dF, ``+inf`` where the weight was pruned
    before); per layer, the ``threshold`` applied (NaN for rule ``"rhs"``, which has none) and, for
    rule ``"rhs"``, the fitted hyperparameters ``rhs`` (:class:`~bnnzoo.guides.bmr_rhs.RHSFit`)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    accepted: dict[str, torch.Tensor] = field(default_factory=dict)
    locs: dict[str, torch.Tensor] = field(default_factory=dict)
    variances: dict[str, torch.Tensor] = field(default_factory=dict)
    delta_f: dict[str, torch.Tensor] = field(default_factory=dict)
    threshold: dict[str, torch.Tensor] = field(default_factory=dict)
    reduced_var: float = 0.0
    protected: list[str] = field(default_factory=list)
    rhs: dict[str, bmr_rhs.RHSFit] = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain numbers for reports and JSON: per layer, the threshold and the fraction of its
        weights where the reduced prior is accepted (pruned, when ``reduced_var = 0``); for rule
        ``"rhs"`` the threshold is ``None`` and ``"rhs"`` holds the fitted hyperparameters."""
        layers = {}
        for layer, zeta in self.threshold.items():
            sites = [s for s in self.accepted if split_site(s)[0] == layer]
            n = sum(self.accepted[s].numel() for s in sites)
            acc = sum(int(self.accepted[s].sum()) for s in sites)
            layers[layer] = {"threshold": None if layer in self.rhs else float(zeta), "weights": n,
                             "reduced_fraction": acc / n}
            if layer in self.rhs:
                layers[layer]["rhs"] = self.rhs[layer].summary()
        out = {"reduced_var": self.reduced_var, "layers": layers}
        if self.protected:
            out["protected_layers"] = list(self.protected)
        return out


def _split_like(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for s, t in like.items():
        out[s] = flat[start:start + t.numel()].view_as(t)
        start += t.numel()
    return out


def _guard_layer(layer: str, prune: dict[str, torch.Tensor], d_fs: dict[str, torch.Tensor], weight: str,
                 bias: str | None, allow_empty: bool) -> bool:
    """Keep a layer from being emptied: a group (a row of ``weight`` with its ``bias``
    entry) survives when any of its weights is kept (its bias alone does not make the layer's output
    depend on its input). If the decision keeps no group, :func:`~bnnzoo.models.sparsity.protect_layers`
    keeps the group with the highest summed ``-dF`` over its weights not pruned before, and that
    group's entries are restored in ``prune`` (in place). Layers every weight of which was pruned
    before are left as they are. Returns whether the layer was protected."""
    rows = prune[weight].reshape(prune[weight].shape[0], -1)
    keep = ~rows.all(1)
    if bool(keep.any()):  # the common case: one pass over the decision
        return False
    d_rows = d_fs[weight].reshape(rows.shape)
    live = torch.isfinite(d_rows)  # not pruned before this decision
    score = -torch.where(live, d_rows, torch.zeros_like(d_rows)).sum(1)
    live_b = None
    if bias is not None:
        d_b = d_fs[bias]
        live_b = torch.isfinite(d_b)
        score = score - torch.where(live_b, d_b, torch.zeros_like(d_b))
    score = score.masked_fill(~live.any(1), -math.inf)
    if not bool(torch.isfinite(score).any()):  # every weight was pruned before
        return False
    kept = protect_layers({layer: keep}, {layer: score}, allow_empty=allow_empty)[layer]
    restore = kept & ~keep
    if not bool(restore.any()):
        return False
    prune[weight] = prune[weight] & ~(restore.unsqueeze(1) & live).view_as(prune[weight])
    if bias is not None:
        prune[bias] = prune[bias] & ~(restore & live_b)
    return True


def decide_reduction(weights: Mapping[str, GaussianSite], masks: Mapping[str, torch.Tensor] | None = None, *,
                     rule: str = "ss", level: str = "weight", reduced_var: float = 0.0,
                     num_iters: int = 4, allow_empty: bool = False, count_pruned: str = "pruned",
                     rhs_tau0: float = bmr_rhs.TAU0) -> Reduction:
    """Decide a reduction for Gaussian weight sites ``{site: GaussianSite(mu, var, prior_var)}``.

    Sites named ``<layer>.<param>`` of one layer share a threshold (the per-layer Beta prior of
    the S&S rule). ``masks`` holds weights pruned already: they stay pruned and count as pruned.
    ``level="group"`` decides per output group (weight row + bias entry, ``dF`` summed over the
    group's kept weights) instead of per weight. ``reduced_var = 0`` removes the accepted weights;
    ``reduced_var > 0`` instead shrinks them to their reduced posterior under ``N(0, reduced_var)``.
    ``rule="rhs"`` (removal only) prunes the groups (``level="group"``) or weights whose fitted
    regularised-horseshoe scale is 0 (:func:`bnnzoo.guides.bmr_rhs.rhs_decision`, global scale
    ``rhs_tau0``); weights pruned before are left out of that fit.

    No layer is emptied unless ``allow_empty``: where a removal (``reduced_var = 0``) would prune
    every weight of a layer's weight site (every group at ``level="group"``), the group with the
    highest summed ``-dF`` keeps its weights (:func:`bnnzoo.models.sparsity.protect_layers`, which
    warns with an ``EmptyLayerWarning``); ``Reduction.protected`` lists those layers.
    Vectorised per layer; the empty-layer check reads one flag per layer from the device.
    """
    if rule not in RULES:
        raise ValueError(f"unknown BMR rule {rule!r}; choose one of {RULES}")
    if level not in LEVELS:
        raise ValueError(f"unknown BMR level {level!r}; choose one of {LEVELS}")
    if not reduced_var >= 0:
        raise ValueError(f"reduced_var must be >= 0, got {reduced_var}")
    if rule == "rhs" and reduced_var != 0:
        raise ValueError(f"rule 'rhs' removes weights (its reduced priors are fitted): reduced_var must be 0, "
                         f"got {reduced_var}")
    if rule == "rhs" and not rhs_tau0 > 0:
        raise ValueError(f"rhs_tau0 (the global half-Cauchy scale of rule 'rhs') must be > 0, got {rhs_tau0}")
    masks = dict(masks or {})
    out = Reduction(reduced_var=float(reduced_var))
    by_layer: dict[str, list[str]] = {}
    for site in weights:
        by_layer.setdefault(split_site(site)[0], []).append(site)
    for layer, sites in by_layer.items():
        d_fs, reduced = {}, {}
        for site in sites:
            mu, var, prior_var = weights[site]
            if reduced_var > 0:  # t > 0 is automatic for r = 0; check it otherwise
                _t(var, _as_tensor(prior_var, var), _as_tensor(reduced_var, var))
            d_f, mu_r, var_r = _reduced_normal(mu, var, prior_var, reduced_var)
            if site in masks:
                d_f = d_f.masked_fill(~masks[site], math.inf)
            d_fs[site], reduced[site] = d_f, (mu_r, var_r)
        if rule == "rhs":
            prune, fit = bmr_rhs.rhs_decision({s: weights[s] for s in sites}, masks, level, tau0=rhs_tau0)
            prune = {s: prune[s] | ~masks[s] if s in masks else prune[s] for s in sites}
            out.rhs[layer] = fit
            zeta = torch.full((), math.nan, dtype=fit.tau.dtype, device=fit.tau.device)
        elif level == "weight":
            prune_flat, zeta = prune_decision(torch.cat([d.reshape(-1) for d in d_fs.values()]), rule, num_iters,
                                              count_pruned)
            prune = _split_like(prune_flat, d_fs)
        else:
            kinds = {split_site(s)[1]: s for s in sites}
            if set(kinds) - {"weight", "bias"} or "weight" not in kinds:
                raise ValueError(f"group-level BMR needs a layer's weight (and bias) sites, got {sites}")
            w, b = kinds["weight"], kinds.get("bias")
            # a group's dF over its still-kept weights; a fully pruned group counts as pruned
            g = group_delta_f(d_fs[w], d_fs[b] if b else None)
            prune_g, zeta = prune_decision(g, rule, num_iters, count_pruned)
            prune = {w: prune_g.view(-1, *([1] * (d_fs[w].dim() - 1))).expand_as(d_fs[w])}
            if b:
                prune[b] = prune_g
        kinds = {split_site(s)[1]: s for s in sites}
        if reduced_var == 0 and "weight" in kinds and _guard_layer(layer, prune, d_fs, kinds["weight"],
                                                                   kinds.get("bias"), allow_empty):
            out.protected.append(layer)
        out.threshold[layer] = zeta
        for s in sites:
            keep_before = masks.get(s)
            # weights pruned before have dF = +inf, so the rule has pruned them again
            accept = prune[s]
            out.delta_f[s], out.accepted[s] = d_fs[s], accept
            if reduced_var == 0:
                out.masks[s] = ~accept
            else:
                if keep_before is not None:
                    out.masks[s] = keep_before
                mu, var, _ = weights[s]
                mu_r, var_r = reduced[s]
                out.locs[s] = torch.where(accept, mu_r, mu)
                out.variances[s] = torch.where(accept, var_r, var)
    return out




# ---- guides with Gaussian weights --------------------------------------------------------------------
@runtime_checkable
class GaussianWeights(Protocol):
    """A guide whose weights have Gaussian posteriors under zero-mean Gaussian priors.

    ``gaussian_weights(level)`` gives ``{site: GaussianSite(loc, variance, prior_variance)}`` (detached)
    for every weight site a reduction at ``level`` (``"weight"`` or ``"group"``) may consider.
    ``apply_reduction(reduction)`` writes a :class:`Reduction` into the guide in place: it sets
    ``reduction.masks`` (masks only shrink; a pruned weight is then an exact zero in every draw) and
    replaces the posterior of the ``reduction.accepted`` entries by the reduced one (a point mass at
    0 when ``reduction.reduced_var == 0``, else ``reduction.locs`` / ``reduction.variances``).

    :func:`reduce` also reads the guide's ``net`` (its sites and layers) and ``masks`` (the weights
    pruned already), which every :class:`~bnnzoo.guides.WeightGuide` has.
    """

    def gaussian_weights(self, level: str = "weight") -> dict[str, GaussianSite]: ...

    def apply_reduction(self, reduction: Reduction) -> None: ...


def reducible_sites(net, prune_last: bool = False, layers=None) -> list[str]:
    """The weight sites BMR considers: every layer but the output layer (unless ``prune_last``),
    or the named ``layers``."""
    names = [l.name for l in (net.param_layers if prune_last else net.hidden_layers())]
    if layers is not None:
        unknown = [l for l in layers if l not in [p.name for p in net.param_layers]]
        if unknown:
            raise KeyError(f"unknown layers {unknown}; layers are {[p.name for p in net.param_layers]}")
        names = list(layers)
    return [s for s in net.sites() if split_site(s)[0] in names]


def _require_protocol(guide) -> None:
    if not isinstance(guide, GaussianWeights):
        raise TypeError(f"Bayesian model reduction needs Gaussian weights: a {type(guide).__name__} guide does "
                        f"not implement the GaussianWeights protocol (gaussian_weights(level), "
                        f"apply_reduction(reduction))")


def _reducible_weights(guide, level: str, prune_last: bool, layers) -> dict[str, GaussianSite]:
    weights = guide.gaussian_weights(level)
    return {s: weights[s] for s in reducible_sites(guide.net, prune_last, layers) if s in weights}


def reduce(guide: GaussianWeights, *, rule: str = "ss", level: str = "weight", prune_last: bool = False,
           layers=None, reduced_var: float = 0.0, num_iters: int = 4, allow_empty: bool = False,
           count_pruned: str = "pruned", rhs_tau0: float = bmr_rhs.TAU0) -> Reduction:
    """Bayesian model reduction of a fitted guide with Gaussian weights, in place; returns the
    :class:`Reduction` (see :meth:`Reduction.summary`).

    ``rule``: ``"ss"`` (prune a weight when its ``dF`` exceeds the per-layer spike-and-slab
    threshold, Beta(1, 1) prior on the keep probability, ``num_iters`` iterations) or ``"plain"``
    (``dF > 0``) or ``"rhs"`` (BMR-RHS: prune where the layer's regularised-horseshoe scales, fitted
    over the ``dF`` surface with global scale ``rhs_tau0``, are 0; :mod:`bnnzoo.guides.bmr_rhs`).
    ``level``: ``"weight"`` or ``"group"`` (whole neurons / filters by their summed ``dF``). The output layer is left alone unless ``prune_last`` (or ``layers`` names the layers to
    reduce). Weights pruned before (the guide's ``masks``) stay pruned (``count_pruned``: how they
    enter the S&S threshold, see :func:`prune_decision`). Pruned weights are masked
    (exact zeros in every draw) and their posterior set to the reduced one, a point mass at 0; with
    ``reduced_var > 0`` the accepted weights are instead shrunk to their reduced posterior under
    ``N(0, reduced_var)``. A removal that would empty a layer keeps the layer's best group (by the
    summed ``-dF`` of its weights) and warns, unless ``allow_empty`` (see :func:`decide_reduction`).

    ``guide`` must implement :class:`GaussianWeights` (``TypeError`` otherwise).
    """
    _require_protocol(guide)
    weights = _reducible_weights(guide, level, prune_last, layers)
    current = dict(guide.masks.items())
    masks = {s: current[s] for s in weights if s in current}
    reduction = decide_reduction(weights, masks, rule=rule, level=level, reduced_var=reduced_var,
                                 num_iters=num_iters, allow_empty=allow_empty, count_pruned=count_pruned,
                                 rhs_tau0=rhs_tau0)
    guide.apply_reduction(reduction)
    return reduction


def evidence_changes(guide: GaussianWeights, *, level: str = "weight", prune_last: bool = False, layers=None,
                     reduced_var: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-weight ``dF`` of every site :func:`reduce` would consider (``+inf`` where already pruned)."""
    _require_protocol(guide)
    masks = dict(guide.masks.items())
    out = {}
    for site, (mu, var, prior_var) in _reducible_weights(guide, level, prune_last, layers).items():
        d_f = reduced_normal(mu, var, prior_var, reduced_var)[0]
        out[site] = d_f.masked_fill(~masks[site], math.inf) if site in masks else d_f
    return out


def prior_variance(prior, site: str):
    """The prior variance of a site: ``site_scale(site)^2`` of a :class:`~bnnzoo.models.GaussianPrior`
    (a number), or the variance of any zero-mean Normal site prior (a tensor)."""
    site_scale = getattr(prior, "site_scale", None)
    if site_scale is not None:
        scale = site_scale(site)
        return scale * scale
    d = prior.site_distribution(site)
    base = getattr(d, "base_dist", d)
    if not isinstance(base, torch.distributions.Normal) or not bool(torch.all(base.loc == 0)):
        raise TypeError(f"BMR needs a zero-mean Gaussian prior on {site}, the model has {type(base).__name__}")
    return base.scale.pow(2)


@torch.no_grad()
def write_reduction(locs: nn.ModuleDict, log_scales: nn.ModuleDict, reduction: Reduction,
                    pruned_scale: float = PRUNED_SCALE) -> None:
    """Write a reduction's posteriors into per-site Gaussian parameters ``locs`` / ``log_scales``
    (the containers of :func:`~bnnzoo.guides.sites.site_parameters`) in place: where the reduction
    was accepted, the reduced posterior (pruned weights: loc 0 and ``pruned_scale``, so a masked
    weight stays frozen there); elsewhere the entries are unchanged. Masks are the caller's."""
    log_pruned = math.log(pruned_scale)
    for site, accept in reduction.accepted.items():
        p_loc, p_log_scale = get_site(locs, site), get_site(log_scales, site)
        if reduction.reduced_var == 0:
            p_loc.masked_fill_(accept, 0.0)
            p_log_scale.masked_fill_(accept, log_pruned)
        else:
            var = reduction.variances[site]
            p_loc.copy_(torch.where(accept, reduction.locs[site].to(p_loc.dtype), p_loc))
            p_log_scale.copy_(torch.where(accept, 0.5 * torch.log(var.to(p_log_scale.dtype)), p_log_scale))
