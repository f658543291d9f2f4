"""The paired LOO-versus-test comparison over repeated splits (benchmarks/paired_rows.py)."""

import math

import numpy as np
import pytest

from benchmarks.paired_rows import paired_by_row


def test_hand_computed_case():
    # 3 rows, 2 splits. Split 0 trains on rows 0, 1 and tests row 2; split 1 trains on 1, 2, tests 0.
    loo = [([0, 1], [-1.0, -2.0]), ([1, 2], [-4.0, -3.0])]
    test = [([2], [-2.5]), ([0], [-1.5])]
    out = paired_by_row(loo, test)
    assert out["loo"] == pytest.approx((-1.5 + -3.5) / 2)
    assert out["test"] == pytest.approx((-2.5 + -1.5) / 2)
    # row 2's LOO term is -3 (split 1), row 0's is -1 (split 0)
    assert out["matched"] == pytest.approx((-3.0 + -1.0) / 2)
    assert out["estimation"] == pytest.approx(out["test"] - out["matched"])
    assert out["composition"] == pytest.approx(out["matched"] - out["loo"])
    # cluster totals: row 2 (0.5)/2, row 0 (-0.5)/2 -> sum 0, SE sqrt(2 * (0.25^2 + 0.25^2))
    assert out["estimation"] == pytest.approx(0.0)
    assert out["estimation_se"] == pytest.approx(math.sqrt(2 * 2 * 0.25**2))
    assert out["rows"] == 2 and out["occurrences"] == 2 and out["dropped_occurrences"] == 0


def _splits(num_rows, num_splits, num_test, rng):
    for _ in range(num_splits):
        perm = rng.permutation(num_rows)
        yield perm[num_test:], perm[:num_test]


@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_recovers_estimation_bias_despite_heavy_tailed_rows(bias):
    rng = np.random.default_rng(0)
    num_rows = 500
    # rows of very unequal difficulty: a few far-out ones dominate any small test set's mean
    difficulty = -2.0 - rng.standard_exponential(num_rows) ** 2
    loo, test, unpaired = [], [], []
    for train, held in _splits(num_rows, 20, 50, rng):
        loo_values = difficulty[train] + 0.05 * rng.standard_normal(len(train))
        test_values = difficulty[held] + bias + 0.05 * rng.standard_normal(len(held))
        loo.append((train.tolist(), loo_values))
        test.append((held.tolist(), test_values))
        unpaired.append(test_values.mean() - loo_values.mean())
    out = paired_by_row(loo, test)
    # the decomposition is exact when every test row also trains somewhere
    assert out["dropped_occurrences"] == 0
    assert out["test"] - out["loo"] == pytest.approx(out["estimation"] + out["composition"], abs=1e-12)
    # the paired difference finds the bias with a standard error far below the unpaired spread
    assert abs(out["estimation"] - bias) < 3 * out["estimation_se"]
    assert out["estimation_se"] < 0.1 * np.std(unpaired) / math.sqrt(20)
    if bias:
        assert out["estimation_z"] > 10
    # composition is the test rows' difficulty against the training rows' (exactly, up to the noise)
    assert abs(out["composition"]) < 3 * np.std(difficulty) / math.sqrt(20 * 50) + 0.01


def test_rows_that_never_train_are_dropped():
    loo = [([0, 1], [-1.0, -2.0])]
    test = [([2, 0], [-9.0, -1.0])]
    out = paired_by_row(loo, test)
    assert out["dropped_occurrences"] == 1 and out["occurrences"] == 1
    assert out["test"] == pytest.approx(-1.0) and out["matched"] == pytest.approx(-1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="one .rows, values. pair"):
        paired_by_row([([0], [1.0])], [])
    with pytest.raises(ValueError, match="as many LOO values"):
        paired_by_row([([0, 1], [1.0])], [([2], [1.0])])
    with pytest.raises(ValueError, match="as many test values"):
        paired_by_row([([0, 1], [1.0, 2.0])], [([2], [1.0, 3.0])])
