"""The M-step of EM-TDAMP (Xu, Liu, Zhang & Lau 2024, *Bayesian Deep Learning via Expectation
Maximization and Turbo Deep Approximate Message Passing*), run after every TDAMP pass. It is a reduced
M-step: one rate per hidden layer, one slab variance per layer (optional), the Gaussian noise variance
for regression; the output layer is never sparse and the probit-product variance is not learned.

    rho_l     <- mean_g P(s_g = 1 | D)                  one inclusion rate per hidden layer
    sigma_l^2 <- sum_g pi_g sum_i E[w_i^2 | s_g = 1] / sum_g pi_g n_g      (``learn_slab_var``)
    v         <- mean_n [(y_n - E z_n)^2 + Var z_n]      (regression; the pass's running sums)

The noise M-step reads the residuals each minibatch met during the pass (before its own update), so
it lags the fit by at most a pass; it tracks the true noise once the fit has converged, and the noise
of a fit that pruned is refitted afterwards to the final posterior (:class:`~bnnzoo.posterior.Posterior`).

Options beyond this reduced form (each off by default):

    rho_g     <- P(s_g = 1 | D)                          ``rate_level="group"``: one rate per neuron
    v         <- argmax_v sum_n log E[p(y_n | z_n; v)]   classification (``learn_probit_noise``)

Per-group rates are the M-step of a prior with one rate per group: each rate follows its own
neuron's inclusion probability, which pushes the probabilities towards 0 or 1 over the passes (the
self-reinforcing update of automatic relevance determination). The probit-product variance maximises
the pass's summed log evidence, ``log E[p(y_n | z_n)]`` under the Gaussian outputs each minibatch met
during the pass (the statistics behind the regression noise update, one pass behind the fit): a 1-D
search in ``log v`` by nested grids (:func:`probit_noise_m_step`).

With a target ``keep`` fraction the rate M-step is constrained instead: each hidden layer's prior
log-odds are shifted by the one constant that puts exactly ``round(keep * K)`` of its ``K`` neurons
above inclusion probability 1/2 (the midpoint between the k-th and (k+1)-th group log-odds).
"""

from __future__ import annotations

import math

import torch

from ..models.errors import ConfigError


def keep_count(keep: float, num_groups: int) -> int:
    """Neurons kept of a layer of ``num_groups`` for a target fraction ``keep`` (at least one)."""
    return max(1, min(num_groups, round(keep * num_groups)))


@torch.no_grad()
def constrained_log_odds_shift(log_odds: torch.Tensor, k: int) -> torch.Tensor:
    """The constant ``c`` for which exactly ``k`` entries of ``log_odds + c`` are positive: minus the
    midpoint between the k-th and (k+1)-th largest (a scalar tensor)."""
    top = torch.topk(log_odds, min(k + 1, len(log_odds))).values
    if k >= len(log_odds):
        return 1.0 - top[-1]
    return -0.5 * (top[k - 1] + top[k])


RATE_LEVELS = ("layer", "group")
NOISE_BRACKET = 100.0  # the probit noise M-step searches v within this factor of its current value
NOISE_GRID = 17  # points of each nested grid in log v
NOISE_ROUNDS = 5  # nested grids (each 4 / (NOISE_GRID - 1) of the last's span: resolution ~0.2% in v)


def check_rate_level(rate_level) -> str:
    if rate_level not in RATE_LEVELS:
        raise ConfigError(f"rate_level must be one of {RATE_LEVELS}, got {rate_level!r}")
    return rate_level


@torch.no_grad()
def probit_noise_m_step(likelihood, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor,
                        bracket: float = NOISE_BRACKET) -> torch.Tensor:
    """``argmax_v sum_n log E[p(y_n | z_n; v)]`` for ``z_n ~ N(mean_n, diag var_n)`` under the
    probit-product ``likelihood``, searched in ``log v`` within ``bracket`` times the current ``v``:
    nested grids of ``NOISE_GRID`` points, each round spanning four steps of the last around its
    best point (no host reads; a maximum at the bracket's edge is taken as it is). Sets the
    likelihood's ``noise_var`` to the result and returns it."""
    buffer = likelihood.noise_var
    start = buffer.clone()

    def objective(log_v: torch.Tensor) -> torch.Tensor:
        values = []
        for lv in log_v:
            buffer.copy_(torch.exp(lv))
            values.append(likelihood.log_evidence(mean, var, y).sum())
        return torch.stack(values)

    center = torch.log(start).to(mean.dtype)
    half = torch.tensor(math.log(bracket), dtype=mean.dtype, device=mean.device)
    lo, hi = center - half, center + half
    steps = torch.linspace(0.0, 1.0, NOISE_GRID, dtype=mean.dtype, device=mean.device)
    best = center
    for _ in range(NOISE_ROUNDS):
        grid = lo + (hi - lo) * steps
        best = grid[torch.argmax(objective(grid))]
        step = (hi - lo) / (NOISE_GRID - 1)
        lo, hi = torch.maximum(best - 2 * step, center - half), torch.minimum(best + 2 * step, center + half)
    value = torch.exp(best).to(buffer.dtype)
    buffer.copy_(value)
    return value


@torch.no_grad()
def m_step(guide, *, keep: float | None = None, learn_rho: bool = True, learn_slab_var: bool = False,
           learn_noise: bool = True, rate_level: str = "layer", learn_probit_noise: bool = False,
           ) -> dict[str, torch.Tensor]:
    """The EM M-step on ``guide``'s model after a pass (module docstring). Returns the new values
    (``logit_rho.<layer>``, ``slab_var.<layer>``, ``noise_var``) as tensors on the device.
    ``rate_level="group"`` learns one rate per neuron; ``learn_probit_noise`` the probit-product
    variance (the guide must have collected the pass's outputs, ``guide.collect_outputs``)."""
    check_rate_level(rate_level)
    prior = guide.prior
    posts = guide.group_posteriors()
    out = {}
    for layer in guide.net.hidden_layers():
        post = posts[layer.name]
        if keep is not None:
            shift = constrained_log_odds_shift(post.log_odds, keep_count(keep, layer.num_groups))
            logit = prior.logit_rho(layer.name) + shift
        elif learn_rho and rate_level == "group":
            logit = torch.logit(post.inclusion.clamp(1e-6, 1 - 1e-6))
        elif learn_rho:
            rho = post.inclusion.mean()
            logit = torch.logit(rho.clamp(1e-6, 1 - 1e-6)).expand(layer.num_groups)
        else:
            continue
        prior.set_group_parameters(layer.name, logit_rho=logit)
        out[f"logit_rho.{layer.name}"] = logit
    if learn_slab_var:
        for layer in guide.net.param_layers:
            post = posts[layer.name]
            (w_m, w_v), (b_m, b_v) = post.weight_slab, post.bias_slab
            second = (w_m * w_m + w_v).reshape(layer.num_groups, -1).sum(1) + b_m * b_m + b_v
            pi = post.inclusion
            size = second.new_tensor(float(math.prod(layer.weight_shape[1:]) + 1))
            s2 = (pi * second).sum() / (pi.sum() * size).clamp_min(1e-12)
            prior.set_group_parameters(layer.name, slab_var=s2.clamp_min(1e-8).expand(layer.num_groups))
            out[f"slab_var.{layer.name}"] = s2
    if learn_noise and guide.task == "regression":
        noise = (guide.noise_sum / guide.num_seen.clamp_min(1.0)).clamp_min(1e-6)
        guide.set_noise_var(noise)
        out["noise_var"] = noise
    if learn_probit_noise and guide.task == "classification":
        outputs = guide.pass_outputs()
        if outputs is None:
            raise ValueError("learn_probit_noise needs the pass's outputs: set guide.collect_outputs = True "
                             "before the pass")
        out["noise_var"] = probit_noise_m_step(guide.likelihood, *outputs)
    return out
