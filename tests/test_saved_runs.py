"""Runs saved by an earlier layout of the package (format 1: the networks in ``bnnzoo.nets``, the
methods under ``bnnzoo.methods``; format 2 before runs had a manifest) still load and predict
exactly as they did when saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bnnzoo
from bnnzoo.guides.training import TrainingHistory
from bnnzoo.posterior import FitState, PruningRecord

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


@pytest.mark.parametrize("name", sorted(SAVED["predictions"]))
def test_run_saved_in_format1_loads_into_the_typed_state(name, tmp_path):
    saved = json.loads((RUNS / name / "config.json").read_text())
    assert saved["format"] == 1
    posterior = bnnzoo.load(RUNS / name)
    # the network spec and the pruning threshold leave the config for the posterior's own state
    assert "network_spec" not in posterior.config and posterior.network_spec == saved["config"]["network_spec"]
    assert "pruned_threshold" not in posterior.config["train"]
    assert isinstance(posterior.history, TrainingHistory) and posterior.history.to_dict() == saved["history"]
    threshold = saved["config"]["train"].get("pruned_threshold")
    pruning = [PruningRecord("threshold", {"threshold": threshold})] if threshold is not None else []
    temperature = saved["config"]["train"]["kl_weight"] if name == "horseshoe-svi" else 1.0
    assert posterior.fit_state == FitState(temperature=temperature, pruning=pruning)
    # saved again, it is a format-2 run that predicts as the format-1 one did
    again = bnnzoo.load(posterior.save(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["format"] == 2
    x = torch.tensor(SAVED["x"])
    a, b = posterior.predict(x, num_samples=8, seed=0), again.predict(x, num_samples=8, seed=0)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert again.config == posterior.config and again.fit_state == posterior.fit_state


@pytest.mark.parametrize("name", sorted(SAVED["predictions"]))
def test_run_saved_in_format2_without_a_manifest_still_loads(name, tmp_path):
    """Format 2 as first saved (no manifest.json, no "manifest" key in config.json) loads with the
    structural checks only, and predicts as saved."""
    path = bnnzoo.load(RUNS / name).save(tmp_path / "run")
    (path / "manifest.json").unlink()
    meta = json.loads((path / "config.json").read_text())
    del meta["manifest"]
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    posterior = bnnzoo.load(path)
    x = torch.tensor(SAVED["x"])
    pred = posterior.predict(x, num_samples=8, seed=0)
    expected = SAVED["predictions"][name]
    torch.testing.assert_close(pred.mean, torch.tensor(expected["mean"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.std, torch.tensor(expected["std"]), rtol=1e-5, atol=1e-5)
