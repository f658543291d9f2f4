"""LOO against held-out log-likelihood on the same data rows, across repeated train/test splits.

With repeated random splits of one data set (the 20 UCI splits), every row is a test point in some
splits and a training point in the others. The mean test log-likelihood over the splits and the
mean LOO estimate over the splits then differ for two reasons:

* **composition**: the test sets are a sample of the rows. The 20 test sets of 51 Boston houses
  may hold more or fewer of the few badly predicted houses than the data set does, and one such
  house moves a split's mean by several tenths. LOO averages over all the training rows, so it
  does not share this noise.
* **estimation**: on the same rows, the LOO term of a row (a fit without it, in a split where it
  is a training row) and its test term (a fit without it, in a split where it is a test row) may
  differ systematically. This is the bias of LOO as an estimate of the held-out log-likelihood.

:func:`paired_by_row` separates the two exactly: ``test - LOO = (test - matched) + (matched - LOO)``
where ``matched`` weighs each row's mean LOO term (over the splits where it trains) as the test
means weigh its test terms. The standard error of ``test - matched`` treats rows as the
independent units (a cluster standard error), so the spread between easy and hard rows, which
dominates the unpaired comparison, cancels.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def paired_by_row(loo_terms, test_terms) -> dict:
    """``loo_terms`` and ``test_terms``: one ``(rows, values)`` pair per split: the data rows of the
    split's training (test) points and their LOO (test) log predictive densities.

    Returns ``test`` (mean over splits of the per-split test means), ``loo`` (the same for LOO),
    ``matched`` (the LOO terms of the test occurrences' rows, weighted as the test means weigh
    them), ``estimation`` = ``test - matched`` with its standard error ``estimation_se`` and
    ``estimation_z``, ``composition`` = ``matched - loo``, and the counts of rows used and of test
    occurrences dropped because their row never trains (then ``test``/``matched`` cover the rest).
    """
    if len(loo_terms) != len(test_terms) or not loo_terms:
        raise ValueError("need one (rows, values) pair of LOO and of test terms per split")
    loo_sum, loo_count = defaultdict(float), defaultdict(int)
    loo_means = []
    for rows, values in loo_terms:
        values = np.asarray(values, dtype=float).tolist()
        if len(rows) != len(values):
            raise ValueError("each split needs as many LOO values as training rows")
        loo_means.append(sum(values) / len(values))
        for r, v in zip(rows, values):
            loo_sum[int(r)] += v
            loo_count[int(r)] += 1
    row_loo = {r: loo_sum[r] / loo_count[r] for r in loo_sum}
    num_splits = len(test_terms)
    # each test occurrence weighs 1 / (splits x the split's test size), as in the mean of split means
    occurrences = []
    dropped = 0
    for rows, values in test_terms:
        values = np.asarray(values, dtype=float).tolist()
        if len(rows) != len(values):
            raise ValueError("each split needs as many test values as test rows")
        for r, v in zip(rows, values):
            if int(r) in row_loo:
                occurrences.append((int(r), v, 1.0 / (num_splits * len(values))))
            else:
                dropped += 1
    total = sum(w for _, _, w in occurrences)
    test = float(sum(w * v for _, v, w in occurrences) / total)
    matched = float(sum(w * row_loo[r] for r, _, w in occurrences) / total)
    # cluster totals per row of the weighted differences; their sum is (test - matched) * total
    per_row = defaultdict(float)
    for r, v, w in occurrences:
        per_row[r] += w * (v - row_loo[r]) / total
    d = np.array(list(per_row.values()))
    num_rows = len(d)
    estimation = float(d.sum())
    se = math.sqrt(num_rows / (num_rows - 1) * float(((d - estimation / num_rows) ** 2).sum())) if num_rows > 1 else math.nan
    loo = float(np.mean(loo_means))
    return {"test": test, "loo": loo, "matched": matched, "estimation": estimation, "estimation_se": se,
            "estimation_z": estimation / se if se > 0 else math.nan, "composition": matched - loo,
            "rows": num_rows, "occurrences": len(occurrences), "dropped_occurrences": dropped}
