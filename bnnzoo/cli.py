"""The ``bnnzoo`` command line: list the catalog and fit a model; the other commands live in
:mod:`bnnzoo.commands` (``evaluate``, ``prune``, ``diagnose``, ``federated``)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import time
from pathlib import Path

import click

from . import commands, distributed
from .api import fit as fit_model
from .api import load as load_posterior
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
from .models.networks import ARCHITECTURES


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
              help="boston (bundled, the default), concrete, energy, yacht, wine, protein, mnist, fashion-mnist, "
                   "cifar10, cifar100, sparse-teacher, or a directory")
@click.option("--split", default=0, show_default=True, help="UCI split index")
@click.option("--network", "arch", type=click.Choice(sorted(ARCHITECTURES)), default=None,
              help="the architecture (default: the data set's catalog default; docs/networks.md)")
@click.option("--hidden", default=None, metavar="W1,W2,...",
              help="hidden layer widths of --network mlp, e.g. 100,100")
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
@click.option("--devices", type=int, default=None,
              help="data-parallel fit over N processes on this machine (gloo on the CPU; NCCL on CUDA, rank r on "
                   "cuda:r); under torchrun leave it out (torchrun's ranks join by themselves)")
def fit(name, data, split, arch, hidden, epochs, batch_size, lr, seed, device, num_samples, options, out, overwrite,
        resume, checkpoint_every, quiet, devices) -> None:
    """Fit catalog model NAME, save the posterior and its test metrics to a run directory.

    Data parallel (docs/data-parallel.md): --devices N starts N processes on this machine; under
    torchrun every rank runs this command. Rank 0 writes the checkpoints and the run."""
    get_entry(name)
    if devices is not None:
        distributed.check_devices(devices, device)
    if devices is not None or distributed.launched_by_torchrun():
        distributed.check_entry(name)
    network = _network(arch, hidden)
    dataset = load_dataset(data, split=split)
    overrides = check_options(name, dataset.task, merge_options(parse_options(options), epochs=epochs,
                                                                batch_size=batch_size, lr=lr))
    run = Path(out or resume or f"runs/{name}-{dataset.name}-split{dataset.split}-seed{seed}")
    if resume is None or run.resolve() != Path(resume).resolve():
        if has_checkpoint(run) and not overwrite:  # checkpoints live in the run directory
            raise RunError(f"{run} holds the checkpoint of an interrupted fit: continue it with --resume {run}, "
                           f"or pass --overwrite to start again")
        check_out(run, overwrite)  # refused before the fit, not after it
    if distributed.is_main_process():
        click.echo(f"fitting {name} on {dataset.name} (split {dataset.split}): {len(dataset.x_train)} training, "
                   f"{len(dataset.x_test)} test examples" + (f", data-parallel over {devices} processes"
                                                              if devices else ""))
    job = {"name": name, "data": data, "split": split, "network": network, "seed": seed, "num_samples": num_samples,
           "overrides": overrides, "run": str(run), "resume": resume, "checkpoint_every": checkpoint_every,
           "quiet": quiet, "overwrite": overwrite}
    if devices is not None and devices > 1:
        distributed.spawn(_fit_rank, devices, job, device=device)
        _report(load_posterior(run), json.loads((run / "metrics.json").read_text()), run)
    elif distributed.launched_by_torchrun():
        with distributed.process_group(device) as (parallel, rank_device):
            done = _fit_and_save(parallel.is_main, rank_device, dict(job, dataset=dataset))
        if done is not None:
            _report(*done, run)
    else:
        _report(*_fit_and_save(True, device, dict(job, dataset=dataset)), run)


def _network(arch: str | None, hidden: str | None) -> dict | None:
    """The ``network`` of ``--network`` and ``--hidden`` (``None``: the data set's default)."""
    if hidden is not None and arch != "mlp":
        raise click.BadParameter("--hidden sets the widths of --network mlp", param_hint="--hidden")
    if arch is None:
        return None
    if hidden is None:
        return {"arch": arch}
    try:
        widths = [int(w) for w in hidden.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {hidden!r}", param_hint="--hidden") from None
    return {"arch": arch, "hidden": widths}


def _fit_rank(parallel, device, job: dict) -> None:
    """One rank of ``bnnzoo fit --devices N`` (:func:`bnnzoo.distributed.spawn`)."""
    _fit_and_save(parallel.is_main, device, job)


def _fit_and_save(main_rank: bool, device, job: dict):
    """Fit ``job`` (the checked arguments of ``bnnzoo fit``); the main rank also evaluates and saves the
    run and returns ``(posterior, metrics)`` (``None`` on the other ranks of a data-parallel fit)."""
    dataset = job.get("dataset") or load_dataset(job["data"], split=job["split"])
    run, resume = Path(job["run"]), job["resume"]
    start = time.perf_counter()
    try:
        posterior = fit_model(job["name"], dataset, network=job.get("network"), seed=job["seed"], device=device,
                              progress=not job["quiet"] and main_rank, run_dir=run, resume=resume,
                              checkpoint_every=job["checkpoint_every"], **job["overrides"])
    except KeyboardInterrupt:
        if main_rank and has_checkpoint(run):
            click.echo(f"\ninterrupted: the fit's last checkpoint is in {run / 'checkpoint'}; continue it with the "
                       f"same command and --resume {run}", err=True)
        raise click.exceptions.Exit(130) from None
    except RuntimeError as err:  # the device asked for is not available (bnnzoo's own errors: BnnzooGroup)
        raise click.ClickException(str(err)) from None
    if not main_rank:
        return None
    seconds = time.perf_counter() - start
    metrics = run_metrics(posterior, dataset, job["num_samples"])
    metrics["fit_seconds"] = seconds
    # the run and its metrics appear at once; replace what only this fit put there (its checkpoint), or
    # the run a resumed fit was allowed to replace
    own = resume is not None or (has_checkpoint(run) and {p.name for p in run.iterdir()} == {"checkpoint"})
    posterior.save(run, overwrite=job["overwrite"] or own,
                   extra_files={"metrics.json": json.dumps(metrics, indent=2)})
    return posterior, metrics


def _report(posterior, metrics: dict, run: Path) -> None:
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
