"""A fused dense layer for decentred Gaussian weights times a scale per output unit: local
reparameterisation, the scale and the KL to a zero-mean Gaussian prior in one autograd function.

For ``beta_ij ~ N(mu_ij, exp(2 rho_ij))``, a positive scale ``s_i`` per output unit and input ``h``,
the pre-activation of example ``n`` and unit ``i`` is ``s_i * z_ni`` with ``z_ni ~ N(m_ni, v_ni)``,
``m = h mu^T + b_mu`` and ``v = h^2 exp(2 rho)^T + exp(2 b_rho)``: one draw ``m + sqrt(v) eps`` per
example replaces a weight draw. The function also returns ``KL(q(beta) || N(0, p^2))`` summed over
the layer. Its backward pass writes each weight-sized gradient with one matrix product and at most
two elementwise passes (the KL's gradient folded in with ``addcmul``), so a step costs two matrix
products forward and two (four with the input's gradient) backward, plus eight elementwise passes
over the weights in all (five forward: ``exp(2 rho)`` and the KL's three sums). Scalars stay tensors
or enter as ``alpha`` arguments: no host-device copy on CUDA.
"""

from __future__ import annotations

import math

import torch

from .data_parallel import example_noise


class ScaledLocalReparamDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, mu, rho, b_mu, b_rho, s, eps, prior_scale: float):
        # scalars enter as ``alpha`` arguments or 0-d tensors: an operation with a wrapped Python number
        # costs about twice as much on small tensors, and a small network's step is mostly such overhead
        var, b_var = rho.mul(2).exp_(), b_rho.mul(2).exp_()
        h2 = h * h
        sd = torch.addmm(b_var, h2, var.t()).sqrt_()
        z = torch.addmm(b_mu, h, mu.t()).addcmul_(sd, eps)
        # KL = sum (var + mu^2) / (2 p^2) - rho - (1/2 - ln p) over weights and biases
        pv = prior_scale * prior_scale
        second = var.sum() + b_var.sum() + torch.dot(mu.view(-1), mu.view(-1)) + torch.dot(b_mu, b_mu)
        kl = torch.add(second, rho.sum() + b_rho.sum(), alpha=-2 * pv).mul_(0.5 / pv)
        kl = kl.add_(float(mu.numel() + b_mu.numel()) * (math.log(prior_scale) - 0.5))
        ctx.save_for_backward(h, h2, mu, var, b_mu, b_var, eps / sd, z, s)
        ctx.inv_pv = 1.0 / pv
        return z * s, kl

    @staticmethod
    def backward(ctx, g_out, g_kl):
        h, h2, mu, var, b_mu, b_var, eps_over_sd, z, s = ctx.saved_tensors
        c = g_kl * ctx.inv_pv  # the KL's weight in the loss times 1/p^2
        g_z = g_out * s
        g_w = g_z * eps_over_sd  # 2 d loss / d v
        d_mu = torch.mm(g_z.t(), h).addcmul_(mu, c)
        d_b_mu = torch.addcmul(g_z.sum(0), b_mu, c)
        # d/d rho of [v-path + KL] = var (g_w^T h^2 + c) - g_kl
        # in place on the products' outputs: a weight-sized temporary costs a pass over fresh memory
        d_rho = torch.mm(g_w.t(), h2).add_(c).mul_(var).sub_(g_kl)
        d_b_rho = g_w.sum(0).add_(c).mul_(b_var).sub_(g_kl)
        d_h = torch.addcmul(g_z @ mu, h, g_w @ var) if ctx.needs_input_grad[0] else None
        d_s = (g_out * z).sum(0) if ctx.needs_input_grad[5] else None
        return d_h, d_mu, d_rho, d_b_mu, d_b_rho, d_s, None, None


class MaskedScaledLocalReparamDense(torch.autograd.Function):
    """:class:`ScaledLocalReparamDense` over the kept entries of pruning masks: every weight whose
    ``keep`` is 0 is removed from the draw (mean and variance 0) and from the KL, and its gradient is
    0. ``keep`` and ``b_keep`` are float 0/1 tensors shaped as ``mu`` and ``b_mu``. A unit whose
    weights and bias are all removed has pre-activation variance 0; ``1e-16`` is added to every
    unit's, as in the guides' generic masked layer, so that its gradient stays finite."""

    @staticmethod
    def forward(ctx, h, mu, rho, b_mu, b_rho, s, eps, keep, b_keep, prior_scale: float):
        var, b_var = torch.exp(rho + rho).mul_(keep), torch.exp(b_rho + b_rho).mul_(b_keep)
        mu_k, b_mu_k = mu * keep, b_mu * b_keep
        h2 = h * h
        sd = torch.addmm(b_var.add(1e-16), h2, var.t()).sqrt_()
        z = torch.addcmul(torch.addmm(b_mu_k, h, mu_k.t()), sd, eps)
        # KL = sum over kept entries of (var + mu^2) / (2 p^2) - rho - (1/2 - ln p)
        pv = prior_scale * prior_scale
        second = var.sum() + b_var.sum() + torch.dot(mu_k.view(-1), mu_k.view(-1)) + torch.dot(b_mu_k, b_mu_k)
        log_sd = torch.dot(rho.view(-1), keep.view(-1)) + torch.dot(b_rho, b_keep)
        kept = keep.sum() + b_keep.sum()
        kl = torch.add(second, log_sd, alpha=-2 * pv).mul_(0.5 / pv).add_(kept, alpha=math.log(prior_scale) - 0.5)
        ctx.save_for_backward(h, h2, mu_k, var, b_mu_k, b_var, eps / sd, z, s, keep, b_keep)
        ctx.inv_pv = 1.0 / pv
        return z * s, kl

    @staticmethod
    def backward(ctx, g_out, g_kl):
        h, h2, mu_k, var, b_mu_k, b_var, eps_over_sd, z, s, keep, b_keep = ctx.saved_tensors
        c = g_kl * ctx.inv_pv
        g_z = g_out * s
        g_w = g_z * eps_over_sd  # 2 d loss / d v
        # kept entries: as ScaledLocalReparamDense; removed ones: 0 (var and mu_k are 0 there)
        d_mu = torch.mm(g_z.t(), h).addcmul_(mu_k, c).mul_(keep)
        d_b_mu = torch.addcmul(g_z.sum(0), b_mu_k, c).mul_(b_keep)
        neg_g_kl = -g_kl
        d_rho = torch.mm(g_w.t(), h2).add_(c).mul_(var).addcmul_(keep, neg_g_kl)
        d_b_rho = g_w.sum(0).add_(c).mul_(b_var).addcmul_(b_keep, neg_g_kl)
        d_h = torch.addcmul(g_z @ mu_k, h, g_w @ var) if ctx.needs_input_grad[0] else None
        d_s = (g_out * z).sum(0) if ctx.needs_input_grad[5] else None
        return d_h, d_mu, d_rho, d_b_mu, d_b_rho, d_s, None, None, None, None


def scaled_local_reparam_dense(h, mu, rho, b_mu, b_rho, s, prior_scale: float):
    """One local-reparameterised draw of ``s * (h beta^T + beta_bias)`` and the layer's Gaussian KL;
    ``s`` has one positive entry per output unit. Inputs ``h`` of shape ``(B, ..., I)`` (the tokens
    of a transformer or a mixer) are one draw per example and position: the noise is drawn as
    ``(B, ..., O)`` (per example, as a data-parallel rank slices it) and the products run on the
    flattened ``(B * ..., I)`` rows."""
    lead = h.shape[:-1]
    eps = example_noise(lead + (mu.shape[0],), device=h.device, dtype=h.dtype)
    if h.dim() == 2:
        return ScaledLocalReparamDense.apply(h, mu, rho, b_mu, b_rho, s, eps, prior_scale)
    out, kl = ScaledLocalReparamDense.apply(h.reshape(-1, h.shape[-1]), mu, rho, b_mu, b_rho, s,
                                            eps.reshape(-1, mu.shape[0]), prior_scale)
    return out.reshape(lead + (mu.shape[0],)), kl


def masked_scaled_local_reparam_dense(h, mu, rho, b_mu, b_rho, s, keep, b_keep, prior_scale: float):
    """:func:`scaled_local_reparam_dense` over the kept entries of float 0/1 masks ``keep`` and
    ``b_keep`` (shaped as ``mu`` and ``b_mu``; ``None``: every entry kept) for inputs ``h`` of shape
    ``(B, I)``: the draw and KL of the masked layer, whose removed weights get gradient 0."""
    eps = example_noise((h.shape[0], mu.shape[0]), device=h.device, dtype=h.dtype)
    if keep is None and b_keep is None:
        return ScaledLocalReparamDense.apply(h, mu, rho, b_mu, b_rho, s, eps, prior_scale)
    keep = torch.ones_like(mu) if keep is None else keep
    b_keep = torch.ones_like(b_mu) if b_keep is None else b_keep
    return MaskedScaledLocalReparamDense.apply(h, mu, rho, b_mu, b_rho, s, eps, keep, b_keep, prior_scale)
