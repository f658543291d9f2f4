"""``bnnzoo prune RUN_DIR``: Bayesian model reduction of a saved run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from bnnzoo.errors import BnnzooError
from bnnzoo.guides.bmr import RULES as BMR_RULES
from bnnzoo.runs import check_target, run_dataset

from .common import SPARSITY_KEYS, num_samples_option, print_metrics, run_metrics
from .evaluate import load_run


def _layer_fractions(sparsity: dict) -> dict:
    return {name: layer["weights_pruned_fraction"] for name, layer in sparsity["layers"].items()}


def _test_data(posterior, data: str | None):
    """The test data (:func:`bnnzoo.runs.run_dataset`): ``--data`` if given (an error if unusable),
    else what the run recorded (its source if it exists here, then its name), else ``None``."""
    try:
        return run_dataset(posterior.config.get("data", {}), data)
    except BnnzooError as err:  # DataError
        if data is not None:
            raise click.ClickException(str(err)) from None
        return None


@click.command("prune")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="where to write the reduced run (default RUN_DIR-bmr-RULE)")
@click.option("--rule", type=click.Choice(list(BMR_RULES)), default="ss", show_default=True,
              help="ss: spike-and-slab threshold with a per-layer Beta(1,1) prior; plain: prune when dF > 0; "
                   "rhs: a regularised-horseshoe reduced prior fitted over the dF surface (BMR-RHS)")
@click.option("--level", type=click.Choice(["weight", "group"]), default="weight", show_default=True,
              help="prune single weights or whole neurons/filters")
@click.option("--prune-last", is_flag=True, help="also prune the output layer")
@click.option("--data", "data", default=None, help="test data (default: the data the run was fitted on)")
@num_samples_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing run at --out (otherwise refused)")
def command(run_dir, out, rule, level, prune_last, data, num_samples, device, overwrite) -> None:
    """Prune the saved run RUN_DIR by Bayesian model reduction and save the reduced run with a
    report: per-layer pruned fraction and test metrics before and after. The weights are not
    refitted; a regression run's noise is re-estimated on the data it was fitted on."""
    run = Path(out or f"{str(run_dir).rstrip('/')}-bmr-{rule}")
    check_target(run, overwrite)  # refused before the work, not after it
    posterior = load_run(run_dir, device)
    dataset = _test_data(posterior, data)

    # the noise of a regression run is re-estimated on the data it was fitted on (never on --data)
    train = (dataset.x_train, dataset.y_train) if dataset is not None and data is None else None
    start = time.perf_counter()
    try:
        reduced = posterior.reduce(rule=rule, data=train, level=level, prune_last=prune_last)
    except (TypeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    seconds = time.perf_counter() - start

    before_sp, after_sp = posterior.sparsity(), reduced.sparsity()
    report = {
        "run": str(run_dir), "model": posterior.name, "rule": rule, "level": level, "prune_last": prune_last,
        "reduce_seconds": seconds,
        "weights_pruned_fraction": {"before": before_sp["weights_pruned_fraction"],
                                    "after": after_sp["weights_pruned_fraction"]},
        "architecture": {"before": before_sp["architecture"], "after": after_sp["architecture"]},
        "layers": {name: {"before": b, "after": _layer_fractions(after_sp)[name]}
                   for name, b in _layer_fractions(before_sp).items()},
        "thresholds": {k: v["threshold"] for k, v in reduced.fit_state.pruning[-1].summary["layers"].items()},
    }
    if dataset is not None:
        report["data"] = {"name": dataset.name, "split": dataset.split}
        report["test_before"] = run_metrics(posterior, dataset, num_samples)
        report["test_after"] = run_metrics(reduced, dataset, num_samples)

    extra = {"bmr_report.json": json.dumps(report, indent=2)}
    if dataset is not None:
        extra["metrics.json"] = json.dumps(report["test_after"], indent=2)
    reduced.save(run, overwrite=overwrite, extra_files=extra)  # the run, its metrics and report at once

    click.echo(f"{posterior!r}: Bayesian model reduction ({rule}, {level}) in {seconds:.3f} s")
    click.echo(f"  {'layer':>10s}  pruned before -> after")
    for name, layer in report["layers"].items():
        click.echo(f"  {name:>10s}  {layer['before']:>12.1%} -> {layer['after']:.1%}")
    click.echo(f"  {'all':>10s}  {report['weights_pruned_fraction']['before']:>12.1%} -> "
               f"{report['weights_pruned_fraction']['after']:.1%}  ({report['architecture']['after']})")
    if dataset is None:
        click.echo("no test data recorded with this run (pass --data): test metrics skipped")
    else:
        for when in ("before", "after"):
            click.echo(f"test metrics {when}:")
            print_metrics({k: v for k, v in report[f"test_{when}"].items() if k not in SPARSITY_KEYS})
    click.echo(f"saved to {run} (report: {run / 'bmr_report.json'})")
