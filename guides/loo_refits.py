"""Vectorised refits of a mean-field Gaussian guide on a dense network, for exact leave-one-out.

Refit ``r`` trains on the training data less point ``r`` with exactly the algorithm of a
mean-field SVI fit (:func:`bnnzoo.guides.training.fit_svi` with
:class:`~bnnzoo.guides.LocalReparamELBO`): its own standardisation statistics, independent
minibatch shuffles, the local-reparameterised loss with the closed-form KL to the ``N(0, s^2)``
prior, and Adam. Every guide parameter gets a leading refit dimension ``R``, so all refits of a
chunk train as one batched computation (Adam acts elementwise, so it is ``R`` independent Adams).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from ..models.standardizer import Standardizer
from .sites import get_site
from .training import make_adam


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


class MeanFieldRefits:
    """``R`` mean-field refits, refit ``r`` on the training data ``(x, y)`` (raw units, on the device)
    less point ``points[r]``, as tensors with a leading refit dimension.

    ``locs``, ``log_scales`` (site -> ``(R, *shape)``) and ``log_noise_scale`` (``(R,)``, regression)
    start as the catalog's fit starts; :meth:`train` runs the catalog's SVI on all of them at once,
    :meth:`loss` is one step's loss per refit and :meth:`log_predictive` the LOO term of each
    refit's excluded point."""

    def __init__(self, net, task: str, x: torch.Tensor, y: torch.Tensor, points, *, start_guide, start_likelihood,
                 prior_scale: float, train_config: dict, seed: int, cpu_state: torch.Tensor):
        self.device = x.device
        self.net, self.task = net, task
        self.x, self.y = x, y
        n = len(self.y)
        if n < 3:
            raise ValueError(f"exact LOO needs at least 3 training points, got {n}")
        self.points = torch.as_tensor(points, dtype=torch.long).reshape(-1).to(self.device)  # setup, not the loop
        if len(self.points) == 0:
            raise ValueError("no points to leave out")
        self.n, self.num_refits = n, len(self.points)

        # the original indices of each refit's n - 1 training points, in their original order, and
        # each refit's statistics, computed where Posterior.fit computes them (on the host)
        pos = torch.arange(n - 1)
        keep = pos + (pos[None, :] >= self.points.cpu()[:, None]).long()
        x_host, y_host = x.cpu(), y.cpu()
        stats = [Standardizer.from_data(x_host[k], y_host[k], self.task) for k in keep]
        self.keep = keep.to(self.device)
        self.x_mean = self._features(torch.stack([s.x_mean for s in stats]).to(self.device))
        self.x_std = self._features(torch.stack([s.x_std for s in stats]).to(self.device))
        if self.task == "regression":
            self.y_mean = torch.stack([s.y_mean for s in stats]).to(self.device)
            self.y_std = torch.stack([s.y_std for s in stats]).to(self.device)

        self.seed, self.cpu_state = seed, cpu_state
        self.train_config = dict(train_config)
        self.prior_scale = prior_scale
        r = self.num_refits

        def batched(value: torch.Tensor) -> torch.Tensor:
            value = value.detach().to(self.device)
            return value.unsqueeze(0).repeat(r, *([1] * value.dim())).requires_grad_()

        self.locs = {site: batched(get_site(start_guide.locs, site)) for site in self.net.sites()}
        self.log_scales = {site: batched(get_site(start_guide.log_scales, site)) for site in self.net.sites()}
        self.log_noise_scale = batched(start_likelihood.log_noise_scale) if self.task == "regression" else None
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
        """The catalog's SVI (``bnnzoo.guides.training.fit_svi``) for every refit at once: per epoch, an
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

    def generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        """The training generator (the catalog's stream: CPU continues after the initialisation, CUDA
        starts at the configuration's seed) and the draw generator (seeded with ``seed``)."""
        device = self.device
        train = torch.Generator(device=device)
        if device.type == "cpu":
            train.set_state(self.cpu_state)
        else:
            train.manual_seed(self.seed)
        draws = torch.Generator(device=device).manual_seed(seed)
        return train, draws
