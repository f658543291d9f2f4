"""The fitted posterior: the one object every method in the catalog returns.

A :class:`Posterior` owns the Pyro model (network, prior, likelihood), whatever represents the
posterior (a guide, a set of samples, message-passing state), the data standardisation, the
configuration it was built from and the typed record of its fit: :attr:`~Posterior.history` (a
:class:`~bnnzoo.guides.training.TrainingHistory`) and :attr:`~Posterior.fit_state` (a
:class:`FitState`: the temperature it was fitted at, the prunings applied). It predicts,
evaluates, reports sparsity, exports the (pruned) network and saves/loads itself. Subclasses say
how the posterior is fitted (:meth:`_fit`) and how weights are drawn from it (:meth:`draw_weights`);
:class:`GuidePosterior` is the base of those represented by a guide module.

``config`` is what the user asked for (the entry's defaults merged with the overrides); fitting,
pruning and reduction never write to it. What they decide goes to ``history`` and ``fit_state``.

Saved runs (:meth:`Posterior.save`): ``config.json`` holds the format number, the entry name, the
config, the network's spec, the fit state and the history; ``posterior.pt`` the tensors;
``manifest.json`` every file's size and SHA-256 (:mod:`bnnzoo.runs`: written atomically, verified
on load). Format 2 is written; formats 1 (the network spec and the pruning threshold inside the
config, no fit state) and 2 are read, with or without a manifest.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyro.util
import torch
from tqdm import tqdm

from . import metrics, runs
from .catalog import get_entry
from .checkpoint import Continuation
from .data import validate_arrays
from .devices import resolve_device
from .diagnostics import to_arviz
from .guides import bmr, temperature_scaling
from .guides import predictive_moments as moments
from .guides.training import TrainingHistory
from .models.errors import ConfigError, DataError, NotFittedError, RunError
from .models.likelihoods import CategoricalLikelihood, GaussianLikelihood, noise_m_step
from .models.sparsity import sparsity_report
from .models.standardizer import Standardizer

FORMAT_VERSION = 2
#: weight draws behind the noise refit after pruning (:meth:`Posterior.refit_noise`)
NOISE_REFIT_DRAWS = 100
READABLE_FORMATS = (1, 2)

# ---- the sample count set by the Monte Carlo error (``num_samples="auto"``) -------------------------
#: weight draws between two checks of the Monte Carlo error
AUTO_BLOCK = 16
#: the fewest draws ``"auto"`` uses (its error estimate needs a few blocks; a point estimate uses one)
AUTO_MIN_DRAWS = 32
#: the most draws ``"auto"`` uses, whatever the error then (recorded in ``Prediction.mc_error``)
AUTO_MAX_DRAWS = 1024
#: the expected loss of mean log predictive density that the Monte Carlo error of the predictive
#: costs, in nats per point, must be at most this (:class:`_MonteCarloError`): classification
#: ``mean_n sum_k s_nk^2 / (2 S p_nk)`` (the chi-square approximation of ``KL(p || p_hat)``),
#: regression ``mean_n s_n^2 / (2 S sd_n^2)`` (a mean off by ``d`` predictive sds costs ``d^2 / 2``:
#: 0.0025 nats is ``d = 0.07``)
AUTO_LOG_DENSITY_TOLERANCE = 0.0025
#: ``method="moments"`` (classification): quasi-Monte Carlo points of the logits' Gaussian, each
#: with its antithetic twin (:func:`bnnzoo.guides.predictive_moments.sampled_softmax`)
MOMENT_LOGIT_POINTS = 128
#: the prediction methods: Monte Carlo over weight draws, moment propagation (classification: with
#: draws of the logits' Gaussian), moment propagation with the probit approximation of the softmax
PREDICT_METHODS = ("sample", "moments", "probit")
#: the order in which a calibrated fit compares the predictives it supports on its validation rows
#: (:meth:`Posterior.select_temperature`), cheapest first: the first within one standard error of
#: the best is chosen
PREDICTIVE_CANDIDATES = ("probit", "moments", "sample")


@dataclass
class Prediction:
    """Posterior predictive summary for a set of inputs.

    Regression: ``mean`` and ``std`` of the predictive distribution of ``y`` (noise included), in the
    original units. Classification: ``probs``, the predictive class probabilities (``mean`` is the same
    tensor). ``samples`` holds the network outputs of every weight draw, shape ``(S, N, out)``
    (original units for regression, logits for classification), when asked for.

    ``method``: how it was computed (:data:`PREDICT_METHODS`); ``num_samples``: the weight draws
    behind it (0 for the moment methods; with ``num_samples="auto"`` the number the rule chose);
    ``mc_error``: with ``"auto"``, the Monte Carlo error criterion at the last draw (see
    :meth:`Posterior.predict`), else ``None``.
    """

    task: str
    mean: torch.Tensor
    std: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    method: str = "sample"
    num_samples: int | None = None
    mc_error: float | None = None

    @property
    def probs(self) -> torch.Tensor:
        if self.task != "classification":
            raise AttributeError("probs is defined for classification; use mean and std for regression")
        return self.mean


@dataclass
class PruningRecord:
    """One pruning or reduction applied to a posterior.

    ``rule``: ``"threshold"`` (the entry's own rule with a threshold), ``"keep"`` (a target fraction
    of groups kept) or ``"bmr"`` (Bayesian model reduction); ``options``: the settings it ran with;
    ``summary``: what it decided (plain numbers, e.g. BMR's per-layer thresholds and the pruned
    fraction); ``seconds``: its wall time, where measured. JSON-serialisable.
    """

    rule: str
    options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


@dataclass
class FitState:
    """What a fit (and any later pruning) decided about a posterior, saved with it.

    ``temperature``: the KL weight ``T`` of the objective the posterior was fitted at (1 for the
    exact ELBO, or a method without one); prediction reads it from here. ``pruning``: every pruning
    or reduction applied, in order (the masks themselves live with the posterior's state).
    """

    temperature: float = 1.0
    pruning: list[PruningRecord] = field(default_factory=list)
    #: the number of epochs chosen on a validation part of the training data, and how (see
    #: :meth:`Posterior.fit`); ``None`` when the fit ran the configured ``epochs``
    epoch_selection: dict[str, Any] | None = None
    #: classification: the predictive's temperature fitted on a validation part of the training
    #: data, and how (see :meth:`Posterior.select_temperature`); ``None``: not tempered
    calibration: dict[str, Any] | None = None
    #: training options chosen among candidate values on a validation part of the training data,
    #: and how (see :meth:`Posterior.select_options`); ``None``: the configured values
    option_selection: dict[str, Any] | None = None

    @property
    def predictive_temperature(self) -> float:
        """The temperature of the classification predictive (1 when not calibrated)."""
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    @property
    def predictive_method(self) -> str:
        """The predictive that ``method="auto"`` uses: the one a calibrated fit chose on its
        validation rows (``calibration["predictive"]``), else ``"sample"`` (a run saved before the
        choice was made included)."""
        return str((self.calibration or {}).get("predictive", "sample"))

    def to_dict(self) -> dict:
        out = {"temperature": self.temperature, "pruning": [asdict(r) for r in self.pruning]}
        if self.epoch_selection is not None:
            out["epoch_selection"] = self.epoch_selection
        if self.calibration is not None:
            out["calibration"] = self.calibration
        if self.option_selection is not None:
            out["option_selection"] = self.option_selection
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "FitState":
        return cls(temperature=float(values.get("temperature", 1.0)),
                   pruning=[PruningRecord(**r) for r in values.get("pruning", [])],
                   epoch_selection=values.get("epoch_selection"), calibration=values.get("calibration"),
                   option_selection=values.get("option_selection"))


class _MonteCarloError:
    """The expected loss of mean log predictive density (nats per point) that the Monte Carlo error
    of a predictive costs, from running sums over output draws: the criterion of
    ``num_samples="auto"`` (:meth:`Posterior.predict`), with tolerance
    :data:`AUTO_LOG_DENSITY_TOLERANCE`.

    With ``S`` draws: classification (``add`` takes logits), ``mean_n sum_k s_nk^2 / (2 S p_nk)``,
    ``p_nk`` the predicted probability of class ``k`` for point ``n`` and ``s_nk^2`` the unbiased
    sample variance of ``softmax(f)_k`` over the draws: an estimate ``p + e`` of ``p`` costs
    ``KL(p || p + e) ~ sum_k e_k^2 / (2 p_k)`` in expected log density, and ``E[e_k^2] = s_k^2 / S``.
    Regression (standardised outputs): ``mean_n s_n^2 / (2 S sd_n^2)``, ``sd_n^2`` the predictive
    variance (the draws' variance plus ``noise_var``): a predictive mean off by ``d`` sds costs
    ``d^2 / 2``. The sums stay on the device; :meth:`error` is the one host synchronisation, once per
    block of draws.
    """

    def __init__(self, task: str, noise_var: float, probs=None):
        self.task, self.noise_var = task, noise_var
        self.probs = probs if probs is not None else (lambda f: torch.softmax(f, -1))  # classification
        self.tolerance = AUTO_LOG_DENSITY_TOLERANCE
        self.count = 0
        self.first = self.second = None
        self.last_error: float | None = None

    def add(self, f: torch.Tensor) -> None:
        v = self.probs(f) if self.task == "classification" else f.squeeze(-1)
        self.first = v if self.first is None else self.first + v
        self.second = v * v if self.second is None else self.second + v * v
        self.count += 1

    def error(self) -> float:
        s = self.count
        if s < 2:
            self.last_error = math.inf
            return self.last_error
        mean = self.first / s
        spread = (self.second / s - mean**2).clamp_min(0)  # the variance over the draws
        tiny = torch.finfo(spread.dtype).tiny
        squared_error = spread * (s / (s - 1)) / s  # of the Monte Carlo mean
        if self.task == "classification":
            loss = (squared_error / mean.clamp_min(tiny)).sum(-1) / 2
        else:
            loss = squared_error / (spread + self.noise_var).clamp_min(tiny) / 2
        self.last_error = float(loss.mean())
        return self.last_error


class _Fold(NamedTuple):
    """One fold of :meth:`Posterior._pooled_fold_run`: the copy fitted on the other folds' rows, its
    held-out rows, and the held-out total (squared error or log density) after each epoch."""

    twin: "Posterior"
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    totals: list[float]


class _SelectionDone(Exception):
    """Raised by the validation monitor to end the selection fit once its patience has run out."""


class Posterior(ABC):
    """A fitted posterior over a Bayesian network's weights (see the module docstring)."""

    def __init__(self, model, *, name: str, config: dict, device="cpu"):
        self.model = model
        self.name = name
        self.config = config
        self.device = resolve_device(device)
        self.standardizer: Standardizer | None = None
        self.history = TrainingHistory()
        self.fit_state = FitState()
        self.train_rows: int | None = None  # rows of the last fit's training data (fit_epochs' min_steps rule)
        self.model.to(self.device)
        self.model.eval()  # normalisation layers of a user's module predict with running statistics

    # ---- what subclasses provide ----------------------------------------------------------------
    @abstractmethod
    def _fit(self, x: torch.Tensor, y: torch.Tensor, progress: bool, callback=None) -> None:
        """Fit on standardised training data already on the device; call ``callback(epoch, loss)``
        after every epoch (or pass over the data), record the epochs in :attr:`history` and what
        the fit decided in :attr:`fit_state`."""

    @abstractmethod
    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``num_samples`` posterior draws of every weight site (pruned weights zero)."""

    @abstractmethod
    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean of every weight site."""

    @abstractmethod
    def masks(self) -> dict[str, torch.Tensor]:
        """The pruning masks (site -> bool tensor, ``True`` = kept) of the pruned sites."""

    @abstractmethod
    def _state(self) -> dict:
        """Tensors to save (besides the model's state)."""

    @abstractmethod
    def _load_state(self, state: dict) -> None:
        """Restore what :meth:`_state` saved."""

    # ---- properties ---------------------------------------------------------------------------
    @property
    def net(self):
        return self.model.net

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def network_spec(self) -> dict:
        """The network's exact layout (:meth:`~bnnzoo.models.networks.Network.spec`), saved beside the config."""
        return self.net.spec()

    @property
    def training_temperature(self) -> float:
        """The KL weight of the objective this posterior's fit uses (1: the exact posterior)."""
        return 1.0

    @property
    def predictive_temperature(self) -> float:
        """Classification: the temperature ``T`` of the predictive, whose class probabilities are
        ``softmax(log p / T)`` for the posterior predictive ``p`` (1 unless fitted on validation
        data: ``train.calibrate``, :meth:`select_temperature`)."""
        return self.fit_state.predictive_temperature

    def _tempered(self, probs: torch.Tensor) -> torch.Tensor:
        """Classification: the predictive class probabilities ``probs`` ``(N, K)`` at the fitted
        :attr:`predictive_temperature` (unchanged at 1)."""
        t = self.predictive_temperature
        if t == 1.0:
            return probs
        return temperature_scaling.tempered_log_probs(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), t).exp()

    @property
    def is_fitted(self) -> bool:
        return self.standardizer is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"this {self.name} posterior is not fitted yet: call fit(x, y) first")

    # ---- fit ----------------------------------------------------------------------------------
    def validate(self, x, y=None, what="data") -> tuple[torch.Tensor, torch.Tensor | None]:
        num_classes = self.net.output_dim if self.task == "classification" else None
        x, y = validate_arrays(x, y, self.task, num_classes, what)  # y=None: the inputs alone
        expected = tuple(self.net.input_shape)
        if tuple(x.shape[1:]) != expected:
            raise DataError(f"{what}: inputs have shape {tuple(x.shape[1:])} per example, "
                             f"but the network {self.net.name} expects {expected}")
        return x, y

    def fit(self, x, y, progress: bool = True, callback=None) -> "Posterior":
        """Fit the posterior on training inputs ``x`` and targets ``y`` (raw units).

        ``callback(epoch, loss)``, if given, runs after every epoch (logging, early inspection).

        With ``train.validation_fraction`` set (entries that offer it), choices are made first on
        that held-out part of the training rows, as the UCI protocol makes them, and this posterior
        is then fitted on all rows:

        - ``train.select_epochs`` (default on): the number of epochs (:meth:`select_epochs`): a copy
          of this unfitted posterior is fitted on the other rows while the log predictive density
          of the held-out rows is followed; the fit runs the number of epochs that scored best
          (a regression point estimate then predicts with the noise scale of the held-out
          residuals). Recorded in ``fit_state.epoch_selection``.
        - ``train.calibrate`` (classification, default off): the predictive and its temperature
          ``T`` (:meth:`select_temperature`): a copy fitted on the other rows, as this one is
          fitted; each predictive it supports (probit, moments, draws) with the ``T`` that
          maximises its held-out log density, and the cheapest whose tempered density is within
          one standard error of the highest.
          Recorded in ``fit_state.calibration``; every prediction gives the class probabilities
          ``softmax(log p / T)`` of the posterior predictive ``p`` (:attr:`predictive_temperature`),
          made by the chosen predictive unless another ``method`` is asked for.
        - the entry's :meth:`validation_candidates` (where it has any): training options whose value
          is chosen among candidates (:meth:`select_options`), each candidate fitted on the other
          rows and scored on the held-out ones (with its own temperature where ``calibrate`` is on:
          the winner's is the fit's). Recorded in ``fit_state.option_selection``; the fit reads the
          chosen values through :meth:`chosen_option`.
        """
        x, y = self.validate(x, y, "training data")
        self.train_rows = len(x)  # the rows a train.min_steps rule counts (fit_epochs)
        train = self.config["train"]
        if train.get("augment") is not None and x.dim() != 4:
            raise ConfigError(f"{self.name}: augment={train['augment']!r} crops and flips images; these inputs have "
                              f"shape {tuple(x.shape[1:])} per example, not (channels, height, width)")
        held_out = bool(train.get("validation_fraction"))
        calibrate = held_out and bool(train.get("calibrate", False))
        if calibrate and self.task != "classification":
            raise ConfigError(f"{self.name}: calibrate fits a temperature of the class probabilities, which is for classification; "
                              f"a regression fit learns its noise scale instead (set calibrate: false)")
        selection = self.select_epochs(x, y, progress) if held_out and train.get("select_epochs", True) else None
        option_selection = None
        if held_out and self.validation_candidates():
            option_selection, calibration = self.select_options(x, y, selection, calibrate, progress)
        else:
            calibration = self.select_temperature(x, y, selection, progress) if calibrate else None
        self.standardizer = Standardizer.from_data(x, y, self.task).to(self.device)
        x = self.standardizer.x(x.to(self.device))
        y = self.standardizer.y(y.to(self.device))
        self.fit_state = FitState(temperature=self.training_temperature, epoch_selection=selection,
                                  calibration=calibration, option_selection=option_selection)
        try:
            self.model.train()  # batch statistics (and running averages) in a user module's normalisation layers
            try:
                self._fit(x, y, progress, callback)
            finally:
                self.model.eval()
            if selection and selection.get("noise_scale") is not None:  # estimated on held-out rows
                with torch.no_grad():
                    self.model.likelihood.log_noise_scale.fill_(
                        math.log(selection["noise_scale"] / self.standardizer.y_scale))
            if self.task == "regression" and self.fit_state.pruning:
                self._refit_noise(x, y)
        except BaseException:  # a diverged or interrupted fit leaves an unfitted posterior, never a half-fitted one
            self.standardizer = None
            raise
        return self

    @property
    def fit_epochs(self) -> int:
        """The epochs (passes) the fit runs: those chosen on validation data
        (``fit_state.epoch_selection``), else ``train.epochs``, raised where ``train.min_steps`` is
        set to the passes that make at least that many minibatch steps over the fit's training rows:
        ``max(epochs, ceil(min_steps / ceil(n / batch_size)))``, a rule of ``n`` that gives a small
        data set more passes and a large one ``epochs``."""
        chosen = self.fit_state.epoch_selection
        if chosen:
            return int(chosen["epochs"])
        train = self.config["train"]
        epochs = int(train["epochs"])
        steps, rows = train.get("min_steps"), self.train_rows
        if steps and rows:
            epochs = max(epochs, math.ceil(int(steps) / math.ceil(rows / self.fit_batch_size)))
        return epochs

    @property
    def fit_batch_size(self) -> int:
        """The minibatch size the fit uses: ``train.batch_size``, or, where that is ``None`` (chosen
        on validation data), the one :meth:`select_epochs` chose."""
        size = self.config["train"]["batch_size"]
        if size is None:
            chosen = self.fit_state.epoch_selection
            if not chosen:
                raise ConfigError(f"{self.name}: batch_size null means 'chosen on validation data', which needs "
                                  f"validation_fraction set")
            return int(chosen["batch_size"])
        return int(size)

    #: posterior draws behind each validation score of :meth:`select_epochs` (one for a point estimate)
    SELECTION_DRAWS = 20
    #: the minibatch sizes :meth:`select_epochs` compares when ``train.batch_size`` is ``None``
    BATCH_SIZE_CANDIDATES = (8, 32)
    #: a candidate size that would cut a pass into more minibatches than this is not tried (the
    #: largest candidate always is): small batches help where a pass has few updates, and on large
    #: data they only multiply the cost of a pass
    MAX_SELECTED_BATCHES_PER_PASS = 1000

    #: ``train.select_folds`` applies while the held-out part would have fewer rows than this: beyond,
    #: one part's score is already precise (its standard error shrinks as one over the square root
    #: of its rows) and the folds would multiply the selection's cost for little
    FOLDS_BELOW_VALIDATION_ROWS = 1000

    def select_epochs(self, x, y, progress: bool = False) -> dict[str, Any]:
        """Choose the number of epochs (and, where ``train.batch_size`` is ``None``, the minibatch
        size) on a validation part of the training data ``(x, y)`` (raw units), leaving this
        posterior unfitted and the global random state as it was.

        The rule (the same on any data): the first ``train.validation_fraction`` of a fixed random
        permutation of the rows (seed 0) is held out; a copy of this posterior, as created, is fitted
        on the other rows for at most ``train.epochs`` epochs; after every epoch the mean log
        predictive density of the held-out rows is computed (:data:`SELECTION_DRAWS` draws, fixed
        seed, so the epochs are compared on common random numbers); the copy stops once
        ``train.patience`` epochs have passed without a better score. The chosen number is the best
        epoch. With ``batch_size`` ``None`` this runs once per size of :data:`BATCH_SIZE_CANDIDATES`
        (the largest, and each smaller one that cuts a pass into at most
        :data:`MAX_SELECTED_BATCHES_PER_PASS` minibatches) and the size with the best score wins
        (ties: the larger, cheaper one).

        With ``train.select_folds`` ``K``, while the held-out part would have fewer than
        :data:`FOLDS_BELOW_VALIDATION_ROWS` rows and where the fit can continue in stages (it
        supports checkpoints: not a Pyro autoguide's fit), it is replaced by ``K`` folds run in step,
        each row held out once, and the epoch is chosen on their pooled score
        (:meth:`_pooled_fold_run`); ``"validation_rows"`` is then every row, and ``"folds"`` and
        ``"fold_epochs_run"`` are recorded.

        A regression point estimate (``map``) is scored with the noise at its held-out maximum
        likelihood: a point estimate's learned noise follows the training residuals down, so its
        held-out log density falls while its held-out fit still improves. Each epoch's score is
        ``-log(2 pi e m) / 2``, ``m`` the held-out mean squared error (original units), and the
        chosen epoch's ``sqrt(m)`` is recorded as ``"noise_scale"``: the fit on all rows predicts
        with that noise scale (estimated on rows the copy did not see) in place of its own.

        Returns ``{"epochs", "batch_size", "max_epochs", "validation_fraction", "patience",
        "validation_rows", "validation_log_likelihood"}`` (the winner's score after each epoch run),
        ``"noise_scale"`` (regression point estimates) and, when sizes were compared,
        ``"candidates"`` (per size: its best epoch and score)."""
        train = self.config["train"]
        patience = int(train.get("patience", 20))
        max_epochs = int(train["epochs"])
        x, y = self.validate(x, y, "training data")
        fraction, fit_rows, val_rows = self._validation_split(len(x))
        n, n_val = len(x), len(val_rows)
        x_val, y_val = x[val_rows], y[val_rows]
        point = bool(getattr(self, "point_estimate", False))
        draws = 1 if point else self.SELECTION_DRAWS
        held_out_noise = point and self.task == "regression"
        if train["batch_size"] is not None:
            sizes = [train["batch_size"]]
        else:
            largest = max(self.BATCH_SIZE_CANDIDATES)
            sizes = [b for b in sorted(self.BATCH_SIZE_CANDIDATES, reverse=True)
                     if b == largest or (n - n_val) / b <= self.MAX_SELECTED_BATCHES_PER_PASS]
        folds = train.get("select_folds")
        if n_val >= self.FOLDS_BELOW_VALIDATION_ROWS or not getattr(self, "supports_checkpoints", False):
            folds = None  # a large held-out part, or a fit that cannot continue in stages: one part
        runs = []
        for size in sizes:
            if folds:
                runs.append(self._pooled_fold_run(x, y, int(folds), size, patience, max_epochs, draws, held_out_noise,
                                                  progress))
                continue
            twin = self._validation_twin(batch_size=size)
            scores: list[float] = []
            noises: list[float] = []

            def monitor(epoch: int, loss: float, twin=twin, scores=scores, noises=noises) -> None:
                if held_out_noise:
                    mean = twin.predict(x_val, num_samples=1, seed=0).mean
                    mse = max(float((y_val.to(mean.device) - mean).pow(2).mean()), torch.finfo(mean.dtype).tiny)
                    noises.append(math.sqrt(mse))
                    scores.append(-0.5 * math.log(2 * math.pi * math.e * mse))
                else:
                    scores.append(float(twin.log_likelihood(x_val, y_val, num_samples=draws, seed=0).mean()))
                best = max(range(len(scores)), key=scores.__getitem__)
                if len(scores) - 1 - best >= patience:
                    raise _SelectionDone

            try:
                self._fit_twin(twin, x[fit_rows], y[fit_rows], progress, monitor)
            except _SelectionDone:
                pass
            if not scores:
                raise RuntimeError(f"{self.name}: the epoch selection fit ran no epoch")
            best = max(range(len(scores)), key=scores.__getitem__)
            runs.append({"batch_size": size, "epochs": best + 1, "score": scores[best], "scores": scores,
                         "noise_scale": noises[best] if noises else None})
        winner = max(runs, key=lambda r: r["score"])  # first of equals: the larger size
        out = {"epochs": winner["epochs"], "batch_size": winner["batch_size"], "max_epochs": max_epochs,
               "validation_fraction": fraction, "patience": patience, "validation_rows": n_val,
               "validation_log_likelihood": winner["scores"]}
        if winner["noise_scale"] is not None:
            out["noise_scale"] = winner["noise_scale"]
        if folds:
            out.update(folds=int(folds), validation_rows=n, fold_epochs_run=winner["epochs_run"])
        if len(runs) > 1:
            out["candidates"] = [{k: r[k] for k in ("batch_size", "epochs", "score")} for r in runs]
        return out

    def _validation_split(self, n: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """``(fraction, fit_rows, validation_rows)`` of ``n`` training rows: the first
        ``train.validation_fraction`` of a fixed random permutation (seed 0) is held out."""
        fraction = float(self.config["train"]["validation_fraction"])
        n_val = round(fraction * n)
        if not 1 <= n_val < n - 1:
            raise DataError(f"{self.name}: validation_fraction {fraction:g} of {n} training rows leaves no "
                            f"validation part or no training part; give more data or validation_fraction: null")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        return fraction, order[n_val:], order[:n_val]

    def _pooled_fold_run(self, x, y, folds: int, batch_size: int, patience: int, max_epochs: int, draws: int,
                         held_out_noise: bool, progress: bool) -> dict[str, Any]:
        """:meth:`select_epochs` on ``folds`` folds run in step (``train.select_folds``): the rows, in the
        fixed permutation of :meth:`_validation_split`, are cut into ``folds`` parts; one copy of this
        posterior per part is fitted on the other parts, all copies advancing ``patience`` epochs at a
        time (each continues its own fit: :class:`~bnnzoo.checkpoint.Continuation`), and after every
        epoch the pooled score of all held-out rows (each row held out once) is computed: the mean log
        predictive density, or for a regression point estimate ``-log(2 pi e m) / 2`` with ``m`` the
        pooled mean squared error. The copies stop once the pooled score's best epoch lies ``patience``
        epochs back (or at ``max_epochs``); the best epoch wins, with ``sqrt(m)`` as the noise scale."""
        n = len(x)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        parts = list(order.tensor_split(folds))
        if min(len(p) for p in parts) < 1 or n - max(len(p) for p in parts) < 2:
            raise DataError(f"{self.name}: select_folds {folds} of {n} training rows leaves a fold without "
                            f"held-out or training rows; give more data or fewer folds")
        folds_fitted = []
        for k, held in enumerate(parts):
            twin = self._validation_twin(batch_size=batch_size)
            twin.checkpoint = Continuation(twin)
            rest = torch.cat([p for j, p in enumerate(parts) if j != k])
            folds_fitted.append(_Fold(twin, x[rest], y[rest], x[held], y[held], []))
        horizon, scores, pooled_mse = 0, [], []
        # one bar for the whole selection (epochs of the pooled curve), not one per fold and stage
        with tqdm(total=max_epochs, desc=f"{self.name}: epochs on {folds} folds", disable=not progress,
                  leave=False) as bar:
            while True:
                horizon = min(max_epochs, horizon + patience)
                for fold in folds_fitted:

                    def monitor(epoch: int, loss: float, fold=fold) -> None:
                        if held_out_noise:
                            mean = fold.twin.predict(fold.x_held, num_samples=1, seed=0).mean
                            fold.totals.append(float((fold.y_held.to(mean.device) - mean).pow(2).sum()))
                        else:
                            fold.totals.append(float(fold.twin.log_likelihood(fold.x_held, fold.y_held,
                                                                              num_samples=draws, seed=0).sum()))

                    fold.twin.config["train"]["epochs"] = horizon
                    if fold.totals:
                        fold.twin.checkpoint.arm()
                    self._fit_twin(fold.twin, fold.x_fit, fold.y_fit, False, monitor)
                    if len(fold.totals) != horizon:
                        raise RuntimeError(f"{self.name}: a fold's selection fit ran {len(fold.totals)} of "
                                           f"{horizon} epochs")
                for epoch in range(len(scores), horizon):
                    total = sum(fold.totals[epoch] for fold in folds_fitted) / n
                    if held_out_noise:
                        total = max(total, torch.finfo(torch.float32).tiny)
                        pooled_mse.append(total)
                        scores.append(-0.5 * math.log(2 * math.pi * math.e * total))
                    else:
                        scores.append(total)
                best = max(range(len(scores)), key=scores.__getitem__)
                bar.update(horizon - bar.n)
                bar.set_postfix(best_epoch=best + 1)
                if horizon - 1 - best >= patience or horizon >= max_epochs:
                    break
        return {"batch_size": batch_size, "epochs": best + 1, "score": scores[best], "scores": scores,
                "noise_scale": math.sqrt(pooled_mse[best]) if held_out_noise else None, "epochs_run": horizon}

    def _validation_twin(self, **train) -> "Posterior":
        """A copy of this unfitted posterior that makes no choice on validation data itself, writes
        no checkpoint, and trains with ``train`` overriding its training options."""
        twin = copy.deepcopy(self)
        if hasattr(twin, "checkpoint"):
            twin.checkpoint = None  # the selection fit never writes or resumes the run's checkpoints
        twin.config = {**self.config, "train": {**self.config["train"], "validation_fraction": None, **train}}
        return twin

    @staticmethod
    def _fit_twin(twin: "Posterior", x, y, progress: bool, callback=None) -> None:
        """Fit ``twin`` on ``(x, y)``, leaving the global random state as it was (so the fit that
        follows is the one it would be without the choices made on validation data)."""
        rng = pyro.util.get_rng_state()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the copy's pruning warnings are not this fit's
                twin.fit(x, y, progress=progress, callback=callback)
        finally:
            pyro.util.set_rng_state(rng)

    def select_temperature(self, x, y, epoch_selection: dict | None = None,
                           progress: bool = False) -> dict[str, Any]:
        """Classification: choose the predictive and fit its temperature on a validation part of the
        training data ``(x, y)`` (raw units), leaving this posterior unfitted and the global random
        state as it was (temperature scaling, :mod:`bnnzoo.guides.temperature_scaling`).

        The rule (the same on any data): the rows :meth:`select_epochs` holds out (the first
        ``train.validation_fraction`` of a fixed permutation) are held out; a copy of this
        posterior, as created, is fitted on the other rows by this entry's whole procedure
        (pruning or reduction included; with the epochs and batch size of ``epoch_selection`` where
        those were chosen). Each predictive the copy supports, in the order of
        :data:`PREDICTIVE_CANDIDATES` (``"probit"`` and ``"moments"`` where the moment propagation
        applies, :meth:`predict_methods`; always ``"sample"``, with the draws ``num_samples="auto"``
        takes; fixed seed), predicts the held-out rows; its temperature ``T`` maximises their mean
        log density of ``softmax(log p / T)``, and the cheapest predictive whose tempered density is
        within one standard error of the highest one's is chosen (the one-standard-error rule: the
        best one's lead over it, averaged over the rows, at most its standard error over the rows).
        Every later prediction with ``method="auto"`` (the default) is made by that predictive at
        that temperature, so the temperature is fitted to the predictive it tempers. Returns
        ``{"predictive", "temperature", "validation_fraction", "validation_rows", "num_samples",
        "validation_log_likelihood", "candidates"}``
        (``num_samples``: the chosen predictive's draws, 0 for the moment methods;
        ``validation_log_likelihood``: its held-out mean log density untempered, then tempered;
        ``candidates``: each predictive's ``method``, ``temperature``, tempered density
        ``validation_log_likelihood``, and the best one's lead over it, ``best_lead``, with that
        lead's standard error ``best_lead_se``)."""
        if self.task != "classification":
            raise ConfigError(f"{self.name}: a predictive temperature is for classification, not {self.task}")
        x, y = self.validate(x, y, "training data")
        fraction, fit_rows, val_rows = self._validation_split(len(x))
        chosen = {k: epoch_selection[k] for k in ("epochs", "batch_size")} if epoch_selection else {}
        twin = self._validation_twin(**chosen)
        self._fit_twin(twin, x[fit_rows], y[fit_rows], progress)
        record = self._twin_temperature(twin, x[val_rows], y[val_rows])
        del record["pointwise"]
        return {**record, "validation_fraction": fraction, "validation_rows": len(val_rows)}

    def _twin_temperature(self, twin: "Posterior", x_val, y_val) -> dict[str, Any]:
        """The predictive of ``twin`` chosen on the held-out rows and its temperature, by
        :meth:`select_temperature`'s rule; ``"pointwise"`` holds the chosen predictive's tempered
        log density of every held-out row (a tensor)."""
        y_val = y_val.to(self.device)
        runs = []
        for method in twin.predict_methods():
            prediction = twin.predict(x_val, seed=0, method=method)
            probs = prediction.probs  # the twin makes no choice on validation data: untempered
            log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
            t = temperature_scaling.fit_temperature(log_probs, y_val)
            target = y_val.unsqueeze(-1)
            pointwise = [temperature_scaling.tempered_log_probs(log_probs, v).gather(-1, target).squeeze(-1)
                         for v in (1.0, t)]
            runs.append({"predictive": method, "temperature": t, "num_samples": int(prediction.num_samples),
                         "pointwise": pointwise[1],
                         "validation_log_likelihood": {"untempered": float(pointwise[0].mean()),
                                                       "tempered": float(pointwise[1].mean())}})
        best = max(runs, key=lambda r: r["validation_log_likelihood"]["tempered"])
        for run in runs:  # the best's lead over each, and its standard error (paired over the rows)
            lead = (best["pointwise"] - run["pointwise"]).double()
            run["lead"] = float(lead.mean())
            run["lead_se"] = float(lead.std() / math.sqrt(len(lead))) if len(lead) > 1 else 0.0
        winner = next(r for r in runs if r["lead"] <= r["lead_se"])  # the cheapest within one SE
        candidates = [{"method": r["predictive"], "temperature": r["temperature"],
                       "validation_log_likelihood": r["validation_log_likelihood"]["tempered"],
                       "best_lead": r["lead"], "best_lead_se": r["lead_se"]} for r in runs]
        record = {k: v for k, v in winner.items() if k not in ("lead", "lead_se")}
        return {**record, "candidates": candidates}

    def predict_methods(self) -> list[str]:
        """The predictives this posterior supports, in the order of :data:`PREDICTIVE_CANDIDATES`:
        ``"sample"`` always, ``"probit"`` and ``"moments"`` where the moment propagation applies to
        its weights, network and likelihood (:meth:`predict`)."""
        try:
            self._moment_weights()
        except TypeError:
            return ["sample"]
        return list(PREDICTIVE_CANDIDATES)

    # ---- training options chosen on validation data ---------------------------------------------
    def validation_candidates(self) -> list[dict[str, Any]]:
        """The candidates this posterior chooses among on a validation part of the training data when
        it has one (``train.validation_fraction``): each a dict of training options that override
        the configured ones, the preferred candidate first (it wins ties). None by default; an entry
        that chooses training options overrides this."""
        return []

    def chosen_option(self, name: str):
        """Training option ``name`` as this fit uses it: the value chosen on validation data
        (``fit_state.option_selection``) where one was, else the configured ``train`` value."""
        chosen = (self.fit_state.option_selection or {}).get("options", {})
        return chosen[name] if name in chosen else self.config["train"].get(name)

    def select_options(self, x, y, epoch_selection: dict | None = None, calibrate: bool = False,
                       progress: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Choose among the candidates of :meth:`validation_candidates` (overrides of training
        options) on a validation part of the training data ``(x, y)`` (raw units), leaving this
        posterior unfitted and the global random state as it was.

        The rule (the same on any data): the rows :meth:`select_epochs` holds out are held out; for
        each candidate, a copy of this posterior, as created, with the candidate's options, is
        fitted on the other rows by this entry's whole procedure (with the epochs and
        batch size of ``epoch_selection`` where those were chosen) and scored by the mean log
        predictive density of the held-out rows (:data:`SELECTION_DRAWS` draws, one for a point
        estimate, fixed seed); with ``calibrate`` (classification), by that density under the
        temperature fitted on the same rows (:meth:`select_temperature`'s rule), so that each
        candidate is scored as it would predict. The highest score wins (first of equals: the first
        candidate), as :meth:`select_epochs` picks its best epoch. Each later candidate's record also
        gives its advantage over the first and that advantage's standard error (the paired
        differences of their held-out log densities), to show how far the choice stands above the
        noise of the held-out rows.

        Returns ``(selection, calibration)``: ``selection`` is ``{"options", "candidates",
        "validation_fraction", "validation_rows"}`` (``options``: the winner's; ``candidates``: each
        one's options, score and, after the first, ``"advantage"`` over the first with its
        ``"advantage_se"``), ``calibration`` the winner's temperature record (``None`` without
        ``calibrate``)."""
        candidates = self.validation_candidates()
        if not candidates:
            raise ConfigError(f"{self.name}: no training option is chosen on validation data")
        x, y = self.validate(x, y, "training data")
        fraction, fit_rows, val_rows = self._validation_split(len(x))
        chosen = {k: epoch_selection[k] for k in ("epochs", "batch_size")} if epoch_selection else {}
        runs = []
        for options in candidates:
            twin = self._validation_twin(**chosen, **options)
            self._fit_twin(twin, x[fit_rows], y[fit_rows], progress)
            if calibrate:
                temperature = self._twin_temperature(twin, x[val_rows], y[val_rows])
                pointwise = temperature.pop("pointwise")
            else:
                temperature = None
                draws = 1 if getattr(self, "point_estimate", False) else self.SELECTION_DRAWS
                pointwise = twin.log_likelihood(x[val_rows], y[val_rows], num_samples=draws, seed=0)
            runs.append({"options": options, "score": float(pointwise.mean()), "temperature": temperature,
                         "pointwise": pointwise.detach().double()})
        for run in runs[1:]:
            gain = run["pointwise"] - runs[0]["pointwise"]
            run["advantage"] = float(gain.mean())
            run["advantage_se"] = float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else math.inf
        winner = max(runs, key=lambda r: r["score"])  # first of equals: the first candidate
        calibration = None
        if calibrate:
            calibration = {**winner["temperature"], "validation_fraction": fraction, "validation_rows": len(val_rows)}
        keys = ("options", "score", "advantage", "advantage_se")
        selection = {"options": winner["options"], "validation_fraction": fraction, "validation_rows": len(val_rows),
                     "candidates": [{k: r[k] for k in keys if k in r} for r in runs]}
        return selection, calibration

    # ---- the noise after a structural change ----------------------------------------------------
    @torch.no_grad()
    def refit_noise(self, x, y, num_samples: int = NOISE_REFIT_DRAWS, chunk_size: int = 4096,
                    seed: int | None = 0) -> dict[str, float]:
        """Regression: re-estimate the noise scale on training data ``(x, y)`` (raw units) for the
        network as it is now, in place; returns (and records with the last pruning) what changed.

        Pruning changes the function the network computes, so the noise fitted with the dense
        network no longer matches its residuals. The refit is the EM M-step of the Gaussian
        likelihood's variance with the weights' posterior held fixed,
        ``sigma^2 = mean_n E_q[(y_n - f(x_n; w))^2]`` (:func:`~bnnzoo.models.likelihoods.noise_m_step`),
        over ``num_samples`` draws of the posterior as it was fitted (:meth:`fitted_weights`) — the
        value the fit's own noise update reaches for that posterior. The record gives the scale before
        and after (units of ``y``) and the mean squared standardised residual
        ``z^2 = (y - mean)^2 / predictive variance`` of the predictive on the data (near 1 when it is
        calibrated there). A fit that prunes calls this on its own training data; :meth:`prune` and
        :meth:`reduce` call it when given ``data``.
        """
        self._require_fitted()
        if self.task != "regression":
            raise TypeError(f"refit_noise is for regression; {self.name} was fitted for {self.task}")
        x, y = self.validate(x, y, "training data")
        return self._refit_noise(self.standardizer.x(x.to(self.device)), self.standardizer.y(y.to(self.device)),
                                 num_samples, chunk_size, seed)

    def _refit_noise(self, x: torch.Tensor, y: torch.Tensor, num_samples: int = NOISE_REFIT_DRAWS,
                     chunk_size: int = 4096, seed: int | None = 0) -> dict[str, float]:
        """:meth:`refit_noise` on standardised data."""
        f = torch.stack([d.squeeze(-1) for d in self._output_draws(x, num_samples, chunk_size, seed, fitted=True)])
        before = self.noise_scale(original_units=True)
        with torch.no_grad():
            self.model.likelihood.log_noise_scale.copy_(noise_m_step(f, y))
        # the predictive's draws: the same ones unless the entry predicts from something else
        same = type(self).fitted_weights is Posterior.fitted_weights
        pred = f if same else torch.stack([d.squeeze(-1) for d in self._output_draws(x, num_samples, chunk_size, seed)])
        var = pred.var(0, unbiased=False) + self.noise_scale() ** 2
        record = {"noise_scale_before": before, "noise_scale_after": self.noise_scale(original_units=True),
                  "train_mean_z2": float(((y - pred.mean(0)) ** 2 / var).mean()), "num_samples": num_samples}
        if self.fit_state.pruning:
            self.fit_state.pruning[-1].summary["noise_refit"] = record
        return record

    def fitted_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Draws of the weights from the posterior as the fit found it; :meth:`draw_weights` (the
        draws prediction uses) unless an entry predicts from something else (the horseshoe's
        untempered widening)."""
        return self.draw_weights(num_samples)

    # ---- predict --------------------------------------------------------------------------------
    @torch.no_grad()
    def _output_draws(self, x: torch.Tensor, num_samples: int, chunk_size: int,
                      seed: int | None, fitted: bool = False) -> Iterator[torch.Tensor]:
        """For each weight draw, the network outputs for all of ``x`` (standardised units); the
        draws of :meth:`draw_weights`, or with ``fitted`` those of :meth:`fitted_weights`.

        With a ``seed`` the draws are reproducible and the global random state is left untouched.
        """
        for arg, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{arg} must be a positive integer, got {value!r}")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for params in (self.fitted_weights if fitted else self.draw_weights)(num_samples):
                yield self._forward(x, params, chunk_size)

    def _forward(self, x: torch.Tensor, params: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
        """The network outputs for all of ``x`` under one set of weights, in chunks of ``chunk_size``."""
        return torch.cat([self.net(x[i:i + chunk_size], params) for i in range(0, len(x), chunk_size)])

    def _draw_probs(self, f: torch.Tensor) -> torch.Tensor:
        """Classification: the class probabilities of one draw's outputs ``f`` (a softmax of the
        logits, unless the likelihood says otherwise)."""
        return torch.softmax(f, -1)

    def _predictive_draws(self, x: torch.Tensor, num_samples, chunk_size: int,
                          seed: int | None) -> tuple[Iterator[torch.Tensor], _MonteCarloError | None]:
        """The output draws behind a prediction: ``num_samples`` of them (:meth:`_output_draws`), or
        with ``num_samples="auto"`` as many as :meth:`_auto_output_draws` decides, with the monitor
        that counts them (``None`` for a fixed count)."""
        if isinstance(num_samples, str):
            if num_samples != "auto":
                raise ConfigError(f"num_samples must be a positive integer or 'auto', got {num_samples!r}")
            monitor = _MonteCarloError(self.task, self.noise_scale() ** 2 if self.task == "regression" else 0.0,
                                       self._draw_probs)
            return self._auto_output_draws(x, chunk_size, seed, monitor), monitor
        return self._output_draws(x, num_samples, chunk_size, seed), None

    @torch.no_grad()
    def _auto_output_draws(self, x: torch.Tensor, chunk_size: int, seed: int | None,
                           monitor: _MonteCarloError) -> Iterator[torch.Tensor]:
        """Output draws until the Monte Carlo error of the predictive is small (``num_samples="auto"``).

        Draws come in blocks of :data:`AUTO_BLOCK`; after each block, once :data:`AUTO_MIN_DRAWS`
        are in, the sampling stops when ``monitor``'s error (:class:`_MonteCarloError`: the
        criterion of :meth:`predict`) is at most its tolerance, and in any case at
        :data:`AUTO_MAX_DRAWS`. Independent draws (a guide) are those of :meth:`_output_draws` in
        order, so ``"auto"`` stopping at ``S`` gives exactly the prediction of ``num_samples=S``
        with the same seed. A point estimate takes one draw (its draws are all the same). Stored
        samples (a sampler's chains) are visited in a random order (fixed by ``seed``) over at most
        :data:`AUTO_MAX_DRAWS` of them spread evenly over the chains, so that every prefix is spread
        over the whole run; the standard error then treats them as independent (thinned) draws.
        Running out of draws with the error above the tolerance warns (``UserWarning``).
        """
        if self.point_estimate:
            draws = self._output_draws(x, 1, chunk_size, seed)
        elif self.stores_samples:
            draws = self._stored_draws_in_random_order(x, chunk_size, seed)
        else:
            draws = self._output_draws(x, AUTO_MAX_DRAWS, chunk_size, seed)
        try:
            for f in draws:
                monitor.add(f)
                yield f
                if (monitor.count >= AUTO_MIN_DRAWS and monitor.count % AUTO_BLOCK == 0
                        and monitor.error() <= monitor.tolerance):
                    return
            if not self.point_estimate and monitor.error() > monitor.tolerance:
                warnings.warn(f"{self.name}: num_samples='auto' used all {monitor.count} draws it may "
                              f"({'the stored draws, at most ' if self.stores_samples else ''}AUTO_MAX_DRAWS="
                              f"{AUTO_MAX_DRAWS}) and the expected log-density loss of its Monte Carlo error, "
                              f"{monitor.last_error:.3g} nats, is still above the tolerance {monitor.tolerance:g}",
                              UserWarning, stacklevel=4)
        finally:
            draws.close()  # leaves the seeded random state of _output_draws now, not at garbage collection
            if self.point_estimate:
                monitor.last_error = 0.0  # every draw is the same: no Monte Carlo error
            elif monitor.count:
                monitor.error()  # the criterion at the last draw, recorded for the prediction

    def _stored_draws_in_random_order(self, x: torch.Tensor, chunk_size: int, seed: int | None) -> Iterator[torch.Tensor]:
        """The outputs of up to :data:`AUTO_MAX_DRAWS` stored draws (spread evenly over the stored
        ones by :meth:`draw_weights`), in a random order (``seed``) so that any prefix is spread too."""
        total = min(int(getattr(self, "num_draws", AUTO_MAX_DRAWS)), AUTO_MAX_DRAWS)
        stored = list(self.draw_weights(total))  # views of the stored tensors: no copy
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for i in torch.randperm(len(stored), generator=generator).tolist():
            yield self._forward(x, stored[i], chunk_size)

    def resolve_predictive(self, method: str = "auto", num_samples: int | str = "auto") -> str:
        """The prediction method ``method`` names, checked: ``"auto"`` is the predictive the fit
        chose (:attr:`FitState.predictive_method`), or ``"sample"`` when a number of draws is asked
        for; raise unless it is one of :data:`PREDICT_METHODS` and, for the moment methods, this
        posterior supports them (:meth:`_moment_weights` says why not)."""
        if method == "auto":
            method = self.fit_state.predictive_method if isinstance(num_samples, str) else "sample"
        if method not in PREDICT_METHODS:
            raise ConfigError(f"method must be 'auto' or one of {', '.join(map(repr, PREDICT_METHODS))}, "
                              f"got {method!r}")
        if method != "sample":
            self._moment_weights()
        return method

    def _moment_weights(self):
        """The weight moments of this posterior for the moment-propagated predictive
        (:meth:`predictive_weight_moments`), after checking that it applies: a ReLU network of
        dense and conv layers and pooling, and a Gaussian or softmax likelihood. Anything else
        raises ``TypeError`` naming what is not supported (there is no fallback to sampling)."""
        likelihood = self.model.likelihood
        if type(likelihood) not in (GaussianLikelihood, CategoricalLikelihood):
            raise TypeError(f"the moment-propagated predictive supports the Gaussian and the softmax "
                            f"likelihoods; {self.name} has {type(likelihood).__name__}")
        moments.check_network(self.net)
        return self.predictive_weight_moments()

    def predictive_weight_moments(self) -> dict:
        """Per layer ``((w_mean, w_var), (b_mean, b_var))`` of the independent Gaussian weights that
        this posterior's draws come from (:func:`bnnzoo.guides.predictive_moments.gaussian_weight_moments`),
        optionally with a third entry, ``(E[s], E[s^2])`` of an independent scale per output unit
        (:func:`~bnnzoo.guides.predictive_moments.output_moments`). Here: a guide posterior that
        predicts from its guide's own draws (a subclass whose draws differ overrides this, or has
        no moments); anything else raises ``TypeError``."""
        guide = getattr(self, "guide", None)
        if guide is None or type(self).draw_weights is not GuidePosterior.draw_weights:
            raise TypeError(f"the moment-propagated predictive needs a posterior that predicts from a guide's "
                            f"Gaussian weights; {self.name} ({type(self).__name__}) predicts from "
                            f"{'stored samples' if guide is None else 'draws of its own'}")
        return moments.gaussian_weight_moments(guide)

    def _output_moments(self, x: torch.Tensor, chunk_size: int, full_covariance: bool):
        """:func:`~bnnzoo.guides.predictive_moments.output_moments` of standardised inputs ``x`` in
        chunks of ``chunk_size``: the outputs' mean and variance (and covariance)."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        weights = self._moment_weights()
        parts = [moments.output_moments(self.net, x[i:i + chunk_size], weights, full_covariance)
                 for i in range(0, len(x), chunk_size)]
        return [torch.cat(column) for column in zip(*parts)]

    def _moment_probs(self, x: torch.Tensor, method: str, chunk_size: int, seed: int | None) -> torch.Tensor:
        """Classification: the predictive class probabilities of standardised inputs ``x`` by moment
        propagation; ``"moments"``: the average softmax over :data:`MOMENT_LOGIT_POINTS` quasi-random
        points of the logits' Gaussian and their antithetic twins (full covariance of the last
        layer's logits), ``"probit"``: the probit approximation; tempered as the sampled
        predictive is (:meth:`_tempered`)."""
        if method == "probit":
            mean, var = self._output_moments(x, chunk_size, False)
            return self._tempered(moments.probit_softmax(mean, var))
        mean, _, cov = self._output_moments(x, chunk_size, True)
        return self._tempered(moments.sampled_softmax(mean, cov, MOMENT_LOGIT_POINTS, seed))

    @torch.no_grad()
    def predict(self, x, num_samples: int | str = "auto", chunk_size: int = 4096, return_samples: bool = False,
                seed: int | None = 0, method: str = "auto") -> Prediction:
        """The posterior predictive for raw inputs ``x``.

        ``method="auto"`` (the default): the predictive a calibrated classification fit chose on
        its validation rows (``fit_state.calibration["predictive"]``, :meth:`select_temperature`),
        else ``"sample"``; an integer ``num_samples`` asks for ``"sample"``.

        ``method="sample"`` averages ``num_samples`` weight draws. Memory stays bounded:
        weights are drawn one set at a time and ``x`` is pushed through in chunks of ``chunk_size``
        examples; only running sums are kept unless ``return_samples``.

        ``num_samples="auto"`` (the default): draws in blocks of :data:`AUTO_BLOCK` until the Monte
        Carlo error of the predictive costs at most :data:`AUTO_LOG_DENSITY_TOLERANCE` nats of
        expected log predictive density per point, between :data:`AUTO_MIN_DRAWS` and
        :data:`AUTO_MAX_DRAWS` draws (one for a point estimate). With ``S`` draws and ``s^2`` the
        sample variance over the draws: classification, ``mean_n sum_k s_nk^2 / (2 S p_nk)``
        (``s_nk``, ``p_nk``: of the probability of class ``k`` for point ``n``; the chi-square
        approximation of ``KL(p || p_hat)``); regression, ``mean_n s_n^2 / (2 S sd_n^2)`` (``s_n``:
        of the network output, ``sd_n``: the predictive sd, noise included). The result records
        ``num_samples`` and ``mc_error`` (that loss at the last draw). An integer gives that many
        draws.

        ``method="moments"`` (a mean-field Gaussian or point-mass guide on a ReLU network of dense
        and conv layers and pooling; anything else raises ``TypeError``): no weight draws; the mean and variance of every unit are
        propagated layer by layer (:mod:`bnnzoo.guides.predictive_moments`). Regression: the
        predictive mean and variance (plus the noise). Classification: the average softmax over
        :data:`MOMENT_LOGIT_POINTS` quasi-random points of the logits' Gaussian (and their
        antithetic twins). ``method="probit"``: the same
        moments, the class probabilities by the probit approximation ``softmax(mu / sqrt(1 + pi/8
        var))`` (cheaper, less accurate: see ``docs/methods/map-meanfield.md``). ``num_samples`` is
        not used and ``return_samples`` is refused by both.
        """
        self._require_fitted()
        method = self.resolve_predictive(method, num_samples)
        x, _ = self.validate(x, None, "inputs")
        x = self.standardizer.x(x.to(self.device))
        if method != "sample":
            if return_samples:
                raise ConfigError(f"return_samples: method={method!r} draws no weights, so there are no samples")
            return self._predict_moments(x, method, chunk_size, seed)
        first = second = None
        kept = []
        draws, monitor = self._predictive_draws(x, num_samples, chunk_size, seed)
        for f in draws:
            if self.task == "classification":
                p = self._draw_probs(f)
                first = p if first is None else first + p
            else:
                f = self.standardizer.y_inverse(f.squeeze(-1))
                first = f if first is None else first + f
                second = f * f if second is None else second + f * f
            if return_samples:
                kept.append(f if self.task == "classification" else f.unsqueeze(-1))
        samples = torch.stack(kept) if return_samples else None
        if monitor is not None:
            num_samples = monitor.count
        record = {"num_samples": num_samples, "mc_error": None if monitor is None else monitor.last_error}
        mean = first / num_samples
        if self.task == "classification":
            return Prediction("classification", self._tempered(mean), samples=samples, **record)
        noise = self.noise_scale() * self.standardizer.y_scale
        var = (second / num_samples - mean**2).clamp_min(0) + noise**2
        return Prediction("regression", mean, var.sqrt(), samples, **record)

    def _predict_moments(self, x: torch.Tensor, method: str, chunk_size: int, seed: int | None) -> Prediction:
        """:meth:`predict` by moment propagation, for standardised inputs ``x``."""
        if self.task == "classification":
            return Prediction("classification", self._moment_probs(x, method, chunk_size, seed),
                              method=method, num_samples=0)
        mean, var = self._output_moments(x, chunk_size, False)
        scale = self.standardizer.y_scale
        std = (var.squeeze(-1) * scale**2 + (self.noise_scale() * scale) ** 2).sqrt()
        return Prediction("regression", self.standardizer.y_inverse(mean.squeeze(-1)), std,
                          method=method, num_samples=0)

    def noise_scale(self, original_units: bool = False) -> float:
        """The likelihood's noise scale (regression): in standardised units, or in the units of ``y``."""
        scale = float(self.model.likelihood.noise_scale.detach())
        return scale * self.standardizer.y_scale if original_units else scale

    @torch.no_grad()
    def log_likelihood(self, x, y, num_samples: int | str = "auto", chunk_size: int = 4096, seed: int | None = 0,
                       method: str = "auto") -> torch.Tensor:
        """Pointwise log predictive density ``log (1/S) sum_s p(y_n | x_n, w_s)`` in the original units.

        ``num_samples="auto"`` and ``method`` as in :meth:`predict` (``"auto"`` applies the same rule
        to the same draws, so it stops where :meth:`predict` does with the same seed). The moment
        methods give ``log p_n(y_n)`` of the moment predictive: regression, the Gaussian with the
        propagated mean and variance plus the noise; classification, the log of the predicted
        probability of the observed class."""
        self._require_fitted()
        method = self.resolve_predictive(method, num_samples)
        x, y = self.validate(x, y, "test data")
        x = self.standardizer.x(x.to(self.device))
        y = self.standardizer.y(y.to(self.device))
        if method != "sample":
            if self.task == "classification":
                probs = self._moment_probs(x, method, chunk_size, seed)
                lp = torch.log(probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp_min(torch.finfo(probs.dtype).tiny))
            else:
                mean, var = self._output_moments(x, chunk_size, False)
                total = var.squeeze(-1) + self.noise_scale() ** 2
                lp = -0.5 * ((y - mean.squeeze(-1)) ** 2 / total + torch.log(2 * math.pi * total))
            return lp - math.log(self.standardizer.y_scale)
        acc = None
        draws, monitor = self._predictive_draws(x, num_samples, chunk_size, seed)
        tempered = self.task == "classification" and self.predictive_temperature != 1.0
        for f in draws:
            if tempered:  # the whole predictive is needed: sum the class probabilities
                p = self._draw_probs(f)
                acc = p if acc is None else acc + p
                continue
            lp = self.model.likelihood.log_prob(f, y)
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        if monitor is not None:
            num_samples = monitor.count
        if tempered:
            probs = self._tempered(acc / num_samples)
            return torch.log(probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp_min(torch.finfo(probs.dtype).tiny))
        return acc - math.log(num_samples) - math.log(self.standardizer.y_scale)

    def evaluate(self, x, y, num_samples: int | str = "auto", chunk_size: int = 4096, seed: int | None = 0,
                 method: str = "auto") -> dict[str, float]:
        """Test metrics. Regression: ``rmse`` and ``log_likelihood`` (mean per point, original units).
        Classification: ``accuracy``, ``nll``, ``ece`` (15 bins), ``brier``. ``num_samples="auto"``
        and ``method`` as in :meth:`predict`."""
        self._require_fitted()
        method = self.resolve_predictive(method, num_samples)
        _, y = self.validate(x, y, "test data")  # bad labels fail before any prediction is made
        # the new options are passed only when used: an entry's own predict keeps its signature
        extra = {} if method == "sample" else {"method": method}
        pred = self.predict(x, num_samples, chunk_size, seed=seed, **extra)
        y = y.to(self.device)
        if self.task == "classification":
            return metrics.classification_metrics(pred.probs, y)
        ll = self.log_likelihood(x, y, num_samples, chunk_size, seed, **extra)
        return {"rmse": metrics.rmse(pred.mean, y), "log_likelihood": float(ll.mean())}

    def score(self, x, y, num_samples: int | str = "auto") -> float:
        """Accuracy (classification) or mean test log-likelihood (regression): higher is better."""
        m = self.evaluate(x, y, num_samples)
        return m["accuracy"] if self.task == "classification" else m["log_likelihood"]

    # ---- sparsity and export ----------------------------------------------------------------------
    def sparsity(self) -> dict:
        """Fraction of weights and of groups pruned, per layer and overall, and the kept architecture."""
        return sparsity_report(self.net, self.masks())

    def prune(self, data=None, **options) -> "Posterior":
        """A pruned copy of this posterior, by the method's own rule (the original is untouched).

        Methods with a pruning rule (shrinkage scales, inclusion probabilities, evidence changes)
        implement :meth:`_prune`, which appends a :class:`PruningRecord` to the copy's
        :attr:`fit_state`; see each catalog entry for its options and thresholds. A rule that would
        empty a hidden layer keeps its best group and warns, unless ``allow_empty=True``.
        Regression: with ``data = (x_train, y_train)`` the copy's noise is refitted to the pruned
        network (:meth:`refit_noise`); without it the noise stays as fitted and a warning says so.
        """
        self._require_fitted()
        pruned = copy.deepcopy(self)
        pruned._prune(**options)
        pruned._after_structural_change(data)
        return pruned

    def _after_structural_change(self, data) -> None:
        """Refit a regression noise on ``data`` after a pruning or reduction (or warn that it is not)."""
        if self.task != "regression":
            return
        if data is None:
            warnings.warn(f"{self.name}: the noise scale was not refitted to the pruned network; pass "
                          f"data=(x_train, y_train) to refit it", UserWarning, stacklevel=3)
            return
        self.refit_noise(*data)

    def _prune(self, **options) -> None:
        """Prune this (copied) posterior in place. Methods without a rule of their own raise."""
        raise TypeError(f"{self.name} has no pruning rule of its own: reduce it with Bayesian model reduction "
                        f"(bnnzoo prune / the bmr entries) instead")

    def reduce(self, rule: str = "ss", data=None, **options) -> "Posterior":
        """Bayesian model reduction: a sparser copy of a posterior with Gaussian weights. Only a
        :class:`GuidePosterior` whose guide implements :class:`~bnnzoo.guides.bmr.GaussianWeights`
        has them; any other posterior raises ``TypeError``."""
        raise TypeError(f"Bayesian model reduction needs Gaussian weights: {self.name} ({type(self).__name__}) "
                        f"is not represented by a guide with Gaussian weights")

    def to_torch(self, pruned: bool = True) -> torch.nn.Sequential:
        """A plain PyTorch network with the posterior-mean weights; with ``pruned``, pruned groups
        are removed so the module is smaller. Its inputs are *standardised* (see ``standardizer``)."""
        kept = self.sparsity()["keep"] if pruned else None
        return self.net.to_torch(self.posterior_mean(), kept)

    # ---- ArviZ --------------------------------------------------------------------------------
    def to_arviz(self, data=None, *, num_samples: int = 100, sites="auto", seed: int | None = 0,
                 chunk_size: int = 4096, new_data=None, prior_samples: int = 100, feature_names=None):
        """The posterior as ArviZ data; ``data = (x, y)`` adds the pointwise log-likelihood (for
        ``az.loo``), the posterior predictive and the prior groups, ``new_data`` the predictions.
        See :func:`bnnzoo.diagnostics.to_arviz`."""
        return to_arviz(self, data, num_samples=num_samples, sites=sites, seed=seed, chunk_size=chunk_size,
                        new_data=new_data, prior_samples=prior_samples, feature_names=feature_names)

    # The ArviZ export hook (:class:`bnnzoo.diagnostics.ArvizExportable`): ``stores_samples``,
    # ``num_chains`` and the three ``arviz_*`` methods; a guide's defaults below.

    #: whether the draws are a fixed set of stored samples (a sampler's chains) rather than
    #: independent draws of a guide
    stores_samples: bool = False

    #: whether the posterior is a single point (MAP): ArviZ gets one draw, marked as a point
    #: estimate, and no effective sample size or LOO is claimed for it
    point_estimate: bool = False

    @property
    def num_chains(self) -> int:
        """Chains of posterior draws: a guide gives one chain of independent draws."""
        return 1

    def arviz_draws_per_chain(self, num_samples: int) -> int:
        """Draws per chain for ArviZ; ``draw_weights(num_chains * n)`` yields them chain by chain."""
        if self.num_chains != 1:
            raise TypeError(f"{type(self).__name__} has {self.num_chains} chains: it must say how "
                            f"many draws each holds (arviz_draws_per_chain)")
        return 1 if self.point_estimate else num_samples

    def arviz_hyperparameters(self, num_draws: int) -> dict[str, torch.Tensor]:
        """Hyperparameter and scale-variable draws ``{name: (chain, draw, ...)}`` (none by default);
        ``"<layer>.<var>"`` of shape ``(chain, draw, groups)`` is indexed by the layer's groups."""
        return {}

    def arviz_sample_stats(self) -> dict[str, torch.Tensor]:
        """Per-draw sampler statistics ``{name: (chain, draw)}`` (none for a guide)."""
        return {}

    def arviz_constant_data(self) -> dict[str, torch.Tensor]:
        """What the fit decided that is not drawn: ``{name: tensor}`` for ArviZ's ``constant_data``
        group (none by default). ``"<site>.<var>"`` of the site's shape is indexed by the site's
        dimensions, ``"<layer>.<var>"`` of shape ``(groups,)`` by the layer's groups."""
        return {}

    # ---- device -------------------------------------------------------------------------------
    def to(self, device) -> "Posterior":
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._to(self.device)
        if self.standardizer is not None:
            self.standardizer = self.standardizer.to(self.device)
        return self

    def _to(self, device: torch.device) -> None:
        """Move method-specific state (a guide is moved by its subclass)."""

    # ---- save / load --------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False,
             extra_files: dict[str, str | bytes] | None = None) -> Path:
        """Save to the run directory ``path``, atomically (:func:`bnnzoo.runs.write_run`).

        The run holds ``posterior.pt`` (tensors), ``config.json`` (readable: the entry name, the
        config, the network spec, the fit state and the history), ``extra_files`` (name -> text or
        bytes, e.g. the CLI's ``metrics.json``) and ``manifest.json`` (each file's size and SHA-256).
        Everything is written in a temporary directory beside ``path`` and renamed into place when
        complete: a save that fails or is interrupted leaves no run, or the previous one untouched.
        An existing run at ``path`` is replaced (no stale file kept) only with ``overwrite``;
        otherwise :class:`~bnnzoo.errors.RunError` is raised before anything is written.
        """
        self._require_fitted()
        extra_files = dict(extra_files or {})
        for name in extra_files:
            parts = Path(name).parts
            if (Path(name).is_absolute() or not parts or ".." in parts
                    or name in (*RUN_FILES, runs.MANIFEST)):
                raise ConfigError(f"extra_files: file name {name!r}: expected a relative path inside the run, "
                                 f"other than {', '.join((*RUN_FILES, runs.MANIFEST))}")
        state = {
            "format": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "posterior": self._state(),
            "standardizer": self.standardizer.state_dict(),
        }
        meta = {"format": FORMAT_VERSION, "name": self.name, "config": self.config,
                "network_spec": self.network_spec, "fit_state": self.fit_state.to_dict(),
                "history": self.history.to_dict(), "manifest": runs.MANIFEST}
        path = Path(path)
        with runs.write_run(path, overwrite=overwrite) as tmp:
            torch.save(state, tmp / "posterior.pt")
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            for name, content in extra_files.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
        return path

    @staticmethod
    def load(path: str | Path, device="cpu") -> "Posterior":
        """Load a posterior saved with :meth:`save` (format 1 or 2); it predicts exactly as the
        saved one did. The network is rebuilt from the saved spec: the entry's ``create`` gets the
        config with a ``network_spec`` key, the posterior keeps the config without it.

        The run is checked before it is used: its files against ``manifest.json``
        (:func:`bnnzoo.runs.verify_run`; runs saved without a manifest skip this), then the layout
        of ``config.json`` and ``posterior.pt``, that no saved tensor holds a NaN, that the
        standardiser is finite, that the tensors fit the network the config describes and that the
        loaded posterior predicts a finite value. Any failure raises one
        :class:`~bnnzoo.errors.RunError` naming the run directory and the file at fault.
        """
        path = Path(path)
        _refuse_other_format(path)  # a newer layout is named as such, not as a manifest mismatch
        manifest = runs.verify_run(path)
        missing = [name for name in RUN_FILES if not (path / name).is_file()]
        if missing:
            raise RunError(f"{path} is not a saved bnnzoo posterior ({' and '.join(RUN_FILES)} expected, "
                           f"{' and '.join(missing)} missing)")
        meta = _read_meta(path)
        if manifest is None and "manifest" in meta:
            raise RunError(f"{path}: {runs.MANIFEST} is missing, but config.json says the run was saved with one")
        state = _read_state(path)
        config = copy.deepcopy(meta["config"])
        if meta["format"] == 1:  # the network spec and the pruning threshold were kept in the config
            spec = config.pop("network_spec", None)
            train = config.get("train")
            threshold = train.pop("pruned_threshold", None) if isinstance(train, dict) else None
        else:
            spec, threshold = meta["network_spec"], None
        build = {**config, "network_spec": spec} if spec is not None else config
        try:
            entry = get_entry(meta["name"])
        except KeyError as err:
            raise RunError(f"{path}: config.json names {err.args[0]}") from None
        try:
            posterior = entry.create(build, device="cpu")
        except Exception as err:  # noqa: BLE001 -- whatever a config of the wrong shape makes create raise
            raise RunError(f"{path}: config.json does not describe a {meta['name']} posterior: "
                           f"{type(err).__name__}: {err}") from None
        posterior.config = config
        try:
            posterior.model.load_state_dict(state["model"])
            posterior._load_state(state["posterior"])
            posterior.standardizer = Standardizer.from_state_dict(state["standardizer"])
        except Exception as err:  # noqa: BLE001 -- tensors of another network or method
            raise RunError(f"{path}: posterior.pt does not match the network and method of config.json: "
                           f"{type(err).__name__}: {err}") from None
        try:
            posterior.history = TrainingHistory.from_dict(meta.get("history", {}))
            if "fit_state" in meta:
                posterior.fit_state = FitState.from_dict(meta["fit_state"])
            else:
                pruning = [PruningRecord("threshold", {"threshold": threshold})] if threshold is not None else []
                posterior.fit_state = FitState(temperature=posterior.training_temperature, pruning=pruning)
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise RunError(f"{path}: config.json has a history or fit state of the wrong shape: "
                           f"{type(err).__name__}: {err}") from None
        try:
            probe = posterior.predict(torch.zeros(1, *posterior.net.input_shape), num_samples=1)
            finite = bool(torch.isfinite(probe.mean).all())
        except Exception as err:  # noqa: BLE001 -- tensors of the right names but the wrong shapes
            raise RunError(f"{path}: posterior.pt does not give a working {meta['name']} posterior: "
                           f"{type(err).__name__}: {err}") from None
        if not finite:
            raise RunError(f"{path}: posterior.pt gives non-finite predictions")
        return posterior.to(device)

    def __repr__(self) -> str:
        status = "fitted" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({self.name}, {self.net!r}, {self.task}, {status}, device={self.device})"


class GuidePosterior(Posterior):
    """A posterior represented by a guide module ``q(w)`` (``self.guide``): its draws, mean, pruning
    masks, saved state and device follow the guide's.

    The guide provides ``draw()`` (one draw of every weight site, pruned weights zero),
    ``posterior_mean()``, ``masks`` (site -> bool, ``True`` = kept), ``state_dict`` / ``load_state_dict``
    and ``to``. A guide that implements :class:`~bnnzoo.guides.bmr.GaussianWeights` can be reduced
    by Bayesian model reduction (:meth:`reduce`).
    """

    def __init__(self, model, guide, *, name: str, config: dict, device="cpu"):
        super().__init__(model, name=name, config=config, device=device)
        self.guide = guide.to(self.device)

    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(num_samples):
            yield self.guide.draw()

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return self.guide.posterior_mean()

    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self.guide.masks.items())

    def _state(self) -> dict:
        return {"guide": {k: v.detach().cpu() for k, v in self.guide.state_dict().items()}}

    def _load_state(self, state: dict) -> None:
        self.guide.load_state_dict(state["guide"])

    def _to(self, device: torch.device) -> None:
        self.guide.to(device)

    def reduce(self, rule: str = "ss", data=None, **options) -> "GuidePosterior":
        """Bayesian model reduction (Markovic, Friston & Kiebel 2023): a sparser deep copy (the
        original is untouched) that predicts, evaluates, exports and saves like any other.

        The copy's guide is reduced in place by :func:`bnnzoo.guides.bmr.reduce` (``rule="ss"``: the
        per-layer spike-and-slab threshold on the evidence changes; ``"plain"``: prune where
        ``dF > 0``; ``"rhs"``: BMR-RHS, a regularised-horseshoe reduced prior fitted over the dF
        surface (:mod:`bnnzoo.guides.bmr_rhs`); ``options``: ``level``, ``prune_last``, ``layers``,
        ``reduced_var``, ``num_iters``, ``rhs_tau0``, as there). The decision is appended to the copy's ``fit_state.pruning``
        (rule ``"bmr"``: the options, the per-layer summary and the pruned fraction). Regression: with
        ``data = (x_train, y_train)`` the copy's noise is refitted (:meth:`refit_noise`). A guide that
        does not implement :class:`~bnnzoo.guides.bmr.GaussianWeights` raises ``TypeError``.
        """
        self._require_fitted()
        if not isinstance(self.guide, bmr.GaussianWeights):
            raise TypeError(f"Bayesian model reduction needs Gaussian weights: {self.name}'s guide "
                            f"{type(self.guide).__name__} does not implement bnnzoo.guides.bmr.GaussianWeights "
                            f"(gaussian_weights() and apply_reduction())")
        reduced = copy.deepcopy(self)
        start = time.perf_counter()
        reduction = bmr.reduce(reduced.guide, rule=rule, **options)
        seconds = time.perf_counter() - start
        summary = {**reduction.summary(), "weights_pruned_fraction": reduced.sparsity()["weights_pruned_fraction"]}
        reduced.fit_state.pruning.append(PruningRecord("bmr", {"rule": rule, **options}, summary, seconds))
        reduced._after_structural_change(data)
        return reduced


#: the files every saved run holds
RUN_FILES = ("config.json", "posterior.pt")


def _refuse_other_format(path: Path) -> None:
    """Raise :class:`~bnnzoo.errors.RunError` if ``config.json`` of ``path`` parses and names a
    format this bnnzoo does not read (an unreadable one is left to the full checks)."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] not in READABLE_FORMATS:
        raise RunError(f"{path}: config.json says format {meta['format']!r}, this bnnzoo reads formats "
                       f"{', '.join(map(str, READABLE_FORMATS))}")


def _read_meta(path: Path) -> dict:
    """``config.json`` of the run ``path``, its layout checked (:class:`~bnnzoo.errors.RunError` if wrong)."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: config.json is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path}: config.json holds a {type(meta).__name__}, not an object with the keys "
                       f"format, name, config")
    if meta.get("format") not in READABLE_FORMATS:
        raise RunError(f"{path}: config.json says format {meta.get('format')!r}, this bnnzoo reads formats "
                       f"{', '.join(map(str, READABLE_FORMATS))}")
    expected = {"name": str, "config": dict, "history": dict, "fit_state": dict}
    if meta["format"] >= 2:
        expected["network_spec"] = dict
    for key, kind in expected.items():
        optional = key in ("history", "fit_state")
        if (key not in meta and not optional) or (key in meta and not isinstance(meta[key], kind)):
            got = type(meta[key]).__name__ if key in meta else "nothing"
            raise RunError(f"{path}: config.json: {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                           f"got {got}")
    return meta


def _read_state(path: Path) -> dict:
    """``posterior.pt`` of the run ``path``: readable, of the saved layout, no NaN in any tensor, the
    standardiser finite with positive scales (:class:`~bnnzoo.errors.RunError` if not)."""
    file = path / "posterior.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types for a truncated or foreign file
        raise RunError(f"{path}: posterior.pt is unreadable (truncated, or not a file saved by torch): "
                       f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    layout = ("model", "posterior", "standardizer")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in layout):
        raise RunError(f"{path}: posterior.pt does not hold the saved layout (a dict with model, posterior and "
                       f"standardizer entries)")
    for key in ("x_mean", "x_std"):
        if not isinstance(state["standardizer"].get(key), torch.Tensor):
            raise RunError(f"{path}: posterior.pt: the standardiser has no {key} tensor")
    for name, tensor in _tensors(state):  # infinities can be meant (a logit of an inclusion probability 1)
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            raise RunError(f"{path}: posterior.pt: {name} holds NaN values")
    for key, value in state["standardizer"].items():
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            raise RunError(f"{path}: posterior.pt: the standardiser's {key} holds infinite values")
        if key.endswith("_std") and isinstance(value, torch.Tensor) and not bool((value > 0).all()):
            raise RunError(f"{path}: posterior.pt: the standardiser's {key} is not positive")
    return state


def _tensors(value, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a dotted name."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{i}]")
