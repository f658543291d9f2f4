"""Every notebook in ``tutorials/`` runs top to bottom with the quick settings.

Notebooks are found by globbing, so a new tutorial is executed here without touching this file.
They run in a fresh ``python3`` kernel of this interpreter, in a temporary working directory,
with ``BNNZOO_TUTORIAL_QUICK=1`` (tiny epochs and sample counts), ``MPLBACKEND=Agg`` and one
intra-op thread.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
QUICK_VAR = "BNNZOO_TUTORIAL_QUICK"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def kernelspec_root(tmp_path_factory) -> Path:
    """A Jupyter data directory holding a ``python3`` kernelspec that runs this very interpreter.

    Put first on ``JUPYTER_PATH`` it wins over any installed ``python3`` spec (which, on a CI
    machine or in a virtual environment, may be missing or point at another Python).
    """
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3")
    return root


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path):
    """Committed without outputs (the repository stays small) and honouring the quick switch."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"
    assert any(QUICK_VAR in c.source for c in code), f"{path.name} never reads ${QUICK_VAR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernelspec_root, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(kernelspec_root),
                                                                     os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv(QUICK_VAR, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the quick settings use tiny tensors, which gain nothing from intra-op threads; with other
    # processes on the machine (parallel test runs) extra threads only oversubscribe the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as err:
        failure = ANSI_ESCAPE.sub("", str(err))  # the cell's source and its traceback, uncoloured
    if failure is not None:
        pytest.fail(f"{path.name}: a cell failed\n{failure}", pytrace=False)
