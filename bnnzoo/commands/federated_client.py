"""``bnnzoo federated-client --server HOST:PORT``: one client of a ``bnnzoo federated --serve`` run.

The client waits up to ``--timeout`` seconds for the server to accept connections, then takes part
until the run ends: over TLS when given the CA certificate that signed the server's
(``--root-certificates``, as Flower's ``flower-supernode``), presenting the shared token of
``--token-file`` in the handshake. Every failure is one line and a non-zero exit status: a server
that cannot be reached (the address and what to check), a connection that fails, a server that
refused this client (how its options differ from the server's), a local fit that diverged.
"""

from __future__ import annotations

import socket
from pathlib import Path

import click

from bnnzoo.errors import BnnzooError
from bnnzoo.federated.partition import partition as make_partition

from .common import check_options, parse_options
from .federated import federated_options, load, network_of, token_of


@click.command("federated-client")
@click.option("--server", "server", required=True, metavar="HOST:PORT", help="the server's address")
@federated_options
@click.option("--client-index", default=0, show_default=True,
              help="which part of the training split this client holds (with --clients and --partition)")
@click.option("--clients", default=1, show_default=True, help="the number of parts the training split is cut into")
@click.option("--partition", type=click.Choice(["iid", "label-skew"]), default="iid", show_default=True)
@click.option("--alpha", default=0.5, show_default=True)
@click.option("--name", default=None, help="the name the server reports this client by  [default: HOST/client-INDEX]")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="the CA certificate (PEM) that signed the server's: connect with TLS")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="present the token in this file to the server (its --token-file)")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds to wait for the server to accept the connection")
@click.option("--device", default="cpu", show_default=True)
@click.option("--verbose", is_flag=True, help="show Flower's own log")
def command(server, dataset, split, seed, method, hidden, options, client_index, clients, partition, alpha, name,
            root_certificates, token_file, timeout, device, verbose) -> None:
    """Serve as one client: the local data are part CLIENT_INDEX of the dataset's training split (or
    the whole of a data directory with --clients 1); data, network, method and --set options must
    match the server's."""
    from bnnzoo.federated.run import (  # lazy: flwr, kept off the CLI's start-up
        build_posterior,
        client_spec,
        start_client,
    )

    if not 0 <= client_index < clients:
        raise click.BadParameter(f"must lie in [0, {clients}), got {client_index}", param_hint="--client-index")
    token = token_of(token_file)
    certificates = Path(root_certificates).read_bytes() if root_certificates else None
    name = name or f"{socket.gethostname()}/client-{client_index}"
    data = load(dataset, split)
    entry_options = check_options("em-tdamp", data.task, parse_options(options))
    try:
        idx = make_partition(data.y_train, clients, partition, seed=seed, alpha=alpha)[client_index]
        posterior = build_posterior(data, network=network_of(hidden, data), device=device, seed=seed, **entry_options)
        spec = client_spec(method, posterior.config, posterior.device, seed * 1000 + client_index, name=name,
                           token=token)
        click.echo(f"{name}: {len(idx)} examples (part {client_index} of {clients}), connecting to {server}"
                   f"{' with TLS' if certificates else ''}", err=True)
        client = start_client(server, spec, data.x_train[idx], data.y_train[idx], threads=None, quiet=not verbose,
                              root_certificates=certificates, timeout=timeout)
    except (BnnzooError, ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{name}: the run ended after {client.rounds_done} rounds", err=True)
