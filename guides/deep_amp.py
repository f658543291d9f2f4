"""Module A of TDAMP as deep approximate message passing (``module_a="amp"``): the forward pass of
:mod:`~bnnzoo.guides.moment_propagation` with Onsager-corrected (cavity) pre-activation means, the
extrinsic weight messages built from them, and the turbo loop between Module A and Module B.

**Why a correction.** Module A evaluates, for every example ``n``, the log evidence ``log Z_n`` of
its output under the weights' beliefs ``N(M, V)``, and sends each weight the Gaussian message built
from ``g = d log Z_n / d omega`` and its derivative. The beliefs are Module B's posterior: the prior
times *every* message, example ``n``'s own message of the previous turbo iteration included. Message
passing wants the message of factor ``n`` computed on the cavity (extrinsic) belief, the belief
without factor ``n``'s own message (Xu, Liu, Zhang & Lau 2024, Module A; DeepMP, Lucibello et al.
2022; GAMP, Rangan 2011). AMP does not form ``N`` cavities: it expands the pre-activation mean to
first order in the example's message and subtracts the example's part, the Onsager term.

**The first-order cavity.** Dense layer ``l``, unit ``k`` (a group: weight row and bias, Module B's
group spike-and-slab), inputs ``x_n`` with variances ``u_n`` (``u = 0`` for known inputs and the
bias's constant input). Example ``n``'s message to weight ``w_ki`` (moment propagation's backward
pass, :func:`~bnnzoo.guides.moment_propagation.weight_messages`) has precision and precision-mean

    c_i = G_nk (x_ni^2 + u_ni),   e_i = c_i M_ki + d_i,   d_i = g_nk x_ni + 2 gt_nk M_ki u_ni

with ``g = d log Z_n / d omega``, ``gt = d log Z_n / d tau`` and ``G = g^2 - 2 gt = -d g / d omega``.
For any prior, the belief ``p(w) ~ prior(w) exp(sum eta w - lam w^2 / 2)`` has ``d E[w_j] / d eta_i =
Cov(w_j, w_i)`` and ``d E[w_j] / d lam_i = -Cov(w_j, w_i^2) / 2``. Under a group's Bernoulli-Gaussian
posterior (inclusion ``pi``, slab posterior ``N(m_i, v_i)`` per weight, mean ``M_i = pi m_i``):

    Cov(w_j, w_i)   = pi v_i [i = j] + pi (1 - pi) m_j m_i
    Cov(w_j, w_i^2) = 2 pi m_i v_i [i = j] + pi (1 - pi) m_j (m_i^2 + v_i)

so removing ``beta`` times the message (its weight in the belief) changes the belief means by

    dM_j = -beta { pi v_j (d_j - (1 - pi) m_j c_j) + pi (1 - pi) m_j sum_i [ m_i d_i + c_i q_i ] },
    q_i  = pi m_i^2 - (m_i^2 + v_i) / 2.

The two parts are the first-order changes of the slab means, ``dm_j = -beta v_j (d_j - (1 - pi) m_j
c_j)``, and of the group's inclusion log-odds, ``dL = -beta sum_i [m_i d_i + c_i q_i]`` (``d pi = pi (1
- pi) dL``). One example can move a wide layer's log-odds by several units (``sum_i m_i d_i`` sums
over every input), where ``pi + pi (1 - pi) dL`` leaves ``[0, 1]``; the cavity therefore takes the
inclusion as the exact sigmoid of the moved log-odds, which agrees with the expansion to first order.
With ``S_nk = sum_i m_ki x_ni`` (the slab-mean pre-activation) the cavity pre-activation mean is

    omega_nk = pi_cav ( S - beta [ g A1 + 2 gt A2 - (1 - pi) G A3 ] )
    pi_cav   = sigmoid( L - beta [ g S + 2 gt A4 + G A5 ] )
    A1 = sum_i v x^2,  A2 = sum_i v M x u,  A3 = sum_i v m x (x^2 + u),  A4 = sum_i m M u,  A5 = sum_i (x^2 + u) q

(every ``A`` one matrix product per layer; ``L`` the group's inclusion log-odds). For a Gaussian
belief (``pi = 1``: the output layer) it is the textbook term ``omega = sum_i M x - g sum_i V x^2 -
2 gt sum_i V M x u``: DeepMP's ``omega = sum_i m x - g sum_i sigma x^2`` with the input-variance
term of a deeper layer. ``g``,
``gt`` and ``G`` are the previous turbo iteration's (AMP's time index): the first exchange of a
minibatch has none and evaluates at ``omega = p`` (AMP's ``g^0 = 0``). The variances ``tau`` are
moment propagation's (the Onsager term changes only the mean, as in AMP), and the correction is not
differentiated in the backward pass (it is a constant of the iteration).

**The messages.** At the cavity means Module A's closed-form backward pass gives ``g_nk = d log Z_n /
d omega_nk`` and ``G_nk = -d g_nk / d omega_nk`` at every layer, and the batch's message to ``w_ki``
is, as in GAMP, precision ``sum_n G_nk (x_ni^2 + u_ni)`` and precision-mean ``that precision times M_ki
plus sum_n (g_nk x_ni + 2 gt_nk M_ki u_ni)``: the data's extrinsic message (Module A sends Module B
the likelihood's message, never the posterior). Module B (:mod:`~bnnzoo.guides.group_sparse_messages`)
returns the posterior moments; the message each weight receives from it is its extrinsic
Bernoulli-Gaussian prior (the group's prior times all the other weights' messages), and Module A's
belief is that prior times Module A's own message.

**The turbo loop** (:func:`turbo_update`). Per minibatch, with the state before the batch as the
prior (the posterior after the previous batches): Module A's message of the batch, in natural
parameters ``(c, c M + d)`` at the current belief, is damped against the previous iteration's
(``TURBO_DAMPING``: the new one enters with weight 1/2, as damped GAMP does), the state is set to
the prior with this message folded in (the guide's forgetting and weight ``beta = damping P / T``,
and its per-neuron line search from the prior's means), Module B gives the new belief, and the
exchange repeats until the largest change of an inclusion probability and of a slab mean (in units
of its slab posterior standard deviation) falls below ``turbo_tolerance``, at most
``turbo_iterations`` times. Each iteration replaces the batch's message of the previous one (the
batch is counted once, whatever the number of iterations), so the Onsager weight is ``beta``: the
weight with which example ``n``'s message sits in the belief.
With one turbo iteration the update is moment propagation's (no previous ``g``).

What is not corrected: an example's message also moves, through the lower layers' weights, the means
of a deeper layer's inputs (DeepMP's input-side cavity); those inputs are taken as propagated.
"""

from __future__ import annotations

import torch

from ..models.errors import ConfigError
from ..models.networks import Dense, Network
from .group_sparse_messages import GroupPosterior, group_posterior
from .moment_propagation import WeightMessage, message_pass

MODULE_A = ("adf", "amp")  # the Module A variants of TDAMPGuide
TURBO_DAMPING = 0.5  # a turbo iteration's message enters the batch's message with this weight


def check_module_a(value) -> str:
    """``"adf"`` (moment propagation, the beliefs' own means) or ``"amp"`` (this module)."""
    if value not in MODULE_A:
        raise ConfigError(f"module_a must be one of {MODULE_A}, got {value!r}")
    return value


def onsager_correction(inputs: torch.Tensor, input_var: torch.Tensor | None, post: GroupPosterior,
                       g: torch.Tensor, g_tau: torch.Tensor, curv: torch.Tensor, weight: float) -> torch.Tensor:
    """The change ``omega - p`` (``(B, K)``) of one dense layer's pre-activation means when each
    example's own message is removed from the beliefs (module docstring): the slab means and the
    group's inclusion log-odds moved to first order, the inclusion itself their exact sigmoid.

    ``inputs`` ``(B, I + 1)`` (the bias's constant 1 last), ``input_var`` the same shape or ``None``
    (known inputs); ``post`` Module B's layer posterior on the ``(K, I + 1)`` tensors; ``g``,
    ``g_tau``, ``curv`` (``G``) the example's previous derivatives ``(B, K)``; ``weight`` the
    message's weight ``beta`` in the belief."""
    pi = post.inclusion
    m, v = post.weight_slab
    mean = post.weight_moments[0]
    pi_row = pi.unsqueeze(0)
    sq = inputs * inputs
    second = sq if input_var is None else sq + input_var
    s = inputs @ m.t()
    slab = g * (sq @ v.t()) - (1.0 - pi_row) * curv * ((inputs * second) @ (v * m).t())
    log_odds = g * s + curv * (second @ (pi.unsqueeze(1) * m * m - 0.5 * (m * m + v)).t())
    if input_var is not None:
        slab = slab + 2.0 * g_tau * ((inputs * input_var) @ (v * mean).t())
        log_odds = log_odds + 2.0 * g_tau * (input_var @ (m * mean).t())
    # the cavity inclusion: sigmoid of the group's log-odds less the example's first-order share
    # (+inf for the output layer and -inf for pruned groups stay as they are)
    pi_cavity = torch.sigmoid(post.log_odds.unsqueeze(0) - weight * log_odds)
    return pi_cavity * (s - weight * slab) - pi_row * s


def amp_message_pass(net: Network, x: torch.Tensor, posts: dict[str, GroupPosterior], output_grads,
                     previous: dict[str, WeightMessage] | None = None, weight: float = 1.0,
                     offsets: dict[str, torch.Tensor] | None = None,
                     curv_out: dict[str, torch.Tensor] | None = None,
                     corrections_out: dict[str, torch.Tensor] | None = None):
    """Deep AMP's Module A: :func:`~bnnzoo.guides.moment_propagation.message_pass` with every dense
    layer's pre-activation means replaced by the Onsager-corrected cavity means (module docstring).

    ``posts`` are Module B's layer posteriors (the beliefs); ``previous`` the messages of the
    previous turbo iteration (their ``pre_grad`` ``g`` and ``example_curv`` ``G``; ``None``: no
    correction, AMP's first iteration); ``weight`` the examples' message weight in the beliefs.
    ``offsets[layer]`` (``(B, K)``), if given, is added to that layer's means as well (a probe for
    finite differences); ``corrections_out``, if given, receives each layer's Onsager correction
    ``omega - p``. The backward pass holds the corrections fixed (they are constants of the
    iteration): ``g`` is the derivative of ``log Z_n`` in ``omega`` with the deeper layers' corrections
    held at their values. Returns ``log_z`` per example, the output mean and variance, and the
    messages per layer (:class:`~bnnzoo.guides.moment_propagation.WeightMessage`, at the cavity).
    """
    def adjust(name: str, inputs: torch.Tensor, input_var, mean: torch.Tensor) -> torch.Tensor:
        if previous is not None:
            prev = previous[name]
            g, curv = prev.pre_grad, prev.example_curv
            correction = onsager_correction(inputs, input_var, posts[name], g, 0.5 * (g * g - curv), curv, weight)
            mean = mean + correction
            if corrections_out is not None:
                corrections_out[name] = correction
        if offsets is not None and name in offsets:
            mean = mean + offsets[name]
        return mean

    moments = {name: post.weight_moments for name, post in posts.items()}
    return message_pass(net, x, moments, output_grads, curv_out, adjust=adjust)


def belief_change(before: dict[str, GroupPosterior], after: dict[str, GroupPosterior]) -> torch.Tensor:
    """The turbo loop's convergence measure: the largest change of an inclusion probability and of a
    slab mean in units of its (new) slab posterior standard deviation, over all layers (a scalar
    tensor on the device)."""
    out = None
    for name, new in after.items():
        old = before[name]
        step = ((new.weight_slab[0] - old.weight_slab[0]).abs() / new.weight_slab[1].sqrt()).amax()
        incl = torch.where(torch.isfinite(new.log_odds), (new.inclusion - old.inclusion).abs(), 0.0)
        step = torch.maximum(step, incl.amax())
        out = step if out is None else torch.maximum(out, step)
    return out


def _snapshot(guide) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (mod.eta.clone(), mod.precision.clone()) for name, mod in guide.messages.items()}


def _restore(guide, saved) -> None:
    for name, (eta, lam) in saved.items():
        guide.messages[name].eta.copy_(eta)
        guide.messages[name].precision.copy_(lam)


def copy_posteriors(posts: dict[str, GroupPosterior]) -> dict[str, GroupPosterior]:
    """Copies of Module B's layer posteriors (the ones the guide returns may live in reused buffers)."""
    def c(pair):
        return None if pair is None else (pair[0].clone(), pair[1].clone())

    return {n: GroupPosterior(p.log_odds.clone(), c(p.weight_slab), c(p.bias_slab), c(p.weight_moments),
                              c(p.bias_moments)) for n, p in posts.items()}


@torch.no_grad()
def turbo_update(guide, x: torch.Tensor, y: torch.Tensor, rate: float, beta: float) -> torch.Tensor:
    """One minibatch of TDAMP with deep AMP as Module A (module docstring): the turbo loop from the
    state before the batch (the prior), each iteration's message damped against the last
    (``TURBO_DAMPING``) and folded into that prior by the guide's ``_absorb`` (forgetting ``rate``,
    weight ``beta``). Stops when :func:`belief_change` is
    below ``guide.turbo_tolerance`` (``None``: never) or after ``guide.turbo_iterations``. Adds the
    iterations used to ``guide.turbo_count``. Returns the batch's summed log evidence under the
    beliefs it was given."""
    prior_state = _snapshot(guide)
    prior_posts = copy_posteriors(guide.layer_posteriors())
    posts, previous, first = prior_posts, None, None
    damped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the batch's message (c, c M + d), damped
    used = 0
    for it in range(guide.turbo_iterations):
        log_z, f_mean, f_var, messages = amp_message_pass(
            guide.net, x, posts, lambda mean, var: guide.log_evidence_and_grads(mean, var, y),
            previous=previous, weight=beta)
        used += 1
        if first is None:
            first = log_z.sum()
            guide.record_batch(first, y, f_mean, f_var, len(x))
        if it > 0:
            _restore(guide, prior_state)
        for name, msg in messages.items():
            curv, eta = msg.curv, msg.grad.addcmul_(msg.curv, posts[name].weight_moments[0])
            if name in damped:
                old_curv, old_eta = damped[name]
                curv = torch.lerp(old_curv, curv, TURBO_DAMPING)
                eta = torch.lerp(old_eta, eta, TURBO_DAMPING)
            damped[name] = (curv, eta)
            # _absorb folds in curv * (the prior's means) + g^T h + var_grad_term: carry it all in the last
            folded = WeightMessage(curv, msg.example_curv, msg.inputs, msg.pre_var, torch.zeros_like(msg.pre_grad),
                                   eta - curv * prior_posts[name].weight_moments[0])
            guide._absorb(name, prior_posts[name], folded, rate, beta)
        previous = messages
        new_posts = copy_posteriors(guide.layer_posteriors())
        if guide.turbo_tolerance is not None and it + 1 < guide.turbo_iterations:
            if float(belief_change(posts, new_posts)) < guide.turbo_tolerance:  # one host read per iteration
                posts = new_posts
                break
        posts = new_posts
    guide.turbo_count += used
    guide.turbo_batches += 1
    return first


@torch.no_grad()
def batch_deep_amp(net: Network, x: torch.Tensor, logit_rho: dict[str, torch.Tensor],
                   slab_var: dict[str, torch.Tensor], output_grads,
                   prior_messages: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   onsager: bool = True, iterations: int = 1000, damping: float = 0.5,
                   tol: float = 1e-9) -> tuple[dict[str, GroupPosterior], int]:
    """Deep AMP on one batch to its fixed point (no state over batches, no forgetting): the data's
    message ``(eta, lam)`` to every weight is Module A's message of the whole batch at the cavity
    means (:func:`amp_message_pass`, weight 1), damped (``damping``) until the belief means change by
    less than ``tol`` (relative). The deep analogue of :func:`~bnnzoo.guides.tdamp.linear_tdamp`, the
    test bed against exact inference on small networks.

    ``logit_rho`` and ``slab_var`` (layer -> per-group ``(K,)``) define each layer's group prior
    (``logit_rho = +inf``: always on); ``prior_messages`` (layer -> ``(eta, lam)``, ``(K, I + 1)``) are
    fixed Gaussian factors multiplying the prior (known weights: large ``lam``); ``output_grads(mean,
    var) -> (log_z, g, g_tau)`` is the likelihood's. ``onsager=False`` evaluates every example at the
    beliefs' own means (moment propagation's message at the same fixed-point iteration). Returns
    Module B's layer posteriors and the iterations run."""
    layers = [layer for layer in net.layers if isinstance(layer, Dense)]
    eta, lam, base = {}, {}, {}
    for layer in layers:
        zeros = x.new_zeros(layer.out_features, layer.in_features + 1)
        eta[layer.name], lam[layer.name] = zeros.clone(), zeros.clone()
        base[layer.name] = (prior_messages or {}).get(layer.name, (zeros, zeros))

    def beliefs():
        return {name: group_posterior(logit_rho[name], slab_var[name], base[name][0] + eta[name],
                                      base[name][1] + lam[name]) for name in eta}

    previous, last = None, None
    it = 0
    for it in range(1, iterations + 1):
        posts = beliefs()
        _, _, _, messages = amp_message_pass(net, x, posts, output_grads, previous=previous if onsager else None)
        for name, msg in messages.items():
            mean = posts[name].weight_moments[0]
            eta[name].mul_(1 - damping).add_(msg.curv * mean + msg.grad, alpha=damping)
            lam[name].mul_(1 - damping).add_(msg.curv, alpha=damping)
        previous = messages
        current = torch.cat([p.weight_moments[0].flatten() for p in posts.values()])
        if last is not None and float((current - last).norm()) <= tol * max(float(current.norm()), 1e-30):
            break
        last = current
    return beliefs(), it
