"""Bayesian model reduction (Markovic, Friston & Kiebel 2023) as catalog entries: mean-field
Gaussian VI, then pruning by the change in evidence, once after the fit (``bmr``) or between
training epochs (``bmr-iterative``).

Both entries reduce their :class:`~bnnzoo.guides.MeanFieldNormal` guide with
:func:`bnnzoo.guides.bmr.reduce`, the one entry point of BMR (formulas, thresholds and the
:class:`~bnnzoo.guides.bmr.GaussianWeights` protocol live in :mod:`bnnzoo.guides.bmr`). Any other
fitted posterior whose guide implements that protocol is reduced after the fact by
``Posterior.reduce()`` or ``bnnzoo prune``.

Options. The ``model`` section: ``weight_prior`` (``"fixed"``, the default: ``N(0, prior_scale^2)``
on every weight, :class:`~bnnzoo.models.GaussianPrior` and :class:`~bnnzoo.guides.MeanFieldNormal`;
``"layer-scale"``: the non-centred model of the authors' code bmr4pml, ``w = f_l c_l z`` with
``z ~ N(0, 1)``, ``c_l^-2 ~ Gamma(2, 2)`` learned per layer and ``f_l = hidden_factor`` (1/10) in
hidden layers, :class:`~bnnzoo.models.priors.LayerScaleGaussianPrior` and
:class:`~bnnzoo.guides.meanfield.LayerScaleMeanFieldNormal`, BMR's ``dF`` on ``z``). The ``train``
section: ``rule`` (``"ss"``: the per-layer spike-and-slab threshold; ``"plain"``: ``dF > 0``;
``"rhs"``: BMR-RHS, prune where a regularised-horseshoe hyperprior fitted over the layer's ``dF``
surface puts a scale at 0, :mod:`bnnzoo.guides.bmr_rhs`, with ``rhs_tau0`` its global half-Cauchy scale),
``level`` (``"weight"`` or ``"group"``), ``prune_last`` (reduce the output layer too),
``count_pruned`` (how weights pruned before enter the S&S threshold: ``"prior"``, ``dF = 0`` as in
bmr4pml; ``"pruned"``, as certainly pruned), and for ``bmr-iterative`` the warm-up
(``warmup_fraction`` of the epochs, 0.5 for regression; else ``warmup_epochs``, 1 for classification). No
reduction empties a layer (its best group is kept, with an ``EmptyLayerWarning``). How the defaults
were chosen (BMR-RHS included): ``docs/methods/bmr.md``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..catalog import CALIBRATED, VALIDATION_OFF, CatalogEntry, Option, register
from ..errors import ConfigError
from ..guides import MeanFieldNormal
from ..guides.bmr import (
    LEVELS,
    PRUNED_COUNTS,
    RULES,
    Reduction,
    evidence_changes,
    reduce,
)
from ..guides.bmr_rhs import TAU0 as RHS_TAU0
from ..guides.meanfield import LayerScaleMeanFieldNormal
from ..models import GaussianPrior
from ..models.priors import LayerScaleGaussianPrior
from ..posterior import PruningRecord
from ..variational import VariationalPosterior
from .baselines import GAUSSIAN_SVI_OPTIONS, build_model


def _options(train: dict) -> dict:
    # a saved run from before count_pruned existed counted pruned weights as pruned
    out = {"rule": train["rule"], "level": train["level"], "prune_last": train["prune_last"],
           "count_pruned": train.get("count_pruned", "pruned")}
    if train["rule"] == "rhs":
        out["rhs_tau0"] = train.get("rhs_tau0", RHS_TAU0)
    return out


class _ReducedExport:
    """The ArviZ export of a reduced mean-field posterior: the pruning masks and dF per weight."""

    @torch.no_grad()
    def arviz_constant_data(self) -> dict[str, torch.Tensor]:
        """``"<site>.mask"`` (kept = 1) for every weight site and ``"<site>.delta_f"``, the change in
        free energy ``dF`` of removing each weight, recomputed from the fitted guide
        (:func:`~bnnzoo.guides.bmr.evidence_changes` at the weight level, with the entry's
        ``prune_last``; ``+inf`` where the weight is pruned) for the sites BMR considers."""
        out = {f"{site}.mask": keep.to(torch.int8) for site, keep in self.masks().items()}
        changes = evidence_changes(self.guide, level="weight", prune_last=self.config["train"]["prune_last"])
        out.update({f"{site}.delta_f": d_f for site, d_f in changes.items()})
        return out

    def _freeze_pruned(self) -> None:
        """Write the reduced posterior (a point mass at 0) into the pruned weights' guide entries
        again: the optimiser's momentum may have moved them (without effect: they are masked)."""
        masks = self.masks()
        self.guide.apply_reduction(Reduction(masks=masks, accepted={s: ~keep for s, keep in masks.items()}))


class PostHocBMR(_ReducedExport, VariationalPosterior):
    """Mean-field Gaussian VI, then one Bayesian model reduction of the fitted guide.

    ``train.refit_fraction`` (``f``): the last ``r = round(f * epochs)`` epochs (at most ``epochs - 1``)
    train the reduced model: the reduction runs after epoch ``epochs - r`` and the kept weights then
    adapt to the removal, the pruned ones frozen at zero as in ``bmr-iterative``; ``r = 0`` reduces
    the fitted guide as it is.

    ``history.extra["bmr_seconds"]`` holds the reduction's wall time; ``fit_state.pruning`` its
    record (rule ``"bmr"``, the options and :meth:`~bnnzoo.guides.bmr.Reduction.summary`)."""

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        epochs = self.fit_epochs
        refit = min(round(float(self.config["train"].get("refit_fraction", 0.0)) * epochs), epochs - 1)  # older runs: 0
        if refit == 0:
            super()._fit(x, y, progress, callback)
            self._reduce_once()
            return

        def hook(epoch: int, loss: float) -> None:
            if epoch + 1 == epochs - refit:
                self._reduce_once()
            if callback is not None:
                callback(epoch, loss)

        super()._fit(x, y, progress, hook)
        self._freeze_pruned()

    def _reduce_once(self) -> None:
        options = _options(self.config["train"])
        start = time.perf_counter()
        reduction = reduce(self.guide, **options)
        seconds = time.perf_counter() - start
        self.history.extra.setdefault("bmr_seconds", []).append(seconds)
        summary = {**reduction.summary(), "weights_pruned_fraction": self.sparsity()["weights_pruned_fraction"]}
        self.fit_state.pruning.append(PruningRecord("bmr", options, summary, seconds))


class IterativeBMR(_ReducedExport, VariationalPosterior):
    """BMR-S&S during training (Markovic et al.'s schedule): a warm-up of SVI (:func:`warmup_epochs`), then
    {reduce; train one epoch} until ``epochs`` are done, so the last epoch trains the final
    reduced model (there is no reduction after it).

    A pruned weight stays pruned (its mask is permanent) and its guide entries are frozen at the
    reduced posterior, a point mass at zero: the masked guide gives them no gradient, and every
    reduction writes them again. The pruned weights drop out of the KL, so training continues on
    the reduced model. ``history.extra`` records each reduction's time (``bmr_seconds``) and the
    pruned fraction after it (``weights_pruned_fraction``).
    """

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        train = self.config["train"]
        options = _options(train)
        epochs = self.fit_epochs
        warmup = warmup_epochs(train, epochs)
        if not 1 <= warmup < epochs:
            raise ConfigError(f"{self.name}: need 1 <= warmup_epochs < epochs, got {warmup} and {epochs}")
        sync = self.device.type == "cuda"
        extra = self.history.extra

        def hook(epoch: int, loss: float) -> None:
            if warmup <= epoch + 1 < epochs:
                if sync:
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                reduce(self.guide, **options)
                if sync:
                    torch.cuda.synchronize(self.device)
                extra.setdefault("bmr_seconds", []).append(time.perf_counter() - start)
                extra.setdefault("weights_pruned_fraction", []).append(self.sparsity()["weights_pruned_fraction"])
            if callback is not None:
                callback(epoch, loss)

        super()._fit(x, y, progress, hook)
        self._freeze_pruned()

#: the weight priors of the bmr entries: ``layer-scale``, the paper's non-centred model with a learned
#: scale per layer (:class:`~bnnzoo.models.priors.LayerScaleGaussianPrior`); ``fixed``, ``N(0, prior_scale^2)``
#: on every weight (:class:`~bnnzoo.models.GaussianPrior`, the only model before the layer-scale option)
WEIGHT_PRIORS = ("layer-scale", "fixed")


def weight_prior_of(config: dict) -> str:
    """The weight prior a configuration asks for; a saved run from before the option existed
    (its ``model`` section has no ``weight_prior``) was fitted under the fixed prior."""
    return config["model"].get("weight_prior", "fixed")


def _creator(cls, name: str):
    def create(config: dict, device="cpu"):
        for key, allowed in (("rule", RULES), ("level", LEVELS)):
            if config["train"][key] not in allowed:
                raise ConfigError(f"{name}: {key} must be one of {allowed}, got {config['train'][key]!r}")
        prior = weight_prior_of(config)
        if prior == "layer-scale":
            factor = config["model"].get("hidden_factor", 0.1)
            model = build_model(config, lambda net: LayerScaleGaussianPrior(net, hidden_factor=factor))
            guide = LayerScaleMeanFieldNormal(model, init_scale=config["guide"]["init_scale"])
        elif prior == "fixed":
            model = build_model(config, lambda net: GaussianPrior(net, config["model"]["prior_scale"]))
            guide = MeanFieldNormal(model, init_scale=config["guide"]["init_scale"])
        else:
            raise ConfigError(f"{name}: weight_prior must be one of {WEIGHT_PRIORS}, got {prior!r}")
        return cls(model, guide, name=name, config=config, device=device)

    return create


# The defaults differ by task (learning rate, initial guide scale, epochs); how each was chosen is
# in docs/methods/bmr.md.
_BMR = {"rule": "ss", "level": "weight", "prune_last": False, "count_pruned": "prior", "rhs_tau0": RHS_TAU0}
# the paper's model is an option: it lost to the fixed prior on validation data (docs/methods/bmr.md)
_MODEL = {"weight_prior": "fixed", "hidden_factor": 0.1}
_OPTIONS = {
    **GAUSSIAN_SVI_OPTIONS,
    "prior_scale": dataclasses.replace(
        GAUSSIAN_SVI_OPTIONS["prior_scale"],
        help="weight_prior=fixed: standard deviation of the N(0, s^2) prior on every weight and bias (unused by "
             "layer-scale)"),
    "weight_prior": Option(str, choices=WEIGHT_PRIORS,
                           help="layer-scale: w = f_l c_l z, z ~ N(0, 1), c_l^-2 ~ Gamma(2, 2) learned per layer, dF "
                                "on z (the paper's code); fixed: N(0, prior_scale^2) on every weight"),
    "hidden_factor": Option(float, gt=0, le=1e3,
                            help="weight_prior=layer-scale: f_l of the hidden layers (the output layer's is 1)"),
    "rule": Option(str, choices=RULES, help="ss: the per-layer spike-and-slab threshold; plain: prune where dF > 0; "
                                            "rhs: prune where a regularised-horseshoe hyperprior fitted over the "
                                            "layer's dF surface puts the scale at 0 (BMR-RHS)"),
    "rhs_tau0": Option(float, gt=0, le=1e3, help="rule rhs: scale of the global half-Cauchy prior on the layer's tau"),
    "level": Option(str, choices=LEVELS, help="reduce single weights or whole groups (neurons / filters)"),
    "prune_last": Option(bool, help="reduce the output layer too"),
    "count_pruned": Option(str, choices=PRUNED_COUNTS,
                           help="rule ss: weights pruned before enter the threshold with dF = 0 (prior: bmr4pml's "
                                "code) or as certainly pruned (pruned)"),
    "warmup_epochs": Option(int, ge=1, help="bmr-iterative: SVI epochs before the first reduction (< epochs; "
                                            "used where warmup_fraction is null)"),
    "warmup_fraction": Option(float, gt=0, lt=1, nullable=True,
                              help="bmr-iterative: the fraction of the epochs run before the first reduction, "
                                   "max(1, round(f * epochs)) (< epochs); null: warmup_epochs (giving warmup_epochs "
                                   "without warmup_fraction sets it to null)"),
    "refit_fraction": Option(float, ge=0, lt=1, help="bmr: the fraction of the epochs, at the end, that train the "
                                                     "reduced model after the one reduction (0: reduce the fitted "
                                                     "guide as it is)"),
}


def warmup_epochs(train: dict, epochs: int) -> int:
    """bmr-iterative's SVI epochs before the first reduction: ``max(1, round(warmup_fraction *
    epochs))`` where ``warmup_fraction`` is set, else ``warmup_epochs``."""
    fraction = train.get("warmup_fraction")
    if fraction is None:
        return int(train["warmup_epochs"])
    return max(1, round(float(fraction) * epochs))


def _check_warmup(config: dict) -> None:
    """bmr-iterative needs ``1 <= warmup < epochs`` (at least one reduction, and an epoch after
    it)."""
    train = config["train"]
    if train.get("warmup_fraction") is not None:
        if warmup_epochs(train, train["epochs"]) >= train["epochs"]:
            raise ConfigError(f"bmr-iterative: warmup_fraction={train['warmup_fraction']} of epochs={train['epochs']} "
                              f"leaves no epoch after the warm-up; give more epochs or a smaller fraction")
        return
    if not train["warmup_epochs"] < train["epochs"]:
        raise ConfigError(f"bmr-iterative: option 'warmup_epochs' must be below 'epochs', got warmup_epochs="
                          f"{train['warmup_epochs']} with epochs={train['epochs']}")

_PAPER = "Markovic, Friston & Kiebel 2023, Bayesian sparsification for deep neural networks with Bayesian model reduction"

register(CatalogEntry(
    name="bmr",
    summary="Mean-field VI, then Bayesian model reduction (BMR-S&S): prune weights whose removal raises the evidence",
    paper=_PAPER,
    tasks=("regression", "classification"),
    create=_creator(PostHocBMR, "bmr"),
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5, **_MODEL}, "guide": {"init_scale": 1e-3},
                       "train": {"epochs": 100, "batch_size": 32, "lr": 3e-3, **_BMR, "refit_fraction": 0.2,
                                 **VALIDATION_OFF}},
        "classification": {"model": {"prior_scale": 1.0, **_MODEL}, "guide": {"init_scale": 1e-3},
                           "train": {"epochs": 25, "batch_size": 128, "lr": 3e-3, "augment": None, **_BMR,
                                     "refit_fraction": 0.0, **CALIBRATED}},
    },
    options=_OPTIONS,
))

register(CatalogEntry(
    name="bmr-iterative",
    summary="BMR during training (Markovic et al.'s schedule, one reduction per epoch; rule S&S for regression, "
            "BMR-RHS for classification): warm-up, then train an epoch / reduce, pruned weights frozen at zero",
    paper=_PAPER,
    tasks=("regression", "classification"),
    create=_creator(IterativeBMR, "bmr-iterative"),
    defaults={
        "regression": {"model": {"prior_scale": 1.0, "noise_scale": 0.5, **_MODEL}, "guide": {"init_scale": 1e-3},
                       "train": {"epochs": 200, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 1, "warmup_fraction": 0.5, **_BMR,
                                 **VALIDATION_OFF}},
        "classification": {"model": {"prior_scale": 1.0, **_MODEL}, "guide": {"init_scale": 1e-3},
                           "train": {"epochs": 25, "batch_size": 128, "lr": 3e-3, "augment": None, "warmup_epochs": 1,
                                     "warmup_fraction": None,
                                     **_BMR, "rule": "rhs",  # chosen on validation data: docs/methods/bmr.md
                                     **CALIBRATED}},
    },
    options=_OPTIONS,
    checks=(_check_warmup,),
))
