"""The scale block of the horseshoe guide in one autograd function: the closed-form KL of every
scale variable and one reparameterised draw of every group's scale ``s_k``.

Every scale variable ``v`` (the Half-Cauchy auxiliaries ``tau_a``, ``tau_b``, ``lambda_a``,
``lambda_b`` and the slab ``c^2``) has ``q(v) = LogNormal(m, r^2)`` and a Gamma (``sign = -1``) or
inverse-Gamma (``sign = +1``) prior with shape ``a`` and rate/scale ``b``; then (see
:mod:`~bnnzoo.guides.closed_form_kl`)

    KL = sign a m + b exp(r^2/2 - sign m) - ln r + const.

A draw: ``ln tau^2 = ln tau_a + ln tau_b ~ N(m_a + m_b, r_a^2 + r_b^2)`` per layer, likewise
``ln lambda_k^2`` per group and ``ln c^2`` per layer, then ``ln s_k = (ln u_k - softplus(ln u_k - ln c^2)) / 2``
with ``ln u_k = ln tau^2 + ln lambda_k^2`` (the regularised horseshoe, ``s^2 = c^2 u / (c^2 + u)``).

Written as autograd of the elementwise formulas, this block records some thirty autograd nodes per
training step, and their overhead dominates the step of a small network; here the backward pass is
written out (about twenty vector operations) and the whole block is one autograd node.
"""

from __future__ import annotations

import torch


class HorseshoeScales(torch.autograd.Function):
    """``(s, kl) = HorseshoeScales.apply(pair_loc_raw, pair_log_sd, slab_loc_raw, slab_log_sd, eps, const)``.

    ``pair_*`` have shape ``(2, L + G)`` (row 0: Gamma factors, row 1: inverse-Gamma factors;
    columns: ``L`` layers' ``tau``, then ``G`` groups' ``lambda``), ``slab_*`` shape ``(L,)``; the
    means are stored divided by ``const.gain``. ``eps``: standard normal of shape ``(L + G + L,)``
    (the ``ln tau^2`` and ``ln lambda^2`` draws, then the ``ln c^2`` draws). ``const`` carries the
    prior's constants as tensors on the parameters' device (:class:`~bnnzoo.guides.HorseshoeGuide`
    builds it): ``gain``, ``sign``, ``half_sign``, ``rate`` (shape ``(2, L + G)``), ``slab_shape``,
    ``slab_scale``, ``kl_const``, ``minus_one`` (0-d), ``zeros`` (``(L,)``), ``group_layer`` (each
    group's layer index) and ``num_layers``. Returns ``s`` of shape ``(G,)`` and the summed KL of
    every scale variable.
    """

    @staticmethod
    def forward(ctx, loc_raw, log_sd, slab_loc_raw, slab_log_sd, eps, const):
        n, width = const.num_layers, loc_raw.shape[1]
        m = loc_raw * const.gain
        var = torch.exp(log_sd + log_sd)
        moment = torch.exp(torch.addcmul(var, const.sign, m, value=-2.0).mul_(0.5))  # E_q[v^(-sign)]
        m_c = slab_loc_raw * const.gain
        sd_c = slab_log_sd.exp()
        var_c = sd_c * sd_c
        inv_moment = torch.exp(torch.sub(var_c, m_c, alpha=2.0).mul_(0.5))  # E_q[1 / c^2]
        slab_kl = torch.addcmul(m_c * const.slab_shape, inv_moment, const.slab_scale)
        kl = (torch.addcmul(const.half_sign * m, const.rate, moment).sum() + slab_kl.sum()
              - log_sd.sum() - slab_log_sd.sum() + const.kl_const)
        # one draw of ln tau^2 (per layer), ln lambda^2 (per group) and ln c^2 (per layer)
        sd = var.sum(0).sqrt_()
        z = torch.addcmul(m.sum(0), sd, eps[:width])
        log_c2 = torch.addcmul(m_c, sd_c, eps[width:])
        log_u = z[n:] + z[:n].index_select(0, const.group_layer)
        d = log_u - log_c2.index_select(0, const.group_layer)
        s = torch.exp(torch.sub(log_u, torch.nn.functional.softplus(d)).mul_(0.5))
        ctx.save_for_backward(var, moment, sd, eps, var_c, sd_c, inv_moment, torch.sigmoid(d), s)
        ctx.const = const
        return s, kl

    @staticmethod
    def backward(ctx, g_s, g_kl):
        var, moment, sd, eps, var_c, sd_c, inv_moment, p, s = ctx.saved_tensors
        const = ctx.const
        width = var.shape[1]
        g_log_s = g_s * s  # twice d loss / d ln s
        g_c = g_log_s * p  # d ln s / d ln c^2 = p / 2, d ln s / d ln u = (1 - p) / 2
        g_u = g_log_s - g_c
        zeros = const.zeros
        g_z = torch.cat([zeros.index_add(0, const.group_layer, g_u), g_u])
        g_log_c2 = zeros.index_add(0, const.group_layer, g_c)
        # z = (m_a + m_b) + sqrt(var_a + var_b) eps with the halves of g_z; the KL's terms folded in
        rate_moment = const.rate * moment
        g_m = torch.addcmul(const.half_sign, const.sign, rate_moment, value=-1.0).mul_(g_kl)
        g_m = torch.add(g_m, g_z, alpha=0.5)
        g_var_draw = torch.mul(g_z, eps[:width]).div_(sd)  # 2 var d loss / d var = var * g_z eps / (2 sd)
        g_log_sd = torch.addcmul(torch.addcmul(const.minus_one, rate_moment, var).mul_(g_kl), var, g_var_draw, value=0.5)
        g_m_c = torch.addcmul(const.slab_shape, inv_moment, const.slab_scale, value=-1.0).mul_(g_kl)
        g_m_c = torch.add(g_m_c, g_log_c2, alpha=0.5)
        g_slab_log_sd = torch.addcmul(torch.addcmul(const.minus_one, const.slab_scale * inv_moment, var_c).mul_(g_kl),
                                      g_log_c2, sd_c * eps[width:], value=0.5)
        return g_m * const.gain, g_log_sd, g_m_c * const.gain, g_slab_log_sd, None, None


__all__ = ["HorseshoeScales"]
