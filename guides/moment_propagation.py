"""Module A of TDAMP: moment propagation through dense and ReLU layers, and the weight messages.

Every weight ``w`` is given an independent Gaussian belief ``N(M, V)``. A forward pass carries the
mean and variance of every unit, layer by layer (the building block of probabilistic
backpropagation, Hernandez-Lobato & Adams 2015):

    dense  (input mean m, var v; weights M, V; bias M_b, V_b):
        p   = M m + M_b
        tau = (V + M^2) v + V m^2 + V_b                       (inputs and weights independent)
    ReLU   (pre-activation N(p, tau), alpha = p / sqrt(tau), gamma = phi(alpha) / Phi(alpha)):
        u     = p + sqrt(tau) gamma
        mean  = Phi(alpha) u
        var   = mean u Phi(-alpha) + Phi(alpha) tau (1 - gamma (gamma + alpha))

and the log evidence ``log Z_n = log E[p(y_n | z_n)]`` of each example under the Gaussian output
``z_n ~ N(p_L, tau_L)``. The backward pass is one autograd pass giving, per example, ``g = d log
Z_n / d p`` and ``g_tau = d log Z_n / d tau`` at every layer. The Gaussian message of the batch to
weight ``w_ki`` (row ``k``, input ``i``) is the second-order expansion of ``sum_n log Z_n`` around
the belief (the batch form of PBP's update ``M <- M + V dlogZ/dM``, ``V <- V - V^2 ((dlogZ/dM)^2 -
2 dlogZ/dV)``, with the per-example curvature taken at the pre-activation):

    gradient   d_ki = sum_n [ g_nk m_ni + 2 g_tau_nk M_ki v_ni ]
    curvature  c_ki = sum_n G_nk (m_ni^2 + v_ni),     G_nk = g_nk^2 - 2 g_tau_nk  (= -d^2 log Z_n / d p_nk^2)
    message    N(w; M + d / c, 1 / c)     (natural parameters: precision c, precision-mean c M + d)

``G`` is exactly ``-d^2 log Z_n / d p^2`` when ``Z_n`` is a Gaussian expectation over ``z`` (the
output layer: Gaussian and probit-product likelihoods); a negative curvature (possible in hidden
layers) is floored at zero, leaving the message a pure gradient.

Numerical safety: the inverse Mills ratio ``gamma`` is replaced by its asymptotic series
``-alpha - 1/alpha + 2/alpha^3 - ...`` in the Gaussian tail (``alpha < -10``, where
``Phi(alpha)`` would lose precision; the series also gives ``alpha + gamma`` without cancellation);
variances are floored at ``VAR_FLOOR``; each branch is evaluated on clamped arguments so that no
infinity enters a gradient (saturated units give exact zeros, not ``inf * 0``).
A NaN is never replaced: :func:`check_finite` raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bnnzoo.nets import Activation, Dense, Flatten, Network

VAR_FLOOR = 1e-12  # smallest pre-activation variance (standardised units); keeps alpha finite
TAIL_ALPHA = -10.0  # below this the inverse Mills ratio uses its asymptotic series
_ALPHA_MAX = 40.0  # beyond this a ReLU unit is linear to float precision (gamma = 0, Phi(-alpha) = 0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """``Phi(x)`` through ``erfc``: accurate to relative precision in the lower tail (unlike
    ``1 + erf``), so ``Phi(-10) ~ 7.6e-24`` is exact in float32."""
    return 0.5 * torch.erfc(-_INV_SQRT_2 * x)


def _mills_terms(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gamma = phi(alpha) / Phi(alpha)``, ``alpha + gamma`` and the tail mask, for ``alpha <= 40``.

    Above ``TAIL_ALPHA`` the ratio is computed directly (``Phi(-10) ~ 8e-24`` is still a normal
    float32); below, by its asymptotic series ``gamma = -alpha - 1/alpha + 2/alpha^3 - 10/alpha^5 +
    74/alpha^7 - 706/alpha^9`` (relative error below 1e-6 there), which also gives ``alpha + gamma``
    without cancellation. Each branch
    sees clamped arguments, so neither produces an infinity, forward or backward.
    """
    tail = alpha < TAIL_ALPHA
    a = alpha.clamp(min=TAIL_ALPHA)
    gamma_exact = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI / normal_cdf(a)
    inv = 1.0 / alpha.clamp(max=TAIL_ALPHA)
    u = inv * inv
    # alpha + gamma = -(1/alpha) (1 - 2u + 10u^2 - 74u^3 + 706u^4), u = 1/alpha^2 (truncation < 1e-6 relative)
    tail_sum = -inv * (1.0 + u * (-2.0 + u * (10.0 + u * (-74.0 + 706.0 * u))))
    gamma = torch.where(tail, tail_sum - alpha, gamma_exact)
    alpha_plus_gamma = torch.where(tail, tail_sum, a + gamma_exact)
    return gamma, alpha_plus_gamma, tail


def inverse_mills_ratio(alpha: torch.Tensor) -> torch.Tensor:
    """``phi(alpha) / Phi(alpha)``, finite for every finite ``alpha`` (0 beyond ``alpha = 40``)."""
    return _mills_terms(alpha.clamp(max=_ALPHA_MAX))[0]


class _ReLUMoments(torch.autograd.Function):
    """Forward: the stable moments below. Backward: their closed-form derivatives (Stein's lemma,
    ``d/dm E f(z) = E f'(z)``, ``d/ds E f(z) = E f''(z) / 2``):

        d mean/d m = Phi(alpha)              d mean/d var = phi(alpha) / (2 sd)
        d var_out/d m = 2 mean_out Phi(-alpha)  d var_out/d var = Phi(alpha) - mean_out phi(alpha) / sd
    """

    @staticmethod
    def forward(ctx, mean, var):
        floored = var < VAR_FLOOR
        var = var.clamp_min(VAR_FLOOR)
        sd = var.sqrt()
        # beyond alpha = 40 the unit is linear to float precision; clamping there keeps huge alphas
        # (saturated units) out of every product
        alpha = (mean / sd).clamp(max=_ALPHA_MAX)
        gamma, alpha_plus_gamma, tail = _mills_terms(alpha)
        cdf = normal_cdf(alpha)
        cdf_neg = normal_cdf(-alpha)
        # u = mean + sd * gamma = sd * (alpha + gamma); the first form is exact for large alpha
        u = torch.where(tail, sd * alpha_plus_gamma, mean + sd * gamma)
        out_mean = cdf * u
        # var_out = mean_out u Phi(-alpha) + Phi(alpha) var (1 - gamma (gamma + alpha)), written as
        # var * h(alpha) with h in [0, 1] (u = sd (alpha + gamma)), so nothing overflows
        h = cdf * (cdf_neg * alpha_plus_gamma * alpha_plus_gamma + 1.0 - gamma * alpha_plus_gamma)
        out_var = (var * h).clamp_min(0.0)
        ctx.save_for_backward(alpha, sd, cdf, cdf_neg, out_mean, floored)
        return out_mean, out_var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        alpha, sd, cdf, cdf_neg, out_mean, floored = ctx.saved_tensors
        pdf_over_sd = torch.exp(-0.5 * alpha * alpha) * _INV_SQRT_2PI / sd
        d_m = grad_mean * cdf + grad_var * (2.0 * out_mean * cdf_neg)
        d_v = 0.5 * grad_mean * pdf_over_sd + grad_var * (cdf - out_mean * pdf_over_sd)
        return d_m, d_v.masked_fill(floored, 0.0)


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``max(0, z)`` for ``z ~ N(mean, var)`` (module docstring), with
    closed-form derivatives for the backward pass."""
    return _ReLUMoments.apply(mean, var)


def linear_moments(mean: torch.Tensor, var: torch.Tensor | None, w_mean: torch.Tensor, w_var: torch.Tensor,
                   b_mean: torch.Tensor, b_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``W h + b`` for independent ``h ~ N(mean, var)`` (``var=None``: known
    inputs), ``W ~ N(w_mean, w_var)``, ``b ~ N(b_mean, b_var)``, all entries independent."""
    out_mean = torch.addmm(b_mean, mean, w_mean.t())
    out_var = torch.addmm(b_var, mean * mean, w_var.t())
    if var is not None:
        out_var = out_var + var @ (w_var + w_mean * w_mean).t()
    return out_mean, out_var


def gaussian_log_evidence(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                          noise_var: torch.Tensor) -> torch.Tensor:
    """``log N(y; mean, noise_var + var)`` per example (``mean``, ``var`` of shape ``(B, 1)``)."""
    total = noise_var + var.squeeze(-1)
    return -0.5 * ((y - mean.squeeze(-1)) ** 2 / total + torch.log(total)) - _HALF_LOG_2PI


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming ``name`` if any tensor holds a NaN or infinity."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"TDAMP: non-finite values in {name}; the message passing diverged "
                                     f"(try more damping, a smaller batch or a smaller initial precision)")


# ---- the forward pass over a network ------------------------------------------------------------
@dataclass
class LayerRecord:
    """What the backward pass needs of one dense layer: input moments and pre-activation moments.

    ``bias``: the layer has a bias, stored as the last column of its (augmented) weight tensors,
    so its input is ``[h, 1]``."""

    name: str
    in_mean: torch.Tensor
    in_var: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    bias: bool = True


SUPPORTED_ACTIVATIONS = ("relu", "identity")


def check_network(net: Network) -> None:
    """TDAMP propagates moments through dense layers, ReLU (or identity) and flattening only."""
    for layer in net.layers:
        if isinstance(layer, Dense) or isinstance(layer, Flatten):
            continue
        if isinstance(layer, Activation) and layer.fn in SUPPORTED_ACTIVATIONS:
            continue
        what = f"activation {layer.fn!r}" if isinstance(layer, Activation) else f"layer kind {layer.kind!r}"
        raise ValueError(f"TDAMP supports dense networks with ReLU activations (an MLP); {net!r} has {what}")


def propagate(net: Network, x: torch.Tensor, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
              ) -> tuple[torch.Tensor, torch.Tensor, list[LayerRecord]]:
    """Forward moment propagation of inputs ``x`` (known) through ``net``.

    ``moments[layer] = (mean, var)`` of the layer's weights *augmented with its bias* as the last
    column (shape ``(K, I + 1)``). Returns the output mean and variance, shape ``(B, out)``, and one
    :class:`LayerRecord` per dense layer. Inputs of each layer are detached: the backward pass needs
    gradients with respect to pre-activation moments only.
    """
    mean, var = x, None
    records = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            w_mean, w_var = moments[layer.name]
            in_mean, in_var = mean, var
            mean, var = linear_moments(in_mean, in_var, w_mean[:, :-1], w_var[:, :-1], w_mean[:, -1], w_var[:, -1])
            if torch.is_grad_enabled() and not mean.requires_grad:  # the backward pass starts here
                mean.requires_grad_()
                var.requires_grad_()
            records.append(LayerRecord(layer.name, in_mean.detach(), None if in_var is None else in_var.detach(),
                                       mean, var))
        elif isinstance(layer, Flatten):
            mean = mean.flatten(start_dim=1)
            var = None if var is None else var.flatten(start_dim=1)
        elif isinstance(layer, Activation) and layer.fn == "relu":
            mean, var = relu_moments(mean, var if var is not None else torch.zeros_like(mean))
        elif isinstance(layer, Activation) and layer.fn == "identity":
            pass
        else:
            check_network(net)
    return mean, var, records


@dataclass
class WeightMessage:
    """The batch's Gaussian message to one layer's weights (bias as the last column when the layer
    has one): summed gradient ``grad`` and curvature ``curv >= 0`` of ``sum_n log Z_n`` with respect to
    the weight means, the per-example curvature ``example_curv = -d^2 log Z_n / d p^2`` (``(B, K)``)
    and the layer's input means ``inputs`` (``(B, I [+ 1])``, with the bias's constant 1)."""

    grad: torch.Tensor
    curv: torch.Tensor
    example_curv: torch.Tensor
    inputs: torch.Tensor


def _with_constant(t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.cat([t, t.new_full((len(t), 1), value)], 1)


def weight_messages(records: list[LayerRecord], log_evidence: torch.Tensor,
                    w_means: dict[str, torch.Tensor]) -> dict[str, WeightMessage]:
    """The backward pass: from ``log_evidence`` (per example, built on ``records``) to a
    :class:`WeightMessage` per dense layer (module docstring). ``w_means[layer]`` are the weight
    means the forward pass used (augmented like the message)."""
    inputs = [t for r in records for t in (r.mean, r.var)]
    grads = torch.autograd.grad(log_evidence.sum(), inputs, allow_unused=True)
    out = {}
    for i, r in enumerate(records):
        g, g_tau = grads[2 * i], grads[2 * i + 1]
        if g is None:  # the output does not depend on this layer (cannot happen for a chain)
            g = torch.zeros_like(r.mean)
        if g_tau is None:
            g_tau = torch.zeros_like(r.var)
        curv_pre = g * g - 2.0 * g_tau  # -d^2 log Z_n / d p^2, per example and unit
        m, v = r.in_mean, r.in_var
        second = m * m if v is None else torch.addcmul(v, m, m)
        if r.bias:
            m, second = _with_constant(m, 1.0), _with_constant(second, 1.0)
        grad = g.t() @ m
        if v is not None:
            v = _with_constant(v, 0.0) if r.bias else v
            grad.addcmul_(w_means[r.name], g_tau.t() @ v, value=2.0)
        curv = (curv_pre.t() @ second).clamp_min_(0.0)
        out[r.name] = WeightMessage(grad, curv, curv_pre, m)
    return out
