"""What the ``bnnzoo`` commands share: ``--set KEY=VALUE`` parsing and the test metrics of a run."""

from __future__ import annotations

import json

import click

#: the entries of :func:`run_metrics` that describe the network rather than its predictions
SPARSITY_KEYS = ("weights_pruned_fraction", "hidden_groups_pruned_fraction", "architecture")


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``("key=value", ...)`` as a dict; a value is read as JSON where it parses, else kept as text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def print_metrics(metrics: dict) -> None:
    """One aligned ``name: value`` line per metric (floats to four decimals)."""
    for key, value in metrics.items():
        click.echo(f"  {key:>28s}: {value:.4f}" if isinstance(value, float) else f"  {key:>28s}: {value}")


def run_metrics(posterior, dataset, num_samples: int) -> dict:
    """``posterior.evaluate`` on ``dataset``'s test split with ``num_samples`` draws, plus the
    posterior's pruned fractions and kept architecture (:data:`SPARSITY_KEYS`)."""
    metrics = posterior.evaluate(dataset.x_test, dataset.y_test, num_samples=num_samples)
    sp = posterior.sparsity()
    metrics.update({key: sp[key] for key in SPARSITY_KEYS})
    return metrics
