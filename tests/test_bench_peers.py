"""The ``peers`` benchmark suite (benchmarks/bench_peers.py) without any peer library: it imports,
records a missing peer as left out with the import error's text, scores every method with one metric
code, and gives every method and its paired plain Adam run the same batches."""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch

from bnnzoo.data.dataset import Dataset

PEER_MODULES = ("bayesian_torch", "laplace", "tyxe", "backpack")


@pytest.fixture
def no_peers(monkeypatch):
    """Make every peer library unimportable (``None`` in ``sys.modules`` raises ImportError)."""
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def toy_task(bench_peers, epochs=2):
    gen = torch.Generator().manual_seed(0)
    data = Dataset("toy", "classification", torch.rand(40, 1, 4, 4, generator=gen),
                   torch.randint(0, 3, (40,), generator=gen), torch.rand(12, 1, 4, 4, generator=gen),
                   torch.randint(0, 3, (12,), generator=gen), num_classes=3)
    return bench_peers.PeerTask("toy", data, torch.device("cpu"), epochs=epochs, batch_size=16)


def test_module_imports_without_peers(no_peers, monkeypatch):
    for name in ("benchmarks.bench_peers", "benchmarks.peers_libs"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("benchmarks.bench_peers")
    assert set(module.SUITES) == {"peers-mnist", "peers-quick"}
    assert all(callable(fn) for fn in module.SUITES.values())


def test_missing_peer_is_left_out_with_the_import_error(no_peers):
    from benchmarks import bench_peers

    peers = {name: spec for name, spec in bench_peers.METHODS.items() if spec[0] == "peer"}
    assert len(peers) == 5
    result = bench_peers.run_suite(toy_task(bench_peers), methods=peers, progress=False)
    assert set(result["left_out"]) == set(peers)
    for name, reason in result["left_out"].items():
        assert reason.split(": ")[0] in ("ImportError", "ModuleNotFoundError")
        module = "bayesian_torch" if "bayesian" in name else "tyxe" if "TyXe" in name else "laplace"
        assert module in reason
    assert list(result["methods"]) == ["plain Adam"]  # the reference still runs
    adam = result["methods"]["plain Adam"]
    assert 0 <= adam["accuracy"] <= 1 and adam["epochs"] == 2 and adam["epoch_time_ratio"] == 1.0
    assert "left out: " in result["headline"] and "TyXe mean-field" in result["headline"]
    assert "bayesian-torch Flipout: left out (" in bench_peers.table(result)


def test_run_method_passes_other_errors_on():
    from benchmarks import bench_peers

    def broken(task, adam):
        raise ValueError("a bug, not a missing library")

    with pytest.raises(ValueError):
        bench_peers.run_method(broken, None, None)
    assert bench_peers.run_method(lambda a, b: {"x": a + b}, 1, 2) == ({"x": 3}, None)


def test_score_agrees_with_a_hand_computed_example():
    from benchmarks import bench_peers

    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.62, 0.38], [0.32, 0.68]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 0])
    m = bench_peers.score(probs, y)
    # 15 bins of width 1/15: 0.9, 0.9 in bin 13 (confidence 1.8, 1 correct), 0.7 (correct) and 0.68
    # (wrong) in bin 10, 0.62 (correct) in bin 9: ECE = (0.8 + 0.38 + 0.38) / 5. With 10 bins 0.62,
    # 0.68 and 0.7 would share a bin and the ECE would be 0.8 / 5.
    assert m["ece"] == pytest.approx(1.56 / 5)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["nll"] == pytest.approx(-sum(map(math.log, (0.9, 0.1, 0.7, 0.62, 0.32))) / 5)
    assert m["brier"] == pytest.approx((0.02 + 1.62 + 0.18 + 2 * 0.38**2 + 2 * 0.68**2) / 5)


def test_every_method_and_its_plain_run_see_the_same_batches():
    from benchmarks import bench_peers

    task = toy_task(bench_peers, epochs=3)
    schedule = task.schedule()
    assert len(schedule) == 3
    assert [[b.tolist() for b in epoch] for epoch in schedule] == [[b.tolist() for b in epoch]
                                                                   for epoch in task.schedule()]
    for epoch in schedule:
        assert sorted(torch.cat(epoch).tolist()) == list(range(40))
        assert [len(b) for b in epoch] == [16, 16, 8]
    assert schedule[0][0].tolist() != schedule[1][0].tolist()  # reshuffled every epoch

    seen = []
    seconds, plain = task.train_paired(seen.append)
    assert len(seconds) == 3 and len(plain.epoch_seconds) == 3
    assert [[b.tolist() for b in epoch] for epoch in seen] == [[b.tolist() for b in epoch] for epoch in schedule]


def test_paired_plain_trains_on_exactly_the_given_batches():
    from benchmarks import bench_peers

    task = toy_task(bench_peers)
    a, b = task.plain(), task.plain()
    batches = task.schedule()[0]
    a.epoch_on(batches)
    b.epoch_on(batches)
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)
    before = [p.clone() for p in a.module.parameters()]
    a.epoch_on([])  # no batch: no step
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), before))
    a.epoch_on(batches[:1])
    assert not all(torch.equal(p, q) for p, q in zip(a.module.parameters(), before))
