"""``scripts/execute_tutorials.py``: executed copies of the tutorials for the site, written whole or
not at all, with the full settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("execute_tutorials", ROOT / "scripts" / "execute_tutorials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TUTORIALS", tmp_path)
    monkeypatch.setattr(module, "EXECUTED", tmp_path / "executed")
    monkeypatch.setenv("BNNZOO_TUTORIAL_QUICK", "1")  # the script must run the full settings anyway
    return module


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


def test_an_executed_copy_holds_the_outputs_of_the_full_settings(script, tmp_path):
    _notebook(tmp_path / "01_a.ipynb", 'import os\nprint("quick" if os.environ.get("BNNZOO_TUTORIAL_QUICK") else "full")')
    assert script.main(["01"]) == 0
    executed = nbformat.read(tmp_path / "executed" / "01_a.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == "full"
    assert executed.metadata["bnnzoo"]["execution"]["seconds"] >= 0
    stored = nbformat.read(tmp_path / "01_a.ipynb", as_version=4)
    assert stored.cells[0].outputs == []  # the tutorial itself stays clean


def test_a_failing_notebook_writes_nothing(script, tmp_path):
    _notebook(tmp_path / "02_b.ipynb", "raise RuntimeError('broken')")
    assert script.main(["02"]) == 1
    assert not (tmp_path / "executed" / "02_b.ipynb").exists()
    assert script.main(["99"]) == 2  # no notebook matches
