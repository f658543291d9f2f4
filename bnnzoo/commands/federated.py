"""``bnnzoo federated``: federated EM-TDAMP (or the FedAvg baseline) on Flower.

On one machine (default) the server runs here and every client in a local process, gRPC on
loopback. With ``--serve HOST:PORT`` only the server runs, waiting for ``--clients`` clients
started elsewhere with ``bnnzoo federated-client --server HOST:PORT``: with TLS when given its
certificate and key (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``, the names of
Flower's own ``flower-superlink`` options), accepting only clients that present the shared token
of ``--token-file``. A run whose round falls short of ``--min-clients`` fails (exit status 1) with
a message naming the round and the clients that failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from bnnzoo.data import DataError, load_dataset
from bnnzoo.errors import BnnzooError
from bnnzoo.federated.handshake import read_token, resolve_min_clients

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
    """``--min-clients``: a count ("3") or a fraction of the clients ("0.5"); ``None``: all of them."""
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


def token_of(path: str | None) -> str | None:
    """The shared token of ``--token-file`` (``None`` without one), a bad file as a usage error."""
    if path is None:
        return None
    try:
        return read_token(path)
    except (OSError, BnnzooError) as err:
        raise click.BadParameter(str(err), param_hint="--token-file") from None


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
@click.option("--min-clients", default=None, metavar="N|FRACTION",
              help="fewest clients that must answer every round, a count or a fraction of --clients "
                   "(rounded up); a round with fewer fails the run  [default: all the clients]")
@click.option("--wait-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds to wait for the clients to connect (then start if --min-clients have, else fail)")
@click.option("--round-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a client may take for a round before it counts as failed")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --serve: the server's TLS certificate (PEM); with --ssl-keyfile and --ssl-ca-certfile")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --serve: the private key of --ssl-certfile (PEM)")
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --serve: the CA certificate that signed --ssl-certfile (PEM; the clients' --root-certificates)")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="accept only clients that present the token in this file (their --token-file)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="save the fitted EM-TDAMP run here")
@click.option("--overwrite", is_flag=True, help="replace an existing run at --out")
@click.option("--verbose", is_flag=True, help="show Flower's own log")
def command(dataset, split, seed, method, hidden, options, clients, rounds, partition, alpha, local_epochs, weighting,
            eval_every, serve, min_clients, wait_timeout, round_timeout, ssl_certfile, ssl_keyfile, ssl_ca_certfile,
            token_file, device, out, overwrite, verbose) -> None:
    """Federated EM-TDAMP (or FedAvg) over CLIENTS clients: a Flower server, one process per client."""
    from bnnzoo.federated.run import (  # lazy: flwr, kept off the CLI's start-up
        FederatedServer,
        run_federated,
    )

    check_federated_out(method, out)
    if out is not None:
        check_out(out, overwrite)
    tls = (ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if any(tls) and not all(tls):
        raise click.UsageError("TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    if any(tls) and not serve:
        raise click.UsageError("--ssl-* options are for --serve (one-machine runs use loopback)")
    certificates = tuple(Path(f).read_bytes() for f in tls) if all(tls) else None
    data = load(dataset, split)
    entry_options = check_options("em-tdamp", data.task, parse_options(options))
    kwargs = dict(method=method, num_clients=clients, rounds=rounds, local_epochs=local_epochs, seed=seed,
                  device=device, network=network_of(hidden, data), weighting=weighting, eval_every=eval_every,
                  quiet=not verbose, min_clients=min_clients_value(min_clients, clients), token=token_of(token_file),
                  wait_timeout=wait_timeout, report=lambda message: click.echo(message, err=True),
                  **entry_options)
    try:
        if serve:
            server = FederatedServer(data, **kwargs)
            click.echo(f"serving {method} at {serve} ({'TLS' if certificates else 'no TLS'}"
                       f"{', token required' if token_file else ''}): waiting for {clients} clients "
                       f"(bnnzoo federated-client --server {serve} ...)", err=True)
            model, history = server.serve(serve, round_timeout, certificates), server.history
            left_out = {**server.roster.failed, **{k: f"refused: {v}" for k, v in server.roster.refused.items()}}
        else:
            run = run_federated(data, partition=partition, alpha=alpha, round_timeout=round_timeout, **kwargs)
            model, history = run.model, run.history
            left_out = {**run.failed_clients, **{k: f"refused: {v}" for k, v in run.refused_clients.items()}}
            click.echo(f"{method}: {clients} clients ({partition}), {rounds} rounds in {run.seconds:.1f} s")
    except (BnnzooError, ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    for name, why in left_out.items():
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
