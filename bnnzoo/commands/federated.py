"""``bnnzoo federated``: federated EM-TDAMP (or the FedAvg baseline) on Flower.

On one machine (default) the server runs here and every client in a local process, gRPC on
loopback. With ``--serve HOST:PORT`` only the server runs, waiting for ``--clients`` clients
started elsewhere with ``bnnzoo federated-client --server HOST:PORT``.
"""

from __future__ import annotations

import json

import click

from bnnzoo.data import DataError, load_dataset

from .common import parse_options, print_metrics


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


def load(dataset: str, split: int):
    """The dataset ``dataset`` (split ``split``), a data error reported as a command-line error."""
    try:
        return load_dataset(dataset, split=split)
    except DataError as err:
        raise click.ClickException(str(err)) from None


@click.command("federated")
@federated_options
@click.option("--clients", default=4, show_default=True, help="number of clients")
@click.option("--rounds", default=100, show_default=True, help="federated rounds (after the statistics round)")
@click.option("--partition", type=click.Choice(["iid", "label-skew"]), default="iid", show_default=True)
@click.option("--alpha", default=0.5, show_default=True, help="Dirichlet concentration of label-skew")
@click.option("--local-epochs", default=1, show_default=True, help="local passes (epochs) per round")
@click.option("--weighting", type=click.Choice(["geometric", "product"]), default="geometric", show_default=True,
              help="EM-TDAMP aggregation: weighted geometric mean (each client's likelihood scaled to the whole "
                   "training set), or product over the shared prior")
@click.option("--eval-every", default=10, show_default=True, help="evaluate the global model every N rounds")
@click.option("--serve", "serve", default=None, metavar="HOST:PORT",
              help="run only the server here, for clients started with bnnzoo federated-client")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="save the fitted EM-TDAMP run here")
@click.option("--verbose", is_flag=True, help="show Flower's own log")
def command(dataset, split, seed, method, hidden, options, clients, rounds, partition, alpha, local_epochs, weighting,
            eval_every, serve, device, out, verbose) -> None:
    """Federated EM-TDAMP (or FedAvg) over CLIENTS clients: a Flower server, one process per client."""
    from bnnzoo.federated.run import (  # lazy: flwr, kept off the CLI's start-up
        FederatedServer,
        run_federated,
    )

    data = load(dataset, split)
    kwargs = dict(method=method, num_clients=clients, rounds=rounds, local_epochs=local_epochs, seed=seed,
                  device=device, network=network_of(hidden, data), weighting=weighting, eval_every=eval_every,
                  quiet=not verbose, **parse_options(options))
    try:
        if serve:
            server = FederatedServer(data, **kwargs)
            click.echo(f"serving {method} at {serve}: waiting for {clients} clients "
                       f"(bnnzoo federated-client --server {serve} ...)")
            model, history = server.serve(serve), server.history
        else:
            run = run_federated(data, partition=partition, alpha=alpha, **kwargs)
            model, history = run.model, run.history
            click.echo(f"{method}: {clients} clients ({partition}), {rounds} rounds in {run.seconds:.1f} s")
    except (ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    metric = "nmse" if data.task == "regression" else "error"
    for rnd, value in zip(history["eval_round"], history[metric]):
        click.echo(f"  round {rnd:4d}: test {metric} {value:.4f}")
    if method == "em-tdamp":
        print_metrics(model.evaluate(data.x_test, data.y_test, num_samples=100))
        click.echo(f"  {'architecture':>28s}: {model.sparsity()['architecture']}")
        if out:
            click.echo(f"saved to {model.save(out)}")
    elif out:
        raise click.ClickException("--out saves EM-TDAMP runs; FedAvg returns a plain network")
    click.echo(json.dumps({"eval_round": history["eval_round"], metric: history[metric]}))
