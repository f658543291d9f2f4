"""The scale block of the horseshoe guide in one autograd function: the closed-form KL of every
scale variable and one reparameterised draw of every group's scale ``s_k``.

Every scale variable ``v`` (the Half-Cauchy auxiliaries ``tau_a``, ``tau_b``, ``lambda_a``,
``lambda_b`` and the slab ``c^2``) has ``q(v) = LogNormal(m, r^2)`` and a Gamma (``sign = -1``) or
inverse-Gamma (``sign = +1``) prior with shape ``a`` and rate/scale ``b``; then (see
:mod:`~bnnzoo.guides.closed_form_kl`)

    KL = sign a m + b exp(r^2/2 - sign m) - ln r + const.

All of them sit in one vector of ``V = 2 (L + G) + L`` entries, ``[tau_a (L), lambda_a (G) | tau_b
(L), lambda_b (G) | c^2 (L)]`` for ``L`` hidden layers with ``G`` groups in all, so the KL is a
handful of vector operations.

A draw: ``ln tau^2 = ln tau_a + ln tau_b ~ N(m_a + m_b, r_a^2 + r_b^2)`` per layer, likewise
``ln lambda_k^2`` per group, and ``ln c^2`` per layer: the means and variances of these ``L + G + L``
Gaussians are the sums of the two halves' first ``L + G`` entries, then the slabs' own. Then, with
``x_u = (ln tau^2_l(k) + ln lambda_k^2) / 2`` and ``x_c = ln c^2_l(k) / 2`` per group (``l(k)`` the
layer of group ``k``: a product with the ``(G, L)`` 0/1 matrix ``P`` that spreads each layer's draw
over its groups), ``ln s_k = x_u - softplus_2(x_u - x_c)`` with ``softplus_2(d) = ln(1 + e^(2d)) / 2``:
the regularised horseshoe ``s^2 = c^2 u / (c^2 + u)``, ``u = tau^2 lambda_k^2``. The backward pass
reverses these: the halves' gradients are the sums' gradient repeated, and a layer's is ``P^T``
times its groups'.

Written as autograd of the elementwise formulas, this block records some thirty autograd nodes per
training step, and their overhead dominates the step of a small network; here the backward pass is
written out and the whole block is one autograd node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scales_forward(params, eps, const):
    """The forward formulas of :class:`HorseshoeScales`: returns ``s``, the KL and the tensors
    :func:`scales_backward` needs (shared with the fused network step,
    :mod:`~bnnzoo.guides.horseshoe_mlp`)."""
    loc_raw, log_sd = params.unbind(0)
    m = loc_raw * const.gain
    var = torch.exp(log_sd + log_sd)
    # b E_q[v^(-sign)] = exp(ln b - sign m + r^2 / 2)
    rate_moment = torch.exp(torch.addcmul(const.log_rate, const.sign, m, value=-1.0).addcmul_(var, const.half))
    kl = torch.addcmul(rate_moment, const.shape_sign, m).sub_(log_sd).sum() + const.kl_const
    # one draw of ln tau^2 (per layer), ln lambda^2 (per group) and ln c^2 (per layer), spread over the groups
    width, n_layers = const.width, const.n_layers
    sd = torch.cat([var[:width] + var[width:2 * width], var[2 * width:]]).sqrt_()
    z = torch.cat([m[:width] + m[width:2 * width], m[2 * width:]]).addcmul_(sd, eps)
    # (G, L) @ (L, 2): every group's ln tau^2 and ln c^2
    layer_draws = torch.mm(const.spread, torch.stack([z[:n_layers], z[width:]], 1))
    x_u = torch.add(layer_draws[:, 0], z[n_layers:width]).mul_(0.5)
    x_c = layer_draws[:, 1].mul(0.5)
    d = x_u - x_c
    s = torch.exp(x_u - F.softplus(d, beta=2.0))
    return s, kl, (var, rate_moment, sd, eps, d, s)


def scales_backward(saved, const, g_s, g_kl):
    """The gradient with respect to the ``(2, V)`` parameters given those of ``s`` and of the KL
    (``saved``: the third output of :func:`scales_forward`)."""
    var, rate_moment, sd, eps, d, s = saved
    g_log_s = g_s * s
    g_c = g_log_s * torch.sigmoid(d + d)  # d ln s / d x_c = sigmoid(2 d), d ln s / d x_u = 1 - sigmoid(2 d)
    g_u = (g_log_s - g_c).mul_(0.5)  # d loss / d ln lambda_k^2
    g_layers = torch.mm(const.spread_t, torch.stack([g_u, g_c.mul_(0.5)], 1))  # (L, 2): ln tau^2, ln c^2
    g_z = torch.cat([g_layers[:, 0], g_u, g_layers[:, 1]])
    width = const.width
    g_sum = g_z[:width]
    # z = (m_a + m_b, m_c) + sqrt(var_a + var_b, var_c) eps: each half gets the sum's gradient; the KL's terms folded in
    g_draw = torch.cat([g_sum, g_sum, g_z[width:]])
    g_m = torch.addcmul(const.shape_sign, const.sign, rate_moment, value=-1.0).mul_(g_kl).add_(g_draw)
    g_var = torch.mul(g_z, eps).div_(sd)
    g_var_draw = torch.cat([g_var[:width], g_var[:width], g_var[width:]])  # twice d loss / d var (draw)
    g_log_sd = torch.addcmul(const.minus_one, rate_moment, var).mul_(g_kl).addcmul_(var, g_var_draw)
    return torch.stack([g_m.mul_(const.gain), g_log_sd])


class HorseshoeScales(torch.autograd.Function):
    """``(s, kl) = HorseshoeScales.apply(scale_params, eps, const)``.

    ``scale_params`` has shape ``(2, V)``: row 0 the means of ``ln v`` divided by ``const.gain``,
    row 1 their log standard deviations, in the layout of the module docstring. ``eps``: standard
    normal of shape ``(L + G + L,)`` (the ``ln tau^2``, ``ln lambda^2`` and ``ln c^2`` draws).
    ``const`` carries the prior's constants as tensors on the parameters' device
    (:class:`~bnnzoo.guides.HorseshoeGuide` builds it): ``gain``, ``half``, ``minus_one`` and
    ``kl_const`` (0-d), ``sign``, ``shape_sign`` and ``log_rate`` (``(V,)``), ``spread`` (the
    ``(G, L)`` 0/1 matrix of each group's layer) and its transpose ``spread_t``, and the integers
    ``width`` (``L + G``) and ``n_layers`` (``L``). Returns ``s`` of shape
    ``(G,)`` and the summed KL of every scale variable.
    """

    @staticmethod
    def forward(ctx, params, eps, const):
        s, kl, saved = scales_forward(params, eps, const)
        ctx.save_for_backward(*saved)
        ctx.const = const
        return s, kl

    @staticmethod
    def backward(ctx, g_s, g_kl):
        return scales_backward(ctx.saved_tensors, ctx.const, g_s, g_kl), None, None


__all__ = ["HorseshoeScales", "scales_backward", "scales_forward"]
