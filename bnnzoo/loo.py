"""Leave-one-out cross-validation of a fitted posterior: PSIS-LOO, and exact refits where it fails.

PSIS-LOO (``az.loo``) reweights the posterior draws by ``1 / p(y_n | w)`` to mimic leaving point
``n`` out. Its Pareto-k diagnostic says when that fails: above 0.7 the reweighted estimate is
unreliable, and for a Bayesian neural network it is often too low. The remedy ArviZ provides is
``az.reloo``: refit the model without each such point and use the exact LOO term for it.
:class:`RefitWrapper` is the ``az.SamplingWrapper`` that lets it refit any catalog posterior: a fresh
posterior from the same catalog entry and configuration, seeded with the configuration's seed as
``bnnzoo.fit`` seeds, fitted on the training data less
the point, and its draws' log-likelihood of the point. Each refit costs one full fit, so reloo is
for small data sets (a few hundred points, a few seconds per fit).

For the mean-field baseline every point can be refitted at once: ``loo(..., method="exact")``
(:mod:`bnnzoo.exact_loo`) trains all ``n`` leave-one-out refits as one batched computation.

Works with both ArviZ lines (0.x on Python 3.11, 1.x on Python 3.12 and newer): every call that
differs between them goes through :mod:`bnnzoo.arviz_compat`; the results are the installed line's
own ``ELPDData`` (read them with :func:`bnnzoo.arviz_compat.loo_fields`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import arviz_compat
from .catalog import get_entry
from .exact_loo import exact_loo
from .guides.training import set_seed
from .models.errors import ConfigError

#: ArviZ's threshold above which PSIS-LOO terms are unreliable and ``reloo`` refits
K_THRESHOLD = 0.7


class RefitWrapper(arviz_compat.sampling_wrapper_base()):
    """The ``az.SamplingWrapper`` that refits a catalog posterior without some observations.

    ``posterior``: the fitted posterior (its catalog entry and configuration define a refit);
    ``x, y``: the training data it was fitted on, in the original units; ``num_samples``: draws of a
    refitted guide (a sampler's own draws are used as they are); ``seed``: the draw seed."""

    def __init__(self, posterior, x, y, *, num_samples: int = 200, seed: int = 0, idata_orig=None):
        super().__init__(model=posterior, idata_orig=idata_orig)
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)
        self.num_samples, self.seed = num_samples, seed
        self.refits = 0

    def sel_observations(self, idx):
        """Training data without the points ``idx`` and the excluded points."""
        idx = torch.as_tensor(np.asarray(idx).reshape(-1), dtype=torch.long)
        keep = torch.ones(len(self.y), dtype=torch.bool)
        keep[idx] = False
        return (self.x[keep], self.y[keep]), (self.x[idx], self.y[idx])

    def sample(self, modified_observed_data):
        """A fresh posterior of the same entry and configuration, fitted on ``modified_observed_data``."""
        x, y = modified_observed_data
        set_seed(int(self.model.config.get("seed", 0)))  # as bnnzoo.fit: a refit is reproducible
        refit = get_entry(self.model.name).create(self.model.config, device=self.model.device)
        refit.fit(x, y, progress=False)
        self.refits += 1
        return refit

    def get_inference_data(self, fitted):
        # the refitted posterior itself: log_likelihood__i draws from it on the excluded points
        return fitted

    def log_likelihood__i(self, excluded_obs, idata__i):
        """Per-draw log-likelihood of the excluded points under the refitted posterior."""
        x, y = excluded_obs
        idata = idata__i.to_arviz((x, y), num_samples=self.num_samples, sites=None, seed=self.seed)
        return idata.log_likelihood["obs"]


def loo(posterior, x, y, *, method: str = "psis", reloo: bool = False, k_threshold: float = K_THRESHOLD,
        num_samples: int = 200, seed: int = 0, idata=None, chunk_size: int = 512, progress: bool = False):
    """LOO of a fitted ``posterior`` on its training data ``(x, y)``.

    ``method="psis"``: ``az.loo`` (pointwise), and with ``reloo=True`` the exact refit for every point
    whose Pareto k exceeds ``k_threshold`` (``az.reloo``). Returns the installed ArviZ's ``ELPDData``
    (field names differ between the lines: :func:`bnnzoo.arviz_compat.loo_fields` reads either); with
    ``reloo`` it has two more entries, ``result["refits"]`` (how many points were refitted) and
    ``result["pareto_k_psis"]`` (the Pareto k of PSIS before the refits, which ``az.reloo`` sets to 0
    for the refitted points). ``idata``: the posterior's ArviZ data on ``(x, y)`` if already made.

    ``method="exact"``: exact LOO, one refit per training point, all trained at once in chunks of
    ``chunk_size`` (``meanfield-vi`` on a dense network only; see :mod:`bnnzoo.exact_loo`)."""
    if method == "exact":
        if reloo:
            raise ConfigError("reloo refits the high-Pareto-k points of PSIS-LOO; method='exact' refits every point")
        return exact_loo(posterior, x, y, num_samples=num_samples, seed=seed, chunk_size=chunk_size,
                         progress=progress)
    if method != "psis":
        raise ConfigError(f"unknown LOO method {method!r}; choose 'psis' (with reloo=True for az.reloo) or 'exact'")
    if getattr(posterior, "point_estimate", False):
        raise ConfigError(f"LOO needs posterior draws: {posterior.name} is a point estimate (one draw)")
    if idata is None:
        idata = posterior.to_arviz((x, y), num_samples=num_samples, sites=None, seed=seed)
    result = arviz_compat.loo(idata, pointwise=True)  # high Pareto k: the caller reads pareto_k
    if not reloo:
        return result
    wrapper = RefitWrapper(posterior, x, y, num_samples=num_samples, seed=seed, idata_orig=idata)
    pareto_k_psis = result["pareto_k"].copy()
    refitted = arviz_compat.reloo(wrapper, result, k_threshold)
    refitted["refits"] = wrapper.refits
    refitted["pareto_k_psis"] = pareto_k_psis
    return refitted
