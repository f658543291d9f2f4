"""Runs saved by an earlier layout of the package (format 1: the networks in ``bnnzoo.nets``, the
methods under ``bnnzoo.methods``) still load and predict exactly as they did when saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bnnzoo

RUNS = Path(__file__).parent / "data" / "runs-format1"
SAVED = json.loads((RUNS / "predictions.json").read_text())


@pytest.mark.parametrize("name", sorted(SAVED["predictions"]))
def test_run_saved_by_the_previous_layout_predicts_as_saved(name):
    posterior = bnnzoo.load(RUNS / name)
    assert posterior.name == name
    x = torch.tensor(SAVED["x"])
    pred = posterior.predict(x, num_samples=8, seed=0)
    expected = SAVED["predictions"][name]
    torch.testing.assert_close(pred.mean, torch.tensor(expected["mean"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.std, torch.tensor(expected["std"]), rtol=1e-5, atol=1e-5)
