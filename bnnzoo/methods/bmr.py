"""Bayesian model reduction (Markovic, Friston & Kiebel 2023): pruning a fitted Gaussian posterior
by the change in evidence, post hoc ("bmr") or between training epochs ("bmr-iterative").

BMR applies to any posterior whose weights have a Gaussian posterior under a zero-mean Gaussian
prior. A posterior class opts in by offering the :class:`GaussianWeights` protocol; a
:class:`~bnnzoo.variational.VariationalPosterior` with a
:class:`~bnnzoo.guides.MeanFieldNormal` guide (``meanfield-vi`` and the entries here) is
supported as it is. The formulas live in :mod:`bnnzoo.guides.bmr`.
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


def _meanfield_guide(posterior):
    from bnnzoo.guides import MeanFieldNormal

    guide = getattr(posterior, "guide", None)
    return guide if isinstance(guide, MeanFieldNormal) else None


def gaussian_weights(posterior, sites=None) -> dict[str, tuple]:
    """``{site: (mu, sigma^2, prior_var)}`` of a posterior with Gaussian weights."""
    from bnnzoo.guides.bmr import meanfield_gaussian_weights

    if isinstance(posterior, GaussianWeights):
        weights = posterior.gaussian_weights()
        return weights if sites is None else {s: weights[s] for s in sites if s in weights}
    guide = _meanfield_guide(posterior)
    if guide is None:
        raise TypeError(f"Bayesian model reduction needs Gaussian weights: {posterior.name} "
                        f"({type(posterior).__name__}) neither has a MeanFieldNormal guide nor offers "
                        f"gaussian_weights() / apply_reduction()")
    return meanfield_gaussian_weights(guide, posterior.model, sites)


def _apply(posterior, reduction) -> None:
    from bnnzoo.guides.bmr import apply_reduction

    if isinstance(posterior, GaussianWeights):
        posterior.apply_reduction(reduction)
    else:
        apply_reduction(_meanfield_guide(posterior), reduction)


def reduce_in_place(posterior, *, rule: str = "ss", level: str = "weight", prune_last: bool = False,
                    layers=None, reduced_var: float = 0.0, num_iters: int = 4):
    """Reduce ``posterior`` in place; returns the :class:`~bnnzoo.guides.bmr.Reduction`."""
    from bnnzoo.guides.bmr import reducible_sites, reduce_sites

    sites = reducible_sites(posterior.net, prune_last, layers)
    weights = gaussian_weights(posterior, sites)
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


# A small initial guide scale keeps the first reductions (after one warm-up epoch, when the posterior
# is still close to its initialisation) from removing weights that have not had time to grow; the
# scales then grow towards their fitted values and the pruning follows them over the epochs.
_BMR = {"rule": "ss", "level": "weight", "prune_last": False}
_PAPER = "Markovic, Friston & Kiebel 2023, Bayesian sparsification for deep neural networks with Bayesian model reduction"

register(CatalogEntry(
    name="bmr",
    summary="Mean-field VI, then Bayesian model reduction: prune weights whose removal raises the evidence",
    paper=_PAPER,
    tasks=("regression", "classification"),
    create=_creator(PostHocBMR, "bmr"),
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5}, "guide": {"init_scale": 1e-4},
                       "train": {"epochs": 100, "batch_size": 32, "lr": 1e-2, **_BMR}},
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
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5}, "guide": {"init_scale": 1e-4},
                       "train": {"epochs": 100, "batch_size": 32, "lr": 1e-2, "warmup_epochs": 1, **_BMR}},
        "classification": {"model": {"prior_scale": 1.0}, "guide": {"init_scale": 1e-3},
                           "train": {"epochs": 25, "batch_size": 128, "lr": 3e-3, "warmup_epochs": 1, **_BMR}},
    },
))
