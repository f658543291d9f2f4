"""Execute the tutorials in full and store the executed copies for the documentation site.

    python scripts/execute_tutorials.py                 # every tutorials/*.ipynb
    python scripts/execute_tutorials.py 01 04           # those whose names start so

Each notebook of ``tutorials/`` (stored without outputs) is run top to bottom with nbclient in a
fresh kernel, with the full settings (``BNNZOO_TUTORIAL_QUICK`` unset), from a temporary working
directory, and written with its outputs to ``tutorials/executed/<name>``; its metadata
``bnnzoo.execution`` records the wall time, the date and the git commit. The site serves an executed
copy in place of the stripped notebook where one exists (``docs/hooks.py``). A notebook that fails
is reported and nothing is written for it, so a half-executed copy never replaces a good one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
EXECUTED = TUTORIALS / "executed"
#: the longest a cell may run (seconds) before the notebook counts as failed
CELL_TIMEOUT_S = 1800


def commit() -> str | None:
    """The checked-out commit, or ``None`` outside a git checkout."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or None


def execute(path: Path) -> float:
    """Run notebook ``path`` in full and write the executed copy; returns its wall time in seconds.
    Raises ``CellExecutionError`` (nothing written) when a cell fails."""
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "BNNZOO_TUTORIAL_QUICK"}
    with tempfile.TemporaryDirectory() as work:
        old = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            start = time.perf_counter()
            NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                           resources={"metadata": {"path": work}}).execute()
            seconds = time.perf_counter() - start
        finally:
            os.environ.clear()
            os.environ.update(old)
    nb.metadata["bnnzoo"] = {"execution": {"seconds": round(seconds, 1), "commit": commit(),
                                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    EXECUTED.mkdir(exist_ok=True)
    target = EXECUTED / path.name
    partial = target.with_suffix(".partial")
    nbformat.write(nb, partial)
    partial.replace(target)  # written whole or not at all
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="run only the notebooks whose names start with these")
    args = parser.parse_args(argv)
    notebooks = sorted(p for p in TUTORIALS.glob("*.ipynb")
                       if not args.prefixes or any(p.name.startswith(x) for x in args.prefixes))
    if not notebooks:
        print(f"no tutorial matches {args.prefixes}", file=sys.stderr)
        return 2
    failed = []
    for path in notebooks:
        try:
            seconds = execute(path)
        except CellExecutionError as err:
            failed.append(path.name)
            print(f"{path.name}: FAILED ({str(err).splitlines()[0] if str(err) else type(err).__name__})", flush=True)
            continue
        print(f"{path.name}: {seconds:.0f} s -> {EXECUTED / path.name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
