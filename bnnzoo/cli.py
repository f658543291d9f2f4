"""The ``bnnzoo`` command line: list the catalog and fit a model; the other commands live in
:mod:`bnnzoo.commands` (``evaluate``, ``prune``, ``diagnose``, ``federated``)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path

import click

from . import commands
from .api import fit as fit_model
from .catalog import get_entry, list_models
from .checkpoint import has_checkpoint
from .commands.common import (
    check_options,
    check_out,
    merge_options,
    num_samples_option,
    parse_options,
    print_metrics,
    run_metrics,
)
from .data import load_dataset
from .errors import BnnzooError, RunError


class BnnzooGroup(click.Group):
    """The command group: an error bnnzoo raises on purpose (:class:`~bnnzoo.errors.BnnzooError`,
    whose message names the option, file or epoch at fault) ends any command with that one line and
    exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BnnzooError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=BnnzooGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnnzoo")
def main() -> None:
    """bnnzoo: sparse Bayesian neural networks on Pyro and PyTorch."""


@main.command("list")
@click.argument("name", required=False)
@click.option("--task", type=click.Choice(["regression", "classification"]), default=None)
def list_cmd(name: str | None, task: str | None) -> None:
    """List the catalog's models; with NAME, that entry's options (what --set accepts): each one's
    allowed values and its default for each task."""
    if name is None:
        for model in list_models(task):
            entry = get_entry(model)
            click.echo(f"{model:<20s} {'/'.join(entry.tasks):<27s} {entry.summary}")
        return
    entry = get_entry(name)
    tasks = [t for t in entry.tasks if task in (None, t)]
    if not tasks:
        raise click.ClickException(f"{name} supports {', '.join(entry.tasks)}, not {task}")
    click.echo(f"{name}: {entry.summary}\npaper: {entry.paper}\ntasks: {', '.join(entry.tasks)}")
    click.echo(f"options (--set KEY=VALUE, a JSON value; default for {' / '.join(tasks)}):")
    rows = {}
    for t in tasks:
        defaults = {k: v for section in entry.defaults[t].values() if isinstance(section, dict)
                    for k, v in section.items()}
        for key, option in entry.schema(t).items():
            rows.setdefault(key, [option, {}])[1][t] = defaults[key]
    width = max(len(k) for k in rows)
    for key, (option, defaults) in rows.items():
        shown = " / ".join(json.dumps(defaults[t]) if t in defaults else "-" for t in tasks)
        click.echo(f"  {key:<{width}s}  {option.describe()}; default {shown}")
        if option.help:
            click.echo(f"  {'':<{width}s}    {option.help}")


@main.command()
@click.argument("name")
@click.option("--data", "data", default=None,
              help="boston (bundled, the default), concrete, energy, yacht, wine, protein, mnist, sparse-teacher, or a directory")
@click.option("--split", default=0, show_default=True, help="UCI split index")
@click.option("--epochs", type=int, default=None,
              help="passes over the training data (the entry's default otherwise); as --set epochs=N")
@click.option("--batch-size", type=int, default=None, help="as --set batch_size=N")
@click.option("--lr", type=float, default=None, help="learning rate; as --set lr=X")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto")
@num_samples_option
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="any option of the entry, the value a JSON literal (bnnzoo list NAME shows them)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory (default runs/NAME-DATA-...)")
@click.option("--overwrite", is_flag=True, help="replace an existing run at --out (otherwise refused)")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="continue the interrupted fit whose checkpoint is in this run directory (same NAME and options)")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="write a checkpoint every N epochs (default: at an epoch's end once a minute, and on Ctrl-C)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def fit(name, data, split, epochs, batch_size, lr, seed, device, num_samples, options, out, overwrite, resume,
        checkpoint_every, quiet) -> None:
    """Fit catalog model NAME, save the posterior and its test metrics to a run directory."""
    get_entry(name)
    dataset = load_dataset(data, split=split)
    overrides = check_options(name, dataset.task, merge_options(parse_options(options), epochs=epochs,
                                                                batch_size=batch_size, lr=lr))
    run = Path(out or resume or f"runs/{name}-{dataset.name}-split{dataset.split}-seed{seed}")
    if resume is None or run.resolve() != Path(resume).resolve():
        if has_checkpoint(run) and not overwrite:  # checkpoints live in the run directory
            raise RunError(f"{run} holds the checkpoint of an interrupted fit: continue it with --resume {run}, "
                           f"or pass --overwrite to start again")
        check_out(run, overwrite)  # refused before the fit, not after it
    click.echo(f"fitting {name} on {dataset.name} (split {dataset.split}): {len(dataset.x_train)} training, "
               f"{len(dataset.x_test)} test examples")
    start = time.perf_counter()
    try:
        posterior = fit_model(name, dataset, seed=seed, device=device, progress=not quiet, run_dir=run, resume=resume,
                              checkpoint_every=checkpoint_every, **overrides)
    except KeyboardInterrupt:
        if has_checkpoint(run):
            click.echo(f"\ninterrupted: the fit's last checkpoint is in {run / 'checkpoint'}; continue it with the "
                       f"same command and --resume {run}", err=True)
        raise click.exceptions.Exit(130) from None
    except RuntimeError as err:  # the device asked for is not available (bnnzoo's own errors: BnnzooGroup)
        raise click.ClickException(str(err)) from None
    seconds = time.perf_counter() - start
    metrics = run_metrics(posterior, dataset, num_samples)
    metrics["fit_seconds"] = seconds
    # the run and its metrics appear at once; replace what only this fit put there (its checkpoint), or
    # the run a resumed fit was allowed to replace
    own = resume is not None or (has_checkpoint(run) and {p.name for p in run.iterdir()} == {"checkpoint"})
    posterior.save(run, overwrite=overwrite or own, extra_files={"metrics.json": json.dumps(metrics, indent=2)})
    click.echo(f"{posterior!r}\ntest metrics:")
    print_metrics(metrics)
    refit = posterior.fit_state.pruning[-1].summary.get("noise_refit") if posterior.fit_state.pruning else None
    if refit:
        click.echo(f"pruned to {posterior.sparsity()['architecture']}; noise scale refitted on the training data "
                   f"{refit['noise_scale_before']:.4g} -> {refit['noise_scale_after']:.4g} "
                   f"(training mean z^2 {refit['train_mean_z2']:.3f})")
    click.echo(f"saved to {run}")


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
