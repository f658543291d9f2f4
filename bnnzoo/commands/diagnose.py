"""``bnnzoo diagnose RUN_DIR``: ArviZ diagnostics of a saved run, as tables and PNG plots."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import click
import numpy as np

from bnnzoo import arviz_compat, metrics
from bnnzoo.diagnostics import (
    group_variable,
    is_point_estimate,
    save,
    summary,
    summary_variables,
)
from bnnzoo.errors import ConfigError

from .evaluate import dataset_for_run, load_run

#: a forest plot shows at most this many groups (neurons, filters) per layer
MAX_FOREST_GROUPS = 40


def _save(fig, path: Path, written: list[Path]) -> None:
    import matplotlib.pyplot as plt  # lazy: matplotlib, kept off the CLI's start-up

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


# ---- sections ---------------------------------------------------------------------------------------
def summary_table(idata, chains: int, full: bool = False) -> None:
    """The hyperparameters and per-layer scales (with ``full``, every weight too): mean, sd, central 94% interval, and for draws
    MCSE, bulk/tail ESS and (two chains or more) R-hat (:func:`bnnzoo.arviz_compat.summary`: the
    same table on ArviZ 0.x and 1.x). A point estimate gets its values only."""
    point = is_point_estimate(idata)
    what = "every variable" if full else "hyperparameters and per-layer scales (<layer>.rms: root mean square of its weights)"
    click.echo(f"\n{what}:")
    table = summary(idata, full=full)
    if point:
        table = table[["mean"]].rename(columns={"mean": "value"})
    click.echo(table.to_string())
    if point:
        click.echo("(a point estimate: one draw, so no sd, ESS, R-hat or LOO)")
    elif chains < 2:
        click.echo("(one chain of independent draws: no R-hat, which needs two chains or more; the ESS measures "
                   "the Monte Carlo precision of the draws)")


def loo_section(idata, posterior=None, data=None, reloo: bool = False, num_samples: int = 100,
                exact: bool = False) -> dict:
    """PSIS-LOO with the Pareto-k counts; with ``reloo`` the points of k > 0.7 are refitted
    (``bnnzoo.loo``: ``az.reloo``, one full fit each) and the refitted estimate is printed too; with
    ``exact`` (``meanfield-vi``) every point is refitted, all at once (``bnnzoo.exact_loo``)."""
    from bnnzoo.loo import (  # lazy: bnnzoo.loo imports arviz, kept off the CLI's start-up
        K_THRESHOLD,
        loo,
    )

    x, y = data if data is not None else (None, None)
    if is_point_estimate(idata):
        click.echo("\nLOO: none for a point estimate (one draw: PSIS-LOO needs posterior draws)")
        return {"point_estimate": True}
    try:
        result = arviz_compat.loo_fields(loo(posterior, x, y, idata=idata))
    except ConfigError as err:  # too few draws to smooth
        click.echo(f"\nPSIS-LOO: none ({err})")
        return {"too_few_draws": True}
    n = int(result.n_data_points)
    k = result.pareto_k
    good = float(result.good_k)
    counts = {"good": int((k <= good).sum()), "bad": int(((k > good) & (k <= 1)).sum()), "very bad": int((k > 1).sum())}
    click.echo(f"\nPSIS-LOO on the {n} training points ({int(result.n_samples)} draws): elpd_loo "
               f"{result.elpd:.2f} +- {result.se:.2f} ({result.elpd / n:.4f} +- {result.se / n:.4f} per point), "
               f"p_loo {result.p:.2f}")
    click.echo(f"  Pareto k: {counts['good']} good (<= {good:.2f}), {counts['bad']} bad (<= 1), "
               f"{counts['very bad']} very bad (> 1)")
    out = {"elpd_loo": float(result.elpd), "se": float(result.se), "n": n, "pareto_k": counts}
    if counts["bad"] or counts["very bad"]:
        worst = sorted(range(n), key=lambda i: -k[i])[:5]
        click.echo(f"  warning: {counts['bad'] + counts['very bad']} points have Pareto k > {good:.2f}: their LOO "
                   f"terms are unreliable (worst: {', '.join(f'#{i} k={k[i]:.2f}' for i in worst)}); "
                   + ("refitting those above 0.7 below" if reloo else
                      "`--reloo` refits the model without each point of k > 0.7 (exact LOO terms); for "
                      "meanfield-vi, `--exact-loo` refits it without every point at once"))
        if int(result.n_samples) < 100:
            click.echo(f"  (only {int(result.n_samples)} draws: Pareto smoothing needs a hundred or more)")
    if reloo and (k > K_THRESHOLD).any():
        native = loo(posterior, x, y, reloo=True, k_threshold=K_THRESHOLD, num_samples=num_samples, idata=idata)
        refits, refitted = int(native["refits"]), arviz_compat.loo_fields(native)
        click.echo(f"  with exact refits for the {refits} points of k > {K_THRESHOLD}: elpd_loo "
                   f"{refitted.elpd:.2f} +- {refitted.se:.2f} ({refitted.elpd / n:.4f} +- "
                   f"{refitted.se / n:.4f} per point), p_loo {refitted.p:.2f}")
        out.update(elpd_reloo=refitted.elpd, se_reloo=refitted.se, refits=refits)
    if exact:
        try:
            native = loo(posterior, x, y, method="exact", num_samples=num_samples, progress=True)
        except TypeError as err:
            raise click.ClickException(str(err)) from None
        result = arviz_compat.loo_fields(native)
        click.echo(f"  exact LOO ({int(native['refits'])} refits, one without each training point, trained at once): "
                   f"elpd_loo {result.elpd:.2f} +- {result.se:.2f} ({result.elpd / n:.4f} +- "
                   f"{result.se / n:.4f} per point), p_loo {result.p:.2f}")
        out.update(elpd_exact=result.elpd, se_exact=result.se)
    return out


def calibration_section(posterior, dataset, num_samples: int, out: Path, written: list[Path]) -> None:
    """Classification: test accuracy, NLL, ECE and a reliability diagram. Regression: the held-out
    log-likelihood and the coverage of central predictive intervals from posterior predictive draws."""
    import matplotlib.pyplot as plt  # lazy: matplotlib, kept off the CLI's start-up

    click.echo(f"\ncalibration on the {len(dataset.x_test)} test points:")
    if posterior.task == "classification":
        probs = posterior.predict(dataset.x_test, num_samples=num_samples).probs
        y = dataset.y_test.to(probs.device)
        m = metrics.classification_metrics(probs, y)
        click.echo(f"  accuracy {m['accuracy']:.4f}, nll {m['nll']:.4f}, ECE (15 bins) {m['ece']:.4f}, "
                   f"brier {m['brier']:.4f}")
        curve = metrics.reliability_curve(probs, y)
        bins = len(curve["count"])
        centres = (np.arange(bins) + 0.5) / bins
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        used = np.asarray(curve["count"]) > 0
        ax.bar(centres[used], np.asarray(curve["accuracy"])[used], width=1 / bins, edgecolor="k", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.plot(np.asarray(curve["confidence"])[used], np.asarray(curve["accuracy"])[used], "o", color="C3",
                label="(confidence, accuracy)")
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"reliability diagram (ECE {m['ece']:.3f})")
        ax.legend(loc="upper left")
        _save(fig, out / "reliability.png", written)
        return
    test = posterior.to_arviz((dataset.x_test, dataset.y_test), num_samples=num_samples, sites=None)
    ll = test.log_likelihood["obs"].values.reshape(-1, len(dataset.y_test))
    lpd = np.logaddexp.reduce(ll, axis=0) - math.log(ll.shape[0])
    click.echo(f"  held-out log-likelihood {lpd.mean():.4f} +- {lpd.std(ddof=1) / math.sqrt(len(lpd)):.4f} per point")
    reps = test.posterior_predictive["obs"].values.reshape(-1, len(dataset.y_test))
    y = test.observed_data["obs"].values
    for level in (0.5, 0.9):
        lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2], axis=0)
        click.echo(f"  {level:.0%} central predictive interval covers {((y >= lo) & (y <= hi)).mean():.1%} "
                   f"of the test targets")


def plots(idata, posterior, out: Path, written: list[Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ArviZ 0.x calls an API Matplotlib 3.11 deprecates
        warnings.simplefilter("ignore", RuntimeWarning)  # R-hat of a pruned (constant) group divides by zero
        _plots(idata, posterior, out, written)


def _plots(idata, posterior, out: Path, written: list[Path]) -> None:
    chains = int(idata.posterior.sizes["chain"])
    point = is_point_estimate(idata)
    net = posterior.net
    layers = [layer.name for layer in (net.hidden_layers() or net.param_layers)]
    names = [group_variable(idata, layer) for layer in layers]
    coords, rows, total = {}, 0, 0
    for name in names:
        for dim in idata.posterior[name].dims[2:]:
            size = int(idata.posterior.sizes[dim])
            if size > MAX_FOREST_GROUPS:
                coords[dim] = list(range(MAX_FOREST_GROUPS))
            rows, total = rows + min(size, MAX_FOREST_GROUPS), total + size
    fig = arviz_compat.plot_forest(idata, names, coords, chains=chains, figsize=(9, max(3.0, 0.3 * rows)))
    note = f"; first {MAX_FOREST_GROUPS} groups per layer" if rows < total else ""
    fig.suptitle("per-group (neuron / filter) posterior: " + ", ".join(names) + note, fontsize=9)
    _save(fig, out / "forest.png", written)

    _training_traces(idata, out, written)

    if not point:  # one draw has no trace
        fig = arviz_compat.plot_trace(idata, summary_variables(idata))
        fig.tight_layout()
        _save(fig, out / "trace_posterior.png", written)

    draws = int(idata.posterior_predictive.sizes["chain"] * idata.posterior_predictive.sizes["draw"])
    _save(arviz_compat.plot_ppc(idata, min(50, draws)), out / "ppc.png", written)
    if posterior.task == "regression" and not point:  # LOO-PIT weighs draws by PSIS: none for one draw
        fig = arviz_compat.plot_loo_pit(idata, "obs")
        fig.axes[0].set_title("LOO-PIT: uniform when the predictive is calibrated")
        _save(fig, out / "loo_pit.png", written)


def _training_traces(idata, out: Path, written: list[Path]) -> None:
    """The loss (negative ELBO per example for SVI) per epoch and the pruned fraction and step size
    over time, from the ``training`` group."""
    import matplotlib.pyplot as plt  # lazy: matplotlib, kept off the CLI's start-up

    if "training" not in arviz_compat.groups(idata):
        return
    training = idata["training"]
    panels = [v for v in training.data_vars
              if v == "loss" or "pruned_fraction" in v or v.endswith(("step_size", "potential"))]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
    for ax, name in zip(axes[:, 0], panels):
        var = training[name]
        values = np.atleast_2d(var.values) if "chain" in var.dims else var.values[None]
        for c, row in enumerate(values):
            ax.plot(np.arange(len(row)), row, label=f"chain {c}" if len(values) > 1 else None)
        ax.set_xlabel(var.dims[-1])
        ax.set_title(name, fontsize=9)
        if name == "loss" and np.all(values > 0) and values.max() / values.min() > 20:
            ax.set_yscale("log")
        if len(values) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("training trace")
    fig.tight_layout()
    _save(fig, out / "trace.png", written)


@click.command("diagnose")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="where to write the plots and posterior.nc (default RUN_DIR/diagnostics)")
@click.option("--num-samples", default=100, show_default=True, type=click.IntRange(min=2),
              help="draws from a guide (a sampler's stored draws are all used)")
@click.option("--data", "data", default=None, help="the data (default: what the run was fitted on)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--reloo", is_flag=True, help="refit without each training point whose Pareto k exceeds 0.7 and "
              "report the exact-LOO-corrected estimate (one fit per such point: for small data sets)")
@click.option("--exact-loo", "exact_loo", is_flag=True, help="exact LOO of a meanfield-vi run: one refit without "
              "each training point, all trained at once as one batched computation")
@click.option("--full", is_flag=True, help="summarise every weight, not only the per-layer and hyper-parameter variables")
def command(run_dir, out, num_samples, data, device, reloo, exact_loo, full) -> None:
    """ArviZ diagnostics of the saved run RUN_DIR: a summary table of the hyperparameters and per-layer
    scales (ESS, R-hat with chains), PSIS-LOO with Pareto-k warnings, calibration on the test data, and
    PNG plots (forest plot of per-neuron scales or inclusion probabilities, training trace of the loss
    and pruned fraction, posterior trace, posterior predictive check, LOO-PIT or reliability diagram).
    The ArviZ data is saved as posterior.nc."""
    import matplotlib  # lazy: matplotlib, kept off the CLI's start-up

    matplotlib.use("Agg")
    with warnings.catch_warnings():  # ArviZ 0.x announces its 1.0 refactor on import: not news to a user here
        warnings.simplefilter("ignore", FutureWarning)
        import arviz  # lazy: arviz, kept off the CLI's start-up  # noqa: F401

    posterior = load_run(run_dir, device)
    dataset = dataset_for_run(posterior, data, None)
    out = Path(out or Path(run_dir) / "diagnostics")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    try:
        idata = posterior.to_arviz((dataset.x_train, dataset.y_train), num_samples=num_samples,
                                   feature_names=dataset.meta.get("feature_names"))
    except (TypeError, ValueError, FloatingPointError) as err:
        raise click.ClickException(str(err)) from None
    chains, draws = int(idata.posterior.sizes["chain"]), int(idata.posterior.sizes["draw"])
    sp = posterior.sparsity()
    click.echo(f"{posterior!r} on {dataset.name} split {dataset.split}")
    click.echo(f"  {idata.attrs['inference']}: {chains} chain(s) x {draws} draws; posterior group holds "
               f"{idata.attrs['weights']}")
    click.echo(f"  pruned: {sp['weights_pruned_fraction']:.1%} of the weights, "
               f"{sp['hidden_groups_pruned_fraction']:.1%} of the hidden groups ({sp['architecture']})")
    summary_table(idata, chains, full)
    loo_section(idata, posterior, (dataset.x_train, dataset.y_train), reloo=reloo, num_samples=num_samples,
                exact=exact_loo)
    calibration_section(posterior, dataset, num_samples, out, written)
    plots(idata, posterior, out, written)
    written.append(save(idata, out / "posterior.nc"))
    click.echo("\nwrote " + ", ".join(str(p) for p in written))
