"""The ``bnnzoo`` command line: list the catalog, fit a model, evaluate a saved run."""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path

import click

from . import commands
from .api import fit as fit_model
from .api import load
from .catalog import get_entry, list_models
from .commands.common import parse_options, print_metrics, run_metrics
from .data import load_dataset


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnnzoo")
def main() -> None:
    """bnnzoo: sparse Bayesian neural networks on Pyro and PyTorch."""


@main.command("list")
@click.option("--task", type=click.Choice(["regression", "classification"]), default=None)
def list_cmd(task: str | None) -> None:
    """List the catalog's models."""
    for name in list_models(task):
        entry = get_entry(name)
        click.echo(f"{name:<20s} {'/'.join(entry.tasks):<27s} {entry.summary}")


@main.command()
@click.argument("name")
@click.option("--data", "data", default=None,
              help="boston (bundled, the default), concrete, energy, yacht, wine, protein, mnist, sparse-teacher, or a directory")
@click.option("--split", default=0, show_default=True, help="UCI split index")
@click.option("--epochs", type=int, default=None, help="passes over the training data (the entry's default otherwise)")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--num-samples", default=100, show_default=True, help="posterior draws for the test metrics")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE", help="any other option of the entry")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory (default runs/NAME-DATA-...)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def fit(name, data, split, epochs, batch_size, lr, seed, device, num_samples, options, out, quiet) -> None:
    """Fit catalog model NAME, save the posterior and its test metrics to a run directory."""
    try:
        get_entry(name)
    except KeyError as err:
        raise click.ClickException(err.args[0]) from None
    try:
        dataset = load_dataset(data, split=split)
    except ValueError as err:  # DataError: unknown name, missing or bad files
        raise click.ClickException(str(err)) from None
    click.echo(f"fitting {name} on {dataset.name} (split {dataset.split}): {len(dataset.x_train)} training, "
               f"{len(dataset.x_test)} test examples")
    start = time.perf_counter()
    try:
        posterior = fit_model(name, dataset, seed=seed, device=device, progress=not quiet, epochs=epochs,
                              batch_size=batch_size, lr=lr, **parse_options(options))
    except (TypeError, ValueError, RuntimeError, FloatingPointError) as err:  # FloatingPointError: DivergenceError
        raise click.ClickException(str(err)) from None
    seconds = time.perf_counter() - start
    metrics = run_metrics(posterior, dataset, num_samples)
    metrics["fit_seconds"] = seconds
    run = Path(out or f"runs/{name}-{dataset.name}-split{dataset.split}-seed{seed}")
    posterior.save(run)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    click.echo(f"{posterior!r}\ntest metrics:")
    print_metrics(metrics)
    click.echo(f"saved to {run}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--device", default="cpu", show_default=True)
@click.option("--num-samples", default=100, show_default=True)
def evaluate(run_dir, device, num_samples) -> None:
    """Reload a saved run and evaluate it on the test data it was fitted for."""
    try:
        posterior = load(run_dir, device=device)
        data = posterior.config.get("data", {})
        dataset = load_dataset(data.get("source") or data.get("name"), split=data.get("split") or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # not a run, bad format, data, device
        raise click.ClickException(str(err)) from None
    click.echo(f"{posterior!r} on {dataset.name} split {dataset.split}:")
    print_metrics(run_metrics(posterior, dataset, num_samples))


def add_package_commands() -> None:
    """Add the command of each module of :mod:`bnnzoo.commands` that defines one (``command``, a
    ``click`` command); modules without one (shared helpers) are skipped."""
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = getattr(module, "command", None)
        if isinstance(command, click.Command):
            main.add_command(command)


add_package_commands()

if __name__ == "__main__":
    main()
