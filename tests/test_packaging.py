"""The package installs as designed: models/ and guides/ ship as bnnzoo.models and bnnzoo.guides,
with the bundled data, and no top-level ``models`` or ``guides`` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bnnzoo
import bnnzoo.guides
import bnnzoo.models

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    (path,) = out.glob("bnnzoo-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "models" not in tops and "guides" not in tops
    for required in ("bnnzoo/models/bnn.py", "bnnzoo/guides/meanfield.py", "bnnzoo/methods/baselines.py",
                     "bnnzoo/data/bundled/boston/data.txt", "bnnzoo/data/bundled/boston/index_train_19.txt",
                     "bnnzoo/data/bundled/mnist/train5k-images-idx3-ubyte.gz"):
        assert required in names, required


def test_regular_install_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import importlib.util, bnnzoo, bnnzoo.models, bnnzoo.guides\n"
        "from bnnzoo.data import load_uci\n"
        f"assert bnnzoo.__file__.startswith({str(target)!r}), bnnzoo.__file__\n"
        "assert importlib.util.find_spec('models') is None and importlib.util.find_spec('guides') is None\n"
        "assert len(load_uci('boston', split=19).x_train) > 400\n"
        "assert len(bnnzoo.list_models()) == 7, bnnzoo.list_models()  # every built-in entry registers on import\n"
    )
    # run from an empty directory so the repository's folders cannot be imported by accident
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target),
                   "PATH": "/usr/bin:/bin"})


def test_editable_install_maps_folders():
    if Path(bnnzoo.__file__).resolve().parent != ROOT / "bnnzoo":
        pytest.skip("bnnzoo is not installed from this checkout in editable mode")

    assert Path(bnnzoo.models.__file__).resolve().parent == ROOT / "models"
    assert Path(bnnzoo.guides.__file__).resolve().parent == ROOT / "guides"
