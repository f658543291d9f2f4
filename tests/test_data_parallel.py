"""Data-parallel fits (guides/data_parallel.py, bnnzoo/distributed.py): two gloo processes spawned by
the tests, each bounded in time, against the single-process fit on the same global minibatches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bnnzoo
from bnnzoo import cli as cli_module
from bnnzoo import distributed
from bnnzoo.cli import main
from bnnzoo.data import load_dataset
from bnnzoo.errors import ConfigError, RunError
from bnnzoo.guides import LocalReparamELBO
from bnnzoo.guides import data_parallel as data_parallel_module
from bnnzoo.guides.data_parallel import (
    DataParallel,
    current,
    data_parallel,
    example_noise,
    example_noise_flat,
    example_slice,
    noise_blocks,
)
from bnnzoo.guides.tdamp_em import m_step
from bnnzoo.guides.training import _rank_loss, fit_svi, minibatches

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

#: seconds a spawned 2-process job may take before the test fails
TIMEOUT_S = 90.0

#: Boston's 455 training rows in global batches of 227: 227, 227 (split 113 / 114 between the two
#: ranks) and a last batch of one example (rank 0 then computes the prior part alone)
SVI_OPTIONS = {"epochs": 2, "batch_size": 227, "lr": 0.01}
SGHMC_OPTIONS = {"epochs": 4, "batch_size": 227, "cycles": 2, "samples_per_cycle": 2, "thinning": 1, "em_start": 0,
                 "prune_start": 3, "precondition": "always"}


def _count_all_reduce() -> list[int]:
    """Wrap this process's ``torch.distributed.all_reduce`` so that every call appends the size of
    its tensor to the returned list (a spawned rank's own process: nothing to restore)."""
    calls = []
    all_reduce = torch.distributed.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counted
    return calls


def _fit_rank(parallel: DataParallel, device, name: str, options: dict, out: str) -> None:
    """A rank of a spawned job: the fit of ``name`` on Boston, its state saved as ``rank<r>.pt`` with
    the number of ``all_reduce`` calls it made."""
    calls = _count_all_reduce()
    posterior = bnnzoo.fit(name, None, seed=3, device=device, progress=False, **options)
    torch.save(dict(_state(posterior), all_reduce=calls), Path(out) / f"rank{parallel.rank}.pt")


def _state(posterior) -> dict:
    if hasattr(posterior, "samples") and posterior.samples:
        tensors = {f"samples.{k}": v.detach().cpu() for k, v in posterior.samples.items()}
    else:
        tensors = {f"guide.{k}": v.detach().cpu() for k, v in posterior.guide.state_dict().items()}
    tensors.update({f"model.{k}": v.detach().cpu() for k, v in posterior.model.state_dict().items()})
    return {"tensors": tensors, "loss": list(posterior.history.loss)}


def _spawn_fit(name: str, options: dict, tmp_path: Path) -> list[dict]:
    distributed.spawn(_fit_rank, 2, name, options, str(tmp_path), device="cpu", timeout_s=TIMEOUT_S, threads=1)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_meanfield_vi_two_ranks_equal_single_process_fit(tmp_path, one_rank_group):
    """The 2-rank fit equals the fit of one process in a 1-rank world (``torchrun --nproc-per-node 1``),
    whose per-example noise is drawn block by block as the ranks draw it."""
    ranks = _spawn_fit("meanfield-vi", SVI_OPTIONS, tmp_path)
    with one_rank_group():
        single = _state(bnnzoo.fit("meanfield-vi", None, seed=3, device="cpu", progress=False, **SVI_OPTIONS))
    plain = _state(bnnzoo.fit("meanfield-vi", None, seed=3, device="cpu", progress=False, **SVI_OPTIONS))
    _assert_close(ranks[0]["tensors"], ranks[1]["tensors"], atol=0.0)  # the ranks hold one posterior
    _assert_close(ranks[0]["tensors"], single["tensors"], atol=1e-5)
    # one collective per step (3 global batches per epoch) for the gradients, one per epoch for the loss
    num_params = sum(v.numel() for k, v in single["tensors"].items() if k.startswith("guide."))
    assert sorted(ranks[0]["all_reduce"]) == sorted([num_params + 1] * 6 + [1] * 2)
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # the fit moved: the comparison is not between two unfitted guides
    start = _state(bnnzoo.create("meanfield-vi", "regression", (13,), 1, seed=3, device="cpu"))["tensors"]
    moved = max(float((single["tensors"][k] - v).abs().max()) for k, v in start.items() if k.startswith("guide."))
    assert moved > 1e-3
    # a fit outside any group draws the same distributions from another stream: close, not equal
    assert plain["loss"] != pytest.approx(single["loss"], rel=1e-5)
    assert plain["loss"][-1] == pytest.approx(single["loss"][-1], rel=0.1)


@pytest.mark.filterwarnings("ignore:the pruning rule would remove")
def test_sghmc_two_ranks_hold_one_chain_equal_to_single_process(tmp_path):
    ranks = _spawn_fit("spike-slab-sghmc", SGHMC_OPTIONS, tmp_path)
    single = _state(bnnzoo.fit("spike-slab-sghmc", None, seed=3, device="cpu", progress=False, **SGHMC_OPTIONS))
    _assert_close(ranks[0]["tensors"], ranks[1]["tensors"], atol=0.0)  # identical samples on both ranks
    _assert_close(ranks[0]["tensors"], single["tensors"], atol=1e-5)
    assert len(ranks[0]["all_reduce"]) == 4 * 3  # one collective per step: gradient and statistic together
    draws = next(v for k, v in single["tensors"].items() if k.startswith("samples."))
    assert draws.shape[1] > 1 and not torch.equal(draws[0, 0], draws[0, -1])  # a moving chain of several draws


@pytest.mark.filterwarnings("ignore:the pruning rule would remove")
def test_sghmc_chains_as_groups_of_ranks(tmp_path):
    """2 ranks, 2 chains (groups of one rank; ``CHAIN_GROUP_RANKS=4`` runs 2 chains of 2 ranks each):
    every rank ends with both chains; chain 0 is the 1-process chain of the same seed, chain 1 another."""
    world = int(os.environ.get("CHAIN_GROUP_RANKS", "2"))
    options = dict(SGHMC_OPTIONS, epochs=2, cycles=2, samples_per_cycle=1, num_chains=2)
    distributed.spawn(_fit_rank, world, "spike-slab-sghmc", options, str(tmp_path), device="cpu",
                      timeout_s=TIMEOUT_S, threads=1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for other in ranks[1:]:
        _assert_close(ranks[0]["tensors"], other["tensors"], atol=0.0)
    single = _state(bnnzoo.fit("spike-slab-sghmc", None, seed=3, device="cpu", progress=False,
                               **dict(options, num_chains=1)))
    for key, value in single["tensors"].items():
        if key.startswith("samples."):
            assert ranks[0]["tensors"][key].shape[0] == 2
            torch.testing.assert_close(ranks[0]["tensors"][key][:1], value, atol=1e-5, rtol=0)
            assert not torch.allclose(ranks[0]["tensors"][key][1], value[0], atol=1e-3)


def test_cli_devices_2_writes_one_run_that_loads(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "map", "--devices", "2", "--device", "cpu", "--epochs", "2",
                                       "--batch-size", "128", "--checkpoint-every", "1", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("saved to") == 1
    assert sorted(p.name for p in out.iterdir() if p.name == "checkpoint") == []
    posterior = bnnzoo.load(out)
    metrics = json.loads((out / "metrics.json").read_text())
    dataset = load_dataset(None)
    assert posterior.fit_state is not None and len(posterior.history.loss) == 2
    assert metrics["rmse"] == pytest.approx(float(posterior.evaluate(dataset.x_test, dataset.y_test)["rmse"]),
                                            rel=1e-4)


@pytest.mark.parametrize("devices", [0, -1])
def test_cli_refuses_bad_devices(tmp_path, devices):
    result = CliRunner().invoke(main, ["fit", "map", "--devices", str(devices), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "devices must be a positive integer" in result.output
    assert not (tmp_path / "r").exists()


def test_entries_without_a_data_parallel_fit_are_refused(tmp_path, monkeypatch):
    """Every built-in entry fits data-parallel; an entry outside :data:`DATA_PARALLEL_ENTRIES` (an
    entry-point plugin's) is refused, here ``map`` taken off the list."""
    monkeypatch.setattr(distributed, "DATA_PARALLEL_ENTRIES", tuple(e for e in distributed.DATA_PARALLEL_ENTRIES
                                                                    if e != "map"))
    result = CliRunner().invoke(main, ["fit", "map", "--devices", "2", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "map has no data-parallel fit" in result.output
    with pytest.raises(ConfigError, match="no data-parallel fit"):
        with data_parallel(DataParallel(0, 1)):
            bnnzoo.fit("map", None, progress=False)


def test_check_devices_errors(monkeypatch):
    with pytest.raises(ConfigError, match="positive integer"):
        distributed.check_devices(1.5, "cpu")
    with pytest.raises(ConfigError, match="positive integer"):
        distributed.check_devices(True, "cpu")
    if torch.cuda.device_count() < 64:  # no CUDA, or fewer devices than processes
        with pytest.raises(ConfigError, match="CUDA"):
            distributed.check_devices(64, "cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        distributed.check_devices(2, "tpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.check_devices(2, "cpu")


def _rank_draws(batch: int, world: int, draw) -> list[torch.Tensor]:
    """Each rank's ``draw(rows)`` inside its slice of a global batch of ``batch``, every rank from the
    same random state (seed 0), as the ranks of a data-parallel step run it; checks that every rank
    leaves the global random state where the others do."""
    parts, after = [], []
    for rank in range(world):
        start, stop = DataParallel(rank, world).bounds(batch)
        if start == stop:
            continue
        torch.manual_seed(0)
        with example_slice(batch, start, stop):
            parts.append(draw(stop - start))
        after.append(torch.randn(3))
    assert all(torch.equal(a, after[0]) for a in after)  # the shared random state advanced alike
    return parts


@pytest.mark.parametrize("batch", [1, 7, 64, 227, 256])
def test_example_noise_of_any_world_size_is_the_one_rank_draw(batch):
    """The ranks' rows put together are the 1-rank world's draw of the global batch, whatever the
    number of ranks (a rank may hold no example when the batch is smaller than the world)."""
    one = _rank_draws(batch, 1, lambda rows: example_noise((rows, 3, 2)))[0]
    assert one.shape == (batch, 3, 2)
    for world in (2, 3, 5, 8, 16):
        parts = _rank_draws(batch, world, lambda rows: example_noise((rows, 3, 2)))
        torch.testing.assert_close(torch.cat(parts), one, atol=0, rtol=0)
    with example_slice(7, 2, 5), pytest.raises(RuntimeError, match="3 examples"):
        example_noise((4, 5))


def test_example_noise_draws_only_the_blocks_of_the_rank(monkeypatch):
    """A rank draws the blocks that hold its rows and no others: with 2 ranks and a batch of 256,
    4 of the 8 blocks of 32 rows each, and so half the global batch's draws."""
    drawn = []
    real = data_parallel_module._block_generator

    def spy(device, seed):
        drawn.append(seed)
        return real(device, seed)

    monkeypatch.setattr(data_parallel_module, "_block_generator", spy)
    assert noise_blocks(256) == (32, 8) and noise_blocks(227) == (29, 8) and noise_blocks(5) == (1, 5)
    torch.manual_seed(0)
    seeds = torch.empty(8, dtype=torch.int64).random_().tolist()
    for rank, mine in ((0, seeds[:4]), (1, seeds[4:])):
        drawn.clear()
        torch.manual_seed(0)
        with example_slice(256, *DataParallel(rank, 2).bounds(256)):
            example_noise((128, 20, 24, 24))
        assert drawn == mine
    drawn.clear()
    torch.manual_seed(0)
    with example_slice(227, *DataParallel(1, 2).bounds(227)):  # rows [113, 227): blocks 3 to 7 of 29 rows
        example_noise((114, 4))
    assert drawn == seeds[3:8]


def test_example_noise_blocks_are_independent_standard_normals():
    """Inside a slice the draws are standard normal and the blocks independent (different seeds):
    moments, and the correlation between the rows of neighbouring blocks."""
    torch.manual_seed(0)
    with example_slice(512, 0, 512):
        z = example_noise((512, 4096))
    assert abs(float(z.mean())) < 3 * (1 / z.numel()) ** 0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / z.numel()) ** 0.5
    rows, _ = noise_blocks(512)
    corr = torch.corrcoef(torch.stack([z[:rows].reshape(-1), z[rows:2 * rows].reshape(-1)]))[0, 1]
    assert abs(float(corr)) < 4 / (rows * 4096) ** 0.5
    torch.manual_seed(0)
    alone = example_noise((512, 4096))
    torch.manual_seed(0)
    torch.testing.assert_close(alone, torch.randn(512, 4096), atol=0, rtol=0)  # alone: one plain draw


def test_example_noise_flat_of_any_world_size_is_the_one_rank_draw():
    """The flat draws (the step's head, then every layer's rows): the head is the same on every rank and
    every layer's rows put together are the 1-rank world's; alone, one plain draw."""
    batch, head, widths = 45, 4, [3, 2]

    def layers(flat: torch.Tensor, rows: int) -> list[torch.Tensor]:
        return [block.view(rows, w) for block, w in zip(flat[head:].split([rows * w for w in widths]), widths)]

    one = _rank_draws(batch, 1, lambda rows: example_noise_flat(head, widths, rows))[0]
    for world in (2, 3, 4):
        parts = _rank_draws(batch, world, lambda rows: example_noise_flat(head, widths, rows))
        sizes = [DataParallel(r, world).bounds(batch) for r in range(world)]
        for part in parts:
            torch.testing.assert_close(part[:head], one[:head], atol=0, rtol=0)
        for layer, whole in enumerate(layers(one, batch)):
            rows = torch.cat([layers(p, b - a)[layer] for p, (a, b) in zip(parts, sizes)])
            torch.testing.assert_close(rows, whole, atol=0, rtol=0)
    torch.manual_seed(1)
    whole = torch.randn(head + 6 * sum(widths))
    torch.manual_seed(1)
    torch.testing.assert_close(example_noise_flat(head, widths, 6), whole, atol=0, rtol=0)


@pytest.mark.cuda
def test_example_noise_on_cuda_is_the_one_rank_draw():
    one = _rank_draws(256, 1, lambda rows: example_noise((rows, 5), device="cuda"))[0]
    assert one.device.type == "cuda"
    parts = _rank_draws(256, 2, lambda rows: example_noise((rows, 5), device="cuda"))
    torch.testing.assert_close(torch.cat(parts), one, atol=0, rtol=0)


def test_rank_bounds_tile_the_batch():
    for world in (1, 2, 3, 4):
        for batch in (1, 2, 7, 32):
            parts = [DataParallel(r, world).bounds(batch) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    with pytest.raises(ValueError, match="outside"):
        DataParallel(2, 2)


def test_torchrun_environment_is_detected(monkeypatch):
    for var in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched_by_torchrun()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched_by_torchrun()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RunError, match="MASTER_ADDR"):
        with distributed.process_group("cpu"):
            pass
    assert os.environ["RANK"] == "1"


def test_torchrun_rank_path_of_the_cli(tmp_path, monkeypatch):
    """The branch ``torchrun ... -m bnnzoo fit`` takes on every rank, here as the single rank of a
    1-process gloo group joined through the torchrun variables: it fits inside the group, saves the
    run and leaves no process group behind."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(distributed.free_port()))
    seen = []
    real = cli_module._fit_and_save

    def spy(main_rank, device, job):
        seen.append(current())
        return real(main_rank, device, job)

    monkeypatch.setattr(cli_module, "_fit_and_save", spy)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "map", "--device", "cpu", "--epochs", "1", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen and seen[0] is not None and seen[0].world_size == 1
    assert not torch.distributed.is_initialized()
    assert bnnzoo.load(out).fit_state is not None
    result = CliRunner().invoke(main, ["fit", "map", "--devices", "2", "--out", str(tmp_path / "other")])
    assert result.exit_code != 0 and "torchrun" in result.output


@pytest.mark.parametrize("name", ["map", "meanfield-vi", "horseshoe-svi"])
@pytest.mark.parametrize("batch", [45, 1])
def test_rank_losses_sum_to_the_one_rank_loss(name, batch):
    """The ranks' shares of an SVI step (:func:`~bnnzoo.guides.training._rank_loss`), computed here one
    after the other from the same random state as the ranks would, sum to the 1-rank loss of the
    global batch, and so do their gradients: the likelihood scaled to the global batch, the KL counted
    once, the per-example noise the rank's rows of the global batch's draw (a batch of 1 leaves a rank
    empty)."""
    posterior = bnnzoo.create(name, "regression", (13,), 1, seed=0, device="cpu")
    data = load_dataset(None)
    x = (data.x_train - data.x_train.mean(0)) / data.x_train.std(0)
    y = (data.y_train - data.y_train.mean()) / data.y_train.std()
    loss_fn = (posterior.elbo or LocalReparamELBO())(posterior.model, posterior.guide)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:batch]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    loss = _rank_loss(loss_fn, x[idx], y[idx], len(x), DataParallel(0, 1))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for world in (2, 3):
        total, summed = 0.0, [torch.zeros_like(p) for p in params]
        for rank in range(world):
            torch.set_rng_state(state)
            part = _rank_loss(loss_fn, x[idx], y[idx], len(x), DataParallel(rank, world))
            total = total + part.detach()
            for s, g in zip(summed, torch.autograd.grad(part, params, allow_unused=True)):
                if g is not None:
                    s += g
        torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-5)
        for s, g in zip(summed, grads):
            torch.testing.assert_close(s, torch.zeros_like(s) if g is None else g, rtol=1e-4, atol=1e-5)


class _SpyCheckpoint:
    def __init__(self):
        self.calls = []

    def restore(self, loop):
        self.calls.append("restore")

    def epoch_end(self, loop):
        self.calls.append("epoch_end")

    def interrupted(self, loop):
        self.calls.append("interrupted")


def test_only_rank_0_writes_checkpoints(one_rank_group):
    """A rank other than 0 restores the checkpoint it is given but never writes one; rank 0 does both.
    (A 1-process gloo group stands in for the world; the ranks' collectives then sum one part.)"""
    posterior = bnnzoo.create("meanfield-vi", "regression", (3,), 1, seed=0, device="cpu")
    x, y = torch.randn(40, 3), torch.randn(40)
    spies = {}
    with one_rank_group():
        for rank in (0, 1):
            spies[rank] = _SpyCheckpoint()
            with data_parallel(DataParallel(rank, 2)):
                fit_svi(posterior.model, posterior.guide, x, y, elbo=LocalReparamELBO(), epochs=2, batch_size=16,
                        lr=1e-3, progress=False, checkpoint=spies[rank])
    assert spies[0].calls == ["restore", "epoch_end", "epoch_end"]
    assert spies[1].calls == ["restore"]


# ---- EM-TDAMP ---------------------------------------------------------------------------------------
#: Boston's 455 rows in global batches of 50 (9 of 50, split 25 / 25, whose first 32 examples, behind
#: the step control, lie on both ranks, and a last batch of 5 split 2 / 3), float32 through the catalog
TDAMP_OPTIONS = {"epochs": 2, "batch_size": 50, "validation_fraction": None, "network": {"arch": "mlp", "hidden": [16]}}
#: the guide-level passes in float64: synthetic rows, options, batch size, passes, M-step options
TDAMP_GUIDE_CASES = {
    # 203 rows in batches of 40 (20 / 20 per rank; a last batch of 3, split 1 / 2), two turbo iterations
    # per batch (two collectives per step), slab variances and noise learned
    "regression": dict(rows=203, options={"turbo_iterations": 2}, batch_size=40, passes=3,
                       m_step={"learn_slab_var": True}),
    # 121 rows in batches of 30 (a last batch of one example: rank 0 computes nothing and adds zeros),
    # the probit noise M-step on the outputs of every example gathered from the ranks
    "classification": dict(rows=121, options={}, batch_size=30, passes=2, m_step={"learn_probit_noise": True}),
}


def _tdamp_guide(task: str):
    """A float64 EM-TDAMP guide (hidden widths 8 and 6) and synthetic data for ``task`` (seeded alike
    in every process)."""
    case = TDAMP_GUIDE_CASES[task]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(case["rows"] + 40, 5, generator=gen, dtype=torch.float64)
    if task == "regression":
        y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * torch.randn(len(x), generator=gen, dtype=torch.float64)
    else:
        y = (x[:, :3] + 0.3 * torch.randn(len(x), 3, generator=gen, dtype=torch.float64)).argmax(1)
    posterior = bnnzoo.create("em-tdamp", task, (5,), 1 if task == "regression" else 3, seed=5, device="cpu",
                              network={"arch": "mlp", "hidden": [8, 6]}, **case["options"])
    posterior.model.double()
    guide = posterior.guide.double()
    guide.collect_outputs = bool(case["m_step"].get("learn_probit_noise"))
    return guide, x[:case["rows"]], y[:case["rows"]], x[case["rows"]:]


def _tdamp_passes(task: str) -> dict:
    """EM-TDAMP passes (TDAMP over the shuffled minibatches, then the M-step) of the float64 guide of
    ``task``; the beliefs, the learned noise, the pass statistics and the predictive means after them."""
    case = TDAMP_GUIDE_CASES[task]
    guide, x, y, x_new = _tdamp_guide(task)
    start = guide.state()
    for _ in range(case["passes"]):
        guide.reset_statistics()
        for idx in minibatches(len(x), case["batch_size"], x.device):
            guide.update(x[idx], y[idx], len(x))
        m_step(guide, **case["m_step"])
    state = guide.state()
    out = {f"{what}.{k}": v for what in ("inclusion", "slab_mean", "slab_var") for k, v in state[what].items()}
    out.update({k: state[k] for k in ("noise_var", "log_evidence_sum", "num_seen")})
    out["prior_var"] = torch.cat(list(state["prior_var"].values()))
    with torch.no_grad():
        out["predictive_mean"] = guide.propagate(x_new)[0]
    out["moved"] = max(float((state["slab_mean"][k] - v).abs().max()) for k, v in start["slab_mean"].items())
    return out


def _tdamp_fit_state(posterior) -> dict:
    state = posterior.guide.state()
    out = {f"{what}.{k}": v for what in ("inclusion", "slab_mean", "slab_var") for k, v in state[what].items()}
    out["noise_var"] = state["noise_var"]
    out["predictive_mean"] = posterior.predict(load_dataset(None).x_test, num_samples=20, seed=0).mean
    out["loss"] = torch.tensor(posterior.history.loss)
    return out


def _tdamp_rank(parallel: DataParallel, device, out: str) -> None:
    """A rank of the EM-TDAMP job: the float64 guide passes of both tasks and the catalog fit on
    Boston, with the sizes of the ``all_reduce`` calls of each."""
    calls = _count_all_reduce()
    results = {}
    for task in TDAMP_GUIDE_CASES:
        calls.clear()
        results[task] = dict(_tdamp_passes(task), all_reduce=list(calls))
    calls.clear()
    posterior = bnnzoo.fit("em-tdamp", None, seed=3, device=device, progress=False, **TDAMP_OPTIONS)
    results["fit"] = dict(_tdamp_fit_state(posterior), all_reduce=list(calls))
    torch.save(results, Path(out) / f"tdamp{parallel.rank}.pt")


@pytest.fixture(scope="module")
def tdamp_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tdamp")
    distributed.spawn(_tdamp_rank, 2, str(out), device="cpu", timeout_s=TIMEOUT_S, threads=1)
    return [torch.load(out / f"tdamp{r}.pt") for r in range(2)]


def _tdamp_collectives(task: str, batches: list[int]) -> list[int]:
    """The size of each step's one flat buffer: per layer the curvature and gradient ``(K, I + 1)`` and
    the step control's rows (inputs ``(r, I + 1)``, per-example curvatures and pre-activation
    variances ``(r, K)``, ``r = min(B, 32)``), then on a batch's first exchange its log evidence, and
    its residual sum (regression) or every example's output moments (the probit noise M-step)."""
    layers = [(8, 6), (6, 9), (1 if task == "regression" else 3, 7)]  # (K, I + 1)
    outputs = 1 if task == "regression" else 3
    sizes = []
    for batch in batches:
        rows = min(batch, 32)
        per_layer = sum(2 * k * i + rows * i + 2 * rows * k for k, i in layers)
        first = per_layer + 1 + (1 if task == "regression" else 2 * batch * outputs)
        sizes += [first] + [per_layer] * (TDAMP_GUIDE_CASES[task]["options"].get("turbo_iterations", 1) - 1)
    return sizes


@pytest.mark.parametrize("task", list(TDAMP_GUIDE_CASES))
def test_tdamp_two_rank_passes_equal_the_one_rank_passes(tdamp_ranks, task):
    """In float64, the EM-TDAMP passes of two ranks (each Module A on its half of every global
    minibatch, the precision-weighted sums all-reduced) end with the beliefs, learned noise, pass
    statistics and predictions of the one-process passes, to 1e-6 (the summation order alone differs)."""
    single = _tdamp_passes(task)
    ranks = [{k: v for k, v in r[task].items() if k not in ("all_reduce", "moved")} for r in tdamp_ranks]
    expected = {k: v for k, v in single.items() if k != "moved"}
    _assert_close(ranks[0], ranks[1], atol=0.0)  # the ranks hold one state
    _assert_close(ranks[0], expected, atol=1e-6)
    case = TDAMP_GUIDE_CASES[task]
    assert float(single["num_seen"]) == case["rows"]
    inclusion = torch.cat([v for k, v in single.items() if k.startswith("inclusion.")])
    assert bool(((inclusion > 0.01) & (inclusion < 0.99)).any())  # inclusion probabilities that are not saturated
    assert single["moved"] > 1e-2  # the passes moved the beliefs
    batches = [min(case["batch_size"], case["rows"] - s) for s in range(0, case["rows"], case["batch_size"])]
    assert tdamp_ranks[0][task]["all_reduce"] == _tdamp_collectives(task, batches) * case["passes"]


def test_tdamp_two_rank_catalog_fit_equals_the_one_process_fit(tdamp_ranks):
    """``bnnzoo.fit("em-tdamp", ...)`` inside a 2-rank process group (float32, Boston, M-step and
    pruning as configured) equals the 1-process fit: beliefs and learned noise to 1e-6 (standardised
    units), the predictive means to 1e-6 relative (original units)."""
    single = _tdamp_fit_state(bnnzoo.fit("em-tdamp", None, seed=3, device="cpu", progress=False, **TDAMP_OPTIONS))
    ranks = [{k: v for k, v in r["fit"].items() if k != "all_reduce"} for r in tdamp_ranks]
    _assert_close(ranks[0], ranks[1], atol=0.0)
    prediction = ranks[0].pop("predictive_mean")
    torch.testing.assert_close(prediction, single.pop("predictive_mean"), rtol=1e-6, atol=0)
    _assert_close(ranks[0], single, atol=1e-6)
    assert len(tdamp_ranks[0]["fit"]["all_reduce"]) == 2 * 10  # one collective per minibatch step: 10 per pass


def test_cli_devices_2_fits_em_tdamp_into_one_run(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", "em-tdamp", "--devices", "2", "--device", "cpu", "--epochs", "2",
                                       "--batch-size", "100", "--set", "validation_fraction=null", "--network", "mlp",
                                       "--hidden", "8", "--checkpoint-every", "1", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("saved to") == 1
    posterior = bnnzoo.load(out)
    assert len(posterior.history.loss) == 2
    single = bnnzoo.fit("em-tdamp", None, seed=0, device="cpu", progress=False, epochs=2, batch_size=100,
                        validation_fraction=None, network={"arch": "mlp", "hidden": [8]})
    for key, value in single.guide.state()["slab_mean"].items():
        torch.testing.assert_close(posterior.guide.state()["slab_mean"][key], value, atol=1e-5, rtol=0)


def test_tdamp_deep_amp_is_refused_in_data_parallel_passes():
    posterior = bnnzoo.create("em-tdamp", "regression", (3,), 1, network={"arch": "mlp", "hidden": [4]}, seed=0,
                              device="cpu", module_a="amp")
    x, y = torch.randn(8, 3), torch.randn(8)
    with data_parallel(DataParallel(0, 2)), pytest.raises(ConfigError, match="module_a='amp'"):
        posterior.guide.update(x, y, 8)


def test_only_rank_0_writes_tdamp_checkpoints(one_rank_group):
    """The EM-TDAMP passes, as :func:`fit_svi`: a rank other than 0 restores the checkpoint and never
    writes one (a 1-process gloo group stands in for the world)."""
    x, y = torch.randn(40, 3), torch.randn(40)
    spies = {}
    with one_rank_group():
        for rank in (0, 1):
            posterior = bnnzoo.create("em-tdamp", "regression", (3,), 1, network={"arch": "mlp", "hidden": [4]},
                                      seed=0, device="cpu", epochs=2, batch_size=16, validation_fraction=None)
            posterior.checkpoint = spies[rank] = _SpyCheckpoint()
            with data_parallel(DataParallel(rank, 2)):
                posterior.fit(x, y, progress=False)
    assert spies[0].calls == ["restore", "epoch_end", "epoch_end"]
    assert spies[1].calls == ["restore"]
