"""Posteriors represented by a bounded set of weight samples from an MCMC kernel.

The samples are kept as ``{site: tensor of shape (chain, draw, *site_shape)}``, the layout of
``pyro.infer.MCMC.get_samples(group_by_chain=True)`` and of ArviZ. Predictions average the network
over the stored draws; pruned groups are exact zeros in every draw of the chain that pruned them.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Iterator

import torch
from pyro.infer import MCMC

from .posterior import Posterior


class SamplePosterior(Posterior):
    """A posterior held as collected weight samples of one or more chains.

    Subclasses say how the kernel is built (:meth:`_make_kernel`). Fitting runs
    ``pyro.infer.MCMC(kernel, num_samples, warmup_steps, num_chains)`` on the standardised data:
    chains run in processes where the machine has the cores for them (``"spawn"`` on CUDA) and
    one after the other otherwise (then ``fit``'s per-epoch ``callback`` runs too).

    After fitting: ``samples`` (site -> ``(chain, draw, *shape)``), ``chain_masks`` (site ->
    ``(chain, *shape)``, ``True`` = kept), ``chain_state`` (per chain, the kernel's final state:
    e.g. EM's ``pi`` and inclusion probabilities) and ``history``: ``loss`` and ``epoch_seconds``
    per epoch (chains one after the other) and, under ``"chains"``, each chain's per-sample
    diagnostics (global step, step size, potential, pruned fractions, ...), and ``state_bytes``, the
    size of the tensors the kernel keeps between steps (weights, momentum, preconditioner, EM).
    """

    def __init__(self, model, *, name: str, config: dict, device="cpu"):
        super().__init__(model, name=name, config=config, device=device)
        self.samples: dict[str, torch.Tensor] = {}
        self.chain_masks: dict[str, torch.Tensor] = {}
        self.chain_state: list[dict] = []

    @abstractmethod
    def _make_kernel(self, num_data: int):
        """``(kernel, warmup_steps, num_samples)`` for ``num_data`` training examples."""

    # ---- fit --------------------------------------------------------------------------------------
    def _fit(self, x, y, progress: bool, callback=None) -> None:
        train = self.config["train"]
        kernel, warmup_steps, num_samples = self._make_kernel(len(x))
        kernel.on_epoch_end = callback
        num_chains = int(train.get("num_chains", 1))
        mp_context = train.get("mp_context") or ("spawn" if self.device.type == "cuda" else None)
        with warnings.catch_warnings():  # fewer cores than chains: MCMC runs them in turn, as intended
            warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                        mp_context=mp_context, disable_progbar=not progress, save_params=list(self.net.sites()))
        mcmc.run(x, y)
        self.samples = {s: v.detach() for s, v in mcmc.get_samples(group_by_chain=True).items()}
        # what each chain's kernel.diagnostics() returned (MCMC.diagnostics() would also compute n_eff
        # and r_hat over every stored weight, which fails with fewer than 4 draws per chain)
        chains = [mcmc._diagnostics[c] for c in range(num_chains)]
        self._collect(chains)

    def _collect(self, chains: list[dict]) -> None:
        """Masks, final state and history of every chain (from their ``kernel.diagnostics()``)."""
        sites = list(chains[0]["masks"])
        self.chain_masks = {s: torch.stack([c["masks"][s] for c in chains]).to(self.device) for s in sites}
        self.chain_state = [c.get("em", {}) for c in chains]
        scales = [c["noise_scale"] for c in chains if c.get("noise_scale") is not None]
        if scales:
            log_scale = torch.tensor(scales).log().mean()
            with torch.no_grad():
                self.model.likelihood.log_noise_scale.copy_(log_scale)
        self.history["loss"] = [v for c in chains for v in c["epochs"]["loss"]]
        self.history["epoch_seconds"] = [v for c in chains for v in c["epochs"]["epoch_seconds"]]
        self.history["chains"] = [c["history"] for c in chains]
        self.history["state_bytes"] = chains[0].get("state_bytes", {})

    # ---- draws ------------------------------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0] if self.samples else 0

    @property
    def num_draws(self) -> int:
        """Stored draws over all chains."""
        first = next(iter(self.samples.values()), None)
        return 0 if first is None else first.shape[0] * first.shape[1]

    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """``num_samples`` stored draws, spread evenly over the chains' draws (cycling through them
        when more are asked for than stored; a multiple of :attr:`num_draws` weighs all equally)."""
        total = self.num_draws
        if total == 0:
            raise RuntimeError(f"this {self.name} posterior holds no samples: fit it first")
        draws = next(iter(self.samples.values())).shape[1]
        for i in range(num_samples):
            j = (i * total) // num_samples if num_samples <= total else i % total
            c, d = divmod(j, draws)
            yield {s: v[c, d] for s, v in self.samples.items()}

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        return {s: v.mean(dim=(0, 1)) for s, v in self.samples.items()}

    def _arviz_draws_per_chain(self, num_samples: int) -> int:
        """ArviZ gets every stored draw of every chain (``num_samples`` does not apply)."""
        return next(iter(self.samples.values())).shape[1] if self.samples else 0

    def _arviz_sample_stats(self) -> dict[str, torch.Tensor]:
        """Each chain's per-sample record at its stored draws (step size, potential, pruned fractions...)."""
        from .diagnostics import stored_draw_records

        return stored_draw_records(self.history.get("chains", []), self._arviz_draws_per_chain(0), self.device)

    def masks(self) -> dict[str, torch.Tensor]:
        """A weight is pruned when every chain pruned it."""
        return {s: m.any(0) for s, m in self.chain_masks.items()}

    # ---- state --------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"samples": {s: v.detach().cpu() for s, v in self.samples.items()},
                "chain_masks": {s: v.cpu() for s, v in self.chain_masks.items()},
                "chain_state": self.chain_state}

    def _load_state(self, state: dict) -> None:
        self.samples = dict(state["samples"])
        self.chain_masks = dict(state["chain_masks"])
        self.chain_state = list(state["chain_state"])

    def _to(self, device: torch.device) -> None:
        self.samples = {s: v.to(device) for s, v in self.samples.items()}
        self.chain_masks = {s: v.to(device) for s, v in self.chain_masks.items()}
