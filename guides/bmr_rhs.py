"""BMR-RHS: Bayesian model reduction with a regularised-horseshoe hyperprior fitted over the ``dF``
surface (Markovic, Friston & Kiebel 2023; their code ``dimarkov/bmr4pml``).

**What bmr4pml does** (``BMRRegression.prune_regularised_horseshoe`` with the ``SVIRegression``
hyperprior, ``reduced=True`` as its image-classification script runs BMR-RHS). Its weights are
non-centred, ``w = c_l gamma z`` with ``z ~ N(0, 1)``; the guide's ``q(z) = N(mu, 1/p)`` is fitted under
the current ``gamma``. For every layer but the output layer, each weight ``(i, j)`` of output row ``i``
(its bias is column ``j = n``) gets the reduced prior ``z_ij ~ N(0, gamma_ij^2)`` with the
regularised-horseshoe scale

    gamma_ij^2 = c^2 psi_i^2 / (c^2 + psi_i^2),   psi_i = tau tau_i,
    c^-2 ~ Gamma(2, 6),   tau = tau0 |Cauchy(0, 1)| (tau0 = 1e-2),   tau_i ~ HalfCauchy(1)

(the half-Cauchy variables written as ratios of two ``Gamma(1/2, 1)`` variables; with
``reduced=False`` a per-weight ``lambda_ij ~ HalfCauchy(1)`` multiplies ``psi``). The hyperparameters'
"likelihood" is ``exp(dF)``, ``dF = sum_ij dF_ij(gamma_ij^2)`` the change in free energy of
replacing each ``N(0, 1)`` by ``N(0, gamma_ij^2)`` (the layer's summed ``dF``, since
``ln p(y | reduced) = ln p(y | full) + dF``): ``p(theta | y) ∝ p(theta) exp(dF(theta))``. bmr4pml fits
it by SVI (a mean-field ``AutoNormal`` guide over the unconstrained hyperparameters, 16 particles,
5,000 steps of its optimiser), summarises each weight by ``gamma_ij = 1 / sqrt(E_q[gamma_ij^-2])``,
multiplies the weight's prior scale by it and sets the prior scale of every weight whose result is
below ``1e-6`` to ``1e-16`` (pruned); training then continues under the new priors.

**What is implemented here** (``rule="rhs"`` of :func:`bnnzoo.guides.bmr.reduce`). The same
hierarchy, written for any Gaussian site ``q = N(mu, 1/p)`` under a zero-mean prior ``N(0, s^2)``
(the reduced prior is ``N(0, s^2 g^2)``, i.e. ``g`` is relative to the full prior, as bmr4pml's
``gamma`` is relative to its standardised ``N(0, 1)``). Per layer ``l`` (the layers :func:`reduce`
considers),

    g_k^2 = c^2 tau^2 lambda_k^2 / (c^2 + tau^2 lambda_k^2),
    tau ~ HalfCauchy(tau0),   lambda_k ~ HalfCauchy(1),   c^2 ~ InvGamma(2, 6)  (c^-2 ~ Gamma(2, 6)),

with one ``lambda_k`` per group (``level="group"``: a row of the weight tensor with its bias
entry, bmr4pml's ``tau_i``) or per weight (``level="weight"``). Writing ``k_j = s_j^2 p_j - 1`` and
``m_j = p_j mu_j^2``, each weight's evidence change is (:func:`bnnzoo.guides.bmr.reduced_normal` with
``r^2 = s^2 g^2``)

    dF_j(g^2) = 0.5 ln(s_j^2 p_j) - 0.5 ln(1 + g^2 k_j) - 0.5 m_j (1 - g^2) / (1 + g^2 k_j),

``dF_j(0)`` the Savage-Dickey ratio of removing it. The hyperparameters maximise the layer's log
posterior density over the ``dF`` surface,

    J(tau, c^2, lambda) = sum_j dF_j(g_j^2) + ln HalfCauchy(tau; tau0) + ln InvGamma(c^2; 2, 6)
                          + sum_k ln HalfCauchy(lambda_k; 1)

(a maximum a posteriori fit with the densities of ``tau``, ``c^2`` and ``lambda``, no Jacobian):
Adam ascent on ``(ln tau, ln c^2, ln psi_k)``, ``psi_k = tau lambda_k`` (the ``dF`` term depends on
``psi`` alone, so the ``tau``-``lambda`` ridge does not slow the fit; the maximiser is that of ``J``),
from ``tau = lambda = 1``, ``c^2 = 2`` (the slab prior's mode), ``num_steps = 300`` steps with a
learning rate decaying linearly from ``lr = 0.1`` to ``lr / 100`` (on a fitted Boston layer, 700
weights, ``J`` is then within 0.1 of its value after 3,000 steps and the pruning decision within a
few of 700 weights). The
half-Cauchy density is largest at 0 and a group without support has ``dF`` decreasing in its scale,
so its maximiser is the boundary ``lambda_k = 0``, where its reduced prior is a point mass: after the
fit each group compares ``J_k(lambda_k) = sum_{j in k} dF_j + ln HalfCauchy(lambda_k)`` at the fitted
``lambda_k`` with ``J_k(0)`` and is **pruned** where the boundary is at least as good (``lambda_k`` is
then set to 0). The decision is exact at the boundary; no threshold on ``g`` is needed.

Departures from bmr4pml, stated: the hyperparameters get a point estimate (MAP) instead of SVI and the
``E[gamma^-2]`` summary, and pruning is the boundary comparison instead of ``gamma < 1e-6``; the
reduction is post hoc like the other rules (pruned weights are removed, kept weights keep their
posterior; there is no retraining under the fitted priors inside :func:`reduce`); the output layer is
left alone unless asked, as in bmr4pml. A weight whose posterior is not narrower than its prior
(``s^2 p <= 1``, possible under VI, never under exact inference) carries no evidence: its implied
likelihood is flat, its ``dF`` is 0 for every reduced prior and it is left out of ``J`` (as are weights
pruned before, whose posterior is their prior); at ``level="weight"`` such a weight is pruned (its
maximiser is ``lambda = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .sites import split_site

#: the global half-Cauchy scale ``tau0`` of bmr4pml's BMR-RHS
TAU0 = 1e-2
#: ``c^-2 ~ Gamma(SLAB_SHAPE, SLAB_RATE)``, i.e. ``c^2 ~ InvGamma(2, 6)`` (bmr4pml)
SLAB_SHAPE, SLAB_RATE = 2.0, 6.0
NUM_STEPS, LR = 300, 0.1


def _log_half_cauchy(x: torch.Tensor, scale: float) -> torch.Tensor:
    return math.log(2 / (math.pi * scale)) - torch.log1p((x / scale) ** 2)


def _log_inv_gamma(x: torch.Tensor, shape: float, rate: float) -> torch.Tensor:
    return shape * math.log(rate) - math.lgamma(shape) - (shape + 1) * torch.log(x) - rate / x


def rhs_variance_ratio(tau, slab_var, local) -> torch.Tensor:
    """``g^2 = c^2 psi^2 / (c^2 + psi^2)``, ``psi = tau * local``: the regularised-horseshoe reduced
    prior variance relative to the full prior's (Piironen & Vehtari 2017); ``local = 0`` gives 0."""
    psi2 = (tau * local) ** 2
    return slab_var * psi2 / (slab_var + psi2)


def log_hyperprior(tau, slab_var, local, tau0: float = TAU0) -> torch.Tensor:
    """``ln HalfCauchy(tau; tau0) + ln InvGamma(c^2; 2, 6) + sum ln HalfCauchy(local; 1)``."""
    return (_log_half_cauchy(tau, tau0) + _log_inv_gamma(slab_var, SLAB_SHAPE, SLAB_RATE)
            + _log_half_cauchy(local, 1.0).sum())


class _Stats:
    """A layer's weights as a matrix ``(groups, weights per group)``: ``log_sp = ln(s^2 p)``,
    ``k = s^2 p - 1``, ``m = p mu^2`` and ``live`` (carries evidence: not pruned before, ``s^2 p > 1``)."""

    def __init__(self, mu, var, prior_var, live):
        sp = prior_var / var
        self.live = live & (sp > 1)
        one = torch.ones_like(sp)
        sp = torch.where(self.live, sp, one + one)  # dead entries: any finite values, masked below
        self.log_sp, self.k, self.m = torch.log(sp), sp - 1, torch.where(self.live, mu * mu / var, 0 * one)

    def delta_f(self, g2: torch.Tensor) -> torch.Tensor:
        """Per-weight ``dF(g^2)`` (0 where not live)."""
        t = 1 + g2 * self.k
        d_f = 0.5 * (self.log_sp - torch.log(t)) - 0.5 * self.m * (1 - g2) / t
        return torch.where(self.live, d_f, torch.zeros_like(d_f))


def rhs_delta_f(mu, var, prior_var, tau, slab_var, local) -> torch.Tensor:
    """Per-weight ``dF`` of replacing the prior ``N(0, prior_var)`` by the regularised-horseshoe
    Gaussian ``N(0, prior_var * g^2)`` (:func:`rhs_variance_ratio`); 0 where ``prior_var / var <= 1``
    (no evidence). All arguments broadcast."""
    mu = torch.as_tensor(mu)
    var, prior_var = (torch.as_tensor(v, dtype=mu.dtype, device=mu.device) for v in (var, prior_var))
    mu, var, prior_var = torch.broadcast_tensors(mu, var, prior_var)
    stats = _Stats(mu, var, prior_var, torch.ones_like(mu, dtype=torch.bool))
    return stats.delta_f(rhs_variance_ratio(tau, slab_var, local))


@dataclass
class RHSFit:
    """A layer's fitted hyperparameters: ``tau`` (global), ``slab_var`` (``c^2``), ``local``
    (``lambda``, one per group ``(G, 1)`` or per weight), ``prune`` (the layer matrix's entries whose
    group's maximiser is ``lambda = 0``) and ``objective`` (``J`` at the fit)."""

    tau: torch.Tensor
    slab_var: torch.Tensor
    local: torch.Tensor
    prune: torch.Tensor
    objective: torch.Tensor

    def summary(self) -> dict:
        kept = self.local[self.local > 0]
        return {"tau": float(self.tau), "slab_scale": float(self.slab_var.sqrt()),
                "locals": self.local.numel(), "locals_at_zero": int((self.local == 0).sum()),
                "local_median_kept": float(kept.median()) if kept.numel() else 0.0,
                "objective": float(self.objective)}


def _group_objective(stats: _Stats, tau, slab_var, local) -> torch.Tensor:
    """``J_k = sum_{j in k} dF_j + ln HalfCauchy(lambda_k)`` per local scale (shape of ``local``)."""
    d_f = stats.delta_f(rhs_variance_ratio(tau, slab_var, local))
    if local.shape[1] == 1:
        d_f = d_f.sum(1, keepdim=True)
    return d_f + _log_half_cauchy(local, 1.0)


def fit_rhs(mu, var, prior_var, live=None, *, per_group: bool = True, tau0: float = TAU0,
            num_steps: int = NUM_STEPS, lr: float = LR) -> RHSFit:
    """Fit one layer's regularised-horseshoe hyperparameters by maximising ``J`` (module docstring).

    ``mu``, ``var``, ``prior_var`` (broadcasting) and ``live`` (``False``: pruned before, left out) are
    matrices ``(groups, weights per group)``; ``per_group``: one ``lambda`` per row, else one per entry.
    Runs on the inputs' device and dtype; no value is read back to the host."""
    if not tau0 > 0:
        raise ValueError(f"the global scale tau0 must be > 0, got {tau0}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = torch.as_tensor(mu)
    var, prior_var = (torch.as_tensor(v, dtype=mu.dtype, device=mu.device) for v in (var, prior_var))
    mu, var, prior_var = torch.broadcast_tensors(mu, var, prior_var)
    if mu.dim() != 2:
        raise ValueError(f"fit_rhs takes a (groups, weights per group) matrix, got shape {tuple(mu.shape)}")
    live = torch.ones_like(mu, dtype=torch.bool) if live is None else live
    stats = _Stats(mu, var, prior_var, live)
    shape = (mu.shape[0], 1) if per_group else mu.shape
    n_local = math.prod(shape)
    # one flat vector (ln tau, ln c^2, ln psi...) with psi = tau lambda (the data term depends on psi
    # alone, so the tau-lambda ridge of the objective is not in the way); Adam written out
    x = torch.zeros(2 + n_local, dtype=mu.dtype, device=mu.device)
    x[1] = math.log(SLAB_RATE / (SLAB_SHAPE + 1))
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, num_steps + 1):
        with torch.enable_grad():
            x.requires_grad_(True)
            e = x.exp()
            tau, c2, local = e[0], e[1], e[2:].view(shape) / e[0]
            objective = stats.delta_f(rhs_variance_ratio(tau, c2, local)).sum() + log_hyperprior(tau, c2, local, tau0)
            (grad,) = torch.autograd.grad(objective, x)
        x = x.detach()
        m1.mul_(beta1).add_(grad, alpha=1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        rate = lr * (1 - 0.99 * (step - 1) / max(num_steps - 1, 1))  # linear decay to lr / 100
        denom = (m2 / (1 - beta2 ** step)).sqrt_().add_(eps)
        x.addcdiv_(m1, denom, value=rate / (1 - beta1 ** step))  # ascent
    log_tau, log_c2, log_local = x[0], x[1], x[2:].view(shape) - x[0]
    with torch.no_grad():
        tau, c2, local = log_tau.exp(), log_c2.exp(), log_local.exp()
        at_fit = _group_objective(stats, tau, c2, local)
        at_zero = _group_objective(stats, tau, c2, torch.zeros_like(local))
        local = torch.where(at_zero >= at_fit, torch.zeros_like(local), local)
        objective = (stats.delta_f(rhs_variance_ratio(tau, c2, local)).sum()
                     + log_hyperprior(tau, c2, local, tau0))
        prune = (local == 0).expand_as(mu)
    return RHSFit(tau, c2, local, prune, objective)


def rhs_decision(weights: Mapping[str, tuple], masks: Mapping[str, torch.Tensor], level: str,
                 tau0: float = TAU0, num_steps: int = NUM_STEPS) -> tuple[dict[str, torch.Tensor], RHSFit]:
    """The BMR-RHS decision for one layer's sites ``{site: (mu, var, prior_var)}``: ``(prune per
    site, fit)``. ``level="group"``: one ``lambda`` per row of the weight site with its bias entry;
    ``level="weight"``: one per weight. Weights in ``masks`` marked ``False`` (pruned before) are left
    out of the fit and stay pruned."""
    sites = list(weights)
    kinds = {split_site(s)[1]: s for s in sites}

    def full(site):
        mu, var, prior_var = weights[site]
        var, prior_var = (torch.as_tensor(v, dtype=mu.dtype, device=mu.device).expand_as(mu) for v in (var, prior_var))
        live = masks[site] if site in masks else torch.ones_like(mu, dtype=torch.bool)
        return mu, var, prior_var, live

    if level == "group":
        if set(kinds) - {"weight", "bias"} or "weight" not in kinds:
            raise ValueError(f"group-level BMR needs a layer's weight (and bias) sites, got {sites}")
        w, b = kinds["weight"], kinds.get("bias")
        rows = full(w)
        n_rows = rows[0].shape[0]
        parts = [[t.reshape(n_rows, -1)] for t in rows]
        if b is not None:
            for part, t in zip(parts, full(b)):
                part.append(t.reshape(n_rows, 1))
        mats = [torch.cat(p, 1) for p in parts]
        fit = fit_rhs(*mats[:3], mats[3], per_group=True, tau0=tau0, num_steps=num_steps)
        prune = {w: fit.prune[:, :rows[0][0].numel()].reshape(rows[0].shape)}
        if b is not None:
            prune[b] = fit.prune[:, -1]
        return prune, fit
    flat = [full(s) for s in sites]
    mats = [torch.cat([f[i].reshape(-1) for f in flat]).unsqueeze(0) for i in range(4)]
    fit = fit_rhs(*mats[:3], mats[3], per_group=False, tau0=tau0, num_steps=num_steps)
    out, start = {}, 0
    for s, f in zip(sites, flat):
        n = f[0].numel()
        out[s] = fit.prune[0, start:start + n].view_as(f[0])
        start += n
    return out, fit
