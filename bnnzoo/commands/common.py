"""What the ``bnnzoo`` commands share: ``--set KEY=VALUE`` parsing and the checks run before any
work (options against the entry's schema, the output directory), and the test metrics of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..catalog import get_entry
from ..runs import check_target

#: ``--set`` values written the Python way, read as their JSON counterparts
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}

#: the entries of :func:`run_metrics` that describe the network rather than its predictions
SPARSITY_KEYS = ("weights_pruned_fraction", "hidden_groups_pruned_fraction", "architecture")


class NumSamples(click.ParamType):
    """A ``--num-samples`` value: ``auto`` (as many posterior draws as the Monte Carlo error of the
    predictive needs: ``Posterior.predict``) or a positive integer."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip()
        if text == "auto":
            return text
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"expected 'auto' or a positive integer, got {value!r}", param, ctx)


#: the ``--num-samples`` option of the commands that report test metrics
num_samples_option = click.option(
    "--num-samples", type=NumSamples(), default="auto", show_default=True,
    help="posterior draws for the test metrics: a number, or auto (as many as the Monte Carlo error of the "
         "predictive needs)")


#: the ``--method`` option of the commands that report test metrics (``Posterior.predict``'s ``method``)
predict_method_option = click.option(
    "--method", "method", type=click.Choice(["auto", "sample", "moments", "probit"]), default="auto", show_default=True,
    help="the predictive: the one the fit chose on its validation rows (auto; posterior draws unless a "
         "calibrated classification fit chose another, or with a number of --num-samples), posterior draws "
         "(sample), or without draws by moment propagation (moments; probit: the probit approximation of the "
         "softmax) where the posterior supports it")


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``("key=value", ...)`` as a dict. A value is read as a JSON literal where it parses (``3``,
    ``2.5``, ``1e-3``, ``true``, ``null``, ``[50, 20]``, ``"text"``; also Python's ``True``,
    ``False`` and ``None``), else kept as text (``rule=ss``); the entry's schema then checks it
    (:func:`check_options`), so ``lr=abc`` is refused there as not a number. A key given twice with
    different values is a usage error."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        if text.strip() in _PYTHON_LITERALS:
            value = _PYTHON_LITERALS[text.strip()]
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        if key in out and out[key] != value:
            raise click.BadParameter(f"{key} is given twice, as {out[key]!r} and {value!r}", param_hint="--set")
        out[key] = value
    return out


def merge_options(options: dict, **flags) -> dict:
    """``options`` (from ``--set``) joined with the command's own option flags (``--epochs``...,
    ``None`` where not given): a flag and a ``--set`` of the same option must agree, else a usage
    error naming both."""
    out = dict(options)
    for key, value in flags.items():
        if value is None:
            continue
        if key in out and out[key] != value:
            flag = "--" + key.replace("_", "-")
            raise click.UsageError(f"{flag} {value} and --set {key}={json.dumps(out[key])} disagree: give one")
        out[key] = value
    return out


def check_options(name: str, task: str, options: dict) -> dict:
    """``options`` of catalog entry ``name`` checked against its schema for ``task`` before any
    work (:meth:`~bnnzoo.catalog.CatalogEntry.check_options`); an unknown entry or option, or a
    value of the wrong type or out of range, is a command-line error naming the option and what it
    allows. Returns the options in canonical form."""
    return get_entry(name).check_options(task, options)


def check_out(path, overwrite: bool = False, what: str = "--out") -> Path:
    """Check before any work that a run can be written at ``path``: its nearest existing ancestor
    is a writable directory, the path is not a file, and an existing non-empty directory needs
    ``overwrite`` (:func:`bnnzoo.runs.check_target`). A command-line error otherwise."""
    path = Path(path)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise click.ClickException(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.ClickException(f"{what} {path}: the directory {parent} is not writable")
    return check_target(path, overwrite)


def check_federated_out(method: str, out) -> None:
    """``bnnzoo federated``: ``--out`` saves an EM-TDAMP run, so with ``--method fedavg`` (a plain
    network, no posterior to save) it is a usage error, raised before any round."""
    if out is not None and method != "em-tdamp":
        raise click.UsageError(f"--out saves EM-TDAMP runs; --method {method} returns a plain network: drop --out")


def print_metrics(metrics: dict) -> None:
    """One aligned ``name: value`` line per metric (floats to four decimals)."""
    for key, value in metrics.items():
        click.echo(f"  {key:>28s}: {value:.4f}" if isinstance(value, float) else f"  {key:>28s}: {value}")


def run_metrics(posterior, dataset, num_samples: int | str, method: str = "auto") -> dict:
    """``posterior.evaluate`` on ``dataset``'s test split with ``num_samples`` draws (or by
    ``method``, :meth:`~bnnzoo.posterior.Posterior.predict`), plus the posterior's pruned fractions
    and kept architecture (:data:`SPARSITY_KEYS`) and the predictive used (``"predictive"``). A
    posterior without the asked-for predictive is a command-line error naming why."""
    try:
        metrics = posterior.evaluate(dataset.x_test, dataset.y_test, num_samples=num_samples, method=method)
    except TypeError as err:  # the moment-propagated predictive does not apply to this posterior
        if method in ("auto", "sample"):  # "auto" only picks a predictive the posterior supports
            raise
        raise click.ClickException(f"--method {method}: {err}") from None
    sp = posterior.sparsity()
    metrics.update({key: sp[key] for key in SPARSITY_KEYS})
    metrics["predictive"] = posterior.resolve_predictive(method, num_samples)
    return metrics
