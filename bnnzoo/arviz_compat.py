"""The one place bnnzoo calls the parts of ArviZ that differ between its two lines.

ArviZ 0.x (0.17 to 0.23: Python 3.11) and ArviZ 1.x (the ``arviz-base`` / ``arviz-stats`` /
``arviz-plots`` split: the only line installed on Python 3.12 and newer) share ``az.loo``,
``az.ess``, ``az.rhat``, ``az.mcse``, ``az.SamplingWrapper`` and netCDF files, but differ in:

- the data object: 0.x ``InferenceData`` (``az.from_dict(posterior=..., ...)``, ``groups()`` a
  method returning a list), 1.x ``xarray.DataTree`` (``az.from_dict({group: {...}})``, ``groups`` a
  property of paths): :func:`from_dict`, :func:`groups`;
- the summary: 0.x ``az.summary(stat_funcs=, extend=)`` is gone in 1.x and both lines name and
  round the columns differently: :func:`summary` computes one table from the statistics both lines
  share (mean, sd, central interval, MCSE, bulk/tail ESS, R-hat);
- LOO results: ``ELPDData`` is a pandas ``Series`` with ``elpd_loo``, ``p_loo``, ``loo_i`` in 0.x
  and a dataclass with ``elpd``, ``p``, ``elpd_i`` in 1.x. :func:`loo_fields` reads either into
  :class:`LooFields`; :func:`elpd_data` builds the version's own ``ELPDData`` through its public
  constructor (no private module), so that ``az.compare`` accepts it; :func:`reloo` passes the
  threshold under the version's keyword; :func:`compare` names the ELPD column ``elpd`` on both;
- plots: 0.x returns Matplotlib axes, 1.x a ``PlotCollection``, and ``az.plot_ppc`` became
  ``az.plot_ppc_dist``: every plot function here returns the Matplotlib ``Figure`` it drew on;
- ``az.waic`` is removed in 1.x: bnnzoo reports PSIS-LOO only.

Everything is imported lazily (ArviZ is heavy and kept off ``import bnnzoo``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache

import numpy as np

from .errors import ConfigError

#: the central interval of :func:`summary` (ArviZ's default probability, 0.94)
INTERVAL_PROB = 0.94

#: the fewest posterior draws :func:`loo` smooths: PSIS fits its Pareto tail to the largest
#: ``min(S / 5, 3 sqrt(S))`` importance ratios, and ArviZ 1.x refuses a tail of fewer than 5
MIN_PSIS_DRAWS = 25


def _az():
    with warnings.catch_warnings():  # ArviZ 0.x announces its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz  # lazy: heavy, kept off the path of import bnnzoo and the CLI's start-up
    return arviz


@cache
def arviz_major() -> int:
    """The major version of the installed ArviZ: 0 or 1."""
    return int(_az().__version__.split(".")[0])


# ---- data ----------------------------------------------------------------------------------------------
def from_dict(groups: dict[str, dict[str, np.ndarray]], *, dims: dict, coords: dict, attrs: dict,
              extra: dict | None = None):
    """The ArviZ data object of ``{group: {var: array}}``: sample groups laid out ``(chain, draw,
    ...)``, the groups whose name contains ``data`` (``observed_data``, ``constant_data``,
    ``predictions_constant_data``) without sample dimensions; ``dims`` and ``coords`` name the other
    dimensions; ``attrs`` are the object's (0.x) or the tree root's (1.x) attributes. ``extra`` adds
    groups of ``{var: (array, dims)}`` that are not indexed by draw (kept and saved, ignored by
    ArviZ's functions). Returns an ``InferenceData`` (0.x) or an ``xarray.DataTree`` (1.x)."""
    import xarray as xr  # lazy: heavy, as arviz

    az = _az()
    extras = {name: xr.Dataset({k: (d, v) for k, (v, d) in variables.items()})
              for name, variables in (extra or {}).items() if variables}
    if arviz_major() >= 1:
        # 1.x labels the predictions groups with pred_dims / pred_coords only (0.x falls back to dims)
        tree = az.from_dict(groups, dims=dims, coords=coords, pred_dims=dims, pred_coords=coords, attrs={"/": attrs})
        tree.attrs.update(attrs)
        for name, ds in extras.items():
            tree[name] = xr.DataTree(ds)
        return tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a one-draw posterior: "more draws than chains"
        idata = az.from_dict(**groups, dims=dims, coords=coords, attrs=attrs)
    if extras:
        idata.add_groups(extras)
    return idata


def groups(idata) -> list[str]:
    """The names of the groups of ``idata`` (``"posterior"``, ...), on both lines."""
    if callable(getattr(idata, "groups", None)):  # 0.x InferenceData
        return list(idata.groups())
    return [path.strip("/") for path in idata.groups if path.strip("/")]


def group(idata, name: str):
    """The group ``name`` of ``idata`` as an ``xarray.Dataset`` (1.x: the tree node's dataset)."""
    node = idata[name]
    return node.to_dataset() if type(node).__name__ == "DataTree" else node


# ---- summary -------------------------------------------------------------------------------------------
def _values(stat) -> dict[str, np.ndarray]:
    if hasattr(stat, "children") and "posterior" in getattr(stat, "children", {}):  # a DataTree result
        stat = stat["posterior"].to_dataset()
    return {str(k): np.asarray(v.values) for k, v in stat.data_vars.items()}


def summary(idata, var_names: list[str], *, diagnostics: bool = True, round_to: int = 4):
    """A ``pandas.DataFrame`` summarising the posterior variables ``var_names`` (a row per scalar).

    Columns: ``mean``, ``sd``, the central :data:`INTERVAL_PROB` interval (``eti_3%``, ``eti_97%``);
    with ``diagnostics``, ``mcse_mean``, ``ess_bulk``, ``ess_tail`` (meaningful for one chain of
    draws too) and, with two chains or more, ``r_hat``. The statistics are ArviZ's ``az.mcse``,
    ``az.ess`` and ``az.rhat`` (the same rank-normalised estimators on both lines), the rest numpy, so
    the table is the same on ArviZ 0.x and 1.x."""
    import pandas as pd  # lazy: heavy, a dependency of arviz

    az = _az()
    post = idata.posterior if hasattr(idata, "posterior") else idata["posterior"]
    chains = int(post.sizes["chain"])
    lo, hi = (1 - INTERVAL_PROB) / 2, (1 + INTERVAL_PROB) / 2
    columns = {"mean": {}, "sd": {}, f"eti_{lo:.0%}": {}, f"eti_{hi:.0%}": {}}
    stats = {}
    if diagnostics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant (pruned) variables divide by zero
            stats["mcse_mean"] = _values(az.mcse(idata, var_names=var_names, method="mean"))
            stats["ess_bulk"] = _values(az.ess(idata, var_names=var_names, method="bulk"))
            stats["ess_tail"] = _values(az.ess(idata, var_names=var_names, method="tail"))
            if chains > 1:
                stats["r_hat"] = _values(az.rhat(idata, var_names=var_names))
    for name in stats:
        columns[name] = {}
    index = []
    for name in var_names:
        values = np.asarray(post[name].values, dtype=float)  # (chain, draw, *shape)
        flat = values.reshape(-1, *values.shape[2:])
        shape = values.shape[2:]
        for pos in np.ndindex(*shape) if shape else [()]:
            label = f"{name}[{', '.join(map(str, pos))}]" if shape else name
            index.append(label)
            column = flat[(slice(None), *pos)]
            columns["mean"][label] = column.mean()
            columns["sd"][label] = column.std(ddof=1) if len(column) > 1 else np.nan
            columns[f"eti_{lo:.0%}"][label], columns[f"eti_{hi:.0%}"][label] = np.quantile(column, [lo, hi])
            for stat, per_var in stats.items():
                columns[stat][label] = float(np.asarray(per_var[name])[pos])
    return pd.DataFrame(columns, index=index).round(round_to)


# ---- LOO -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LooFields:
    """An ArviZ LOO result under one set of names: ``elpd`` (0.x ``elpd_loo``), ``se``, ``p``
    (0.x ``p_loo``), ``pointwise`` (the per-point ELPD terms, 0.x ``loo_i``, 1.x ``elpd_i``; ``None``
    unless pointwise), ``pareto_k``, ``good_k`` (the Pareto-k threshold of good points),
    ``n_samples``, ``n_data_points`` and ``warning``."""

    elpd: float
    se: float
    p: float
    pointwise: np.ndarray | None
    pareto_k: np.ndarray | None
    good_k: float
    n_samples: int
    n_data_points: int
    warning: bool


def _get(result, *names):
    for name in names:
        try:
            value = result[name]
        except (KeyError, AttributeError):
            continue
        if value is not None:
            return value
    return None


def loo_fields(result) -> LooFields:
    """:class:`LooFields` of an ``ELPDData`` of either line (``az.loo``, ``az.reloo``, :func:`elpd_data`)."""
    pointwise, k = _get(result, "elpd_i", "loo_i"), _get(result, "pareto_k")
    good = _get(result, "good_k")
    return LooFields(elpd=float(_get(result, "elpd", "elpd_loo")), se=float(result["se"]),
                     p=float(_get(result, "p", "p_loo")),
                     pointwise=None if pointwise is None else np.asarray(pointwise.values, dtype=float),
                     pareto_k=None if k is None else np.asarray(k.values, dtype=float),
                     good_k=0.7 if good is None else float(good), n_samples=int(result["n_samples"]),
                     n_data_points=int(result["n_data_points"]), warning=bool(result["warning"]))


def loo(idata, *, pointwise: bool = True):
    """``az.loo`` of ``idata``'s ``log_likelihood`` group (ArviZ's own ``ELPDData``; read it with
    :func:`loo_fields`). High-Pareto-k warnings are silenced: callers read ``pareto_k``. Fewer than
    :data:`MIN_PSIS_DRAWS` draws raise :class:`~bnnzoo.errors.ConfigError` on both lines (0.x would
    return a meaningless estimate, 1.x fails inside the smoothing)."""
    az = _az()
    ll = group(idata, "log_likelihood")
    draws = int(ll.sizes["chain"] * ll.sizes["draw"])
    if draws < MIN_PSIS_DRAWS:
        raise ConfigError(f"PSIS-LOO needs at least {MIN_PSIS_DRAWS} posterior draws, got {draws} "
                          f"({ll.sizes['chain']} chain(s) x {ll.sizes['draw']}): raise num_samples")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.loo(idata, pointwise=pointwise)


def sampling_wrapper_base() -> type:
    """ArviZ's ``SamplingWrapper`` class (the same protocol on both lines: ``sel_observations``,
    ``sample``, ``get_inference_data``, ``log_likelihood__i``)."""
    return _az().SamplingWrapper


def reloo(wrapper, loo_orig, k_threshold: float):
    """``az.reloo``: the exact refit of every point of ``loo_orig`` whose Pareto k exceeds
    ``k_threshold`` (0.x calls it ``k_thresh``). Returns the ``ELPDData`` with those terms replaced and
    their Pareto k set to 0."""
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if arviz_major() >= 1:
            return az.reloo(wrapper, loo_orig=loo_orig, k_threshold=k_threshold, pointwise=True)
        return az.reloo(wrapper, loo_orig=loo_orig, k_thresh=k_threshold)


def elpd_data(*, elpd: float, se: float, p: float, pointwise, n_samples: int, good_k: float,
              pareto_k=None, warning: bool = False, **extra):
    """ArviZ's ``ELPDData`` of a LOO estimate computed by bnnzoo, built through the public API of the
    installed line (0.x: the class ``az.loo`` returns, a ``Series``; 1.x: ``az.ELPDDataLOO``).
    ``pointwise``: the per-point ELPD terms (an ``xarray.DataArray`` of dim ``obs_id``); ``pareto_k``
    defaults to zeros (no importance sampling); ``extra`` entries are stored under their names
    (``result["refits"]``) on both lines."""
    import xarray as xr  # lazy: heavy, as arviz

    az = _az()
    n = int(pointwise.size)
    if pareto_k is None:
        pareto_k = xr.zeros_like(pointwise).rename("pareto_k")
    if arviz_major() >= 1:
        result = az.ELPDDataLOO(elpd=float(elpd), se=float(se), p=float(p), n_samples=int(n_samples),
                                n_data_points=n, scale="log", warning=bool(warning), good_k=float(good_k),
                                elpd_i=pointwise.rename("elpd_i"), pareto_k=pareto_k)
        for key, value in extra.items():
            result[key] = value
        return result
    entries = dict(elpd_loo=float(elpd), se=float(se), p_loo=float(p), n_samples=int(n_samples), n_data_points=n,
                   warning=bool(warning), loo_i=pointwise.rename("loo_i"), pareto_k=pareto_k, scale="log",
                   good_k=float(good_k), **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return az.ELPDData(data=list(entries.values()), index=list(entries))  # public in 0.x: az.loo's type


def compare(results: dict):
    """``az.compare`` of named LOO results: a ``pandas.DataFrame`` ranked best first whose ELPD column
    is ``elpd`` on both lines (0.x names it ``elpd_loo``)."""
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if arviz_major() >= 1:
            return az.compare(results, round_to="none")
        return az.compare(results, ic="loo").rename(columns={"elpd_loo": "elpd", "p_loo": "p"})


# ---- plots ---------------------------------------------------------------------------------------------
def _figure(result):
    """The Matplotlib figure of a plot function's result: axes (0.x: one or an array) or a
    ``PlotCollection`` (1.x, drawn with the Matplotlib backend: its tree's ``figure`` variable)."""
    if hasattr(result, "viz"):
        return result.viz["figure"].item()
    ax = result if hasattr(result, "figure") else np.ravel(result)[0]
    return ax.figure


def plot_forest(idata, var_names: list[str], coords: dict, *, chains: int, figsize):
    """Forest plot of ``var_names`` (chains combined; 0.x adds ESS and, with two chains or more,
    R-hat columns). Returns the figure."""
    az = _az()
    if arviz_major() >= 1:
        return _figure(az.plot_forest(idata, var_names=var_names, coords=coords, combined=True,
                                      backend="matplotlib", figure_kwargs={"figsize": figsize}))
    return _figure(az.plot_forest(idata, var_names=var_names, coords=coords, combined=True, r_hat=chains > 1,
                                  ess=True, figsize=figsize))


def plot_trace(idata, var_names: list[str], figsize=None):
    """Trace plot (density and draws) of the posterior variables ``var_names``. Returns the figure."""
    az = _az()
    if arviz_major() >= 1:
        kwargs = {"figure_kwargs": {"figsize": figsize}} if figsize else {}
        return _figure(az.plot_trace_dist(idata, var_names=var_names, backend="matplotlib", **kwargs))
    return _figure(az.plot_trace(idata, var_names=var_names, compact=True, figsize=figsize))


def plot_ppc(idata, num_pp_samples: int, seed: int = 0):
    """Posterior predictive check of ``obs``: ``num_pp_samples`` replicated densities against the
    observed one (0.x ``az.plot_ppc``, 1.x ``az.plot_ppc_dist``). Returns the figure."""
    az = _az()
    if arviz_major() >= 1:
        np.random.seed(seed)
        return _figure(az.plot_ppc_dist(idata, num_samples=num_pp_samples, backend="matplotlib"))
    return _figure(az.plot_ppc(idata, num_pp_samples=num_pp_samples, random_seed=seed))


def plot_loo_pit(idata, var_name: str = "obs"):
    """LOO-PIT plot of ``var_name`` (uniform when the predictive is calibrated). Returns the figure."""
    az = _az()
    if arviz_major() >= 1:
        return _figure(az.plot_loo_pit(idata, var_names=[var_name], backend="matplotlib"))
    return _figure(az.plot_loo_pit(idata, y=var_name))


def plot_khat(result):
    """Pareto k of every point of a LOO result. Returns the figure."""
    az = _az()
    if arviz_major() >= 1:
        return _figure(az.plot_khat(result, backend="matplotlib"))
    return _figure(az.plot_khat(result, show_bins=True))
