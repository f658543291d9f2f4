"""The local-reparameterisation ELBO with a weight on its KL term (a tempered posterior)."""

from __future__ import annotations

from .elbo import LocalReparamELBO


class TemperedLocalReparamELBO(LocalReparamELBO):
    """``loss = kl_weight * KL(q || p) - (N / B) sum_batch log p(y_n | f_n)``.

    With ``kl_weight = 1`` this is :class:`~bnnzoo.guides.LocalReparamELBO` (the negative ELBO). A
    weight ``T < 1`` fits the tempered posterior ``p(w | D)^(1/T)``-style target in which the
    likelihood counts ``1/T`` times (a "cold posterior", Wenzel et al. 2020); in Pyro terms it is
    ``TraceMeanField_ELBO`` with every latent site of model and guide under ``poutine.scale(T)``.
    """

    def __init__(self, kl_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not kl_weight > 0:
            raise ValueError(f"kl_weight must be positive, got {kl_weight}")
        self.kl_weight = float(kl_weight)

    def differentiable_loss(self, model, guide, x, y, num_data=None):
        num_data = len(x) if num_data is None else num_data
        loss = 0.0
        for _ in range(self.num_particles):
            f, kl = guide.sample_outputs_and_kl(model, x)
            loglik = model.likelihood.log_prob(f, y).sum()
            loss = loss + self.kl_weight * kl - loglik * (num_data / len(x))
        return loss / self.num_particles
