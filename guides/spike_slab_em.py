"""EM for the group spike-and-slab prior, interleaved with a sampler (Ke & Fan 2022; EMVS,
Rockova & George 2014).

Given the current weights ``theta`` the indicators ``gamma_g`` are integrated out in closed form:

E-step, the inclusion probability of group ``g`` of ``m`` weights:

    logit p_g = logit(pi) + (m/2) ln(s0^2/s1^2) + (||theta_g||^2 / 2)(1/s0^2 - 1/s1^2)

M-step, the per-group weight decay (a precision) and the inclusion rate (Beta(a, b) prior, MAP):

    d_g = p_g / s1^2 + (1 - p_g) / s0^2
    pi  = (sum_g p_g + a - 1) / (G + a + b - 2)

With the decays fixed, ``-E_gamma[ln p(theta, gamma | pi)]`` is ``sum_g d_g ||theta_g||^2 / 2`` up to a
constant in ``theta``: the sampler's prior term. Pruning is one-way: once a group's inclusion
probability falls below ``prune_threshold`` (after ``prune_start`` sampler steps) its weights are
zeroed and it is masked out for good; the decision goes through
:func:`~bnnzoo.models.sparsity.protect_layers`, so that a layer is never emptied (its best group,
by inclusion probability among the groups still kept, stays) unless ``allow_empty``. Everything
runs on the weights' device; a pruning update reads one boolean per layer back to the host (is the
layer empty?), once per EM update, not per step.
"""

from __future__ import annotations

import math

import torch

from ..models.sparsity import protect_layers
from ..models.spike_slab import SpikeSlabPrior, dead_units

# pi stays inside (0, 1) so that logit(pi) is finite
_PI_CLAMP = 1e-6


def inclusion_logit(sq_norm: torch.Tensor, size: int, pi: torch.Tensor, spike_scale: float,
                    slab_scale: float) -> torch.Tensor:
    """The E-step: ``logit P(gamma_g = 1 | theta_g, pi)`` for groups of ``size`` weights with squared
    norms ``sq_norm``."""
    s0sq, s1sq = spike_scale**2, slab_scale**2
    return (torch.logit(pi) + 0.5 * size * math.log(s0sq / s1sq)
            + 0.5 * sq_norm * (1.0 / s0sq - 1.0 / s1sq))


def inclusion_probability(sq_norm, size, pi, spike_scale, slab_scale) -> torch.Tensor:
    return torch.sigmoid(inclusion_logit(sq_norm, size, pi, spike_scale, slab_scale))


def group_decay(prob: torch.Tensor, spike_scale: float, slab_scale: float) -> torch.Tensor:
    """The M-step's per-group precision ``d_g = p_g / s1^2 + (1 - p_g) / s0^2``."""
    return prob / slab_scale**2 + (1.0 - prob) / spike_scale**2


def inclusion_rate(probs: list[torch.Tensor], a: float, b: float) -> torch.Tensor:
    """The M-step's ``pi = (sum_g p_g + a - 1) / (G + a + b - 2)`` (the Beta posterior's mode),
    kept inside ``(0, 1)``."""
    total = sum(p.sum() for p in probs)
    count = sum(p.numel() for p in probs)
    return ((total + a - 1.0) / max(count + a + b - 2.0, 1e-12)).clamp(_PI_CLAMP, 1.0 - _PI_CLAMP)


class SpikeSlabEM:
    """The EM state of a sampler run over a :class:`~bnnzoo.models.SpikeSlabPrior`: the per-group
    decays, the inclusion rate and the pruning masks (``keep``, per grouped layer). The inclusion
    probabilities are recomputed from the weights when asked for, not stored.

    ``start``: the sampler step of the first E/M update (before it every group is in the slab,
    ``d_g = 1/s1^2``); ``every``: steps between updates; ``prune_start``: the first step at which
    groups may be pruned (default ``start``); ``prune_threshold``: groups whose inclusion
    probability falls below it are pruned (``0`` disables pruning; default 0.5, the median probability
    rule); ``allow_empty``: let the rule prune every group of a layer (default: the best one is kept,
    with an :class:`~bnnzoo.models.sparsity.EmptyLayerWarning`).

    :meth:`decays` and :meth:`keep_views` return views that broadcast over each site; updates are
    written in place, so the views stay valid for the whole run.
    """

    def __init__(self, prior: SpikeSlabPrior, start: int = 0, every: int = 1, prune_threshold: float = 0.5,
                 prune_start: int | None = None, allow_empty: bool = False):
        if not isinstance(prior, SpikeSlabPrior):
            raise TypeError(f"SpikeSlabEM needs a SpikeSlabPrior, got {type(prior).__name__}")
        for name, value, low in (("start", start, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= prune_threshold < 1:
            raise ValueError(f"prune_threshold must be in [0, 1), got {prune_threshold!r}")
        self.prior = prior
        self.start, self.every = start, every
        self.prune_start = start if prune_start is None else int(prune_start)
        self.prune_threshold = float(prune_threshold)
        self.allow_empty = bool(allow_empty)
        self.scales = {lay.layer: prior.scales(lay.layer) for lay in prior.layouts}  # (s0, s1) per layer
        self.a, self.b = prior.a_value, prior.b_value
        self.layouts = prior.layouts
        self.num_updates = 0

    # ---- state --------------------------------------------------------------------------------
    def reset(self, device) -> None:
        """Fresh state on ``device``: every group in the slab, ``pi`` at its prior mean, nothing pruned."""
        self.pi = torch.tensor(self.a / (self.a + self.b), device=device)
        self.decay = {lay.layer: torch.full((lay.num_groups,), self.scales[lay.layer][1] ** -2, device=device)
                      for lay in self.layouts}
        self.keep = {lay.layer: torch.ones(lay.num_groups, dtype=torch.bool, device=device) for lay in self.layouts}
        self._fixed = {site: torch.tensor(self.prior.fixed_scale(site) ** -2, device=device)
                       for site in self.prior.net.sites() if self.prior.grouped_site(site) is None}
        self.num_updates = 0

    def due(self, step: int) -> bool:
        """Whether sampler step ``step`` (1-based) is followed by an E/M update."""
        return step >= self.start and (step - self.start) % self.every == 0

    def decays(self) -> dict[str, torch.Tensor]:
        """The prior precision of every site's weights, broadcasting over the site."""
        out = {}
        for site in self.prior.net.sites():
            lay = self.prior.grouped_site(site)
            out[site] = self._fixed[site] if lay is None else lay.view(site, self.decay[lay.layer])
        return out

    def keep_views(self) -> dict[str, torch.Tensor]:
        """``True`` for kept and ``False`` for pruned weights of every grouped site (broadcasting
        views; multiplying by them zeroes the pruned weights)."""
        return {site: lay.view(site, self.keep[lay.layer]) for lay in self.layouts for site in lay.sites()}

    # ---- E and M steps ------------------------------------------------------------------------
    def probabilities(self, params: dict[str, torch.Tensor], pi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The E-step for weights ``params`` (leading sample dimensions allowed)."""
        pi = self.pi if pi is None else pi
        return {lay.layer: inclusion_probability(lay.squared_norms(params), lay.size, pi, *self.scales[lay.layer])
                for lay in self.layouts}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        """E-step on the current weights, pruning (from ``prune_start``), then the M-step. Pruned
        weights of ``params`` are zeroed in place."""
        probs = self.probabilities(params)
        if self.prune_threshold > 0 and step >= self.prune_start:
            rule = {k: self.keep[k] & (p >= self.prune_threshold) for k, p in probs.items()}
            # a layer the rule would empty keeps its most probable group among those still kept
            score = {k: torch.where(self.keep[k], p, torch.full_like(p, -1.0)) for k, p in probs.items()}
            for lay in self.layouts:
                keep = self.keep[lay.layer]
                keep.copy_(protect_layers({lay.layer: rule[lay.layer]}, score, allow_empty=self.allow_empty)[lay.layer])
                for site in lay.sites():
                    params[site].mul_(lay.view(site, keep))
        for lay in self.layouts:
            self.decay[lay.layer].copy_(group_decay(probs[lay.layer], *self.scales[lay.layer]))
        self.pi.copy_(inclusion_rate(list(probs.values()), self.a, self.b))
        self.num_updates += 1

    # ---- results ------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks (``True`` = kept) of every grouped site, full site shape. With input groups,
        a unit whose every outgoing group is pruned (:func:`~bnnzoo.models.spike_slab.dead_units`) is
        masked too: its incoming weights and its bias."""
        out = {site: lay.expand(site, self.keep[lay.layer]).clone() for lay in self.layouts for site in lay.sites()}
        net = self.prior.net
        for name, alive in dead_units(net, self.layouts, self.keep).items():
            layer = net.layer(name)
            w, b = f"{name}.weight", f"{name}.bias"
            rows = alive.view(-1, *([1] * (len(layer.weight_shape) - 1)))
            out[w] = out.get(w, torch.ones(layer.weight_shape, dtype=torch.bool, device=alive.device)) & rows
            out[b] = out.get(b, torch.ones(layer.num_groups, dtype=torch.bool, device=alive.device)) & alive
        return out

    def pruned_fractions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device scalars: the fraction of groups pruned and the fraction of the network's weights
        that sit in pruned groups."""
        total_weights = self.prior.net.num_weights()
        groups = sum(lay.num_groups for lay in self.layouts)
        pruned_groups = sum((~self.keep[lay.layer]).sum() for lay in self.layouts)
        pruned_weights = sum((~self.keep[lay.layer]).sum() * lay.size for lay in self.layouts)
        return pruned_groups / groups, pruned_weights / total_weights

    def state(self, params: dict[str, torch.Tensor]) -> dict:
        """The EM state on the CPU: ``pi``, ``keep`` per layer and the inclusion probabilities of the
        weights ``params``."""
        return {"pi": self.pi.detach().cpu(),
                "inclusion_prob": {k: v.detach().cpu() for k, v in self.probabilities(params).items()},
                "keep": {k: v.detach().cpu() for k, v in self.keep.items()}}
