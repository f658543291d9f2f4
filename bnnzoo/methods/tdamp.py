"""EM-TDAMP (Xu, Liu, Zhang & Lau 2024, *Bayesian Deep Learning via Expectation Maximization and Turbo
Deep Approximate Message Passing*, arXiv 2402.07366): sparse Bayesian learning of a ReLU MLP without
gradient descent, in the form implemented here (see "What is implemented" below).

Model: the group-sparse Bernoulli-Gaussian prior (:class:`~bnnzoo.models.BernoulliGaussianPrior`,
one group per neuron) with a Gaussian likelihood (regression) or the probit-product likelihood
(classification). E-step: passes of TDAMP (:class:`~bnnzoo.guides.TDAMPGuide`) over minibatches.
M-step after every pass (:func:`m_step`):

    rho_l     <- mean_g P(s_g = 1 | D)                  one inclusion rate per hidden layer
    sigma_l^2 <- sum_g pi_g sum_i E[w_i^2 | s_g = 1] / sum_g pi_g n_g      (``learn_slab_var``)
    v         <- mean_n [(y_n - E z_n)^2 + Var z_n]      (regression; the pass's running sums)

Pruning follows from the posterior: after the last pass a hidden neuron is kept when its inclusion
probability ``P(s_g = 1 | D)`` is at least 1/2 (``prune_threshold``), through
:func:`~bnnzoo.models.sparsity.protect_layers` (a layer the rule would empty keeps its most probable
neuron, with a warning, unless ``allow_empty``). A target ``keep`` fraction is an explicit option
(no default): the rate M-step is then constrained, each hidden layer's prior log-odds shifted by the
one constant that puts exactly ``round(keep * K)`` of its ``K`` neurons above 1/2 (the midpoint between
the k-th and (k+1)-th group log-odds), as the paper's sparsity sweeps fix the fraction kept, and the
pruning keeps that top fraction. Pruning is recorded in ``fit_state.pruning`` (and the regression
noise is then refitted to the pruned network by :class:`~bnnzoo.posterior.Posterior`).
``history`` (a :class:`~bnnzoo.guides.training.TrainingHistory`) holds per pass the ``loss`` (minus
the mean log evidence of the pass's minibatches under the beliefs they met) and ``epoch_seconds``
(the pass and its M-step) and, in ``extra``, ``kept_fraction`` (hidden neurons with inclusion
probability above 1/2) and, for regression, ``noise_var``.

What is implemented, and where it departs from the paper:

* **Module A is ADF/PBP-style moment propagation by default** (``module_a="adf"``); ``module_a="amp"``
  is deep AMP (:mod:`~bnnzoo.guides.deep_amp`): every example's pre-activation means are the
  Onsager-corrected cavity means (its own message removed from the beliefs to first order, through
  the group's slab means and inclusion log-odds), the messages are built there, and a damped turbo
  loop per minibatch runs to ``turbo_tolerance`` or ``turbo_iterations``. It was level with ADF on
  Boston's validation data and had the better log-likelihood on MNIST's, at 5 times the cost of a
  pass (beyond the MNIST time target; docs/methods/em-tdamp.md), so the default stays. The ADF form is the batch form
  of probabilistic backpropagation's assumed-density update (a second-order expansion of
  ``sum_n log Z_n`` around the beliefs, per-example curvature taken at the pre-activations, a
  negative summed curvature floored at zero). With a single linear layer
  (:func:`~bnnzoo.guides.tdamp.linear_tdamp`) the Onsager correction gives Bernoulli-Gaussian turbo
  GAMP, whose fixed point is exact for a Gaussian prior.
* **Module B** is the exact sum-product on each neuron's group spike-and-slab prior, as in the paper.
* **One turbo iteration per minibatch** by default (``turbo_iterations``), and **damping**
  ``beta = 0.8`` scales each batch's message as it enters the state (rather than averaging messages
  between turbo iterations).
* **Messages are kept over passes**: the state is the data's summed message with a forgetting factor
  ``1 - beta B / (N T)`` per batch of ``B`` of ``N`` examples (``T = memory`` passes), each message
  weighted ``P / T`` so that the state holds the likelihood to the power ``P = temper`` (a tempered
  posterior, like repeated assumed-density passes; by default ``P = 10``, or ``P = T`` when only
  ``memory`` is given, as before the two were separate). A pass moves the means by ``beta / T`` of
  a diagonal Newton step whatever ``N``; ``memory`` defaults to the rule ``T = clip(100 B / N, 1, 10)``
  (:func:`~bnnzoo.guides.tdamp.memory_rule`): 7.0 passes on Boston (N = 455), one pass from
  ``N = 3,200`` up. (Before, ``T = 10`` fixed both, and on large data with little noise the fit
  had not converged after the default passes: the learned noise stood for the misfit.)
* **Line search and trust region** (not in the paper): each neuron's step is the exact minimiser of the
  batch's quadratic model along the update direction (the diagonal message ignores the coupling of a
  neuron's weights through shared inputs and overshoots otherwise), estimated on 32 examples of the
  batch, and capped so that the neuron's pre-activation means move by at most one predictive standard
  deviation per batch (:meth:`~bnnzoo.guides.TDAMPGuide._absorb`).
* **Reduced M-step**: one ``rho`` per hidden layer (the mean inclusion probability), the slab variance
  fixed at ``slab_scale^2 / fan_in`` unless ``learn_slab_var``, the output layer's neurons always kept
  (``rho = 1``), a neuron's bias in its group; for classification the probit-product noise variance is
  fixed at ``v = 1`` unless ``learn_probit_noise`` (which maximises the pass's summed log evidence over
  ``v``); ``rate_level="group"`` learns one rate per neuron instead of one per layer. The ``keep`` option's constrained
  M-step is this module's construction (the paper's mechanism for its sweeps is not known here).
* **Classification**: ``log E[p(y | z)]`` is a 16-node Gauss-Hermite integral; predictions normalise
  the probit product over the classes (it sums to one only for two classes).
* **Initialisation**: a pseudo-message centred on a draw from the slab (``init_precision``) breaks the
  symmetry between neurons; the forgetting factor wipes it out over the first ``memory`` passes.

Number of passes and batch size (regression defaults): chosen per fit on a validation part of the
training rows (:meth:`~bnnzoo.posterior.Posterior.select_epochs`: ``validation_fraction`` 0.2, at most
``epochs`` = 200 passes, ``patience`` 30; ``batch_size: null`` compares batches of 32 and 8), then the
fit runs on all rows with the winners; recorded in ``fit_state.epoch_selection``. Classification runs
the configured 20 passes of 128.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator

import torch

from ..catalog import VALIDATION_OPTIONS, CatalogEntry, Option, register
from ..guides import TDAMPGuide
from ..guides.data_parallel import current as data_parallel_context
from ..guides.tdamp_em import keep_count, m_step
from ..guides.training import EpochLoop, _RestoreOnly, minibatches
from ..models import (
    BayesianNeuralNetwork,
    BernoulliGaussianPrior,
    GaussianLikelihood,
    ProbitProductLikelihood,
)
from ..models.errors import ConfigError
from ..models.module_network import ModuleNetwork
from ..models.sparsity import protect_layers
from ..networks import is_module_config, module_network
from ..posterior import GuidePosterior, PruningRecord
from .baselines import build_network_of, scale_option

NAME = "em-tdamp"


# ---- the posterior ------------------------------------------------------------------------------
def check_keep(keep) -> float | None:
    """A target fraction of hidden neurons to keep: ``None`` (no target) or a number in (0, 1]."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise ConfigError(f"keep must be a fraction of neurons in (0, 1] or null, got {keep!r}")
    return float(keep)


class TDAMPPosterior(GuidePosterior):
    """A Bernoulli-Gaussian posterior fitted by EM-TDAMP (module docstring).

    ``keep``: the target fraction of hidden neurons kept (``train.keep``; ``None`` for none), used
    by the constrained M-step and the pruning; with ``prune_at_end`` (``train.prune``) the fit
    prunes after its last pass, at ``prune_threshold`` (``train.prune_threshold``) when there is no
    target.
    """

    def __init__(self, model, guide, *, name: str, config: dict, device="cpu", keep: float | None = None,
                 prune_at_end: bool = True, prune_threshold: float = 0.5):
        super().__init__(model, guide, name=name, config=config, device=device)
        self.keep = check_keep(keep)
        self.prune_at_end = bool(prune_at_end)
        self.prune_threshold = _check_threshold(prune_threshold)
        #: the :class:`~bnnzoo.guides.training.Checkpoint` the next fit writes to and resumes from
        #: (the guide's messages and statistics, the prior's rates, history, RNG states)
        self.checkpoint = None

    #: this posterior's fit can write and resume checkpoints (:mod:`bnnzoo.checkpoint`)
    supports_checkpoints = True

    # ---- fitting ----------------------------------------------------------------------------------
    def _fit(self, x: torch.Tensor, y: torch.Tensor, progress: bool, callback=None) -> None:
        # Tiny beliefs (neurons switched off, inclusion probabilities near 0) produce subnormal floats,
        # which slow CPU arithmetic down by orders of magnitude; they are flushed to zero during the
        # passes (the previous setting is restored, as far as torch lets it be read: it is off by default).
        flushing = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            self._passes(x, y, progress, callback)
        finally:
            if flushing:
                torch.set_flush_denormal(False)

    def _passes(self, x: torch.Tensor, y: torch.Tensor, progress: bool, callback=None) -> None:
        """EM passes: TDAMP over the minibatches, then the M-step; each pass is an epoch of an
        :class:`~bnnzoo.guides.training.EpochLoop` (timing, divergence check, progress, and, with
        :attr:`checkpoint`, checkpoints and resuming from the pass a checkpoint reached)."""
        train = self.config["train"]
        n = len(x)
        sync = self.device.type == "cuda"
        extra = self.history.extra

        def pass_end(epoch: int, loss: float) -> None:  # runs inside end_epoch, before any checkpoint
            self.guide.check_finite()  # one host read per pass; a NaN stops the fit with a clear error
            extra.setdefault("kept_fraction", []).append(self._kept_fraction())
            if self.task == "regression" or train.get("learn_probit_noise", False):
                extra.setdefault("noise_var", []).append(float(self.guide.noise_var()))
            extra.setdefault("turbo_iterations", []).append(self.guide.mean_turbo_iterations())
            if callback is not None:
                callback(epoch, loss)

        batch_size = self.fit_batch_size
        self.guide.collect_outputs = bool(train.get("learn_probit_noise", False)) and self.task == "classification"
        checkpoint = self.checkpoint
        parallel = data_parallel_context()  # data parallel: rank 0 reports and writes, every rank restores
        if parallel is not None and not parallel.is_main:
            progress = False
            checkpoint = _RestoreOnly(checkpoint) if checkpoint is not None else None
        loop = EpochLoop(self.fit_epochs, method=self.name, progress=progress, history=self.history,
                         on_epoch_end=pass_end, checkpoint=checkpoint)
        with loop:
            for _ in range(loop.epoch, loop.epochs):
                self.guide.reset_statistics()
                if sync:
                    torch.cuda.synchronize(self.device)
                loop.begin_epoch()
                for idx in minibatches(n, batch_size, x.device):
                    self.guide.update(x[idx], y[idx], n)
                m_step(self.guide, keep=self.keep, learn_rho=train["learn_rho"],
                       learn_slab_var=train["learn_slab_var"], learn_noise=train["learn_noise"],
                       rate_level=train.get("rate_level", "layer"),
                       learn_probit_noise=train.get("learn_probit_noise", False))
                if sync:
                    torch.cuda.synchronize(self.device)
                loop.end_epoch(-self.guide.log_evidence_sum / n)
        if self.prune_at_end:
            self._prune()

    def _kept_fraction(self) -> float:
        inclusion = self.guide.inclusion()
        total = sum(p.numel() for p in inclusion.values())
        return float(sum((p > 0.5).sum() for p in inclusion.values())) / total if total else 1.0

    @torch.no_grad()
    def _prune(self, keep: float | None = None, threshold: float | None = None, allow_empty: bool = False) -> None:
        """Remove hidden neurons by their posterior inclusion probability ``P(s_g = 1 | D)``.

        The default rule follows from the posterior: a neuron is kept when it is at least as likely
        on as off, inclusion probability ``>= threshold`` (default :attr:`prune_threshold`, 1/2).
        With a target ``keep`` fraction (an explicit option, default :attr:`keep`, which is ``None``
        unless configured) the top ``keep`` fraction of each layer by inclusion probability is kept
        instead. Neurons pruned before stay pruned. The decision goes through
        :func:`~bnnzoo.models.sparsity.protect_layers` (score: the inclusion log-odds): a layer the rule
        would empty keeps its most probable neuron, with an
        :class:`~bnnzoo.models.sparsity.EmptyLayerWarning`, unless ``allow_empty``. Recorded in
        ``fit_state.pruning``."""
        keep = self.keep if keep is None else check_keep(keep)
        threshold = self.prune_threshold if threshold is None else _check_threshold(threshold)
        posts = self.guide.group_posteriors()
        rule, score = {}, {}
        for layer in self.net.hidden_layers():
            log_odds = posts[layer.name].log_odds  # -inf for neurons pruned before
            if keep is not None:
                kept = torch.zeros_like(log_odds, dtype=torch.bool)
                kept[torch.topk(log_odds, keep_count(keep, layer.num_groups)).indices] = True
                kept &= log_odds > -math.inf
            else:
                kept = log_odds >= math.log(threshold) - math.log1p(-threshold)
            rule[layer.name], score[layer.name] = kept, log_odds
        decided = protect_layers(rule, score, allow_empty=bool(allow_empty))
        masks = {}
        for layer in self.net.hidden_layers():
            kept = decided[layer.name]
            shape = layer.weight_shape
            masks[f"{layer.name}.weight"] = kept.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
            masks[f"{layer.name}.bias"] = kept
        self.guide.set_masks(masks)
        record = PruningRecord("keep", {"keep": keep, "allow_empty": bool(allow_empty)}) if keep is not None else \
            PruningRecord("threshold", {"threshold": threshold, "allow_empty": bool(allow_empty)})
        self.fit_state.pruning.append(record)

    # ---- the posterior ----------------------------------------------------------------------------
    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        return self.guide.draws(num_samples)

    def inclusion(self) -> dict[str, torch.Tensor]:
        """``P(s_g = 1 | D)`` of every hidden neuron (0 for pruned ones)."""
        return self.guide.inclusion()

    @torch.no_grad()
    def arviz_constant_data(self) -> dict[str, torch.Tensor]:
        """The fitted quantities that are not drawn: ``"<layer>.inclusion_probability"``, the
        posterior inclusion probability ``P(s_g = 1 | D)`` of every hidden neuron (0 once pruned), and
        ``"noise_variance"``, the M-step's noise variance ``v`` (regression: in the squared original
        units of ``y``; classification: the probit-product variance)."""
        out = {f"{layer}.inclusion_probability": p for layer, p in self.inclusion().items()}
        scale = self.standardizer.y_scale ** 2 if self.task == "regression" and self.standardizer else 1.0
        out["noise_variance"] = self.guide.noise_var().detach().reshape(()) * scale
        return out

    def _draw_probs(self, f: torch.Tensor) -> torch.Tensor:
        """Classification: the normalised probit product of one draw's outputs (not a softmax)."""
        return self.model.likelihood.class_probs(f)

    @torch.no_grad()
    def log_likelihood(self, x, y, num_samples: int | str = "auto", chunk_size: int = 4096,
                       seed: int | None = 0) -> torch.Tensor:
        """As :meth:`Posterior.log_likelihood`; for classification, of the normalised probit product
        averaged over the draws (tempered where a predictive temperature was fitted)."""
        if self.task != "classification":
            return super().log_likelihood(x, y, num_samples, chunk_size, seed)
        self._require_fitted()
        x, y = self.validate(x, y, "test data")
        x = self.standardizer.x(x.to(self.device))
        y = y.to(self.device)
        total = None
        draws, monitor = self._predictive_draws(x, num_samples, chunk_size, seed)
        for f in draws:
            p = self._draw_probs(f)
            total = p if total is None else total + p
        probs = self._tempered(total / (monitor.count if monitor is not None else num_samples))
        return torch.log(probs.gather(-1, y.unsqueeze(-1)).squeeze(-1))


# ---- the catalog entry --------------------------------------------------------------------------
def build_tdamp_model(config: dict) -> BayesianNeuralNetwork:
    """The Pyro model of a configuration: network, Bernoulli-Gaussian prior, likelihood (the
    configuration is not modified)."""
    spec = config["network"]
    if is_module_config(config):  # message passing needs the network as a chain of dense ReLU layers
        net = module_network(config)
        if isinstance(net, ModuleNetwork):
            odd = next((layer for layer in net.param_layers if layer.kind != "linear"), None)
            what = (f"its layer {odd.name!r} is a {odd.kind}" if odd is not None else
                    "its forward pass is the module's own code, not a chain of dense ReLU layers")
            raise ConfigError(f"{NAME} runs on dense ReLU networks (arch 'mlp' or 'lenet-300-100', or an "
                              f"nn.Sequential of Linear and ReLU) only, not on the module {net.name}: {what}")
    elif config.get("network_spec") is None and spec["arch"] not in ("mlp", "lenet-300-100"):
        raise ConfigError(f"{NAME} runs on dense ReLU networks (arch 'mlp' or 'lenet-300-100'), not {spec['arch']!r}")
    net = build_network_of(config)
    m = config["model"]
    prior = BernoulliGaussianPrior(net, rho=m["rho"], slab_scale=m["slab_scale"])
    if config["task"] == "regression":
        likelihood = GaussianLikelihood(noise_scale=math.sqrt(m["noise_var"]))
    else:
        likelihood = ProbitProductLikelihood(noise_var=m["noise_var"])
    return BayesianNeuralNetwork(net, prior, likelihood)


def _check_threshold(threshold) -> float:
    threshold = float(threshold)
    if not 0 < threshold < 1:
        raise ConfigError(f"the pruning threshold must lie in (0, 1), got {threshold!r}")
    return threshold


def _create(config: dict, device="cpu") -> TDAMPPosterior:
    train = config["train"]
    for key in ("epochs", "batch_size"):
        value = train[key]
        if key == "batch_size" and value is None:
            if not train.get("validation_fraction"):
                raise ConfigError("batch_size null means 'chosen on a validation part of the data', which needs "
                                  "validation_fraction; give a batch size or a validation_fraction")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    model = build_tdamp_model(config)
    g = config["guide"]
    # temper null: P = memory when a memory is given (as before the two were separate), else 10
    guide = TDAMPGuide(model, damping=g["damping"], turbo_iterations=g["turbo_iterations"],
                       init_precision=g["init_precision"], memory=g["memory"], temper=g.get("temper"),
                       module_a=g.get("module_a", "adf"), turbo_tolerance=g.get("turbo_tolerance"))
    return TDAMPPosterior(model, guide, name=NAME, config=config, device=device, keep=train.get("keep"),
                          prune_at_end=train.get("prune", True), prune_threshold=train.get("prune_threshold", 0.5))


_GUIDE = {"damping": 0.8, "turbo_iterations": 1, "init_precision": 1.0, "memory": None, "temper": None,
          "module_a": "adf", "turbo_tolerance": None}
_TRAIN = {"keep": None, "learn_rho": True, "learn_slab_var": False, "learn_noise": True, "rate_level": "layer",
          "learn_probit_noise": False, "prune": True,
          "prune_threshold": 0.5, "validation_fraction": None, "select_epochs": True, "patience": 30,
          "calibrate": False}
_OPTIONS = {
    "epochs": Option(int, ge=1, help="TDAMP passes over the training data, each followed by the M-step (with "
                                     "validation_fraction: the most passes the selection may choose)"),
    "batch_size": Option(int, ge=1, nullable=True,
                         help="examples per minibatch; null: chosen with the passes on validation data (8 or 32)"),
    "rho": Option(float, gt=0, lt=1, help="initial inclusion rate of every hidden neuron"),
    "slab_scale": scale_option(help="slab variance of a layer with fan-in n: slab_scale^2 / n"),
    "noise_var": scale_option(help="noise variance (regression: the starting value, learned with "
                                          "learn_noise; classification: the probit-product variance)"),
    "damping": Option(float, gt=0, le=1, help="fraction of each batch's message entering the state"),
    "turbo_iterations": Option(int, ge=1, help="turbo iterations per minibatch (with turbo_tolerance: the cap)"),
    "turbo_tolerance": Option(float, gt=0, nullable=True,
                              help="stop a minibatch's turbo loop when no inclusion probability nor slab mean (in slab "
                                   "posterior sd) changes by more than this; null: always turbo_iterations"),
    "module_a": Option(str, choices=("adf", "amp"),
                       help="Module A: 'adf' (moment propagation) or 'amp' (deep AMP with Onsager-corrected "
                            "cavity means)"),
    "init_precision": scale_option(help="initial message precision"),
    "memory": Option(float, gt=0, nullable=True,
                     help="passes T the state remembers (forgetting factor 1 - beta B / (N T)); null: the rule "
                          "T = clip(100 B / N, 1, 10)"),
    "temper": Option(float, gt=0, nullable=True,
                     help="power P of the likelihood the state holds (messages weighted P / T); null: P = memory "
                          "when memory is given, else 10"),
    "keep": Option(float, gt=0, le=1, nullable=True,
                   help="target fraction of hidden neurons kept; null: no target (EM learns the rates)"),
    "learn_rho": Option(bool, help="M-step of the inclusion rates"),
    "learn_slab_var": Option(bool, help="M-step of the slab variances"),
    "learn_noise": Option(bool, help="regression: M-step of the noise variance"),
    "rate_level": Option(str, choices=("layer", "group"),
                         help="M-step of the inclusion rates: one per hidden layer, or one per neuron (group)"),
    "learn_probit_noise": Option(bool, help="classification: M-step of the probit-product noise variance (maximises "
                                            "the pass's summed log evidence)"),
    "prune": Option(bool, help="prune the neurons below prune_threshold after the last pass"),
    "prune_threshold": Option(float, gt=0, lt=1, help="inclusion probability below which a neuron is pruned"),
    **VALIDATION_OPTIONS,
}

register(CatalogEntry(
    name=NAME,
    summary="EM-TDAMP as implemented here: group spike-and-slab (one group per neuron), Module A by ADF/PBP "
            "moment propagation (default) or deep AMP with Onsager terms (module_a: amp), exact group sum-product "
            "(Module B), EM M-step, neurons pruned at inclusion probability 1/2",
    paper="Xu, Liu, Zhang & Lau 2024, Bayesian Deep Learning via Expectation Maximization and Turbo Deep "
          "Approximate Message Passing (arXiv 2402.07366)",
    tasks=("regression", "classification"),
    create=_create,
    defaults={
        "regression": {"model": {"rho": 0.5, "slab_scale": 1.0, "noise_var": 0.25}, "guide": dict(_GUIDE),
                       "train": {**_TRAIN, "epochs": 200, "batch_size": None, "validation_fraction": 0.2}},
        # classification keeps the memory of 10 passes (P = T = 10): the rule was chosen on regression
        "classification": {"model": {"rho": 0.5, "slab_scale": 2.0, "noise_var": 1.0},
                           "guide": {**_GUIDE, "memory": 10.0},
                           "train": {**_TRAIN, "epochs": 20, "batch_size": 128}},
    },
    options=_OPTIONS,
))
