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
  (:class:`~bnnzoo.standardizer.Standardizer`, as ``Posterior.fit`` does);
- the same minibatches: every epoch, an independent shuffle of the refit's ``n - 1`` points cut into
  batches of ``batch_size`` (the last one smaller), as ``bnnzoo.training.minibatches`` does;
- the same loss, :class:`~bnnzoo.guides.LocalReparamELBO`'s ``KL(q || p) - (N / B) sum_batch
  log p(y | f)`` with ``N = n - 1``: local reparameterisation (one output draw per example) and the
  closed-form KL to the ``N(0, s^2)`` prior;
- the same optimiser: ``bnnzoo.training.make_adam`` on the batched tensors. Adam (no weight decay, no
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

import math
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .catalog import get_entry
from .nets import Activation, Dense, Flatten
from .standardizer import Standardizer
from .training import make_adam

#: the catalog entry whose fits this module refits
SUPPORTED_ENTRY = "meanfield-vi"


class BatchedLocalReparamDense(torch.autograd.Function):
    """:class:`guides.local_reparam.LocalReparamDense` for ``R`` independent layers at once: inputs
    ``h`` ``(R, B, in)``, weights ``mu, rho`` ``(R, out, in)``, biases ``b_mu, b_rho`` ``(R, out)``,
    noise ``eps`` ``(R, B, out)``. Returns the local-reparameterised outputs ``(R, B, out)`` and each
    layer's ``KL(q || N(0, s^2))``, ``(R,)``; the backward pass folds the KL's gradient into the batched
    matrix products as the catalog's fused layer does."""

    @staticmethod
    def forward(ctx, h, mu, rho, b_mu, b_rho, eps, prior_scale: float):
        inv_pv = 1.0 / (prior_scale * prior_scale)
        var, b_var = torch.exp(2 * rho), torch.exp(2 * b_rho)
        h2 = h * h
        m = torch.baddbmm(b_mu.unsqueeze(1), h, mu.transpose(1, 2))
        sd = torch.baddbmm(b_var.unsqueeze(1), h2, var.transpose(1, 2)).sqrt_()
        out = torch.addcmul(m, sd, eps)
        count = mu[0].numel() + b_mu[0].numel()
        kl = (0.5 * inv_pv * (var.sum((1, 2)) + b_var.sum(1) + (mu * mu).sum((1, 2)) + (b_mu * b_mu).sum(1))
              - rho.sum((1, 2)) - b_rho.sum(1) + count * (math.log(prior_scale) - 0.5))
        ctx.save_for_backward(h, h2, mu, var, b_mu, b_var, sd, eps)
        ctx.inv_pv = inv_pv
        return out, kl

    @staticmethod
    def backward(ctx, g_out, g_kl):
        h, h2, mu, var, b_mu, b_var, sd, eps = ctx.saved_tensors
        g_out = torch.zeros_like(sd) if g_out is None else g_out
        g_kl = torch.zeros(mu.shape[0], device=mu.device, dtype=mu.dtype) if g_kl is None else g_kl
        c = ctx.inv_pv * g_kl  # each refit's KL weight in the loss times 1/s^2
        g_v = g_out * eps / (2 * sd)  # d loss / d v
        d_mu = torch.baddbmm(mu * c[:, None, None], g_out.transpose(1, 2), h)
        d_b_mu = g_out.sum(1) + c[:, None] * b_mu
        d_rho = (torch.baddbmm((0.5 * c)[:, None, None].expand_as(var), g_v.transpose(1, 2), h2)
                 .mul_(var).mul_(2).sub_(g_kl[:, None, None]))
        d_b_rho = (g_v.sum(1) + 0.5 * c[:, None]).mul_(b_var).mul_(2).sub_(g_kl[:, None])
        d_h = None
        if ctx.needs_input_grad[0]:
            d_h = torch.addcmul(torch.bmm(g_out, mu), 2 * h, torch.bmm(g_v, var))
        return d_h, d_mu, d_rho, d_b_mu, d_b_rho, None, None


def check_refittable(posterior) -> None:
    """Raise a ``TypeError`` naming the problem unless ``posterior`` is a fitted ``meanfield-vi``
    posterior of a dense network with the catalog's loss."""
    from bnnzoo.guides import MeanFieldNormal
    from bnnzoo.models import GaussianPrior

    name = getattr(posterior, "name", type(posterior).__name__)
    if name != SUPPORTED_ENTRY:
        raise TypeError(f"exact LOO by vectorised refits supports the {SUPPORTED_ENTRY!r} catalog entry only, not "
                        f"{name!r}: use bnnzoo.loo.loo(..., reloo=True) (one full refit per point of high Pareto k) "
                        f"or K-fold cross-validation")
    if not isinstance(getattr(posterior, "guide", None), MeanFieldNormal) or posterior.elbo is not None \
            or not isinstance(posterior.model.prior, GaussianPrior):
        raise TypeError(f"exact LOO refits the catalog's {SUPPORTED_ENTRY} fit (MeanFieldNormal guide, GaussianPrior, "
                        f"LocalReparamELBO); this posterior was built differently")
    other = [layer for layer in posterior.net.layers if not isinstance(layer, (Dense, Activation, Flatten))]
    if other:
        raise TypeError(f"exact LOO by vectorised refits needs a dense network; {posterior.net.name} has "
                        f"{', '.join(sorted({layer.kind for layer in other}))} layers")
    posterior._require_fitted()


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


class MeanFieldRefits:
    """``R`` mean-field refits of a ``meanfield-vi`` posterior, refit ``r`` on the training data
    ``(x, y)`` (raw units) less point ``points[r]``, as tensors with a leading refit dimension.

    ``locs``, ``log_scales`` (site -> ``(R, *shape)``) and ``log_noise_scale`` (``(R,)``, regression)
    start as the catalog's fit starts; :meth:`train` runs the catalog's SVI on all of them at once,
    :meth:`loss` is one step's loss per refit and :meth:`log_predictive` the LOO term of each
    refit's excluded point."""

    def __init__(self, posterior, x: torch.Tensor, y: torch.Tensor, points):
        check_refittable(posterior)
        x, y = posterior._validate(x, y, "training data")
        self.device = posterior.device
        self.net, self.task = posterior.net, posterior.task
        self.x, self.y = x.to(self.device), y.to(self.device)
        n = len(self.y)
        if n < 3:
            raise ValueError(f"exact LOO needs at least 3 training points, got {n}")
        self.points = torch.as_tensor(points, dtype=torch.long).reshape(-1).to(self.device)  # setup, not the loop
        if len(self.points) == 0:
            raise ValueError("no points to leave out")
        self.n, self.num_refits = n, len(self.points)

        # the original indices of each refit's n - 1 training points, in their original order, and
        # each refit's statistics, computed where Posterior.fit computes them (before moving to the device)
        pos = torch.arange(n - 1)
        keep = pos + (pos[None, :] >= self.points.cpu()[:, None]).long()
        stats = [Standardizer.from_data(x[k], y[k], self.task) for k in keep]
        self.keep = keep.to(self.device)
        self.x_mean = self._features(torch.stack([s.x_mean for s in stats]).to(self.device))
        self.x_std = self._features(torch.stack([s.x_std for s in stats]).to(self.device))
        if self.task == "regression":
            self.y_mean = torch.stack([s.y_mean for s in stats]).to(self.device)
            self.y_std = torch.stack([s.y_std for s in stats]).to(self.device)

        from bnnzoo.guides.sites import get_site

        fresh, self.seed, self.cpu_state = _catalog_start(posterior)
        self.train_config = dict(posterior.config["train"])
        self.prior_scale = fresh.model.prior.scale_value
        r = self.num_refits

        def batched(value: torch.Tensor) -> torch.Tensor:
            value = value.detach().to(self.device)
            return value.unsqueeze(0).repeat(r, *([1] * value.dim())).requires_grad_()

        guide = fresh.guide
        self.locs = {site: batched(get_site(guide.locs, site)) for site in self.net.sites()}
        self.log_scales = {site: batched(get_site(guide.log_scales, site)) for site in self.net.sites()}
        self.log_noise_scale = batched(fresh.model.likelihood.log_noise_scale) if self.task == "regression" else None
        self.history: dict[str, list] = {"loss": []}

    def _features(self, stat: torch.Tensor) -> torch.Tensor:
        """A per-refit statistic ``(R, *s)`` shaped to broadcast against inputs ``(R, B, *input_shape)``."""
        extra = self.x.dim() - 1 - (stat.dim() - 1)
        return stat.reshape(stat.shape[0], 1, *stat.shape[1:], *([1] * extra))

    def parameters(self) -> list[torch.Tensor]:
        params = [*self.locs.values(), *self.log_scales.values()]
        return params + ([self.log_noise_scale] if self.log_noise_scale is not None else [])

    # ---- the batched computations ---------------------------------------------------------------
    def standardise(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(R, B, ...)`` and targets ``(R, B)`` of points ``idx`` (``(R, B)`` original indices),
        each refit's rows standardised with its own statistics."""
        x = (self.x[idx] - self.x_mean) / self.x_std
        y = self.y[idx]
        if self.task == "regression":
            y = (y - self.y_mean[:, None]) / self.y_std[:, None]
        return x, y

    def _log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(y | f)`` per refit and example, ``(R, B)``: the catalog likelihood's formula."""
        if self.task == "regression":
            log_noise = self.log_noise_scale[:, None]
            return -0.5 * ((y - f.squeeze(-1)) / log_noise.exp()) ** 2 - log_noise - 0.5 * math.log(2 * math.pi)
        return torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def sample_outputs_and_kl(self, x: torch.Tensor, eps: list[torch.Tensor] | None = None,
                              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One local-reparameterised draw of the outputs ``(R, B, out)`` of every refit for inputs
        ``x`` ``(R, B, ...)`` and every refit's ``KL(q || p)`` ``(R,)``; ``eps`` (one ``(R, B, out)``
        tensor per dense layer) fixes the noise."""
        noise = iter(eps) if eps is not None else None
        kl = torch.zeros(self.num_refits, device=self.device)

        def linear(layer, h):
            nonlocal kl
            w, b = f"{layer.name}.weight", f"{layer.name}.bias"
            shape = (h.shape[0], h.shape[1], layer.out_features)
            e = next(noise) if noise is not None else torch.randn(shape, generator=generator, device=h.device)
            out, layer_kl = BatchedLocalReparamDense.apply(h, self.locs[w], self.log_scales[w], self.locs[b],
                                                           self.log_scales[b], e, self.prior_scale)
            kl = kl + layer_kl
            return out

        f = self.net.apply(x, linear)
        return f, kl

    def loss(self, idx: torch.Tensor, eps: list[torch.Tensor] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Each refit's ``LocalReparamELBO`` loss on its batch ``idx`` (``(R, B)`` original indices, none
        the refit's own excluded point): ``KL - ((n - 1) / B) sum_batch log p(y | f)``, shape ``(R,)``."""
        x, y = self.standardise(idx)
        particles = int(self.train_config.get("num_particles", 1))
        total = 0.0
        for p in range(particles):
            f, kl = self.sample_outputs_and_kl(x, eps if p == 0 else None, generator)
            loglik = self._log_prob(f, y).sum(1)
            total = total + kl - loglik * ((self.n - 1) / idx.shape[1])
        return total / particles

    def train(self, generator: torch.Generator, bar: tqdm | None = None) -> None:
        """The catalog's SVI (``bnnzoo.training.fit_svi``) for every refit at once: per epoch, an
        independent shuffle of each refit's ``n - 1`` points, batches of ``batch_size``, Adam steps."""
        train = self.train_config
        optimizer = make_adam(self.parameters(), train["lr"])
        m, batch_size = self.n - 1, train["batch_size"]
        for _ in range(train["epochs"]):
            order = torch.stack([torch.randperm(m, generator=generator, device=self.device)
                                 for _ in range(self.num_refits)])
            order = self.keep.gather(1, order)
            total = torch.zeros(self.num_refits, device=self.device)
            for start in range(0, m, batch_size):
                idx = order[:, start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(idx, generator=generator)
                loss.sum().backward()
                optimizer.step()
                total += loss.detach() * idx.shape[1]
            self.history["loss"].append(total / m / m)  # fit_svi's per-example loss, kept on the device
            if bar is not None:
                bar.update(1)
        if not bool(torch.isfinite(self.history["loss"][-1]).all()):  # one read-back per chunk
            raise FloatingPointError("an exact-LOO refit's loss became non-finite: lower the learning rate")

    @torch.no_grad()
    def log_predictive(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``log (1/S) sum_s p(y_r | x_r, w_s)`` of each refit's excluded point ``r`` in the units of
        ``y``, with ``S = num_samples`` weight draws of refit ``r``'s guide, ``(R,)``."""
        x, y = self.standardise(self.points[:, None])
        sites = self.net.sites()
        acc = None
        for _ in range(num_samples):
            params = {site: self.locs[site] + self.log_scales[site].exp()
                      * torch.randn(self.locs[site].shape, generator=generator, device=self.device) for site in sites}
            f = self.net.apply(x, lambda layer, h: torch.baddbmm(params[f"{layer.name}.bias"].unsqueeze(1), h,
                                                                 params[f"{layer.name}.weight"].transpose(1, 2)))
            lp = self._log_prob(f, y)[:, 0]
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        acc = acc - math.log(num_samples)
        return acc - torch.log(self.y_std) if self.task == "regression" else acc


def _generators(refits: MeanFieldRefits, seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The training generator (the catalog's stream: CPU continues after the initialisation, CUDA
    starts at the configuration's seed) and the draw generator (seeded with ``seed``)."""
    device = refits.device
    train = torch.Generator(device=device)
    if device.type == "cpu":
        train.set_state(refits.cpu_state)
    else:
        train.manual_seed(refits.seed)
    draws = torch.Generator(device=device).manual_seed(seed)
    return train, draws


def exact_loo_terms(posterior, x, y, *, points=None, num_samples: int = 200, seed: int = 0,
                    chunk_size: int = 512, progress: bool = False) -> torch.Tensor:
    """The exact LOO term ``log (1/S) sum_s p(y_r | x_r, w_s^(-r))`` (original units) of each training
    point in ``points`` (default: all), ``S = num_samples``, from refits trained ``chunk_size`` at a
    time (memory grows with it: parameters, Adam state and activations of ``chunk_size`` networks).
    Returns a tensor on the posterior's device."""
    check_refittable(posterior)
    for arg, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    n = len(y)
    points = torch.arange(n) if points is None else torch.as_tensor(points, dtype=torch.long).reshape(-1)
    if len(points) and (int(points.min()) < 0 or int(points.max()) >= n):
        raise ValueError(f"points must index the {n} training points")
    chunks = list(points.split(chunk_size))
    epochs = int(posterior.config["train"]["epochs"])
    out = []
    with tqdm(total=epochs * len(chunks), desc="exact LOO refits", disable=not progress, leave=False) as bar:
        for chunk in chunks:
            refits = MeanFieldRefits(posterior, x, y, chunk)
            train_gen, draw_gen = _generators(refits, seed)
            refits.train(train_gen, bar)
            out.append(refits.log_predictive(num_samples, draw_gen))
    return torch.cat(out)


def exact_loo(posterior, x, y, *, num_samples: int = 200, seed: int = 0, chunk_size: int = 512,
              progress: bool = False):
    """Exact LOO of a fitted ``meanfield-vi`` posterior on its training data ``(x, y)`` (raw units):
    one refit per training point, all trained at once (see the module docstring). Returns ArviZ's
    ``ELPDData`` as ``az.loo(..., pointwise=True)`` builds it: ``elpd_loo`` (sum of ``loo_i``),
    ``se`` (``sqrt(n var(loo_i))``), ``p_loo`` (the posterior's in-sample log predictive density
    minus ``elpd_loo``), ``loo_i``, ``pareto_k`` (zero: no importance sampling, as ``az.reloo`` marks
    refitted points), and ``refits``. Raises ``TypeError`` for a posterior it cannot refit this way."""
    import xarray as xr
    from arviz.stats.stats_utils import ELPDData

    check_refittable(posterior)
    terms = exact_loo_terms(posterior, x, y, num_samples=num_samples, seed=seed, chunk_size=chunk_size,
                            progress=progress).cpu().double().numpy()
    n = len(terms)
    lppd = float(posterior.log_likelihood(x, y, num_samples=num_samples, seed=seed).double().sum())
    elpd = float(terms.sum())
    loo_i = xr.DataArray(terms, dims=["obs_id"], coords={"obs_id": np.arange(n)}, name="loo_i")
    pareto_k = xr.zeros_like(loo_i).rename("pareto_k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ELPDData(
            data=[elpd, float(np.sqrt(n * np.var(terms))), lppd - elpd, num_samples, n, False, loo_i, pareto_k,
                  "log", min(1 - 1 / np.log10(num_samples), 0.7), n],
            index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k", "scale",
                   "good_k", "refits"],
        )
