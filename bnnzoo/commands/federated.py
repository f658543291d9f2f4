"""``bnnzoo federated``: federated EM-TDAMP (or the FedAvg baseline) on Flower's ServerApp / ClientApp.

By default the run is simulated here in Flower's Simulation Runtime (Ray: one virtual SuperNode
per client, ``--clients-per-round`` of them sampled each round). Across machines the same ServerApp
and ClientApp run on Flower's SuperLink and SuperNodes: ``--write-app DIR`` writes the Flower App of
these settings (a ``pyproject.toml`` whose run config holds them) for ``flwr run DIR SUPERLINK``;
TLS and node authentication are Flower's own options of ``flower-superlink`` and
``flower-supernode``. A run whose round falls short of ``--min-clients`` fails (exit status 1) with
a message naming the round and the clients that failed.
"""

from __future__ import annotations

import json

import click

from bnnzoo.data import DataError, load_dataset
from bnnzoo.errors import BnnzooError
from bnnzoo.federated.settings import (
    resolve_clients_per_round,
    resolve_min_clients,
    write_app,
)

from .common import (
    check_federated_out,
    check_options,
    check_out,
    parse_options,
    print_metrics,
)


def federated_options(f):
    """The options the server and its clients must agree on (data, network, method options)."""
    f = click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
                     help="EM-TDAMP option (JSON value), e.g. --set keep=0.4 --set damping=0.5")(f)
    f = click.option("--hidden", default=None, help="hidden layer widths, e.g. 50 or 300,100 (the entry's default otherwise)")(f)
    f = click.option("--method", type=click.Choice(["em-tdamp", "fedavg"]), default="em-tdamp", show_default=True)(f)
    f = click.option("--seed", default=0, show_default=True)(f)
    f = click.option("--split", default=0, show_default=True, help="UCI split index")(f)
    f = click.option("--dataset", "dataset", default="boston", show_default=True,
                     help="boston, mnist, another bundled set, or a data directory")(f)
    return f


def network_of(hidden: str | None, dataset):
    if hidden is None:
        return {"arch": "lenet-300-100"} if dataset.task == "classification" and len(dataset.input_shape) > 1 else None
    try:
        widths = [int(w) for w in hidden.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {hidden!r}", param_hint="--hidden") from None
    return {"arch": "mlp", "hidden": widths}


def min_clients_value(text: str | None, clients: int):
    """``--min-clients``: a count ("3") or a fraction of the clients asked per round ("0.5");
    ``None``: all of them."""
    if text is None:
        return None
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise click.BadParameter(f"expected a count from 1 to {clients} or a fraction in (0, 1], got {text!r}",
                                 param_hint="--min-clients") from None
    try:
        resolve_min_clients(value, clients)
    except BnnzooError as err:
        raise click.BadParameter(str(err), param_hint="--min-clients") from None
    return value


#: the options of the hand-written gRPC server this command had, and what replaces each
REPLACED = {"--serve": "run a SuperLink (flower-superlink) and start the run there with `flwr run DIR SUPERLINK` "
                       "after --write-app DIR",
            "--ssl-certfile": "flower-superlink --ssl-certfile", "--ssl-keyfile": "flower-superlink --ssl-keyfile",
            "--ssl-ca-certfile": "flower-superlink --ssl-ca-certfile (and flower-supernode --root-certificates)",
            "--token-file": "Flower's node authentication (flower-superlink --enable-supernode-auth, "
                            "flower-supernode --auth-supernode-private-key)",
            "--wait-timeout": "the run config key wait-timeout of --write-app (a deployed run)"}


def load(dataset: str, split: int):
    """The dataset ``dataset`` (split ``split``), a data error reported as a command-line error."""
    try:
        return load_dataset(dataset, split=split)
    except DataError as err:
        raise click.ClickException(str(err)) from None


def _replaced(ctx, param, value):
    if value not in (None, False):
        flag = "--" + param.name.replace("_", "-")
        raise click.UsageError(f"{flag} belonged to the hand-written gRPC server, which Flower's SuperLink and "
                               f"SuperNodes replace: use {REPLACED[flag]} (see docs/methods/federated-em-tdamp.md)")
    return value


def replaced_options(f):
    for flag in REPLACED:
        f = click.option(flag, default=None, hidden=True, expose_value=False, callback=_replaced, is_eager=False)(f)
    return f


@click.command("federated")
@federated_options
@click.option("--clients", default=4, show_default=True, help="number of clients")
@click.option("--clients-per-round", default=None, type=int,
              help="clients sampled each round  [default: all the clients]")
@click.option("--rounds", default=100, show_default=True, help="federated rounds (after the statistics round)")
@click.option("--partition", type=click.Choice(["iid", "label-skew"]), default="iid", show_default=True)
@click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration of label-skew")
@click.option("--local-epochs", default=1, show_default=True, help="local passes (epochs) per round")
@click.option("--weighting", type=click.Choice(["geometric", "product"]), default="geometric", show_default=True,
              help="EM-TDAMP aggregation: weighted geometric mean (each client's likelihood scaled to the whole "
                   "training set), or product over the shared prior")
@click.option("--eval-every", default=10, show_default=True, help="evaluate the global model every N rounds")
@click.option("--min-clients", default=None, metavar="N|FRACTION",
              help="fewest clients that must answer every round, a count or a fraction of the clients asked per "
                   "round (rounded up); a round with fewer fails the run  [default: all the clients asked]")
@click.option("--round-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a client may take for a round before it counts as failed")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Ray workers of the simulation (one CPU each)  [default: the CPUs available, at most --clients]")
@click.option("--write-app", "write_app_dir", type=click.Path(file_okay=False), default=None,
              help="write the Flower App of these settings here (for `flwr run DIR SUPERLINK`) instead of simulating; "
                   "--out becomes the deployed run's results directory (history.json, and run/ for EM-TDAMP)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="save the fitted EM-TDAMP run here")
@click.option("--overwrite", is_flag=True, help="replace an existing run at --out")
@click.option("--verbose", is_flag=True, help="show Flower's own log")
@replaced_options
def command(dataset, split, seed, method, hidden, options, clients, clients_per_round, rounds, partition, alpha,
            local_epochs, weighting, eval_every, min_clients, round_timeout, workers, write_app_dir, device, out,
            overwrite, verbose) -> None:
    """Federated EM-TDAMP (or FedAvg) over CLIENTS clients: Flower's ServerApp and ClientApp in its
    Simulation Runtime (or, with --write-app, the Flower App for a SuperLink)."""
    from bnnzoo.federated.run import (  # lazy: flwr and Ray, kept off the CLI's start-up
        run_federated,
    )

    check_federated_out(method, out)
    if out is not None:
        check_out(out, overwrite)
    try:
        per_round = resolve_clients_per_round(clients_per_round, clients)
    except BnnzooError as err:
        raise click.BadParameter(str(err), param_hint="--clients-per-round") from None
    floor = min_clients_value(min_clients, per_round)
    data = load(dataset, split)
    entry_options = check_options("em-tdamp", data.task, parse_options(options))
    if write_app_dir is not None:
        try:
            path = write_app(write_app_dir, dataset=dataset, split=split, seed=seed, method=method, hidden=hidden or "",
                             options=entry_options, num_clients=clients, clients_per_round=per_round, rounds=rounds,
                             local_epochs=local_epochs, weighting=weighting, eval_every=eval_every,
                             min_clients="" if min_clients is None else str(min_clients),
                             round_timeout=float(round_timeout), partition=partition, alpha=float(alpha),
                             device=device, results_dir=str(out or ""))
        except BnnzooError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {path}: start the run with `flwr run {write_app_dir} SUPERLINK` once {clients} SuperNodes "
                   "are connected (flower-supernode --node-config \"partition-id=K num-partitions="
                   f"{clients}\")")
        return
    kwargs = dict(method=method, num_clients=clients, clients_per_round=per_round, rounds=rounds,
                  local_epochs=local_epochs, seed=seed, device=device, network=network_of(hidden, data),
                  weighting=weighting, eval_every=eval_every, quiet=not verbose, min_clients=floor,
                  round_timeout=round_timeout, workers=workers, report=lambda message: click.echo(message, err=True),
                  **entry_options)
    try:
        run = run_federated(data, partition=partition, alpha=alpha, **kwargs)
    except (BnnzooError, ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    model, history = run.model, run.history
    click.echo(f"{method}: {clients} clients ({partition}), {per_round} per round, {rounds} rounds in "
               f"{run.seconds:.1f} s")
    for name, why in run.failed_clients.items():
        click.echo(f"left out: client {name!r} ({why})", err=True)
    metric = "nmse" if data.task == "regression" else "error"
    for rnd, value in zip(history["eval_round"], history[metric]):
        click.echo(f"  round {rnd:4d}: test {metric} {value:.4f}")
    if method == "em-tdamp":
        print_metrics(model.evaluate(data.x_test, data.y_test, num_samples=100))
        click.echo(f"  {'architecture':>28s}: {model.sparsity()['architecture']}")
        if out:
            click.echo(f"saved to {model.save(out, overwrite=overwrite)}")
    click.echo(json.dumps({"eval_round": history["eval_round"], metric: history[metric]}))
