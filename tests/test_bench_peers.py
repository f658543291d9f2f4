"""The ``peers`` benchmark suites (benchmarks/bench_peers.py, benchmarks/bench_peers_boston.py)
without any peer library: they import, record a missing peer as left out with the import error's
text, score every method with one metric code, give every method and its paired plain Adam run the
same batches, and turn one bnnzoo fit into a row per predictive."""

from __future__ import annotations

import importlib
import math
import pkgutil
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
    for name in ("benchmarks.bench_peers", "benchmarks.peers_libs", "benchmarks.bench_peers_boston"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("benchmarks.bench_peers")
    assert set(module.SUITES) == {"peers-mnist", "peers-quick", "peers-lenet5", "peers-lenet5-quick"}
    assert all(callable(fn) for fn in module.SUITES.values())
    boston = importlib.import_module("benchmarks.bench_peers_boston")
    assert set(boston.SUITES) == {"peers-boston", "peers-boston-quick"}
    assert all(callable(fn) for fn in boston.SUITES.values())


def test_suites_are_found_by_the_runner():
    # benchmarks.run.all_suites imports every benchmarks/bench_*.py module and merges their SUITES
    import benchmarks

    found = {info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name.startswith("bench_")}
    assert {"bench_peers", "bench_peers_boston"} <= found


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


def test_lenet5_task_builds_the_same_network_for_bnnzoo_and_the_peers():
    from benchmarks import bench_peers

    gen = torch.Generator().manual_seed(0)
    data = Dataset("toy", "classification", torch.rand(8, 1, 28, 28, generator=gen),
                   torch.randint(0, 10, (8,), generator=gen), torch.rand(4, 1, 28, 28, generator=gen),
                   torch.randint(0, 10, (4,), generator=gen), num_classes=10)
    task = bench_peers.PeerTask("toy", data, torch.device("cpu"), arch=bench_peers.CONV_ARCH)
    assert task.network().name == "lenet5"
    module = task.torch_network()
    assert any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    assert module(task.x_test).shape == (4, 10)


# ---- bnnzoo rows: one fit, a row per predictive ---------------------------------------------------------
def test_bnnzoo_fit_gives_the_default_row_and_a_row_per_other_predictive(no_peers):
    from benchmarks import bench_peers

    task = toy_task(bench_peers, epochs=1)
    task.bnnzoo_options = {"epochs": 1}
    methods = {"bnnzoo meanfield-vi": bench_peers.METHODS["bnnzoo meanfield-vi"]}
    result = bench_peers.run_suite(task, methods=methods, progress=False)
    rows = result["methods"]
    default = rows["bnnzoo meanfield-vi"]
    chosen = default["calibration"]["predictive"]  # chosen on the fit's validation rows
    assert default["predict_method"] == chosen
    others = [m for m in ("sample", "moments", "probit") if m != chosen]
    assert list(rows) == ["plain Adam", "bnnzoo meanfield-vi"] + [f"bnnzoo meanfield-vi ({m})" for m in others]
    by_method = {chosen: default, **{m: rows[f"bnnzoo meanfield-vi ({m})"] for m in others}}
    assert by_method["sample"]["predict_method"] == "sample" and by_method["sample"]["predict_samples"] > 0
    assert by_method["moments"]["predict_samples"] == by_method["probit"]["predict_samples"] == 0
    assert by_method["probit"]["predict_method"] == "probit" and "closed form" in by_method["probit"]["predictive"]
    for row in by_method.values():
        assert "extra_rows" not in row and "calibration" in row
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0
        assert row["fit_seconds_total"] > 0
        assert row["fit_in_adam_epochs"] == pytest.approx(row["fit_seconds_total"] / row["plain_seconds_per_epoch"])
        assert row["epoch_time_ratio"] == default["epoch_time_ratio"]  # the same fit's timings
        assert row["epoch_time_ratio_mean"] == default["epoch_time_ratio_mean"] > 0
    text = bench_peers.table(result)
    probit_name = "bnnzoo meanfield-vi" if chosen == "probit" else "bnnzoo meanfield-vi (probit)"
    assert f"| {probit_name} |" in text and "(probit, closed form)" in text and "Adam epochs" in text
    assert "(moments, no weight draws)" in text
    assert f"{others[0]}): " in result["headline"]


class _StubPosterior:
    """A fitted posterior as ``bnnzoo_entry`` reads it, whose predictive has no moment methods."""

    def __init__(self, n, num_classes):
        self.n, self.num_classes = n, num_classes
        self.history = type("History", (), {"epoch_seconds": [0.02, 0.01]})()
        self.fit_state = type("FitState", (), {"calibration": {"temperature": 1.5}, "option_selection": None})()
        self.config = {"train": {"lr": 1e-3, "batch_size": 16, "epochs": 2}, "guide": "g", "model": "m"}

    def sparsity(self):
        return {"weights_pruned_fraction": 0.0, "architecture": "16-300-100-3"}

    def predict(self, x, chunk_size=4096, method="sample"):
        from bnnzoo.posterior import Prediction

        if method != "sample":
            raise TypeError("the moment-propagated predictive supports dense networks only")
        return Prediction("classification", torch.full((len(x), self.num_classes), 1 / self.num_classes),
                          num_samples=48, mc_error=0.004)


def test_bnnzoo_rows_leave_out_unsupported_predictives(monkeypatch):
    from benchmarks import bench_peers

    task = toy_task(bench_peers)

    def fit_with_baseline(name, dataset, **options):
        plain = task.plain()
        plain.epoch_seconds = [0.01, 0.01]
        return _StubPosterior(len(dataset.x_test), 3), plain

    monkeypatch.setattr(bench_peers, "fit_with_baseline", fit_with_baseline)
    row = bench_peers.bnnzoo_entry(task, "meanfield-vi")
    assert row["extra_rows"] == {}
    assert set(row["unsupported_predictives"]) == {"moments", "probit"}
    assert row["predict_samples"] == 48 and row["mc_error"] == 0.004
    assert "48 posterior draws" in row["predictive"] and "Monte Carlo error" in row["predictive"]
    assert row["calibration"] == {"temperature": 1.5}
    assert row["accuracy"] == pytest.approx(float((task.y_test == 0).float().mean()))


# ---- Boston ---------------------------------------------------------------------------------------------
def test_mean_and_median_epoch_ratios():
    """The median ratio sees the typical epoch; the mean ratio the whole fit's time per epoch (a fit
    whose last epochs run on a reduced network); both skip the first epoch of each run."""
    from benchmarks.harness import epoch_ratio, mean_epoch_ratio

    method, plain = [9.0, 2.0, 2.0, 2.0, 0.5, 0.5], [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert epoch_ratio(method, plain) == pytest.approx(2.0)
    assert mean_epoch_ratio(method, plain) == pytest.approx(7.0 / 5.0)


def test_regression_score_against_the_closed_form():
    from benchmarks.bench_peers_boston import regression_score

    y = torch.tensor([1.0, -0.5, 2.0])
    mu, sd = torch.tensor([0.5, 0.0, 2.5]), 0.8

    def log_normal(y, m, s):
        return -0.5 * math.log(2 * math.pi * s * s) - (y - m) ** 2 / (2 * s * s)

    one = regression_score(mu, sd, y)  # closed form: one Gaussian per point
    assert one["log_likelihood"] == pytest.approx(sum(log_normal(a, b, sd) for a, b in zip(y.tolist(), mu.tolist())) / 3)
    assert one["rmse"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0.25) / 3))
    # two draws: the equal-weight mixture, its mean for the RMSE
    loc = torch.stack([mu, mu + 1.0])
    scale = torch.tensor([[0.8], [0.5]])
    two = regression_score(loc, scale, y)
    expected = [math.log(0.5 * math.exp(log_normal(a, b, 0.8)) + 0.5 * math.exp(log_normal(a, b + 1.0, 0.5)))
                for a, b in zip(y.tolist(), mu.tolist())]
    assert two["log_likelihood"] == pytest.approx(sum(expected) / 3)
    assert two["rmse"] == pytest.approx(math.sqrt(sum((b + 0.5 - a) ** 2 for a, b in zip(y.tolist(), mu.tolist())) / 3))


def test_regression_task_scores_in_the_original_units():
    from benchmarks.bench_peers_boston import RegressionTask, regression_score

    gen = torch.Generator().manual_seed(0)
    data = Dataset("toyreg", "regression", torch.randn(30, 3, generator=gen), 5 + 3 * torch.randn(30, generator=gen),
                   torch.randn(6, 3, generator=gen), 5 + 3 * torch.randn(6, generator=gen))
    task = RegressionTask("toyreg", data, torch.device("cpu"), arch="mlp", hidden=[4], batch_size=8)
    std = task.standardizer
    assert task.y_train.mean().abs() < 1e-5  # standardised training targets
    loc = torch.randn(2, 6, generator=gen)
    expected = regression_score(loc * std.y_scale + std.y_mean, 0.5 * std.y_scale, data.y_test)
    assert task.score((loc, torch.tensor(0.5))) == pytest.approx(expected)
    assert task.torch_network()(task.x_test).shape == (6, 1)


def test_boston_suite_runs_without_peers_and_summarises_over_splits(no_peers, monkeypatch):
    from benchmarks import bench_peers_boston as boston

    calls = []

    def run_entry(entry, dataset, splits, *, device="cpu", progress=True):  # the uci suite's, stubbed for speed
        calls.append((entry, dataset, list(splits)))
        rows = [{"split": s, "rmse": 3.0 + s, "log_likelihood": -2.5 - s, "fit_seconds": 2.0, "epochs": 100}
                for s in splits]
        return {"per_split": rows, "failed_splits": [], "test_draws": 100, "config": {"name": entry}}

    monkeypatch.setattr(boston, "run_entry", run_entry)
    monkeypatch.setattr(boston, "QUICK_EPOCHS", 2)
    result = boston.run_suite([0, 1], "cpu", quick=True, entries=["meanfield-vi"], progress=False)
    assert calls == [("meanfield-vi", "boston", [0, 1])]
    assert set(result["left_out"]) == set(boston.PEERS)
    assert list(result["methods"]) == ["plain Adam", "bnnzoo meanfield-vi"]
    adam = result["methods"]["plain Adam"]
    assert [r["split"] for r in adam["per_split"]] == [0, 1] and adam["summary"]["rmse"]["n"] == 2
    assert adam["summary"]["log_likelihood"]["mean"] < 0 and adam["per_split"][0]["epochs"] == 2
    zoo = result["methods"]["bnnzoo meanfield-vi"]
    assert zoo["summary"]["rmse"]["mean"] == pytest.approx(3.5)
    assert zoo["summary"]["rmse"]["se"] == pytest.approx(0.5)
    first = zoo["per_split"][0]
    assert first["fit_in_adam_epochs"] == pytest.approx(2.0 / adam["per_split"][0]["seconds_per_epoch"])
    assert first["fit_seconds_per_epoch_ratio"] == pytest.approx(first["fit_in_adam_epochs"] / 100)
    text = boston.table(result)
    assert "| bnnzoo meanfield-vi | -3.000 ± 0.500 | 3.500 ± 0.500 |" in text
    assert "bayesian-torch Flipout: left out (" in text
    assert "left out: " in result["headline"] and "plain Adam: " in result["headline"]
