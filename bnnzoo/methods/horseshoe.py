"""The node-wise regularised horseshoe with SVI: shrinkage per neuron / filter, structured pruning.

Model :class:`~bnnzoo.models.HorseshoePrior`: in every hidden layer the weights of group ``k`` (a
neuron's incoming weights and bias, or a filter) are ``w = s_k beta`` with ``beta ~ N(0, 1)`` and
the regularised horseshoe scale ``s_k^2 = c^2 tau^2 lambda_k^2 / (c^2 + tau^2 lambda_k^2)``
(half-Cauchy ``tau`` per layer with scale ``tau0``, half-Cauchy ``lambda_k``, inverse-Gamma slab
``c^2``); the output layer has a Gaussian prior of scale ``output_scale``. Guide
:class:`~bnnzoo.guides.HorseshoeGuide`: mean-field Gaussian ``beta``, log-normal scale variables;
trained by Adam on the local-reparameterisation ELBO with closed-form KLs
(:class:`~bnnzoo.guides.TemperedLocalReparamELBO`).

Pruning rule (``train.prune_rule = "evidence"``, the default): group ``k`` of a hidden layer is
removed when removing it raises the model evidence. With ``q`` held fixed, removing the group sets
its decentred weights ``beta`` (and bias) to 0; Bayesian model reduction gives the change in log
evidence in closed form, the sum over the group's weights of the Savage-Dickey ratio
``dF = ln N(0; mu, sigma^2) - ln N(0; 0, 1)``, and the group goes when ``dF > 0`` (a Bayes factor
above 1 for the smaller model). The rule compares two models of the same data, so it means the same
for any number of inputs, rows or units; a group whose scale collapsed leaves ``q(beta)`` at its
prior and gets ``dF`` near 0 from either side, so both clusters are decided by the data. A rule
that would empty a layer keeps its best group and warns (``allow_empty=True`` removes it anyway).
The former rule, ``"scale"`` (``E_q[ln s_k] + 0.5 ln(fan_in) < ln(prune_threshold)``), stays as an
option: its threshold sits between the two clusters only for some fan-ins (with 4 inputs it removed
every neuron of a fit that needs them). With ``train.prune`` (the default) the fit prunes at its end
and, for regression, re-estimates the noise for the pruned network
(:meth:`~bnnzoo.posterior.Posterior.refit_noise`); :meth:`HorseshoePosterior.prune` returns a
pruned copy by either rule. Each pruning is recorded in ``fit_state.pruning``.

Reduction during the fit (``train.reduce_at``, a fraction of the epochs; null by default for
regression, 0.75 for classification, where ``train.reduce_select`` lets the validation part choose
between reducing there and not reducing at all, :meth:`HorseshoePosterior.validation_candidates`):
after that many epochs the groups go by the rule above, then every remaining hidden weight whose
removal raises the evidence (BMR at weight level on the decentred ``q(beta)``, the same
``dF > 0``), and the fit trains the reduced network for its remaining epochs before its closing
prune. Under the mean-field ``q`` each weight's ``dF`` ignores the others, so removing many at once
moves the function; the epochs that follow let the kept weights take up the slack. A group's ``dF``
counts its kept weights only (:func:`~bnnzoo.guides.bmr.group_delta_f`).

Temperature. The ELBO's KL term is weighted by ``train.kl_weight = T`` (0.2 by default: a tempered,
"cold" posterior; ``T = 1`` is the exact ELBO). The fit records ``T`` as ``fit_state.temperature``.
With ``untempered`` (``train.untempered``: on for regression, off for classification; the
:attr:`HorseshoePosterior.untempered` attribute afterwards) prediction draws from ``q`` with every
Gaussian factor widened to the untempered posterior's variance, ``1/v_1 = T/v_T + (1 - T)/prior_var``
(:func:`~bnnzoo.guides.untempered_variance`); training, the means and the pruning rule are unchanged.

Epochs. Regression runs ``max(epochs, ceil(min_steps / steps per epoch))`` epochs (``train.min_steps``
6,000, ``epochs`` 100): at least 6,000 minibatch steps, so a few hundred rows get several hundred
passes and from 1,920 rows on (60 minibatches of 32) the fit runs 100 (docs/methods/horseshoe.md: how it
was chosen).

Departures from the papers (Ghosh, Yao & Doshi-Velez 2019; Louizos, Ullrich & Welling 2017):

* the ELBO is tempered by default (``kl_weight = 0.2``) and regression predicts from the
  untempered widening of ``q`` described above;
* the noise scale of regression is a point estimate (starting at 1, the standardised targets' sd);
* groups are pruned by the evidence change of removing them (BMR on the decentred weights), not
  by the papers' thresholds on the scales' posterior (a variational-dropout or shrinkage criterion);
* the guide packs every scale variable into one parameter and, for small dense ReLU networks,
  computes the whole step as one autograd node (:mod:`bnnzoo.guides.horseshoe_mlp`); this changes
  the speed, not the estimator.

The choice of the defaults and the measured figures: ``docs/methods/horseshoe.md``.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch

from ..catalog import (
    CALIBRATED,
    TRAINING_OPTIONS,
    VALIDATION_OFF,
    VALIDATION_OPTIONS,
    CatalogEntry,
    Option,
    register,
)
from ..guides import HorseshoeGuide, TemperedLocalReparamELBO, bmr
from ..models import HorseshoePrior
from ..models.errors import ConfigError
from ..models.horseshoe import regularised_log_scale
from ..models.sparsity import protect_layers
from ..posterior import PruningRecord
from ..variational import LR_SCHEDULE_OPTION, VariationalPosterior, check_lr_schedule
from .baselines import build_model, scale_option

NAME = "horseshoe-svi"
#: the pruning rules of :meth:`HorseshoePosterior._prune`
PRUNE_RULES = ("evidence", "snr", "scale")


class HorseshoePosterior(VariationalPosterior):
    """A fitted horseshoe guide: prediction, per-layer scale summaries and the pruning rule.

    With ``prune_at_end`` (``train.prune``, the default) :meth:`fit` prunes at the end of training
    by ``prune_rule`` (``train.prune_rule``); :meth:`prune` returns a pruned copy of an
    unpruned (or less pruned) posterior. ``untempered`` (``train.untempered``) says whether
    prediction undoes the fitted temperature (``fit_state.temperature``); it may be switched on a
    fitted posterior.
    """

    def __init__(self, model, guide, *, name: str, config: dict, device="cpu", elbo=None,
                 untempered: bool = True, prune_at_end: bool = True, prune_rule: str = "evidence",
                 prune_threshold: float = 1.0):
        super().__init__(model, guide, name=name, config=config, device=device, elbo=elbo)
        self.untempered = bool(untempered)
        self.prune_at_end = bool(prune_at_end)
        self.prune_rule = _check_rule(prune_rule)
        self.prune_threshold = _check_threshold(prune_threshold)

    def reduction_epoch(self) -> int | None:
        """The epoch after which the fit reduces its network (``train.reduce_at`` of the epochs,
        at least 1, at most the last), or ``None`` where it does not."""
        if self.chosen_option("reduce_select"):
            return None  # reducing is a candidate that only the held-out rows can choose
        fraction = self.chosen_option("reduce_at")
        if fraction is None:
            return None
        epochs = self.fit_epochs
        return min(max(1, round(fraction * epochs)), epochs)

    def validation_candidates(self) -> list[dict]:
        """With ``train.reduce_select`` and a ``reduce_at``: not reducing, or reducing at ``reduce_at``,
        chosen on the validation part (:meth:`~bnnzoo.posterior.Posterior.select_options`; a tie keeps
        the network unreduced). Without a validation part, or with ``train.prune`` off (a fit asked to
        stay unpruned), the fit does not reduce."""
        train = self.config["train"]
        if self.prune_at_end and train.get("reduce_select") and train.get("reduce_at") is not None:
            return [{"reduce_at": None, "reduce_select": False},
                    {"reduce_at": train["reduce_at"], "reduce_select": False}]
        return []

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        at = self.reduction_epoch()
        hook = callback
        if at is not None:
            def hook(epoch: int, loss: float) -> None:
                if epoch + 1 == at:
                    self._reduce_during_fit(at)
                if callback is not None:
                    callback(epoch, loss)

        super()._fit(x, y, progress, hook)
        if self.prune_at_end:
            self._prune()

    @torch.no_grad()
    def _reduce_during_fit(self, epoch: int) -> None:
        """The reduction of ``train.reduce_at``: the groups go by :attr:`prune_rule`, then every
        remaining weight of the hidden layers whose removal raises the evidence (BMR at weight level,
        ``dF > 0`` on its decentred ``q(beta)``, the Bayes factor the group rule uses); the fit then
        trains the reduced network for its remaining epochs. Recorded in ``fit_state.pruning``."""
        self._prune()
        start = time.perf_counter()
        reduction = bmr.reduce(self.guide, rule="plain", level="weight")
        summary = {**reduction.summary(), "weights_pruned_fraction": self.sparsity()["weights_pruned_fraction"]}
        self.fit_state.pruning.append(PruningRecord("bmr", {"rule": "plain", "level": "weight", "epoch": epoch},
                                                    summary, time.perf_counter() - start))

    def _draw_kl_weight(self) -> float:
        """The KL weight the draws undo: the fitted temperature when ``untempered``, else 1 (q itself)."""
        return self.fit_state.temperature if self.untempered else 1.0

    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Draws for prediction: from q widened to the untempered posterior (``untempered``) or
        from q itself."""
        kl_weight = self._draw_kl_weight()
        for _ in range(num_samples):
            yield self.guide.draw(kl_weight)

    def predictive_weight_moments(self) -> dict:
        """The moments of :meth:`draw_weights`' weights (widened as they are, ``untempered``): the
        decentred Gaussian weights and each hidden group's scale moments
        (:meth:`~bnnzoo.guides.HorseshoeGuide.moment_weights`), for ``method="moments"`` and
        ``"probit"``."""
        return self.guide.moment_weights(self._draw_kl_weight())

    def fitted_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Draws from q itself (the fitted, possibly tempered posterior; no widening)."""
        for _ in range(num_samples):
            yield self.guide.draw(1.0)

    @torch.no_grad()
    def scales(self, statistic: str = "mean") -> dict[str, torch.Tensor]:
        """Per hidden layer, ``E_q[s_k]`` (``"mean"``) or ``E_q[ln s_k]`` (``"log_mean"``) of every
        group, including pruned ones (whose scale posterior is what got them pruned)."""
        if statistic not in ("mean", "log_mean"):
            raise ValueError(f"statistic must be 'mean' or 'log_mean', got {statistic!r}")
        fn = self.guide.scale_mean if statistic == "mean" else self.guide.log_scale_mean
        return {layer: fn(layer) for layer in self.guide.hidden}

    @torch.no_grad()
    def arviz_hyperparameters(self, num_draws: int) -> dict[str, torch.Tensor]:
        """ArviZ's draws from q, per hidden layer: ``<layer>.tau`` (global scale), ``<layer>.c`` (slab),
        ``<layer>.lambda`` and ``<layer>.scale`` (``s_k``) per group; one chain, drawn independently of
        the weight draws (marginals of q, not joint draws with the weights), widened as the weight
        draws are (``untempered``)."""
        # ln tau^2 (per layer) then ln lambda_k^2 (per group) in one vector, ln c^2 per layer
        (m, sd), (m_c, sd_c) = self.guide.log_moments(self._draw_kl_weight())
        log_z = m + sd * torch.randn((1, num_draws) + m.shape, device=m.device, dtype=m.dtype)
        log_c2 = m_c + sd_c * torch.randn((1, num_draws) + m_c.shape, device=m.device, dtype=m.dtype)
        n, offsets = len(self.guide.hidden), self.guide.group_offsets
        log_tau2 = log_z[..., :n]
        out = {}
        for i, layer in enumerate(self.guide.hidden):
            log_l2 = log_z[..., n + offsets[i]:n + offsets[i + 1]]
            out[f"{layer}.tau"], out[f"{layer}.c"] = (0.5 * log_tau2[..., i]).exp(), (0.5 * log_c2[..., i]).exp()
            out[f"{layer}.lambda"] = (0.5 * log_l2).exp()
            out[f"{layer}.scale"] = regularised_log_scale(log_tau2[..., i:i + 1] + log_l2, log_c2[..., i:i + 1]).exp()
        return out

    @torch.no_grad()
    def log_signal(self) -> dict[str, torch.Tensor]:
        """Per hidden layer, ``E_q[ln s_k] + 0.5 ln(fan_in)``: the statistic of the pruning rule."""
        return {layer: v + 0.5 * math.log(self.net.layer(layer).fan_in)
                for layer, v in self.scales("log_mean").items()}

    @torch.no_grad()
    def group_evidence_changes(self) -> dict[str, torch.Tensor]:
        """Per hidden layer, each group's ``dF``: the change in log evidence when the group is
        removed (its decentred weights ``beta`` and bias reduced to 0 under their ``N(0, 1)``
        prior), the sum of the Savage-Dickey ratios of its weights (``+inf`` if already pruned)."""
        d_f = bmr.evidence_changes(self.guide, level="group")
        return {layer.name: bmr.group_delta_f(d_f[f"{layer.name}.weight"], d_f[f"{layer.name}.bias"])
                for layer in self.net.hidden_layers()}

    @torch.no_grad()
    def group_signal_to_noise(self) -> dict[str, torch.Tensor]:
        """Per hidden layer, each group's posterior signal-to-noise ratio
        ``sum_j E_q[w_kj]^2 / sum_j Var_q[w_kj]`` over its effective weights ``w = s_k beta``
        (bias included), with ``E[s_k]`` and ``E[s_k^2]`` by quadrature over q of the scales."""
        weights = self.guide.gaussian_weights("weight")
        out = {}
        for layer in self.net.hidden_layers():
            e_s = self.guide.expect_scale(layer.name, torch.exp)
            e_s2 = self.guide.expect_scale(layer.name, lambda v: torch.exp(2 * v))
            signal = noise = 0.0
            for site in (f"{layer.name}.weight", f"{layer.name}.bias"):
                mu, var, _ = weights[site]
                mu, var = mu.reshape(mu.shape[0], -1), var.reshape(var.shape[0], -1)
                mean = e_s[:, None] * mu
                signal = signal + (mean**2).sum(1)
                noise = noise + (e_s2[:, None] * (var + mu**2) - mean**2).sum(1)
            out[layer.name] = signal / noise
        return out

    @torch.no_grad()
    def _prune(self, rule: str | None = None, threshold: float | None = None, allow_empty: bool = False) -> None:
        """Remove hidden groups by ``rule`` (default :attr:`prune_rule`).

        ``"evidence"`` removes the groups whose removal raises the evidence (``dF > 0``,
        :meth:`group_evidence_changes`); ``"snr"`` those whose posterior signal-to-noise ratio is
        below 1 (:meth:`group_signal_to_noise`; for regression: on classification networks it removes
        nearly every group, docs/methods/horseshoe.md); ``"scale"`` those whose
        ``E_q[ln s_k] + 0.5 ln(fan_in)`` is below ``ln(threshold)`` (default :attr:`prune_threshold`;
        a ``threshold`` alone selects this rule). A layer the rule would empty keeps its best group
        (:func:`~bnnzoo.models.sparsity.protect_layers`) unless ``allow_empty``. Recorded in
        ``fit_state.pruning``."""
        if threshold is not None and rule is None:
            rule = "scale"  # only the scale rule has a threshold
        rule = self.prune_rule if rule is None else _check_rule(rule)
        if threshold is not None and rule != "scale":
            raise ConfigError(f"the {rule} rule has no threshold; prune_threshold belongs to the scale rule")
        if rule == "evidence":
            d_f = self.group_evidence_changes()
            keep, score = {k: v <= 0 for k, v in d_f.items()}, {k: -v for k, v in d_f.items()}
            record = PruningRecord("evidence", {"allow_empty": allow_empty})
        elif rule == "snr":
            score = self.group_signal_to_noise()
            keep = {k: v >= 1 for k, v in score.items()}
            record = PruningRecord("snr", {"allow_empty": allow_empty})
        else:
            threshold = self.prune_threshold if threshold is None else _check_threshold(threshold)
            score = self.log_signal()
            keep = {k: v >= math.log(threshold) for k, v in score.items()}
            record = PruningRecord("threshold", {"threshold": threshold, "allow_empty": allow_empty})
        keep = protect_layers(keep, score, allow_empty=allow_empty)
        masks = {}
        for layer, kept in keep.items():
            shape = self.net.layer(layer).weight_shape
            masks[f"{layer}.weight"] = kept.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
            masks[f"{layer}.bias"] = kept.clone()
        self.guide.set_masks(masks)
        record.summary = {layer: {"groups": int(k.numel()), "groups_kept": int(k.sum())} for layer, k in keep.items()}
        self.fit_state.pruning.append(record)


def _check_rule(rule) -> str:
    if rule not in PRUNE_RULES:
        raise ConfigError(f"unknown horseshoe pruning rule {rule!r}; choose one of {PRUNE_RULES}")
    return rule


def _check_threshold(threshold) -> float:
    threshold = float(threshold)
    if not threshold > 0:
        raise ConfigError(f"the pruning threshold must be positive, got {threshold}")
    return threshold


def _create(config: dict, device="cpu") -> HorseshoePosterior:
    m, g = config["model"], config["guide"]
    model = build_model(config, lambda net: HorseshoePrior(net, m["tau0"], m["slab_shape"], m["slab_scale"],
                                                           m["output_scale"]))
    guide = HorseshoeGuide(model, init_scale=g["init_scale"], init_log_scale_sd=g["init_log_scale_sd"],
                           scale_gain=g["scale_gain"])
    train = config["train"]
    elbo = TemperedLocalReparamELBO(train["kl_weight"], num_particles=train.get("num_particles", 1))
    return HorseshoePosterior(model, guide, name=NAME, config=config, device=device, elbo=elbo,
                              untempered=train.get("untempered", True), prune_at_end=train.get("prune", True),
                              prune_rule=train.get("prune_rule", "scale"), prune_threshold=train["prune_threshold"])


_MODEL = {"tau0": 1.0, "slab_shape": 2.0, "slab_scale": 6.0, "output_scale": 1.0}
_GUIDE = {"init_scale": 1e-2, "init_log_scale_sd": 0.1, "scale_gain": 10.0}
_OPTIONS = {
    **TRAINING_OPTIONS,
    "lr_schedule": LR_SCHEDULE_OPTION,
    "tau0": scale_option(help="scale of each hidden layer's half-Cauchy global shrinkage tau"),
    "slab_shape": Option(float, gt=0, help="shape of the inverse-Gamma slab c^2"),
    "slab_scale": scale_option(help="scale of the inverse-Gamma slab c^2"),
    "output_scale": scale_option(help="standard deviation of the output layer's Gaussian prior"),
    "noise_scale": scale_option(help="regression: the noise scale the fit starts from; it is learned "
                                            "(null is refused)"),
    "init_scale": scale_option(help="the guide's initial standard deviation of beta"),
    "init_log_scale_sd": Option(float, gt=0, help="the guide's initial standard deviation of the log scales"),
    "scale_gain": Option(float, gt=0, help="learning-rate gain of the packed scale parameters"),
    "min_steps": Option(int, ge=1, nullable=True,
                        help="at least this many minibatch steps: the fit runs max(epochs, ceil(min_steps / "
                             "steps per epoch)) epochs, more passes on a small data set; null: epochs (giving "
                             "epochs without min_steps sets it to null: the fit runs the epochs asked for)"),
    "kl_weight": scale_option(help="temperature T of the ELBO's KL term (1: the exact ELBO)"),
    "untempered": Option(bool, help="predict from q widened to the untempered posterior's variance"),
    "prune": Option(bool, help="prune neurons / filters at the end of the fit"),
    "prune_rule": Option(str, choices=PRUNE_RULES,
                         help="evidence: prune a group when its removal raises the evidence (BMR's dF > 0); "
                              "snr (regression only: on MNIST it removes nearly every group): when its "
                              "weights' posterior signal-to-noise ratio is below 1; "
                              "scale: when E[ln s] + 0.5 ln(fan_in) < ln(prune_threshold)"),
    "prune_threshold": Option(float, gt=0, help="the scale rule's threshold: prune a group when "
                                                "E[ln s] + 0.5 ln(fan_in) < ln(threshold)"),
    "reduce_at": Option(float, gt=0, le=1, nullable=True,
                        help="after this fraction of the epochs, prune the groups by prune_rule and every hidden "
                             "weight whose removal raises the evidence (BMR, dF > 0), then train the reduced "
                             "network for the remaining epochs; null: no reduction during the fit"),
    "reduce_select": Option(bool, help="reduce at reduce_at only if the held-out rows (validation_fraction) "
                                       "choose it over not reducing, by the higher held-out log density (ties and "
                                       "fits without held-out rows: no reduction)"),
    **VALIDATION_OPTIONS,
}

register(CatalogEntry(
    name=NAME,
    summary="Node-wise regularised horseshoe, SVI with local reparameterisation, neuron/filter pruning",
    paper="Ghosh, Yao & Doshi-Velez 2019, Model selection in Bayesian neural networks via horseshoe priors; "
          "Louizos, Ullrich & Welling 2017, Bayesian compression for deep learning",
    tasks=("regression", "classification"),
    create=_create,
    defaults={
        # lr 1e-2 annealed along a cosine: chosen on validation parts (suites horseshoe-select-lr and
        # horseshoe-select-lr-teachers; docs/methods/horseshoe.md)
        "regression": {"model": {**_MODEL, "noise_scale": 1.0}, "guide": dict(_GUIDE),
                       "train": {"epochs": 100, "min_steps": 6000, "batch_size": 32, "lr": 1e-2,
                                 "lr_schedule": "cosine", "kl_weight": 0.2,
                                 "untempered": True, "prune": True, "prune_rule": "evidence",
                                 "prune_threshold": 1.0, "reduce_at": None, "reduce_select": False,
                                 **VALIDATION_OFF}},
        "classification": {"model": dict(_MODEL), "guide": dict(_GUIDE),
                           "train": {"epochs": 60, "min_steps": None, "batch_size": 128, "lr": 1e-2,
                                     "lr_schedule": "constant", "augment": None, "kl_weight": 0.2,
                                     "untempered": False, "prune": True, "prune_rule": "evidence",
                                     "prune_threshold": 1.0, "reduce_at": 0.75, "reduce_select": True,
                                     **CALIBRATED}},
    },
    options=_OPTIONS,
    checks=(check_lr_schedule,),
))
