"""A fused dense layer for mean-field Gaussian weights: local reparameterisation and the KL to a
zero-mean Gaussian prior in one autograd function.

For weights ``w_ij ~ N(mu_ij, exp(2 rho_ij))`` and input ``h``, the pre-activation of example ``n``
and unit ``i`` is ``N(m_ni, v_ni)`` with ``m = h mu^T + b_mu`` and ``v = h^2 exp(2 rho)^T + exp(2 b_rho)``;
one draw ``m + sqrt(v) * eps`` per example replaces a weight draw. The function also returns
``KL(q || N(0, s^2))`` summed over the layer. Its backward pass adds the KL's gradient in place to
the outputs of the matrix products (no other weight-sized temporary), so that a training step costs
two matrix products forward and two backward per layer (four with the input's gradient), with few
extra passes over the weights; of the draw it keeps ``eps / sd`` alone
(``2 d loss / d v = g * eps / sd`` for the output gradient ``g``), whose factor 2 also cancels the
one of ``d v / d h = 2 h var``.
"""

from __future__ import annotations

import math

import torch

from .data_parallel import example_noise


class LocalReparamDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, mu, rho, b_mu, b_rho, eps, prior_scale: float):
        inv_pv = 1.0 / (prior_scale * prior_scale)
        var, b_var = rho.mul(2).exp_(), b_rho.mul(2).exp_()
        h2 = h * h
        m = torch.addmm(b_mu, h, mu.t())
        sd = torch.addmm(b_var, h2, var.t()).sqrt_()
        out = torch.addcmul(m, sd, eps)
        n = mu.numel() + b_mu.numel()
        kl = (0.5 * inv_pv * (var.sum() + b_var.sum() + torch.dot(mu.flatten(), mu.flatten()) + b_mu.dot(b_mu))
              - rho.sum() - b_rho.sum() + n * (math.log(prior_scale) - 0.5))
        # eps / sd is all the backward pass needs of the draw: one saved output-sized tensor, not two
        ctx.save_for_backward(h, h2, mu, var, b_mu, b_var, eps / sd)
        ctx.inv_pv = inv_pv
        return out, kl

    @staticmethod
    def backward(ctx, g_out, g_kl):
        h, h2, mu, var, b_mu, b_var, eps_over_sd = ctx.saved_tensors
        c = ctx.inv_pv * g_kl  # the KL's weight in the loss times 1/s^2
        g_w = g_out * eps_over_sd  # 2 d loss / d v
        # in place on the products' outputs: a weight-sized temporary costs a pass over fresh memory
        d_mu = torch.mm(g_out.t(), h).addcmul_(mu, c)
        d_b_mu = g_out.sum(0) + c * b_mu
        # d/d rho of [v-path + KL] = var (g_w^T h^2 + c) - g_kl
        d_rho = torch.mm(g_w.t(), h2).add_(c).mul_(var).sub_(g_kl)
        d_b_rho = g_w.sum(0).add_(c).mul_(b_var).sub_(g_kl)
        d_h = None
        if ctx.needs_input_grad[0]:
            d_h = torch.addcmul(g_out @ mu, h, g_w @ var)
        return d_h, d_mu, d_rho, d_b_mu, d_b_rho, None, None


def local_reparam_dense(h, mu, rho, b_mu, b_rho, prior_scale: float):
    """One local-reparameterised draw of a dense layer's pre-activations and the layer's KL. Inputs
    ``h`` of shape ``(B, ..., I)`` (tokens of a transformer or a mixer) are one draw per example and
    position: the noise is drawn as ``(B, ..., O)`` (per example, as a data-parallel rank slices it)
    and the products run on the flattened ``(B * ..., I)`` rows."""
    lead = h.shape[:-1]
    eps = example_noise(lead + (mu.shape[0],), device=h.device, dtype=h.dtype)
    if h.dim() == 2:
        return LocalReparamDense.apply(h, mu, rho, b_mu, b_rho, eps, prior_scale)
    out, kl = LocalReparamDense.apply(h.reshape(-1, h.shape[-1]), mu, rho, b_mu, b_rho,
                                      eps.reshape(-1, mu.shape[0]), prior_scale)
    return out.reshape(lead + (mu.shape[0],)), kl
