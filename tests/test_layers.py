"""The one-way layers (``bnnzoo.models`` < ``bnnzoo.guides`` < the rest of ``bnnzoo``) and the absence
of import cycles, checked by import-linter's contracts in ``pyproject.toml``.

``models/`` and ``guides/`` install as ``bnnzoo.models`` / ``bnnzoo.guides`` (package-dir mapping),
so import-linter reads a copy of the source laid out as installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(dest: Path) -> Path:
    """Copy the package into ``dest`` as it is installed: ``bnnzoo/``, ``bnnzoo/models``, ``bnnzoo/guides``."""
    ignore = shutil.ignore_patterns("__pycache__", "bundled")
    shutil.copytree(ROOT / "bnnzoo", dest / "bnnzoo", ignore=ignore)
    shutil.copytree(ROOT / "models", dest / "bnnzoo" / "models", ignore=ignore)
    shutil.copytree(ROOT / "guides", dest / "bnnzoo" / "guides", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, back_import", [
    ("models/networks.py", "from bnnzoo import posterior"),
    ("models/priors.py", "from bnnzoo.guides import training"),
    ("guides/training.py", "from bnnzoo import catalog"),
])
def test_a_back_import_breaks_the_layers_contract(tmp_path, module, back_import):
    tree = installed_layout(tmp_path)
    path = tree / "bnnzoo" / module
    path.write_text(path.read_text() + f"\n{back_import}  # deliberate back-import\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "models < guides < the user-facing package BROKEN" in result.stdout


@pytest.mark.parametrize("module, back_import", [
    ("metrics.py", "from bnnzoo import api"),  # api -> posterior -> metrics -> api
    ("catalog.py", "from bnnzoo import methods"),  # the methods register themselves in the catalog
    ("commands/prune.py", "from bnnzoo import cli"),  # the CLI adds the commands; they share commands.common
])
def test_an_import_cycle_breaks_the_acyclic_contract(tmp_path, module, back_import):
    tree = installed_layout(tmp_path)
    path = tree / "bnnzoo" / module
    path.write_text(path.read_text() + f"\n{back_import}  # deliberate cycle\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "no import cycles between sibling modules BROKEN" in result.stdout
