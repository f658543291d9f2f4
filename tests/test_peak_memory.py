"""The CPU peak-memory measurement of the module benchmarks (benchmarks/peak_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.peak_memory import cpu_epoch_peak

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux's /proc/self/clear_refs")


def test_an_epoch_rise_counts_what_a_step_allocates():
    """A plain Adam epoch allocates the gradients afresh every step (``zero_grad(set_to_none=True)``)
    and the activations: a hidden layer of 4,096 units on 3x32x32 inputs has 12.6M weights (48 MiB
    of gradient) and, at batch 512, 8 MiB per activation, against 0.8M weights and 0.5 MiB for 256
    units. The measured rises must differ by more than that gradient, and each peak lie above it."""
    job = {"n": 512, "batch_size": 512, "plain": "adam", "lr": 1e-3}
    narrow = cpu_epoch_peak({**job, "network": {"arch": "mlp", "hidden": [256]}})
    wide = cpu_epoch_peak({**job, "network": {"arch": "mlp", "hidden": [4096]}})
    assert 0 < narrow["epoch_rise_mib"] < narrow["peak_rss_mib"]
    assert wide["epoch_rise_mib"] - narrow["epoch_rise_mib"] > 48, (narrow, wide)
