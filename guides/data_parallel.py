"""Data parallelism over ``torch.distributed``: several processes (ranks) share every minibatch step
of one fit, each computing the gradient of its slice of the global minibatch.

Plain ``torch.distributed``, not ``DistributedDataParallel`` nor Lightning Fabric. A step of
:func:`~bnnzoo.guides.training.fit_svi` is ``elbo.differentiable_loss`` followed by Adam, and a step
of :class:`~bnnzoo.guides.SGHMC` is ``torch.autograd.grad`` of a potential followed by a hand-written
update: neither is the ``forward`` of one ``nn.Module``, which is what ``DistributedDataParallel``
wraps (its reducer hooks the parameters of that module's forward). What DDP does inside, this module
does by hand: the ranks' gradients are copied into one flat buffer, summed by a single
``all_reduce`` per step (:func:`all_reduce_flat`: one collective per step, not one per parameter) and
handed back as views of it. Fabric would add a dependency and a launcher for the same two
collectives, and would still leave Pyro's loss and the SGHMC kernel outside its ``backward``.

What makes an N-rank fit equal the 1-rank fit on the same global minibatches:

- the schedule: every rank draws the same shuffled global minibatch from the same random state (all
  ranks seed the global generators alike, :func:`~bnnzoo.guides.training.set_seed`) and takes its
  contiguous slice of it (:meth:`DataParallel.slice`); a 1-rank run sees the same global batches;
- the initial parameters are broadcast from rank 0 (:func:`broadcast_`);
- the loss: each rank's loss is its likelihood part scaled to the *global* batch plus an equal share
  of the prior part (the KL term of an ELBO), so the sum over ranks of the gradients is the gradient of the
  1-rank loss on the global batch (:func:`~bnnzoo.guides.training.fit_svi`);
- the noise: draws that belong to the whole step (an SGHMC step's injected noise, a weight draw, a
  horseshoe scale draw) come from the shared global generator and are the same on every rank;
  per-example draws (local reparameterisation) are made block by block: the shared generator gives
  one seed per block of the global batch and each rank draws only the blocks that hold its rows
  (:func:`example_noise`), so that example ``i`` of a global batch gets the same draw whichever rank
  computes it, and a rank's noise costs its share of the batch. A fit in one process *outside* any
  process group draws its per-example noise in one plain draw instead: the same distribution from
  another stream, so the N-rank fit equals the 1-rank world's (``torchrun --nproc-per-node 1``), not
  that fit's.

EM-TDAMP (:class:`~bnnzoo.guides.TDAMPGuide`) has no gradient: the same schedule, and in place of the
loss its minibatch message, a sum over examples, is summed over the ranks in one :func:`all_reduce_flat`
per turbo iteration before any update (:meth:`~bnnzoo.guides.TDAMPGuide.update`).

Backends: NCCL for CUDA tensors, gloo for the CPU (:func:`backend_for`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def backend_for(device) -> str:
    """The collective backend for tensors on ``device``: ``"nccl"`` for CUDA, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass(frozen=True)
class DataParallel:
    """The ranks of one data-parallel fit: this process's ``rank`` among ``world_size`` processes of
    the (default or given) process ``group``; ``root`` is the global rank of the group's rank 0 (the
    source of broadcasts; 0 for the default group)."""

    rank: int
    world_size: int
    group: object | None = None
    root: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size} processes")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that writes checkpoints and saved runs."""
        return self.rank == 0

    def bounds(self, batch: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous part of a global minibatch of ``batch``
        examples: ``[r B / W, (r + 1) B / W)`` (floors), which tile the batch; a part is empty only
        when the batch holds fewer examples than there are ranks."""
        return self.rank * batch // self.world_size, (self.rank + 1) * batch // self.world_size

    def slice(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global minibatch index tensor ``idx``."""
        start, stop = self.bounds(len(idx))
        return idx[start:stop]


_ACTIVE: list[DataParallel] = []


def current() -> DataParallel | None:
    """The data-parallel context the fits of this process run in (:func:`data_parallel`), or
    ``None``: every fit then runs on its own."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def data_parallel(parallel: DataParallel | None) -> Iterator[DataParallel | None]:
    """Run the fits inside the block data-parallel over ``parallel``'s ranks (``None``: alone)."""
    if parallel is None:
        yield None
        return
    _ACTIVE.append(parallel)
    try:
        yield parallel
    finally:
        _ACTIVE.remove(parallel)


def init_process_group(device, rank: int, world_size: int, *, init_method: str | None = None,
                       timeout_s: float = 600.0) -> DataParallel:
    """Join (creating it if needed) the default process group with the backend of ``device``
    (:func:`backend_for`). ``init_method`` defaults to ``"env://"`` (``MASTER_ADDR``, ``MASTER_PORT``).
    Returns the :class:`DataParallel` of this rank."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: data-parallel fits are not available")
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"the process group is already initialised as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not rank {rank} of {world_size}")
    return DataParallel(rank, world_size)


def all_reduce_flat(tensors: Sequence[torch.Tensor], parallel: DataParallel) -> list[torch.Tensor]:
    """Sum ``tensors`` over the ranks in one ``all_reduce`` of one flat buffer (what DDP's gradient
    buckets do); returns views of the summed buffer, shaped as the inputs. All tensors must share one
    dtype and device, and every rank must pass the same shapes in the same order."""
    tensors = list(tensors)
    if not tensors:
        return []
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"all_reduce_flat needs one dtype and device, got {t.dtype} on {t.device} "
                            f"beside {dtype} on {device}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=parallel.group)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_reduce_gradients_(params: Sequence[torch.Tensor], parallel: DataParallel) -> None:
    """Replace every parameter's ``.grad`` by its sum over the ranks, in one collective. A parameter
    without a gradient keeps none (an optimiser step skips it, as in a 1-rank step): every rank runs
    the same computation on its slice, so the parameters that receive a gradient are the same on
    every rank."""
    params = [p for p in params if p.grad is not None]
    for p, g in zip(params, all_reduce_flat([p.grad for p in params], parallel)):
        p.grad = g


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], parallel: DataParallel) -> None:
    """Overwrite ``tensors`` in place with the values of the group's rank 0 (one collective)."""
    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=parallel.root, group=parallel.group)
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view(t.shape))


def chain_groups(parallel: DataParallel, num_chains: int) -> tuple[int, DataParallel]:
    """Split the ranks of ``parallel`` (the default group) into ``num_chains`` groups of consecutive
    ranks, one chain each: returns this rank's chain and the :class:`DataParallel` of its group.
    Every rank must call it (each group is created by all ranks)."""
    if parallel.group is not None:
        raise ValueError("chain groups are made from the default process group")
    if num_chains < 1 or parallel.world_size % num_chains:
        raise ValueError(f"{parallel.world_size} ranks do not split into {num_chains} chains of equal size")
    per = parallel.world_size // num_chains
    groups = [dist.new_group(list(range(c * per, (c + 1) * per))) for c in range(num_chains)]
    chain = parallel.rank // per
    return chain, DataParallel(parallel.rank % per, per, group=groups[chain], root=chain * per)


def chain_seed(seed: int, chain: int) -> int:
    """The seed of chain ``chain`` > 0 of a data-parallel fit of several chains (chain 0 keeps the
    fit's random state): ``(seed + chain * 0x9E3779B9) mod 2**32`` (the golden-ratio step of Weyl
    sequences, so that the chains of nearby seeds do not share seeds)."""
    return (int(seed) + int(chain) * 0x9E3779B9) % 2**32


def all_reduce_sum(tensor: torch.Tensor, parallel: DataParallel) -> torch.Tensor:
    """``tensor`` summed over the ranks (a new tensor)."""
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=parallel.group)
    return out


# ---- per-example noise ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleSlice:
    """The computed examples are rows ``[start, stop)`` of a global minibatch of ``batch`` examples."""

    batch: int
    start: int
    stop: int


_EXAMPLES: list[ExampleSlice] = []


@contextmanager
def example_slice(batch: int, start: int, stop: int) -> Iterator[ExampleSlice]:
    """Inside the block, :func:`example_noise` draws for the whole global batch of ``batch`` examples
    and returns the rows ``[start, stop)``."""
    s = ExampleSlice(int(batch), int(start), int(stop))
    if not 0 <= s.start <= s.stop <= s.batch:
        raise ValueError(f"rows [{s.start}, {s.stop}) are not inside a batch of {s.batch}")
    _EXAMPLES.append(s)
    try:
        yield s
    finally:
        _EXAMPLES.remove(s)


#: the blocks a data-parallel step's global batch is cut into for its per-example noise
#: (:func:`example_noise`): 2, 4 or 8 ranks whose share of the batch is a whole number of blocks draw
#: exactly their own rows
NOISE_BLOCKS = 8

#: the generator :func:`example_noise` reseeds for each block, one per device
_BLOCK_GENERATORS: dict[torch.device, torch.Generator] = {}


def noise_blocks(batch: int) -> tuple[int, int]:
    """``(rows, blocks)``: a global batch of ``batch`` examples is cut into ``blocks`` blocks of
    ``rows = ceil(batch / NOISE_BLOCKS)`` consecutive examples (the last one may hold fewer)."""
    rows = -(-int(batch) // NOISE_BLOCKS)
    return rows, -(-int(batch) // rows)


def _block_seeds(blocks: int) -> list[int]:
    """One seed per block, from the global CPU generator (every rank holds the same random state, so
    every rank draws the same seeds; the global stream advances by one draw per block)."""
    return torch.empty(blocks, dtype=torch.int64).random_().tolist()


def _block_generator(device: torch.device, seed: int) -> torch.Generator:
    """The device's block generator reseeded with ``seed``: the CPU's (MT19937) takes the low 32 bits,
    a CUDA generator (Philox) all 63."""
    generator = _BLOCK_GENERATORS.get(device)
    if generator is None:
        generator = _BLOCK_GENERATORS[device] = torch.Generator(device=device)
    return generator.manual_seed(seed & 0xFFFFFFFF if device.type == "cpu" else seed)


def _blocked_rows(s: ExampleSlice, widths: Sequence[tuple[int, ...]], device, dtype) -> list[torch.Tensor]:
    """For each per-example shape in ``widths``, the draws of rows ``[s.start, s.stop)`` of a global
    batch drawn block by block: block ``k`` (rows ``[k R, (k + 1) R)``) draws from a generator seeded
    with the ``k``-th of the call's seeds, the shapes one after the other, each in full (so every
    rank draws a block alike); only the blocks that hold this rank's rows are drawn."""
    rows, blocks = noise_blocks(s.batch)
    seeds = _block_seeds(blocks)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    first, last = s.start // rows, max(-(-s.stop // rows), s.start // rows + 1)
    lo, hi = first * rows, min(last * rows, s.batch)
    outs = [torch.empty((hi - lo, *w), device=device, dtype=dtype) for w in widths]
    for k in range(first, last):
        generator = _block_generator(device, seeds[k])
        a, b = k * rows - lo, min((k + 1) * rows, s.batch) - lo
        for out in outs:
            out[a:b].normal_(generator=generator)
    return [out[s.start - lo:s.stop - lo] for out in outs]


def example_noise(shape, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws for a tensor of ``shape`` whose first dimension indexes the examples of
    the current minibatch (local reparameterisation's one draw per example and unit).

    Alone, ``torch.randn(shape)``. Inside :func:`example_slice` (a data-parallel step), the rows
    ``[start, stop)`` of the global batch's draw made block by block (:func:`noise_blocks`): the
    global generator gives one seed per block of the global batch, the same on every rank, and each
    rank draws only the blocks that hold its rows, each from its own generator seeded with that
    block's seed. An example thus gets the same draw whichever rank computes it (any number of ranks,
    one included), and a rank draws its own rows, not the whole global batch's. The CPU's block
    generator (MT19937) takes 32-bit seeds: of ``n`` blocks drawn in a fit, about ``n^2 / 2^33`` pairs
    share a seed (about 100 pairs in a million blocks), which repeats those blocks' noise."""
    shape = tuple(shape)
    if not _EXAMPLES:
        return torch.randn(shape, device=device, dtype=dtype)
    s = _EXAMPLES[-1]
    if shape[0] != s.stop - s.start:
        raise RuntimeError(f"example_noise: a draw for {shape[0]} examples inside a data-parallel step that "
                           f"computes {s.stop - s.start} examples of a global batch of {s.batch}")
    return _blocked_rows(s, [shape[1:]], device, dtype or torch.get_default_dtype())[0]


def example_noise_flat(head: int, widths: Sequence[int], batch: int, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws laid out flat as ``[head | (batch, widths[0]) | (batch, widths[1]) | ...]``:
    ``head`` draws of the whole step, then one block per layer of one draw per example and unit
    (row-major). Alone, ``torch.randn(head + batch * sum(widths))``; inside :func:`example_slice`,
    ``head`` draws from the global generator (the same on every rank), then this rank's rows of every
    layer's draw made block by block as in :func:`example_noise` (one seed per block for all layers)."""
    if not _EXAMPLES:
        return torch.randn(head + batch * sum(widths), device=device, dtype=dtype)
    s = _EXAMPLES[-1]
    if batch != s.stop - s.start:
        raise RuntimeError(f"example_noise_flat: a draw for {batch} examples inside a data-parallel step that "
                           f"computes {s.stop - s.start} examples of a global batch of {s.batch}")
    head_draws = torch.randn(head, device=device, dtype=dtype)
    parts = _blocked_rows(s, [(w,) for w in widths], head_draws.device, head_draws.dtype)
    return torch.cat([head_draws, *(p.reshape(-1) for p in parts)])


__all__ = ["DataParallel", "ExampleSlice", "all_reduce_flat", "all_reduce_gradients_", "all_reduce_sum",
           "backend_for", "broadcast_", "chain_groups", "chain_seed", "current", "data_parallel", "example_noise", "example_noise_flat",
           "example_slice", "init_process_group", "noise_blocks", "NOISE_BLOCKS"]
