"""The scaling suite's summary of repeated runs (benchmarks/bench_scaling.py)."""

import pytest

from benchmarks.bench_scaling import _median_case


def _run(strong: float, weak: float, one: float) -> dict:
    return {"speedup": strong, "examples_per_second": {"1": one, "2": one * strong},
            "weak": {"speedup": weak, "examples_per_second": one * weak}}


def test_repeated_runs_report_the_median_of_each_figure_and_keep_every_run():
    runs = [_run(1.4, 1.7, 1000.0), _run(1.5, 1.5, 1200.0), _run(1.2, 1.8, 1300.0)]
    case = _median_case(runs)
    assert case["speedup"] == 1.4 and case["weak"]["speedup"] == 1.7
    # each figure's own median (of 1000, 1200, 1300; 1400, 1800, 1560; 1700, 1800, 2340), not one run's
    assert case["examples_per_second"]["1"] == pytest.approx(1200.0)
    assert case["examples_per_second"]["2"] == pytest.approx(1560.0)
    assert case["weak"]["examples_per_second"] == pytest.approx(1800.0)
    assert case["speedups"] == [1.4, 1.5, 1.2] and case["weak_speedups"] == [1.7, 1.5, 1.8]
    assert case["runs"] is runs
