"""Bayesian model reduction (Markovic, Friston & Kiebel 2023): pruning a fitted Gaussian posterior
by the change in evidence, post hoc ("bmr") or between training epochs ("bmr-iterative").

BMR applies to any posterior whose weights have a Gaussian posterior under a zero-mean Gaussian
prior. Supported as they are: a :class:`~bnnzoo.guides.MeanFieldNormal` guide (``meanfield-vi`` and
the entries here), the horseshoe guide's decentred weights (``horseshoe-svi``) and TDAMP's slab
posteriors (``em-tdamp``); any other posterior class opts in by offering the
:class:`GaussianWeights` protocol. The formulas live in :mod:`bnnzoo.guides.bmr`.

A posterior fitted with a tempered ELBO (``horseshoe-svi``: KL weight 0.2) is reduced as it is: the
evidence changes are those of the tempered model, whose likelihood counts ``1/kl_weight`` times.
The reduced copy keeps the entry's prediction settings (the horseshoe's untempered predictive for
regression). On Boston, ``horseshoe-svi`` then ``Posterior.reduce()`` meets the regression target
(``python -m benchmarks.run bmr-boston-horseshoe``).
"""

from __future__ import annotations

import copy
import time
from typing import Protocol, runtime_checkable

import torch

from ..catalog import CatalogEntry, register
from ..variational import VariationalPosterior
from .baselines import build_model


@runtime_checkable
class GaussianWeights(Protocol):
    """What a posterior offers to be reduced by BMR.

    ``gaussian_weights()`` -> ``{site: (mu, sigma^2, prior_var)}`` for every weight site with a
    Gaussian posterior ``N(mu, sigma^2)`` under a prior ``N(0, prior_var)`` (``prior_var`` a number
    or a tensor broadcasting to the site). ``apply_reduction(reduction)`` writes a
    :class:`~bnnzoo.guides.bmr.Reduction` into the posterior in place: sets ``reduction.masks``
    (pruned weights must then be exact zeros in :meth:`draw_weights`) and replaces the posterior
    of ``reduction.accepted`` entries by ``reduction.locs`` / ``reduction.variances``.
    """

    def gaussian_weights(self) -> dict[str, tuple]: ...

    def apply_reduction(self, reduction) -> None: ...


# ---- the Gaussian weights of the catalog's guides ----------------------------------------------------
def _meanfield_weights(posterior, level: str) -> dict[str, tuple]:
    from bnnzoo.guides.bmr import meanfield_gaussian_weights

    return meanfield_gaussian_weights(posterior.guide, posterior.model)


def _meanfield_apply(posterior, reduction) -> None:
    from bnnzoo.guides.bmr import apply_reduction

    apply_reduction(posterior.guide, reduction)


@torch.no_grad()
def _horseshoe_weights(posterior, level: str) -> dict[str, tuple]:
    """The horseshoe guide's decentred weights: ``w = s_k beta`` with ``beta ~ N(0, 1)`` in hidden
    layers (the scales ``s_k`` have their own factor of ``q``), so BMR acts on ``q(beta) = N(mu,
    sigma^2)`` under the prior ``N(0, 1)``, as Markovic et al. reduce the standardised weights of
    their non-centred models; the output layer's prior is ``N(0, output_prior_scale^2)`` in the
    guide's stored units."""
    from bnnzoo.guides.sites import get_site, split_site

    guide = posterior.guide
    out = {}
    for site in guide.net.sites():
        prior_scale = guide.output_prior_scale if split_site(site)[0] == guide.output else 1.0
        out[site] = (get_site(guide.locs, site).detach(), torch.exp(2 * get_site(guide.log_scales, site).detach()),
                     prior_scale * prior_scale)
    return out


def _horseshoe_apply(posterior, reduction) -> None:
    from bnnzoo.guides import horseshoe
    from bnnzoo.guides.bmr import apply_reduction

    apply_reduction(posterior.guide, reduction, pruned_scale=horseshoe._PRUNED_SCALE)


@torch.no_grad()
def _tdamp_weights(posterior, level: str) -> dict[str, tuple]:
    """TDAMP's Gaussian part: given that its neuron is on, each weight's posterior is the slab
    posterior ``N(slab_mean, slab_var)`` under the slab prior ``N(0, sigma_l^2)`` (per group), so BMR
    decides within the included neurons. Per weight, only the weights are offered: TDAMP ties a
    neuron's bias to its on/off state (a pruned bias would switch the whole neuron off), so a bias is
    reduced with its group (``level="group"``) only."""
    from bnnzoo.guides.sites import split_site

    state = posterior.guide.state()
    out = {}
    for site, mu in state["slab_mean"].items():
        layer, param = split_site(site)
        if param == "bias" and level == "weight":
            continue
        prior_var = state["prior_var"][layer].reshape((-1,) + (1,) * (mu.dim() - 1))
        out[site] = (mu, state["slab_var"][site], prior_var)
    return out


@torch.no_grad()
def _tdamp_apply(posterior, reduction) -> None:
    """Masks for the pruned weights (exact zeros in every draw; a group whose weights are all pruned
    loses its bias too, i.e. the neuron is removed); with a shrinking reduction (``reduced_var > 0``)
    the slab posteriors of the accepted weights are set to the reduced ones, the neurons' inclusion
    probabilities kept as they were."""
    from bnnzoo.guides.sites import split_site

    guide = posterior.guide
    masks = dict(reduction.masks)
    for site in list(masks):
        layer, param = split_site(site)
        bias = f"{layer}.bias"
        if param == "weight" and bias not in masks:
            row_kept = masks[site].reshape(masks[site].shape[0], -1).any(1)
            before = guide.mask(bias)
            masks[bias] = row_kept if before is None else row_kept & before
    if reduction.reduced_var > 0 and reduction.locs:
        state = guide.state()
        slab_mean, slab_var = state["slab_mean"], state["slab_var"]
        for site, accept in reduction.accepted.items():
            slab_mean[site] = torch.where(accept, reduction.locs[site].to(slab_mean[site].dtype), slab_mean[site])
            slab_var[site] = torch.where(accept, reduction.variances[site].to(slab_var[site].dtype), slab_var[site])
        hidden = [layer.name for layer in guide.net.hidden_layers()]
        before = {name: post.log_odds for name, post in guide.group_posteriors().items() if name in hidden}
        guide.set_posterior(slab_mean, slab_var)
        after = guide.group_posteriors()
        for name in hidden:  # keep each included neuron's inclusion probability as it was
            shift = torch.where(torch.isfinite(before[name]), after[name].log_odds - before[name],
                                torch.zeros_like(before[name]))
            guide.prior.set_group_parameters(name, logit_rho=guide.prior.logit_rho(name) - shift)
    guide.set_masks(masks)


def _adapter(posterior):
    """``(gaussian_weights, apply_reduction)`` functions for a posterior's guide, or ``None``."""
    from bnnzoo.guides import HorseshoeGuide, MeanFieldNormal, TDAMPGuide

    guide = getattr(posterior, "guide", None)
    if isinstance(guide, MeanFieldNormal):
        return _meanfield_weights, _meanfield_apply
    if isinstance(guide, HorseshoeGuide):
        return _horseshoe_weights, _horseshoe_apply
    if isinstance(guide, TDAMPGuide):
        return _tdamp_weights, _tdamp_apply
    return None


def gaussian_weights(posterior, sites=None, level: str = "weight") -> dict[str, tuple]:
    """``{site: (mu, sigma^2, prior_var)}`` of a posterior with Gaussian weights, those a reduction
    at ``level`` may consider."""
    if isinstance(posterior, GaussianWeights):
        weights = posterior.gaussian_weights()
    else:
        adapter = _adapter(posterior)
        if adapter is None:
            raise TypeError(f"Bayesian model reduction needs Gaussian weights: {posterior.name} "
                            f"({type(posterior).__name__}) has no mean-field Gaussian, horseshoe or TDAMP guide "
                            f"and does not offer gaussian_weights() / apply_reduction()")
        weights = adapter[0](posterior, level)
    return weights if sites is None else {s: weights[s] for s in sites if s in weights}


def _apply(posterior, reduction) -> None:
    if isinstance(posterior, GaussianWeights):
        posterior.apply_reduction(reduction)
    else:
        _adapter(posterior)[1](posterior, reduction)


def reduce_in_place(posterior, *, rule: str = "ss", level: str = "weight", prune_last: bool = False,
                    layers=None, reduced_var: float = 0.0, num_iters: int = 4):
    """Reduce ``posterior`` in place; returns the :class:`~bnnzoo.guides.bmr.Reduction`."""
    from bnnzoo.guides.bmr import reduce_sites, reducible_sites

    sites = reducible_sites(posterior.net, prune_last, layers)
    weights = gaussian_weights(posterior, sites, level)
    current = posterior.masks()
    masks = {s: current[s] for s in weights if s in current}
    reduction = reduce_sites(weights, masks, rule=rule, level=level, reduced_var=reduced_var, num_iters=num_iters)
    _apply(posterior, reduction)
    return reduction


def reduce_posterior(posterior, *, rule: str = "ss", level: str = "weight", prune_last: bool = False, layers=None,
                     reduced_var: float = 0.0, num_iters: int = 4):
    """Bayesian model reduction of a fitted posterior with Gaussian weights: a new, sparser
    posterior (a deep copy; ``posterior`` is untouched) that predicts, evaluates, exports and saves
    like any other.

    ``rule="ss"`` prunes a weight when its evidence change ``dF`` exceeds the per-layer
    spike-and-slab threshold (Beta(1, 1) prior on the keep probability, ``num_iters`` iterations);
    ``rule="plain"`` when ``dF > 0``. ``level="group"`` prunes whole neurons / filters by the
    summed ``dF``. The output layer is kept unless ``prune_last`` (or ``layers`` lists the layers
    to reduce). ``reduced_var > 0`` shrinks instead of removing (see :func:`bnnzoo.guides.bmr.reduce`).
    The decision is appended to ``history["bmr"]``.
    """
    posterior._require_fitted()
    reduced = copy.deepcopy(posterior)
    start = time.perf_counter()
    reduction = reduce_in_place(reduced, rule=rule, level=level, prune_last=prune_last, layers=layers,
                                reduced_var=reduced_var, num_iters=num_iters)
    seconds = time.perf_counter() - start
    reduced.history.setdefault("bmr", []).append(
        {"rule": rule, "level": level, "seconds": seconds, **reduction.summary(),
         "weights_pruned_fraction": reduced.sparsity()["weights_pruned_fraction"]})
    return reduced


# ---- catalog entries -------------------------------------------------------------------------------
def _options(train: dict) -> dict:
    return {"rule": train["rule"], "level": train["level"], "prune_last": train["prune_last"]}


class PostHocBMR(VariationalPosterior):
    """Mean-field Gaussian VI, then one Bayesian model reduction of the fitted guide."""

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        super()._fit(x, y, progress, callback)
        start = time.perf_counter()
        reduce_in_place(self, **_options(self.config["train"]))
        self.history.setdefault("bmr_seconds", []).append(time.perf_counter() - start)


class IterativeBMR(VariationalPosterior):
    """BMR-S&S during training (Markovic et al.'s schedule): ``warmup_epochs`` of SVI, then
    {reduce; train one epoch} until ``epochs`` are done, so the last epoch trains the final
    reduced model (there is no reduction after it).

    A pruned weight stays pruned (its mask is permanent) and its guide entries are frozen at the
    reduced posterior, a point mass at zero: the masked guide gives them no gradient, and every
    reduction writes them again. The pruned weights drop out of the KL, so training continues on
    the reduced model. ``history`` records each reduction's time (``bmr_seconds``) and the pruned
    fraction after it (``weights_pruned_fraction``).
    """

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        train = self.config["train"]
        options = _options(train)
        warmup, epochs = int(train["warmup_epochs"]), int(train["epochs"])
        if not 1 <= warmup < epochs:
            raise ValueError(f"{self.name}: need 1 <= warmup_epochs < epochs, got {warmup} and {epochs}")
        sync = self.device.type == "cuda"

        def hook(epoch: int, loss: float) -> None:
            if warmup <= epoch + 1 < epochs:
                if sync:
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                reduce_in_place(self, **options)
                if sync:
                    torch.cuda.synchronize(self.device)
                self.history.setdefault("bmr_seconds", []).append(time.perf_counter() - start)
                self.history.setdefault("weights_pruned_fraction", []).append(
                    self.sparsity()["weights_pruned_fraction"])
            if callback is not None:
                callback(epoch, loss)

        super()._fit(x, y, progress, hook)
        self._freeze_pruned()

    def _freeze_pruned(self) -> None:
        """Write the reduced posterior (a point mass at 0) into the pruned weights' guide entries
        again: the optimiser's momentum may have moved them (without effect: they are masked)."""
        from bnnzoo.guides.bmr import Reduction

        masks = self.masks()
        _apply(self, Reduction(masks=masks, accepted={s: ~keep for s, keep in masks.items()}))


def _creator(cls, name: str):
    def create(config: dict, device="cpu"):
        from bnnzoo.guides import MeanFieldNormal
        from bnnzoo.models import GaussianPrior

        for key, allowed in (("rule", ("ss", "plain")), ("level", ("weight", "group"))):
            if config["train"][key] not in allowed:
                raise ValueError(f"{name}: {key} must be one of {allowed}, got {config['train'][key]!r}")
        model = build_model(config, lambda net: GaussianPrior(net, config["model"]["prior_scale"]))
        guide = MeanFieldNormal(model, init_scale=config["guide"]["init_scale"])
        return cls(model, guide, name=name, config=config, device=device)

    return create


# Regression: the mean-field baseline's learning rate and initial guide scale (3e-3, 1e-3), so the
# post-hoc entry reduces exactly the baseline's fit; the iterative entry trains 200 epochs, as at
# this learning rate the posterior scales (and with them the pruning) need about 100 epochs to grow
# and the reduced model then keeps training. Classification: a small initial guide scale keeps the
# first reductions (after one warm-up epoch, when the posterior is still close to its
# initialisation) from removing weights that have not had time to grow; the scales then grow
# towards their fitted values and the pruning follows them over the epochs.
_BMR = {"rule": "ss", "level": "weight", "prune_last": False}
_PAPER = "Markovic, Friston & Kiebel 2023, Bayesian sparsification for deep neural networks with Bayesian model reduction"

register(CatalogEntry(
    name="bmr",
    summary="Mean-field VI, then Bayesian model reduction: prune weights whose removal raises the evidence",
    paper=_PAPER,
    tasks=("regression", "classification"),
    create=_creator(PostHocBMR, "bmr"),
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5}, "guide": {"init_scale": 1e-3},
                       "train": {"epochs": 100, "batch_size": 32, "lr": 3e-3, **_BMR}},
        "classification": {"model": {"prior_scale": 1.0}, "guide": {"init_scale": 1e-3},
                           "train": {"epochs": 25, "batch_size": 128, "lr": 3e-3, **_BMR}},
    },
))

register(CatalogEntry(
    name="bmr-iterative",
    summary="BMR-S&S during training: warm-up, then train an epoch / reduce, pruned weights frozen at zero",
    paper=_PAPER,
    tasks=("regression", "classification"),
    create=_creator(IterativeBMR, "bmr-iterative"),
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5}, "guide": {"init_scale": 1e-3},
                       "train": {"epochs": 200, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 1, **_BMR}},
        "classification": {"model": {"prior_scale": 1.0}, "guide": {"init_scale": 1e-3},
                           "train": {"epochs": 25, "batch_size": 128, "lr": 3e-3, "warmup_epochs": 1, **_BMR}},
    },
))
