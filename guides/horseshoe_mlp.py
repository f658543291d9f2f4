"""One training step of the horseshoe guide on a dense ReLU network in one autograd function.

On a small network a step is a few hundred operations on tensors of a few
hundred entries, and the per-operation overhead (Python, dispatch, one autograd node per operation)
costs far more than the arithmetic. :class:`HorseshoeMLP` runs the whole step as one autograd node
with a hand-written backward pass:

- the scale block (closed-form KL of every scale variable and one draw of every ``s_k``),
  :func:`~bnnzoo.guides.horseshoe_scales.scales_forward` / ``scales_backward``;
- every dense layer by local reparameterisation, ``o = s * z`` with
  ``z = h mu^T + b_mu + sqrt(h^2 exp(2 rho)^T + exp(2 b_rho)) * eps`` (the formulas of
  :mod:`~bnnzoo.guides.scaled_dense`), ReLU between layers;
- the Gaussian KL of every layer's decentred weights, ``sum 0.5 (var + mu^2) / p^2 - rho + ln p - 1/2``,
  and its gradient for all layers at once with ``torch._foreach_*`` operations (one call per
  formula instead of one per tensor);
- with targets ``y`` (regression), the Gaussian likelihood term, so the node returns the loss
  ``nll_weight * sum_n -log N(y_n | f_n, sigma^2) + kl_weight * KL``; without, it returns ``(f, KL)``.

The KL's sum uses ``torch._foreach_norm(., 1)`` on the elementwise KL terms, which are non-negative
(each is the KL between two one-dimensional Gaussians), so their L1 norm is their sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .horseshoe_scales import scales_backward, scales_forward

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class HorseshoeMLP(torch.autograd.Function):
    """``HorseshoeMLP.apply(x, y, log_noise, eps, plan, weights, *params)``.

    ``params``: the scale block's ``(2, V)`` parameters, then ``mu, rho, b_mu, b_rho`` of every
    dense layer in order (hidden layers, output layer last).
    ``eps``: one standard-normal vector holding the scale block's noise (``plan.scale_noise``
    entries), then ``B x K`` entries per layer. ``plan`` (built by
    :meth:`HorseshoeGuide.step_plan <bnnzoo.guides.HorseshoeGuide.step_plan>`): ``scales`` (the scale block's
    constants), ``sizes`` (groups per hidden layer), ``output_units`` (the output layer's fixed
    scale), ``inv_prior_var``, ``half_inv_prior_var``, ``kl_offset`` and ``ones`` (lists of 0-d
    tensors, one per Gaussian tensor in the order ``mu, b_mu`` of each layer: ``1/p^2``,
    ``1/(2 p^2)``, ``ln p - 1/2`` and 1).
    With ``y = None`` returns ``(f, kl)``; otherwise the scalar loss with
    ``weights = (nll_weight, kl_weight)`` (``log_noise``: the Gaussian noise's log standard deviation).
    """

    @staticmethod
    def forward(ctx, x, y, log_noise, eps, plan, weights, *params):
        batch = x.shape[0]
        layer_params = params[1:]
        mus, rhos = list(layer_params[0::2]), list(layer_params[1::2])  # mu, b_mu, ... / rho, b_rho, ...
        n_scale = plan.scale_noise
        s_hidden, kl, scale_saved = scales_forward(params[0], eps[:n_scale], plan.scales)
        scales = list(s_hidden.split(plan.sizes)) if len(plan.sizes) > 1 else [s_hidden]
        scales.append(plan.output_units)
        variances = torch._foreach_exp(torch._foreach_add(rhos, rhos))
        # the Gaussian KL of every weight and bias: sum 0.5 (var + mu^2) / p^2 - rho + ln p - 1/2
        terms = torch._foreach_addcmul(variances, mus, mus)
        torch._foreach_mul_(terms, plan.half_inv_prior_var)
        torch._foreach_sub_(terms, rhos)
        torch._foreach_add_(terms, plan.kl_offset)
        kl = kl + torch.stack(torch._foreach_norm(terms, 1)).sum()
        h = x.reshape(batch, -1)
        saved, start = [], n_scale
        last = len(scales) - 1
        for j, s in enumerate(scales):
            mu, var, b_mu, b_var = mus[2 * j], variances[2 * j], mus[2 * j + 1], variances[2 * j + 1]
            width = mu.shape[0]
            noise = eps[start:start + batch * width].view(batch, width)
            start += batch * width
            h2 = h * h
            sd = F.linear(h2, var, b_var).sqrt_()
            z = torch.addcmul(F.linear(h, mu, b_mu), sd, noise)
            saved += [h, h2, noise.div(sd), z]
            h = z * s
            if j < last:
                h = torch.relu(h)
        ctx.plan, ctx.batch, ctx.weights, ctx.regression = plan, batch, weights, y is not None
        ctx.x_shape = x.shape
        if y is None:
            ctx.save_for_backward(*mus)
            ctx.intermediates = (variances, scale_saved, saved)
            return h, kl
        r = y - h.view(y.shape)
        sq = torch.dot(r, r)
        inv_var = torch.exp(log_noise * -2.0)
        # nll_weight * (B (ln sigma + ln(2 pi) / 2) + sq / (2 sigma^2)) + kl_weight * KL
        loss = torch.add(log_noise, kl, alpha=weights[1] / (weights[0] * batch))
        loss = loss.addcmul_(inv_var, sq, value=0.5 / batch).add_(_HALF_LOG_2PI).mul_(weights[0] * batch)
        # the inputs through save_for_backward (checked against in-place changes), the intermediates
        # of this function as attributes (unpacking some fifty saved tensors costs more than the rest)
        ctx.save_for_backward(*mus)
        ctx.intermediates = (variances, scale_saved, saved, r, sq, inv_var)
        return loss

    @staticmethod
    def backward(ctx, *grads):
        plan, batch = ctx.plan, ctx.batch
        mus = list(ctx.saved_tensors)
        n_layers = len(plan.sizes) + 1
        variances, scale_saved, layer_saved = ctx.intermediates[:3]
        d_log_noise = None
        if ctx.regression:
            r, sq, inv_var = ctx.intermediates[3:]
            g = grads[0]
            g_nll, g_kl = g * ctx.weights[0], g * ctx.weights[1]
            g_o = (r * (-g_nll * inv_var)).view(batch, -1)
            d_log_noise = g_nll * torch.addcmul(torch.full_like(sq, batch), inv_var, sq, value=-1.0)
        else:
            g_o, g_kl = grads
        data_mu, data_var, d_scales = [None] * (2 * n_layers), [None] * (2 * n_layers), [None] * (n_layers - 1)
        scales = list(scale_saved[-1].split(plan.sizes)) if n_layers > 2 else [scale_saved[-1]]
        scales.append(plan.output_units)
        for j in reversed(range(n_layers)):
            h, h2, noise_over_sd, z = layer_saved[4 * j:4 * j + 4]
            g_z = g_o * scales[j]
            if j < n_layers - 1:
                d_scales[j] = (g_o * z).sum(0)
            g_w = g_z * noise_over_sd  # twice d loss / d (pre-activation variance)
            data_mu[2 * j], data_mu[2 * j + 1] = torch.mm(g_z.t(), h), g_z.sum(0)
            data_var[2 * j], data_var[2 * j + 1] = torch.mm(g_w.t(), h2), g_w.sum(0)
            if j > 0 or ctx.needs_input_grad[0]:
                d_h = torch.addcmul(g_z @ mus[2 * j], h, g_w @ variances[2 * j])
                # through the previous layer's ReLU (h > 0 where it passed); at the input, x's gradient
                g_o = torch.ops.aten.threshold_backward(d_h, h, 0) if j > 0 else d_h.view(ctx.x_shape)
        # d mu = data + g_kl mu / p^2;  d rho = var * data_var + g_kl (var / p^2 - 1)
        d_mus = torch._foreach_mul(mus, plan.inv_prior_var)
        torch._foreach_mul_(d_mus, g_kl)
        torch._foreach_add_(d_mus, data_mu)
        d_rhos = torch._foreach_mul(variances, plan.inv_prior_var)
        torch._foreach_sub_(d_rhos, plan.ones)
        torch._foreach_mul_(d_rhos, g_kl)
        torch._foreach_addcmul_(d_rhos, variances, data_var)
        g_s = torch.cat(d_scales) if len(d_scales) > 1 else d_scales[0]
        d_scale_params = scales_backward(scale_saved, plan.scales, g_s, g_kl)
        layer_grads = [g for pair in zip(d_mus, d_rhos) for g in pair]
        d_x = g_o if ctx.needs_input_grad[0] else None
        return (d_x, None, d_log_noise, None, None, None, d_scale_params, *layer_grads)


__all__ = ["HorseshoeMLP"]
