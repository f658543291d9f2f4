"""Posteriors represented by a bounded set of weight samples from an MCMC kernel.

The samples are kept as ``{site: tensor of shape (chain, draw, *site_shape)}``, the layout of
``pyro.infer.MCMC.get_samples(group_by_chain=True)`` and of ArviZ. Predictions average the network
over the stored draws; pruned groups are exact zeros in every draw of the chain that pruned them.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path

import torch
from pyro.infer import MCMC

from .diagnostics import stored_draw_records
from .guides.data_parallel import chain_groups, chain_seed, data_parallel
from .guides.data_parallel import current as data_parallel_context
from .guides.training import TrainingHistory, set_seed
from .models.errors import ConfigError
from .posterior import Posterior


class ChainRecords:
    """An ``MCMC`` ``hook_fn`` that keeps every chain's end-of-run record: the kernel's
    ``diagnostics()`` taken after the chain's last sample, with that sample.

    Pyro hands a kernel's end-of-chain record out publicly only through ``MCMC.diagnostics()``,
    which also computes R-hat and the effective sample size of every stored site (and needs four
    draws per chain); the hook, a public argument of ``MCMC``, is the route around it. The hook runs
    where its chain runs: in this process (one chain, or chains in turn) the record is kept in
    memory; in a worker process (chains in parallel) it is written to ``directory``. Which chain a
    record belongs to is told by its last sample, compared with the chains' stored draws
    (:meth:`collect`).
    """

    def __init__(self, num_samples: int, sites: list[str], directory: str | Path):
        self.num_samples = int(num_samples)
        self.sites = list(sites)
        self.directory = str(directory)
        self.pid = os.getpid()
        self.records: list[tuple[dict, dict]] = []

    def __call__(self, kernel, params: dict, stage: str, i: int) -> None:
        if not stage.lower().startswith("sample") or i != self.num_samples - 1:
            return
        record = ({s: params[s].detach().cpu() for s in self.sites}, kernel.diagnostics())
        if os.getpid() == self.pid:
            self.records.append(record)
        else:
            torch.save(record, Path(self.directory) / f"chain-{os.getpid()}.pt")

    def collect(self, samples: dict[str, torch.Tensor]) -> list[dict]:
        """The records in chain order, for ``samples`` grouped by chain (``MCMC.get_samples(
        group_by_chain=True)``): chain ``c``'s record is the one whose last sample is its last draw."""
        records = list(self.records)
        for path in sorted(Path(self.directory).glob("chain-*.pt")):
            records.append(torch.load(path, map_location="cpu", weights_only=False))
        chains = next(iter(samples.values())).shape[0]
        out = []
        for c in range(chains):
            match = next((k for k, (last, _) in enumerate(records)
                          if all(torch.equal(last[s], samples[s][c, -1].cpu()) for s in self.sites)), None)
            if match is None:
                raise RuntimeError(f"MCMC returned no end-of-chain record for chain {c} "
                                   f"({len(records)} records for {chains} chains)")
            out.append(records.pop(match)[1])
        return out


class SamplePosterior(Posterior):
    """A posterior held as collected weight samples of one or more chains.

    Subclasses say how the kernel is built (:meth:`_make_kernel`). Fitting runs
    ``pyro.infer.MCMC(kernel, num_samples, warmup_steps, num_chains)`` on the standardised data:
    chains run in processes where the machine has the cores for them (``"spawn"`` on CUDA) and
    one after the other otherwise (then ``fit``'s per-epoch ``callback`` runs too). The kernel's
    ``diagnostics()`` at the end of each chain (collected by :class:`ChainRecords`) gives the
    chain's masks, final state and records.

    Data parallel (inside :func:`~bnnzoo.guides.data_parallel.data_parallel`): one chain is run by all
    ranks (:class:`~bnnzoo.guides.SGHMC`), or, with ``num_chains`` ``C > 1``, each of ``C`` groups of
    ranks runs one chain and every rank gathers them all (docs/data-parallel.md).

    After fitting: ``samples`` (site -> ``(chain, draw, *shape)``), ``chain_masks`` (site ->
    ``(chain, *shape)``, ``True`` = kept), ``chain_state`` (per chain, the kernel's final state:
    e.g. EM's ``pi`` and inclusion probabilities) and ``history``, a
    :class:`~bnnzoo.guides.training.TrainingHistory`: ``loss`` and ``epoch_seconds`` per epoch, chain
    after chain (every chain runs the same epochs); ``extra["chains"]``, each chain's per-sample
    record (``{key: [value per kernel sample]}``: global step, step size, potential, pruned
    fractions, ..., and the ``warmup`` flag); ``extra["state_bytes"]``, the size of the tensors the
    kernel keeps between steps (weights, momentum, preconditioner, EM).
    """

    #: the draws are the chains' stored samples (ArviZ gets them all, with their sampler statistics)
    stores_samples = True

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
        parallel = data_parallel_context()
        if parallel is not None and num_chains > 1:
            samples, chains = self._run_chain_groups(kernel, warmup_steps, num_samples, x, y, progress, parallel,
                                                     num_chains)
        else:  # data parallel: the ranks hold one chain (guides.data_parallel); rank 0 reports
            progress = progress and (parallel is None or parallel.is_main)
            samples, chains = self._run_mcmc(kernel, warmup_steps, num_samples, x, y, progress, num_chains)
        self.samples = {s: v.detach() for s, v in samples.items()}
        self._collect(chains)

    def _run_mcmc(self, kernel, warmup_steps: int, num_samples: int, x, y, progress: bool,
                  num_chains: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """``pyro.infer.MCMC`` of ``num_chains`` chains: the samples grouped by chain and each chain's
        end-of-run record (:class:`ChainRecords`)."""
        mp_context = self.config["train"].get("mp_context") or ("spawn" if self.device.type == "cuda" else None)
        sites = list(self.net.sites())
        with tempfile.TemporaryDirectory(prefix="bnnzoo-chains-") as directory:
            records = ChainRecords(num_samples, sites, directory)
            with warnings.catch_warnings():  # fewer cores than chains: MCMC runs them in turn, as intended
                warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
                mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                            mp_context=mp_context, disable_progbar=not progress,
                            save_params=sites + list(self.net.state_buffers()),  # a draw's BatchNorm statistics
                            hook_fn=records)
            mcmc.run(x, y)
            samples = mcmc.get_samples(group_by_chain=True)
            return samples, records.collect(samples)

    def _run_chain_groups(self, kernel, warmup_steps: int, num_samples: int, x, y, progress: bool, parallel,
                          num_chains: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Data parallel with several chains: the ranks split into ``num_chains`` groups of consecutive
        ranks (:func:`~bnnzoo.guides.data_parallel.chain_groups`), each group runs one chain
        data-parallel over its ranks (chain 0 from the fit's random state, chain ``c`` from
        :func:`~bnnzoo.guides.data_parallel.chain_seed`), then every rank gathers every chain."""
        if parallel.world_size % num_chains:
            raise ConfigError(f"{self.name}: num_chains={num_chains} chains cannot share {parallel.world_size} "
                              f"data-parallel ranks equally (give a number of ranks divisible by num_chains)")
        chain, group = chain_groups(parallel, num_chains)
        if chain > 0:
            set_seed(chain_seed(self.config.get("seed", 0), chain))
        with data_parallel(group):
            samples, records = self._run_mcmc(kernel, warmup_steps, num_samples, x, y,
                                              progress and parallel.is_main, 1)
        gathered: list = [None] * parallel.world_size
        mine = ({s: v.detach().cpu() for s, v in samples.items()}, records[0])
        torch.distributed.all_gather_object(gathered, mine, group=parallel.group)
        heads = [gathered[c * group.world_size] for c in range(num_chains)]
        samples = {s: torch.cat([h[0][s] for h in heads]).to(self.device) for s in heads[0][0]}
        return samples, [h[1] for h in heads]

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
        history = TrainingHistory()
        for c in chains:
            history.extend(c["epochs"])
        history.extra["chains"] = [c["history"] for c in chains]
        history.extra["state_bytes"] = chains[0].get("state_bytes", {})
        self.history = history

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

    def arviz_draws_per_chain(self, num_samples: int) -> int:
        """ArviZ gets every stored draw of every chain (``num_samples`` does not apply)."""
        return next(iter(self.samples.values())).shape[1] if self.samples else 0

    def arviz_sample_stats(self) -> dict[str, torch.Tensor]:
        """Each chain's per-sample record at its stored draws, under ArviZ's names where it has one:
        ``lp`` (minus the kernel's recorded potential ``U``: its estimate of the log joint density up
        to a constant, from the minibatches seen since the previous sample), ``step_size``; the rest (pruned fractions, ``pi``, ...) under the kernel's
        own names. The global ``step`` counter is not a statistic and is left out."""
        stats = stored_draw_records(self.history.extra.get("chains", []), self.arviz_draws_per_chain(0), self.device)
        stats.pop("step", None)
        if "potential" in stats:
            stats["lp"] = -stats.pop("potential")
        return stats

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
