"""``bnnzoo evaluate RUN_DIR``: the test metrics of a saved run, on the data given now or recorded."""

from __future__ import annotations

import click

from bnnzoo.api import load
from bnnzoo.errors import BnnzooError
from bnnzoo.runs import run_dataset

from .common import (
    num_samples_option,
    predict_method_option,
    print_metrics,
    run_metrics,
)


def load_run(run_dir, device):
    """The posterior saved in ``run_dir``, verified (:meth:`bnnzoo.posterior.Posterior.load`); a
    corrupt run or an unusable device is reported as a command-line error."""
    try:
        return load(run_dir, device=device)
    except (BnnzooError, RuntimeError) as err:  # RunError; RuntimeError: the device is not available
        raise click.ClickException(str(err)) from None


def dataset_for_run(posterior, data, split):
    """:func:`bnnzoo.runs.run_dataset` for a loaded run, a data error reported as a command-line error."""
    try:
        return run_dataset(posterior.config.get("data", {}), data, split)
    except BnnzooError as err:  # DataError
        raise click.ClickException(str(err)) from None


@click.command("evaluate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", default=None, metavar="NAME_OR_DIR",
              help="evaluate on this data set or directory (default: the recorded data path if it exists "
                   "here, else the recorded dataset name)")
@click.option("--split", type=click.IntRange(min=0), default=None,
              help="UCI split index (default: the recorded split)")
@click.option("--device", default="cpu", show_default=True)
@num_samples_option
@predict_method_option
def command(run_dir, data, split, device, num_samples, method) -> None:
    """Reload the saved run RUN_DIR (checked against its manifest) and print its test metrics on the
    test split of the data given with --data, or of the data it was fitted on."""
    posterior = load_run(run_dir, device)
    dataset = dataset_for_run(posterior, data, split)
    try:
        metrics = run_metrics(posterior, dataset, num_samples, method)
    except BnnzooError as err:  # DataError: data of another shape or task than the run's
        raise click.ClickException(f"{dataset.name} does not fit this run: {err}") from None
    click.echo(f"{posterior!r} on {dataset.name} split {dataset.split}:")
    print_metrics(metrics)
