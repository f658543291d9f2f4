"""Run benchmark suites: ``python -m benchmarks.run [SUITE ...] [--device DEV]``.

Every module ``benchmarks/bench_*.py`` exposes ``SUITES = {name: function(device) -> {key: result}}``;
each result is written to ``benchmarks/results/<key>.json`` and the results page (``docs/results.md``,
:mod:`benchmarks.report`) is regenerated from all result files. ``--list`` shows the suites; no suite
name runs them all.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
from pathlib import Path

import torch

from bnnzoo.devices import resolve_device

from . import harness, report


def all_suites() -> dict:
    suites = {}
    here = Path(__file__).resolve().parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("bench_"):
            suites.update(importlib.import_module(f"benchmarks.{info.name}").SUITES)
    return suites


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", help="suite names (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); one is best for small networks")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    suites = all_suites()
    if args.list:
        print("\n".join(sorted(suites)))
        return
    unknown = [s for s in args.suites if s not in suites]
    if unknown:
        parser.error(f"unknown suites {unknown}; available: {sorted(suites)}")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.suites or sorted(suites):
        start = time.perf_counter()
        print(f"== {name} on {device}", flush=True)
        for key, result in suites[name](device).items():
            print(f"   wrote {harness.write_result(key, result, device)}", flush=True)
        print(f"   {name} took {time.perf_counter() - start:.0f} s", flush=True)
    print(f"wrote {report.write_page(harness.RESULTS, report.RESULTS_PAGE)}", flush=True)


if __name__ == "__main__":
    main()
