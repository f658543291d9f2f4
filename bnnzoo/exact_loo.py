"""Exact leave-one-out cross-validation of the mean-field baseline by vectorised refits.

The exact LOO term of training point ``r`` is ``log (1/S) sum_s p(y_r | x_r, w_s)`` with ``w_s`` drawn
from the posterior fitted *without* point ``r``. For a mean-field Gaussian guide on a dense network
every one of the ``n`` refits is a handful of small matrix products per step, so all of them are
trained at once as one batched computation: every guide parameter (``locs``, ``log_scales`` of each
site) and the likelihood's learned ``log_noise_scale`` gets a leading refit dimension ``R``, and refit
``r`` runs exactly the algorithm of the ``meanfield-vi`` catalog fit on the training data less point
``r``:

- the same configuration (prior scale, initial noise scale, ``init_scale``, epochs, batch size,
  learning rate, particles) and the same initialisation (the catalog's own guide, created with the
  configuration's seed as ``bnnzoo.fit`` creates it);
- the same standardisation: refit ``r`` uses the statistics of its own ``n - 1`` points
  (:class:`~bnnzoo.models.standardizer.Standardizer`, as ``Posterior.fit`` does);
- the same minibatches: every epoch, an independent shuffle of the refit's ``n - 1`` points cut into
  batches of ``batch_size`` (the last one smaller), as ``bnnzoo.guides.training.minibatches`` does;
- the same loss, :class:`~bnnzoo.guides.LocalReparamELBO`'s ``KL(q || p) - (N / B) sum_batch
  log p(y | f)`` with ``N = n - 1``: local reparameterisation (one output draw per example) and the
  closed-form KL to the ``N(0, s^2)`` prior;
- the same optimiser: ``bnnzoo.guides.training.make_adam`` on the batched tensors. Adam (no weight decay, no
  clipping) acts elementwise and every refit takes the same number of steps, so it is ``R``
  independent Adams; the loss summed over refits gives each refit's parameters its own gradient.

Randomness follows the catalog too: each chunk of refits starts from the configuration's seed, as
every fit of ``bnnzoo.fit`` (and every refit of :class:`bnnzoo.loo.RefitWrapper`) does, and draws its
minibatch orders and local-reparameterisation noise in the catalog's order, so a chunk of one refit
reproduces the catalog's refit (up to floating-point summation order). Within a chunk the refits draw
independent noise. The posterior draws of each refit come from a generator seeded with ``seed``, as
``Posterior.log_likelihood(..., seed=seed)`` draws them.

Only the ``meanfield-vi`` entry with dense layers (a multilayer perceptron, possibly flattening image
inputs) can be refitted this way; other posteriors get :func:`bnnzoo.loo.loo` with ``reloo=True``
(one full refit per high-Pareto-k point) or K-fold cross-validation.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from .arviz_compat import elpd_data
from .catalog import get_entry
from .guides import MeanFieldNormal
from .guides.loo_refits import MeanFieldRefits
from .models import GaussianPrior
from .models.errors import ConfigError, NotFittedError
from .models.networks import Activation, Dense, Flatten

#: the catalog entry whose fits this module refits
SUPPORTED_ENTRY = "meanfield-vi"


def check_refittable(posterior) -> None:
    """Raise a ``TypeError`` naming the problem unless ``posterior`` is a fitted ``meanfield-vi``
    posterior of a dense network with the catalog's loss (a posterior not fitted yet:
    :class:`~bnnzoo.errors.NotFittedError`)."""
    name = getattr(posterior, "name", type(posterior).__name__)
    if name != SUPPORTED_ENTRY:
        raise TypeError(f"exact LOO by vectorised refits supports the {SUPPORTED_ENTRY!r} catalog entry only, not "
                        f"{name!r}: use bnnzoo.loo.loo(..., reloo=True) (one full refit per point of high Pareto k) "
                        f"or K-fold cross-validation")
    if not isinstance(getattr(posterior, "guide", None), MeanFieldNormal) or posterior.elbo is not None \
            or not isinstance(posterior.model.prior, GaussianPrior) or not posterior.model.prior.uniform:
        raise TypeError(f"exact LOO refits the catalog's {SUPPORTED_ENTRY} fit (MeanFieldNormal guide, GaussianPrior "
                        f"with one scale for every weight, LocalReparamELBO); this posterior was built differently")
    other = [layer for layer in posterior.net.layers if not isinstance(layer, (Dense, Activation, Flatten))]
    if other:
        raise TypeError(f"exact LOO by vectorised refits needs a dense network; {posterior.net.name} has "
                        f"{', '.join(sorted({layer.kind for layer in other}))} layers")
    if not posterior.is_fitted:
        raise NotFittedError(f"this {name} posterior is not fitted yet: call fit(x, y) first")
    if posterior.fit_state.epoch_selection or posterior.fit_state.calibration:
        raise TypeError(f"exact LOO by vectorised refits repeats a fit that made no choice on validation data; this "
                        f"{name} fit chose its epochs or its predictive temperature on held-out rows: fit with "
                        f"validation_fraction=None, or use bnnzoo.loo.loo(..., reloo=True) (full catalog refits)")


def _catalog_start(posterior):
    """A fresh catalog posterior of the same entry and configuration, created as ``bnnzoo.fit``
    creates it (torch seeded with the configuration's seed), and the CPU random state right after
    its creation, where the catalog's training continues the stream. The global state is untouched."""
    seed = int(posterior.config.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        fresh = get_entry(posterior.name).create(posterior.config, device="cpu")
        state = torch.default_generator.get_state()
    return fresh, seed, state


def mean_field_refits(posterior, x, y, points) -> MeanFieldRefits:
    """The :class:`~bnnzoo.guides.loo_refits.MeanFieldRefits` of a fitted ``meanfield-vi`` posterior:
    refit ``r`` on the training data ``(x, y)`` (raw units) less point ``points[r]``, started as the
    catalog's fit starts."""
    check_refittable(posterior)
    x, y = posterior.validate(x, y, "training data")
    fresh, seed, cpu_state = _catalog_start(posterior)
    return MeanFieldRefits(posterior.net, posterior.task, x.to(posterior.device), y.to(posterior.device), points,
                           start_guide=fresh.guide, start_likelihood=fresh.model.likelihood,
                           prior_scale=fresh.model.prior.scale_value, train_config=posterior.config["train"],
                           seed=seed, cpu_state=cpu_state)


def exact_loo_terms(posterior, x, y, *, points=None, num_samples: int = 200, seed: int = 0,
                    chunk_size: int = 512, progress: bool = False) -> torch.Tensor:
    """The exact LOO term ``log (1/S) sum_s p(y_r | x_r, w_s^(-r))`` (original units) of each training
    point in ``points`` (default: all), ``S = num_samples``, from refits trained ``chunk_size`` at a
    time (memory grows with it: parameters, Adam state and activations of ``chunk_size`` networks).
    Returns a tensor on the posterior's device."""
    check_refittable(posterior)
    for arg, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{arg} must be a positive integer, got {value!r}")
    n = len(y)
    points = torch.arange(n) if points is None else torch.as_tensor(points, dtype=torch.long).reshape(-1)
    if len(points) and (int(points.min()) < 0 or int(points.max()) >= n):
        raise ConfigError(f"points must index the {n} training points")
    chunks = list(points.split(chunk_size))
    epochs = int(posterior.config["train"]["epochs"])
    out = []
    with tqdm(total=epochs * len(chunks), desc="exact LOO refits", disable=not progress, leave=False) as bar:
        for chunk in chunks:
            refits = mean_field_refits(posterior, x, y, chunk)
            train_gen, draw_gen = refits.generators(seed)
            refits.train(train_gen, bar)
            out.append(refits.log_predictive(num_samples, draw_gen))
    return torch.cat(out)


def exact_loo(posterior, x, y, *, num_samples: int = 200, seed: int = 0, chunk_size: int = 512,
              progress: bool = False):
    """Exact LOO of a fitted ``meanfield-vi`` posterior on its training data ``(x, y)`` (raw units):
    one refit per training point, all trained at once (see the module docstring). Returns the
    installed ArviZ's ``ELPDData`` as ``az.loo(..., pointwise=True)`` builds it, made through its
    public API (:func:`bnnzoo.arviz_compat.elpd_data`): the ELPD (0.x ``elpd_loo``, 1.x ``elpd``: the
    sum of the pointwise terms, 0.x ``loo_i``, 1.x ``elpd_i``), ``se`` (``sqrt(n var(terms))``), the
    effective number of parameters (0.x ``p_loo``, 1.x ``p``: the posterior's in-sample log predictive
    density minus the ELPD), ``pareto_k`` (zero: no importance sampling, as ``az.reloo`` marks
    refitted points), and ``result["refits"]``. Raises ``TypeError`` for a posterior it cannot refit this way."""
    check_refittable(posterior)
    terms = exact_loo_terms(posterior, x, y, num_samples=num_samples, seed=seed, chunk_size=chunk_size,
                            progress=progress).cpu().double().numpy()
    n = len(terms)
    lppd = float(posterior.log_likelihood(x, y, num_samples=num_samples, seed=seed).double().sum())
    elpd = float(terms.sum())
    terms_da = xr.DataArray(terms, dims=["obs_id"], coords={"obs_id": np.arange(n)})
    return elpd_data(elpd=elpd, se=float(np.sqrt(n * np.var(terms))), p=lppd - elpd, pointwise=terms_da,
                     n_samples=num_samples, good_k=min(1 - 1 / np.log10(num_samples), 0.7), warning=False, refits=n)
