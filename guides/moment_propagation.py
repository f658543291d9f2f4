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
``z_n ~ N(p_L, tau_L)``. The backward pass gives, per example, ``g = d log Z_n / d p`` and ``g_tau
= d log Z_n / d tau`` at every layer: by autograd in :func:`weight_messages`, and in closed form (no
autograd graph) in :func:`message_pass`, which the training loop uses (the tests check that the two
agree). The Gaussian message of the batch to weight ``w_ki`` (row ``k``, input ``i``) is the
second-order expansion of ``sum_n log Z_n`` around the belief (the batch form of PBP's update
``M <- M + V dlogZ/dM``, ``V <- V - V^2 ((dlogZ/dM)^2 - 2 dlogZ/dV)``, with the per-example
curvature taken at the pre-activation):

    gradient   d_ki = sum_n [ g_nk m_ni + 2 g_tau_nk M_ki v_ni ]
    curvature  c_ki = sum_n G_nk (m_ni^2 + v_ni),     G_nk = g_nk^2 - 2 g_tau_nk  (= -d^2 log Z_n / d p_nk^2)
    message    N(w; M + d / c, 1 / c)     (natural parameters: precision c, precision-mean c M + d)

``G`` is exactly ``-d^2 log Z_n / d p^2`` when ``Z_n`` is a Gaussian expectation over ``z`` (the
output layer: Gaussian and probit-product likelihoods); in hidden layers it is the identity applied
to the moment-propagated ``Z_n`` (the tests compare it with that function's exact Hessian for a
fitted network), and a negative summed curvature is floored at zero, leaving a pure gradient. A
layer's bias is handled as one more weight with a constant input 1 (the last column of the
layer's tensors), so a neuron's weights and bias form one row: its group.

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

from ..models.networks import Activation, Dense, Flatten, Network

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


def below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``1.0`` where ``x < threshold``, else ``0.0``, in ``x``'s dtype.

    A float mask from two arithmetic kernels, with no boolean tensor: the hot loop selects between
    two finite branches by ``a * mask + b * (1 - mask)``, which is exact for a 0/1 mask."""
    return torch.sign(threshold - x).clamp_min_(0.0)


def _mills_terms(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gamma = phi(alpha) / Phi(alpha)``, ``alpha + gamma`` and the tail mask (float, 1 below
    ``TAIL_ALPHA``), for ``alpha <= 40``.

    Above ``TAIL_ALPHA`` the ratio is computed directly (``Phi(-10) ~ 8e-24`` is still a normal
    float32); below, by its asymptotic series ``gamma = -alpha - 1/alpha + 2/alpha^3 - 10/alpha^5 +
    74/alpha^7 - 706/alpha^9`` (relative error below 1e-6 there), which also gives ``alpha + gamma``
    without cancellation. Each branch sees clamped arguments, so neither produces an infinity,
    forward or backward, and the exact 0/1 blend of the two is the selected branch.
    """
    tail = below(alpha, TAIL_ALPHA)
    head = 1.0 - tail
    a = alpha.clamp(min=TAIL_ALPHA)
    gamma_exact = torch.exp(-0.5 * a * a).div_(normal_cdf(a)).mul_(_INV_SQRT_2PI)
    inv = alpha.clamp(max=TAIL_ALPHA).reciprocal()
    u = inv * inv
    # alpha + gamma = -(1/alpha) (1 - 2u + 10u^2 - 74u^3 + 706u^4), u = 1/alpha^2 (truncation < 1e-6 relative)
    tail_sum = u.mul(706.0).sub_(74.0).mul_(u).add_(10.0).mul_(u).sub_(2.0).mul_(u).add_(1.0).mul_(inv).neg_()
    alpha_plus_gamma = (a + gamma_exact).mul_(head).addcmul_(tail_sum, tail)
    gamma = gamma_exact.mul_(head).addcmul_(tail_sum - alpha, tail)
    return gamma, alpha_plus_gamma, tail


def inverse_mills_ratio(alpha: torch.Tensor) -> torch.Tensor:
    """``phi(alpha) / Phi(alpha)``, finite for every finite ``alpha`` (0 beyond ``alpha = 40``)."""
    return _mills_terms(alpha.clamp(max=_ALPHA_MAX))[0]


def _relu_forward(mean: torch.Tensor, var: torch.Tensor):
    """The stable ReLU moments (:func:`relu_moments`) and what their derivatives need."""
    kept = 1.0 - below(var, VAR_FLOOR)  # 0 where the variance is floored (no derivative there)
    var = var.clamp_min(VAR_FLOOR)
    sd = var.sqrt()
    # beyond alpha = 40 the unit is linear to float precision; clamping there keeps huge alphas
    # (saturated units) out of every product
    alpha = (mean / sd).clamp_(max=_ALPHA_MAX)
    gamma, alpha_plus_gamma, tail = _mills_terms(alpha)
    cdf = normal_cdf(alpha)
    cdf_neg = 1.0 - cdf  # only multiplies terms that vanish where this loses relative precision
    # u = mean + sd * gamma (exact for large alpha, where alpha is clamped) = sd * (alpha + gamma)
    # (without cancellation in the tail)
    out_mean = torch.addcmul(mean, sd, gamma).mul_(1.0 - tail).addcmul_(sd * alpha_plus_gamma, tail)
    out_mean.mul_(cdf)
    # var_out = mean_out u Phi(-alpha) + Phi(alpha) var (1 - gamma (gamma + alpha)), written as
    # var * h(alpha) with h in [0, 1] (u = sd (alpha + gamma)), so nothing overflows
    h = alpha_plus_gamma * alpha_plus_gamma
    h.mul_(cdf_neg).add_(1.0).addcmul_(gamma, alpha_plus_gamma, value=-1.0).mul_(cdf)
    out_var = h.mul_(var).clamp_min_(0.0)
    return out_mean, out_var, (gamma, sd, cdf, cdf_neg, out_mean, kept)


def _relu_backward(saved, grad_mean: torch.Tensor, grad_var: torch.Tensor):
    """Closed-form derivatives of the ReLU moments (see :class:`_ReLUMoments`)."""
    gamma, sd, cdf, cdf_neg, out_mean, kept = saved
    pdf_over_sd = gamma * cdf
    pdf_over_sd.div_(sd)  # phi(alpha) / sd = gamma Phi(alpha) / sd, also in the tail
    d_m = grad_mean * cdf
    d_m.addcmul_(grad_var, out_mean * cdf_neg, value=2.0)
    d_v = torch.addcmul(cdf, out_mean, pdf_over_sd, value=-1.0).mul_(grad_var)
    d_v.addcmul_(grad_mean, pdf_over_sd, value=0.5).mul_(kept)
    return d_m, d_v


class _ReLUMoments(torch.autograd.Function):
    """Forward: the stable moments below. Backward: their closed-form derivatives (Stein's lemma,
    ``d/dm E f(z) = E f'(z)``, ``d/ds E f(z) = E f''(z) / 2``):

        d mean/d m = Phi(alpha)              d mean/d var = phi(alpha) / (2 sd)
        d var_out/d m = 2 mean_out Phi(-alpha)  d var_out/d var = Phi(alpha) - mean_out phi(alpha) / sd
    """

    @staticmethod
    def forward(ctx, mean, var):
        out_mean, out_var, saved = _relu_forward(mean, var)
        ctx.save_for_backward(*saved)
        return out_mean, out_var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        return _relu_backward(ctx.saved_tensors, grad_mean, grad_var)


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


def gaussian_log_evidence_and_grads(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                                    noise_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gaussian_log_evidence` and its derivatives in closed form: with ``s = v + tau`` and
    ``r = y - p``, ``d log Z / d p = r / s`` and ``d log Z / d tau = ((r / s)^2 - 1 / s) / 2``
    (each ``(B, 1)``)."""
    total = var + noise_var
    score = (y.unsqueeze(-1) - mean).div_(total)
    inv_total = total.reciprocal()
    log_z = (score * score).mul_(total).add_(torch.log(total)).mul_(-0.5).sub_(_HALF_LOG_2PI).squeeze(-1)
    return log_z, score, torch.addcmul(-inv_total, score, score).mul_(0.5)


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming ``name`` if any tensor holds a NaN or infinity."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"TDAMP: non-finite values in {name}; the message passing diverged "
                                     f"(try more damping, a smaller batch or a smaller initial precision)")


# ---- the forward pass over a network ------------------------------------------------------------
@dataclass
class LayerRecord:
    """What the backward pass needs of one dense layer: its input moments and pre-activation moments.

    ``inputs`` are the input means and ``second`` their second moments (``mean^2 + var``),
    ``input_var`` the input variances (``None`` for known inputs); when the layer has a bias (the
    last column of its weight tensors) each carries the bias's constant input as a last column
    (mean 1, variance 0, second moment 1). ``mean`` and ``var`` are the pre-activation moments, the
    leaves of the backward pass."""

    name: str
    inputs: torch.Tensor
    second: torch.Tensor
    input_var: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor


SUPPORTED_ACTIVATIONS = ("relu", "identity")


def check_network(net: Network) -> None:
    """TDAMP propagates moments through dense layers, ReLU (or identity) and flattening only."""
    for layer in net.layers:
        if isinstance(layer, (Dense, Flatten)):
            continue
        if isinstance(layer, Activation) and layer.fn in SUPPORTED_ACTIVATIONS:
            continue
        what = f"activation {layer.fn!r}" if isinstance(layer, Activation) else f"layer kind {layer.kind!r}"
        raise ValueError(f"TDAMP supports dense networks with ReLU activations (an MLP); {net!r} has {what}")


def _with_constant(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with one more last column holding ``value`` (the bias's constant input)."""
    return torch.nn.functional.pad(t, (0, 1), value=value)


def augmented_linear_moments(inputs: torch.Tensor, input_var: torch.Tensor | None, w_mean: torch.Tensor,
                             w_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`linear_moments` on inputs that carry the bias's constant column (``inputs`` ``(B, I + 1)``
    with last column 1, ``input_var`` with last column 0 or ``None``) and weight moments with the
    bias as their last column: ``p = [m, 1] M^T``, ``tau = [m^2 + v, 1] V^T + [v, 0] (M^2)^T``. Also
    returns the inputs' second moments ``[m^2 + v, 1]``."""
    if input_var is None:
        second = inputs * inputs
        return inputs @ w_mean.t(), second @ w_var.t(), second
    second = torch.addcmul(input_var, inputs, inputs)
    return inputs @ w_mean.t(), torch.addmm(second @ w_var.t(), input_var, (w_mean * w_mean).t()), second


def _dense_forward(mean: torch.Tensor, var: torch.Tensor | None, w_mean: torch.Tensor, w_var: torch.Tensor):
    """One dense layer of the forward pass: the layer's augmented inputs ``[m, 1]`` and input
    variances ``[v, 0]`` (``None`` for known inputs), and its output mean, variance and the inputs'
    second moments (:func:`augmented_linear_moments`)."""
    inputs = _with_constant(mean, 1.0)
    input_var = None if var is None else _with_constant(var, 0.0)
    return (inputs, input_var, *augmented_linear_moments(inputs, input_var, w_mean, w_var))


def _flatten(mean: torch.Tensor, var: torch.Tensor | None):
    return mean.flatten(start_dim=1), None if var is None else var.flatten(start_dim=1)


def propagate(net: Network, x: torch.Tensor, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
              ) -> tuple[torch.Tensor, torch.Tensor, list[LayerRecord]]:
    """Forward moment propagation of inputs ``x`` (known) through ``net``.

    ``moments[layer] = (mean, var)`` of the layer's weights *augmented with its bias* as the last
    column (shape ``(K, I + 1)``). Returns the output mean and variance, shape ``(B, out)``, and one
    :class:`LayerRecord` per dense layer. Inputs of each layer are detached in the records: the
    backward pass needs gradients with respect to pre-activation moments only.
    """
    mean, var = x, None
    records = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            inputs, input_var, mean, var, second = _dense_forward(mean, var, *moments[layer.name])
            if torch.is_grad_enabled() and not mean.requires_grad:  # the backward pass starts here
                mean.requires_grad_()
                var.requires_grad_()
            records.append(LayerRecord(layer.name, inputs.detach(), second.detach(),
                                       None if input_var is None else input_var.detach(), mean, var))
        elif isinstance(layer, Flatten):
            mean, var = _flatten(mean, var)
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
    has one): curvature ``curv >= 0`` and gradient :attr:`grad` of ``sum_n log Z_n`` with respect to
    the weight means. The gradient is kept factored, ``grad = g^T inputs + 2 M * (g_tau^T
    input_var)``, so that it can be folded into a state in one matrix product. Also: the
    per-example curvature ``example_curv = -d^2 log Z_n / d p^2`` (``(B, K)``), the layer's input
    means ``inputs`` (``(B, I [+ 1])``, with the bias's constant 1) and its pre-activation variances
    ``pre_var``."""

    curv: torch.Tensor
    example_curv: torch.Tensor
    inputs: torch.Tensor
    pre_var: torch.Tensor  # the pre-activation variances of the forward pass (B, K)
    pre_grad: torch.Tensor  # g = d log Z_n / d p (B, K)
    var_grad_term: torch.Tensor | None  # 2 M * (g_tau^T input_var), or None for known inputs

    @property
    def grad(self) -> torch.Tensor:
        grad = self.pre_grad.t() @ self.inputs
        return grad if self.var_grad_term is None else grad.add_(self.var_grad_term)


def _layer_message(r: LayerRecord, g: torch.Tensor, g_tau: torch.Tensor, w_mean: torch.Tensor,
                   curv_out: torch.Tensor | None, floor: bool = True) -> WeightMessage:
    curv_pre = torch.addcmul(g_tau, g, g, value=-0.5).mul_(-2.0)  # g^2 - 2 g_tau = -d^2 log Z_n / d p^2
    curv = curv_pre.t() @ r.second if curv_out is None else torch.mm(curv_pre.t(), r.second, out=curv_out)
    if floor:
        curv.clamp_min_(0.0)
    var_term = None
    if r.input_var is not None:
        var_term = (g_tau.t() @ r.input_var).mul_(w_mean).mul_(2.0)
    return WeightMessage(curv, curv_pre, r.inputs, r.var.detach(), g, var_term)


def weight_messages(records: list[LayerRecord], log_evidence: torch.Tensor, w_means: dict[str, torch.Tensor],
                    curv_out: dict[str, torch.Tensor] | None = None) -> dict[str, WeightMessage]:
    """The backward pass: from ``log_evidence`` (per example, built on ``records``) to a
    :class:`WeightMessage` per dense layer (module docstring). ``w_means[layer]`` are the weight
    means the forward pass used (augmented like the message); ``curv_out[layer]``, if given,
    receives the curvature (a preallocated tensor, no allocation in the training loop)."""
    leaves = [t for r in records for t in (r.mean, r.var)]
    grads = torch.autograd.grad(log_evidence.sum(), leaves, allow_unused=True)
    out = {}
    for i, r in enumerate(records):
        g, g_tau = grads[2 * i], grads[2 * i + 1]
        if g is None:  # the output does not depend on this layer (cannot happen for a chain)
            g = torch.zeros_like(r.mean)
        if g_tau is None:
            g_tau = torch.zeros_like(r.var)
        out[r.name] = _layer_message(r, g, g_tau, w_means[r.name],
                                     None if curv_out is None else curv_out.get(r.name))
    return out


def message_pass(net: Network, x: torch.Tensor, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 output_grads, curv_out: dict[str, torch.Tensor] | None = None, adjust=None,
                 floor_curvature: bool = True):
    """Module A without autograd: :func:`propagate`, the log evidence with its derivatives at the
    output (``output_grads(mean, var) -> (log_z, g, g_tau)``), the backward pass in closed form and
    :func:`weight_messages`' messages. Backward through a dense layer (``p = [m, 1] M^T``, ``tau =
    [m^2 + v, 1] V^T + [v, 0] (M^2)^T``): ``dm = g M + 2 m (g_tau V)``, ``dv = g_tau (V + M^2)`` (the
    bias column dropped); through a ReLU, :func:`relu_moments`' closed-form derivatives.

    ``adjust(name, inputs, input_var, mean) -> mean``, if given, replaces each dense layer's
    pre-activation means before they go on (deep AMP's Onsager-corrected cavity means); the backward
    pass holds the adjustment fixed.

    ``floor_curvature=False`` leaves each message's summed curvature ``curv`` as it is, negative
    entries included (a data-parallel step floors the sum over the ranks' examples, not each rank's part).

    Returns ``log_z`` (per example), the output mean and variance, and the messages per layer.
    """
    mean, var = x, None
    steps = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            inputs, input_var, mean, var, second = _dense_forward(mean, var, *moments[layer.name])
            if adjust is not None:
                mean = adjust(layer.name, inputs, input_var, mean)
            steps.append(LayerRecord(layer.name, inputs, second, input_var, mean, var))
        elif isinstance(layer, Flatten):
            mean, var = _flatten(mean, var)
        elif isinstance(layer, Activation) and layer.fn == "relu":
            mean, var, saved = _relu_forward(mean, var if var is not None else torch.zeros_like(mean))
            steps.append(saved)
        elif isinstance(layer, Activation) and layer.fn == "identity":
            pass
        else:
            check_network(net)
    log_z, g, g_tau = output_grads(mean, var)
    messages = {}
    for step in reversed(steps):
        if isinstance(step, LayerRecord):
            w_mean, w_var = moments[step.name]
            messages[step.name] = _layer_message(step, g, g_tau, w_mean,
                                                 None if curv_out is None else curv_out.get(step.name),
                                                 floor=floor_curvature)
            if step.input_var is None:  # known inputs: nothing further back depends on the weights
                break
            m_w, v_w = w_mean[:, :-1], w_var[:, :-1]
            d_mean = torch.addcmul(g @ m_w, step.inputs[:, :-1], g_tau @ v_w, value=2.0)
            g_tau = g_tau @ torch.addcmul(v_w, m_w, m_w)
            g = d_mean
        else:
            g, g_tau = _relu_backward(step, g, g_tau)
    return log_z, mean, var, messages
