"""The fitted posterior: the one object every method in the catalog returns.

A :class:`Posterior` owns the Pyro model (network, prior, likelihood), whatever represents the
posterior (a guide, a set of samples, message-passing state), the data standardisation and the
configuration it was built from. It predicts, evaluates, reports sparsity, exports the (pruned)
network and saves/loads itself. Subclasses say how the posterior is fitted (:meth:`_fit`) and
how weights are drawn from it (:meth:`draw_weights`).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import metrics
from .data import validate_arrays
from .devices import resolve_device
from .models.sparsity import sparsity_report
from .models.standardizer import Standardizer

FORMAT_VERSION = 1


@dataclass
class Prediction:
    """Posterior predictive summary for a set of inputs.

    Regression: ``mean`` and ``std`` of the predictive distribution of ``y`` (noise included), in the
    original units. Classification: ``probs``, the predictive class probabilities (``mean`` is the same
    tensor). ``samples`` holds the network outputs of every weight draw, shape ``(S, N, out)``
    (original units for regression, logits for classification), when asked for.
    """

    task: str
    mean: torch.Tensor
    std: torch.Tensor | None = None
    samples: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        if self.task != "classification":
            raise AttributeError("probs is defined for classification; use mean and std for regression")
        return self.mean


class Posterior(ABC):
    """A fitted posterior over a Bayesian network's weights (see the module docstring)."""

    def __init__(self, model, *, name: str, config: dict, device="cpu"):
        self.model = model
        self.name = name
        self.config = config
        self.device = resolve_device(device)
        self.standardizer: Standardizer | None = None
        self.history: dict[str, list] = {"loss": [], "epoch_seconds": []}
        self.model.to(self.device)

    # ---- what subclasses provide ----------------------------------------------------------------
    @abstractmethod
    def _fit(self, x: torch.Tensor, y: torch.Tensor, progress: bool, callback=None) -> None:
        """Fit on standardised training data already on the device; call ``callback(epoch, loss)``
        after every epoch (or pass over the data) and record ``history["epoch_seconds"]``."""

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
    def is_fitted(self) -> bool:
        return self.standardizer is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"this {self.name} posterior is not fitted yet: call fit(x, y) first")

    # ---- fit ----------------------------------------------------------------------------------
    def validate(self, x, y=None, what="data") -> tuple[torch.Tensor, torch.Tensor | None]:
        num_classes = self.net.output_dim if self.task == "classification" else None
        if y is None:
            x, _ = validate_arrays(x, torch.zeros(len(x), dtype=torch.long) if self.task == "classification"
                                   else torch.zeros(len(x)), self.task, num_classes, what)
        else:
            x, y = validate_arrays(x, y, self.task, num_classes, what)
        expected = tuple(self.net.input_shape)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{what}: inputs have shape {tuple(x.shape[1:])} per example, "
                             f"but the network {self.net.name} expects {expected}")
        return x, y

    def fit(self, x, y, progress: bool = True, callback=None) -> "Posterior":
        """Fit the posterior on training inputs ``x`` and targets ``y`` (raw units).

        ``callback(epoch, loss)``, if given, runs after every epoch (logging, early inspection).
        """
        x, y = self.validate(x, y, "training data")
        self.standardizer = Standardizer.from_data(x, y, self.task).to(self.device)
        x = self.standardizer.x(x.to(self.device))
        y = self.standardizer.y(y.to(self.device))
        self._fit(x, y, progress, callback)
        return self

    # ---- predict --------------------------------------------------------------------------------
    @torch.no_grad()
    def _output_draws(self, x: torch.Tensor, num_samples: int, chunk_size: int,
                      seed: int | None) -> Iterator[torch.Tensor]:
        """For each weight draw, the network outputs for all of ``x`` (standardised units).

        With a ``seed`` the draws are reproducible and the global random state is left untouched.
        """
        for arg, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for params in self.draw_weights(num_samples):
                yield torch.cat([self.net(x[i:i + chunk_size], params) for i in range(0, len(x), chunk_size)])

    @torch.no_grad()
    def predict(self, x, num_samples: int = 100, chunk_size: int = 4096, return_samples: bool = False,
                seed: int | None = 0) -> Prediction:
        """The posterior predictive for raw inputs ``x``, averaging ``num_samples`` weight draws.

        Memory stays bounded: weights are drawn one set at a time and ``x`` is pushed through in
        chunks of ``chunk_size`` examples; only running sums are kept unless ``return_samples``.
        """
        self._require_fitted()
        x, _ = self.validate(x, None, "inputs")
        x = self.standardizer.x(x.to(self.device))
        first = second = None
        kept = []
        for f in self._output_draws(x, num_samples, chunk_size, seed):
            if self.task == "classification":
                p = torch.softmax(f, -1)
                first = p if first is None else first + p
            else:
                f = self.standardizer.y_inverse(f.squeeze(-1))
                first = f if first is None else first + f
                second = f * f if second is None else second + f * f
            if return_samples:
                kept.append(f if self.task == "classification" else f.unsqueeze(-1))
        samples = torch.stack(kept) if return_samples else None
        mean = first / num_samples
        if self.task == "classification":
            return Prediction("classification", mean, samples=samples)
        noise = self.noise_scale() * self.standardizer.y_scale
        var = (second / num_samples - mean**2).clamp_min(0) + noise**2
        return Prediction("regression", mean, var.sqrt(), samples)

    def noise_scale(self, original_units: bool = False) -> float:
        """The likelihood's noise scale (regression): in standardised units, or in the units of ``y``."""
        scale = float(self.model.likelihood.noise_scale.detach())
        return scale * self.standardizer.y_scale if original_units else scale

    @torch.no_grad()
    def log_likelihood(self, x, y, num_samples: int = 100, chunk_size: int = 4096, seed: int | None = 0) -> torch.Tensor:
        """Pointwise log predictive density ``log (1/S) sum_s p(y_n | x_n, w_s)`` in the original units."""
        self._require_fitted()
        x, y = self.validate(x, y, "test data")
        x = self.standardizer.x(x.to(self.device))
        y = self.standardizer.y(y.to(self.device))
        acc = None
        for f in self._output_draws(x, num_samples, chunk_size, seed):
            lp = self.model.likelihood.log_prob(f, y)
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        return acc - math.log(num_samples) - math.log(self.standardizer.y_scale)

    def evaluate(self, x, y, num_samples: int = 100, chunk_size: int = 4096, seed: int | None = 0) -> dict[str, float]:
        """Test metrics. Regression: ``rmse`` and ``log_likelihood`` (mean per point, original units).
        Classification: ``accuracy``, ``nll``, ``ece`` (15 bins), ``brier``."""
        self._require_fitted()
        _, y = self.validate(x, y, "test data")  # bad labels fail before any prediction is made
        pred = self.predict(x, num_samples, chunk_size, seed=seed)
        y = y.to(self.device)
        if self.task == "classification":
            return metrics.classification_metrics(pred.probs, y)
        ll = self.log_likelihood(x, y, num_samples, chunk_size, seed)
        return {"rmse": metrics.rmse(pred.mean, y), "log_likelihood": float(ll.mean())}

    def score(self, x, y, num_samples: int = 100) -> float:
        """Accuracy (classification) or mean test log-likelihood (regression): higher is better."""
        m = self.evaluate(x, y, num_samples)
        return m["accuracy"] if self.task == "classification" else m["log_likelihood"]

    # ---- sparsity and export ----------------------------------------------------------------------
    def sparsity(self) -> dict:
        """Fraction of weights and of groups pruned, per layer and overall, and the kept architecture."""
        return sparsity_report(self.net, self.masks())

    def prune(self, **options) -> "Posterior":
        """A pruned copy of this posterior, by the method's own rule (the original is untouched).

        Methods with a pruning rule (shrinkage scales, inclusion probabilities, evidence changes)
        implement :meth:`_prune`; see each catalog entry for its options and thresholds.
        """
        self._require_fitted()
        pruned = copy.deepcopy(self)
        pruned._prune(**options)
        return pruned

    def _prune(self, **options) -> None:
        """Prune this (copied) posterior in place. Methods without a rule of their own raise."""
        raise TypeError(f"{self.name} has no pruning rule of its own: reduce it with Bayesian model reduction "
                        f"(bnnzoo prune / the bmr entries) instead")

    def reduce(self, rule: str = "ss", **options) -> "Posterior":
        """Bayesian model reduction: a sparser copy of a posterior with Gaussian weights (the original
        is untouched); see :func:`bnnzoo.methods.bmr.reduce_posterior` for the options."""
        from .methods.bmr import reduce_posterior

        return reduce_posterior(self, rule=rule, **options)

    def to_torch(self, pruned: bool = True) -> torch.nn.Sequential:
        """A plain PyTorch network with the posterior-mean weights; with ``pruned``, pruned groups
        are removed so the module is smaller. Its inputs are *standardised* (see ``standardizer``)."""
        keep = self.sparsity()["keep"] if pruned else None
        return self.net.to_torch(self.posterior_mean(), keep)

    # ---- ArviZ --------------------------------------------------------------------------------
    def to_arviz(self, data=None, *, num_samples: int = 100, sites="auto", seed: int | None = 0,
                 chunk_size: int = 4096):
        """The posterior as ArviZ data; ``data = (x, y)`` adds the pointwise log-likelihood (for
        ``az.loo``) and the posterior predictive. See :func:`bnnzoo.diagnostics.to_arviz`."""
        from .diagnostics import to_arviz

        return to_arviz(self, data, num_samples=num_samples, sites=sites, seed=seed, chunk_size=chunk_size)

    @property
    def num_chains(self) -> int:
        """Chains of posterior draws: a guide gives one chain of independent draws."""
        return 1

    def _arviz_draws_per_chain(self, num_samples: int) -> int:
        """Draws per chain for ArviZ; ``draw_weights(num_chains * n)`` yields them chain by chain."""
        if self.num_chains != 1:
            raise TypeError(f"{type(self).__name__} has {self.num_chains} chains: it must say how "
                            f"many draws each holds (_arviz_draws_per_chain)")
        return num_samples

    def _arviz_hyperparameters(self, num_draws: int) -> dict[str, torch.Tensor]:
        """Hyperparameter and scale-variable draws ``{name: (chain, draw, ...)}`` (none by default);
        ``"<layer>.<var>"`` of shape ``(chain, draw, groups)`` is indexed by the layer's groups."""
        return {}

    def _arviz_sample_stats(self) -> dict[str, torch.Tensor]:
        """Per-draw sampler statistics ``{name: (chain, draw)}`` (none for a guide)."""
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
    def save(self, path: str | Path) -> Path:
        """Save to directory ``path``: ``posterior.pt`` (tensors) and ``config.json`` (readable)."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "posterior": self._state(),
            "standardizer": self.standardizer.state_dict(),
        }
        torch.save(state, path / "posterior.pt")
        meta = {"format": FORMAT_VERSION, "name": self.name, "config": self.config, "history": self.history}
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        return path

    @staticmethod
    def load(path: str | Path, device="cpu") -> "Posterior":
        """Load a posterior saved with :meth:`save`; it predicts exactly as the saved one did."""
        from .catalog import get_entry

        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "posterior.pt").is_file():
            raise FileNotFoundError(f"{path} is not a saved bnnzoo posterior (config.json and posterior.pt expected)")
        meta = json.loads((path / "config.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: saved with format {meta.get('format')}, this bnnzoo reads format {FORMAT_VERSION}")
        state = torch.load(path / "posterior.pt", map_location="cpu", weights_only=True)
        posterior = get_entry(meta["name"]).create(meta["config"], device="cpu")
        posterior.model.load_state_dict(state["model"])
        posterior._load_state(state["posterior"])
        posterior.standardizer = Standardizer.from_state_dict(state["standardizer"])
        posterior.history = meta.get("history", {"loss": []})
        return posterior.to(device)

    def __repr__(self) -> str:
        status = "fitted" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({self.name}, {self.net!r}, {self.task}, {status}, device={self.device})"
