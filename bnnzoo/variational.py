"""Posteriors found by stochastic variational inference with a guide over the weights."""

from __future__ import annotations

from typing import Iterator

import torch

from .guides.training import fit_svi
from .posterior import Posterior


class VariationalPosterior(Posterior):
    """A posterior represented by a fitted Pyro guide (``q(w)``), trained with SVI.

    ``guide`` must be a :class:`~bnnzoo.guides.WeightGuide`; training uses ``elbo``
    (:class:`~bnnzoo.guides.LocalReparamELBO` by default) with Adam over minibatches.
    """

    def __init__(self, model, guide, *, name: str, config: dict, device="cpu", elbo=None):
        super().__init__(model, name=name, config=config, device=device)
        self.guide = guide.to(self.device)
        self.elbo = elbo

    def _fit(self, x, y, progress: bool, callback=None) -> None:
        from bnnzoo.guides import LocalReparamELBO

        train = self.config["train"]
        elbo = self.elbo or LocalReparamELBO(num_particles=train.get("num_particles", 1))
        run = fit_svi(
            self.model, self.guide, x, y, elbo=elbo, epochs=train["epochs"], batch_size=train["batch_size"],
            lr=train["lr"], progress=progress, description=self.name, on_epoch_end=callback,
        )
        for key, values in run.to_dict().items():
            self.history.setdefault(key, []).extend(values)

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
