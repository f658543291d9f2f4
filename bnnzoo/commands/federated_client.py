"""``bnnzoo federated-client --server HOST:PORT``: one client of a ``bnnzoo federated --serve`` run."""

from __future__ import annotations

import click

from bnnzoo.federated.partition import partition as make_partition

from .common import parse_options
from .federated import federated_options, load, network_of


@click.command("federated-client")
@click.option("--server", "server", required=True, metavar="HOST:PORT", help="the server's address")
@federated_options
@click.option("--client-index", default=0, show_default=True,
              help="which part of the training split this client holds (with --clients and --partition)")
@click.option("--clients", default=1, show_default=True, help="the number of parts the training split is cut into")
@click.option("--partition", type=click.Choice(["iid", "label-skew"]), default="iid", show_default=True)
@click.option("--alpha", default=0.5, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--verbose", is_flag=True, help="show Flower's own log")
def command(server, dataset, split, seed, method, hidden, options, client_index, clients, partition, alpha, device,
            verbose) -> None:
    """Serve as one client: the local data are part CLIENT_INDEX of the dataset's training split (or
    the whole of a data directory with --clients 1); data, network, method and --set options must
    match the server's."""
    from bnnzoo.federated.run import (  # lazy: flwr, kept off the CLI's start-up
        build_posterior,
        client_spec,
        start_client,
    )

    data = load(dataset, split)
    if not 0 <= client_index < clients:
        raise click.BadParameter(f"must lie in [0, {clients}), got {client_index}", param_hint="--client-index")
    try:
        idx = make_partition(data.y_train, clients, partition, seed=seed, alpha=alpha)[client_index]
        posterior = build_posterior(data, network=network_of(hidden, data), device=device, seed=seed,
                                    **parse_options(options))
    except (ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"client {client_index} of {clients}: {len(idx)} examples, connecting to {server}")
    start_client(server, client_spec(method, posterior.config, posterior.device, seed * 1000 + client_index),
                 data.x_train[idx], data.y_train[idx], threads=None, quiet=not verbose)
