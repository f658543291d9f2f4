"""Fitted posteriors as ArviZ data: one layout for every method of the catalog.

:func:`to_arviz` (also :meth:`bnnzoo.posterior.Posterior.to_arviz`) draws weights from a fitted
posterior and builds these groups, every array laid out ``(chain, draw, *dims)``:

``posterior``
    ``"<layer>.weight"`` (dims ``<layer>.out``, ``<layer>.in`` and, for a conv layer,
    ``<layer>.kh``, ``<layer>.kw``) and ``"<layer>.bias"`` (``<layer>.out``) for the chosen sites
    (``sites``: all of them for a network of at most :data:`MAX_AUTO_WEIGHTS` weights, none for a
    bigger one unless asked; the attribute ``weights`` says which); for every layer
    ``"<layer>.group_norm"``, the Euclidean norm of each group (a neuron's or filter's weight row and
    bias entry, dim ``<layer>.out``), and ``"<layer>.rms"``, the root mean square of the layer's
    weights; and the method's hyperparameters and scale variables in full (the posterior's
    ``arviz_hyperparameters`` hook, e.g. ``"<layer>.scale"`` of a horseshoe).
``log_likelihood``
    ``obs`` (dims ``chain, draw, obs_id``: Pyro's site name; a dimension cannot share the name of a
    one-dimensional variable, which xarray would turn into a coordinate): ``log p(y_n | x_n, w)`` for every draw, in the original units
    of ``y`` (regression subtracts ``log y_std``), so that ``az.loo`` and ``az.waic`` apply.
``posterior_predictive`` / ``observed_data``
    ``obs``: replicated targets (one per draw, original units) and the observed ones.
``constant_data``
    ``"<layer>.keep"``: the groups (neurons, filters) kept after pruning.
``sample_stats``
    Per-draw statistics of a sampler (the ``arviz_sample_stats`` hook: step size, potential, ...).
    Absent for guides, whose draws are independent.
``training``
    The fit's :class:`~bnnzoo.guides.training.TrainingHistory`: ``loss`` (the negative ELBO per
    example for SVI) and ``epoch_seconds`` per epoch (dim ``epoch``; ``chain, epoch`` for a posterior
    that stores the samples of several chains, whose epochs are recorded chain after chain); every
    numeric list of ``history.extra`` under its own name (dim ``<name>_step``: a method's per-pass or
    per-event records, e.g. pruned fractions); and, for samplers, each chain's per-sample record
    (``history.extra["chains"]``: ``chains.<key>``, dims ``chain, sample``, warm-up included). These
    arrays are indexed by step, not by ``(chain, draw)``: ArviZ would read a 1-D array in
    ``sample_stats`` as one chain of draws, so they live in this extra group (ArviZ keeps and saves
    it, and its functions ignore it).

The attributes (of the ``InferenceData`` / the tree's root) name the model, the task, the network,
the kind of inference, the chains and draws, which weights were kept and the configuration (JSON);
for regression also ``y_loc`` and ``y_scale`` (the training standardisation) and ``noise_scale``, the
likelihood's point estimate in the original units.

Guides (``map``, ``meanfield-vi``, ...) give one chain of ``num_samples`` independent draws; sample
posteriors give their stored ``(chain, draw)`` samples (``num_samples`` is ignored), so R-hat and the
effective sample sizes are real. With ArviZ 0.x the result is an ``InferenceData``; everything that
depends on the ArviZ version is in :func:`_build`, which also targets ArviZ 1.x (``DataTree``).

What the conversion needs of a posterior is the protocol :class:`ArvizExportable`: every
:class:`~bnnzoo.posterior.Posterior` implements it, and so may any object that is not one.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .guides.training import TrainingHistory

#: networks with at most this many weights keep every weight in the ``posterior`` group by default
MAX_AUTO_WEIGHTS = 20_000

#: the per-group variable a forest plot shows, in order of preference (a method's own first)
GROUP_VARIABLES = ("inclusion_probability", "scale", "group_norm")


@runtime_checkable
class ArvizExportable(Protocol):
    """What :func:`to_arviz` needs of a fitted posterior.

    The posterior's identity and fit: ``name``, ``task`` (``"regression"`` or
    ``"classification"``), ``config`` (recorded as JSON), ``device``, ``is_fitted``, ``net`` (a
    :class:`~bnnzoo.models.networks.Network`), ``model.likelihood``, ``standardizer`` (the
    training standardisation), ``history`` (the fit's
    :class:`~bnnzoo.guides.training.TrainingHistory`); ``validate(x, y, what)`` (raw arrays ->
    checked tensors), ``draw_weights(n)`` (``n`` draws of every weight site, chain by chain),
    ``sparsity()`` (its ``"keep"``: the kept groups per layer) and ``noise_scale()`` (regression,
    standardised units).

    The export hook proper: ``stores_samples`` (``True``: the draws are a fixed set of stored
    samples; ``False``: independent draws of a guide), ``num_chains``,
    ``arviz_draws_per_chain(num_samples)`` (the draws of each chain when ``num_samples`` are asked
    for), ``arviz_hyperparameters(num_draws)`` (``{name: (chain, draw, ...)}`` tensors, drawn after
    the weights; ``"<layer>.<var>"`` of shape ``(chain, draw, groups)`` is indexed by the layer's
    groups) and ``arviz_sample_stats()`` (``{name: (chain, draw)}`` per-draw sampler statistics,
    empty for a guide).
    """

    name: str
    config: dict
    device: torch.device
    model: Any
    standardizer: Any
    history: TrainingHistory
    stores_samples: bool

    @property
    def task(self) -> str: ...

    @property
    def net(self) -> Any: ...

    @property
    def is_fitted(self) -> bool: ...

    @property
    def num_chains(self) -> int: ...

    def validate(self, x, y=None, what: str = "data") -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def draw_weights(self, num_samples: int) -> Iterator[dict[str, torch.Tensor]]: ...

    def sparsity(self) -> dict: ...

    def noise_scale(self) -> float: ...

    def arviz_draws_per_chain(self, num_samples: int) -> int: ...

    def arviz_hyperparameters(self, num_draws: int) -> dict[str, torch.Tensor]: ...

    def arviz_sample_stats(self) -> dict[str, torch.Tensor]: ...


def _protocol_members(protocol: type) -> list[str]:
    names = set(getattr(protocol, "__annotations__", {})) | set(vars(protocol))
    return sorted(n for n in names if not n.startswith("_"))


def _check_exportable(posterior) -> None:
    if not isinstance(posterior, ArvizExportable):
        missing = [n for n in _protocol_members(ArvizExportable) if not hasattr(posterior, n)]
        raise TypeError(f"to_arviz needs a posterior implementing bnnzoo.diagnostics.ArvizExportable: "
                        f"{type(posterior).__name__} lacks {', '.join(missing)}")
    if not posterior.is_fitted:
        raise RuntimeError(f"this {posterior.name} posterior is not fitted yet: call fit(x, y) first")


def arviz_major() -> int:
    import arviz  # lazy: heavy, kept off the path of import bnnzoo and the CLI's start-up

    return int(arviz.__version__.split(".")[0])


# ---- which weights -----------------------------------------------------------------------------------
def select_sites(net, sites) -> tuple[list[str], str]:
    """The weight sites to keep and a note saying which: ``"auto"``, ``"all"``, ``None`` (none), or
    layer names (``"fc1"``: its weight and bias) and site names (``"fc1.weight"``)."""
    all_sites = list(net.sites())
    if isinstance(sites, str) and sites == "auto":
        if net.num_weights() <= MAX_AUTO_WEIGHTS:
            return all_sites, f"all {net.num_weights()} weights"
        return [], (f"no weights: the network has {net.num_weights()} > {MAX_AUTO_WEIGHTS} weights; pass "
                    f"sites=[layer or site names] (or 'all') to keep some")
    if sites is None:
        return [], "no weights (sites=None)"
    if isinstance(sites, str) and sites == "all":
        return all_sites, f"all {net.num_weights()} weights"
    if isinstance(sites, str) or not isinstance(sites, Iterable):
        raise ValueError(f"sites must be 'auto', 'all', None or a list of layer/site names, got {sites!r}")
    layers = [layer.name for layer in net.param_layers]
    chosen = []
    for name in sites:
        if name in layers:
            chosen += [f"{name}.weight", f"{name}.bias"]
        elif name in all_sites:
            chosen.append(name)
        else:
            raise ValueError(f"unknown layer or site {name!r}; layers are {layers}, sites {all_sites}")
    chosen = [s for s in all_sites if s in chosen]  # forward order, no duplicates
    return chosen, f"the weights of {', '.join(chosen)}" if chosen else "no weights (empty selection)"


def site_dims(net, site: str) -> list[str]:
    layer_name, _, kind = site.rpartition(".")
    layer = net.layer(layer_name)
    if kind == "bias":
        return [f"{layer_name}.out"]
    extra = ["kh", "kw"] if len(layer.weight_shape) == 4 else []
    return [f"{layer_name}.{d}" for d in ["out", "in", *extra]]


def _hyper_dims(net, name: str, shape: tuple[int, ...]) -> list[str] | None:
    """``"<layer>.<var>"`` with one trailing dimension of the layer's group count -> ``<layer>.out``."""
    layer_name = name.rpartition(".")[0]
    layers = {layer.name: layer for layer in net.param_layers}
    if layer_name in layers and shape == (layers[layer_name].num_groups,):
        return [f"{layer_name}.out"]
    return None


def stored_draw_records(records: list[dict], draws: int, device=None) -> dict[str, torch.Tensor]:
    """A sampler's per-sample records (``history.extra["chains"]``: per chain, ``{key: [value per
    kernel sample]}`` with a ``warmup`` flag) at its stored draws: ``{key: (chain, draw)}`` for every scalar,
    numeric key whose post-warm-up length is ``draws`` in every chain."""
    out = {}
    if not records or any("warmup" not in r for r in records):
        return out
    for key in records[0]:
        if key == "warmup":
            continue
        rows = []
        for record in records:
            values = [v for v, warm in zip(record.get(key, []), record["warmup"]) if not warm]
            if len(values) != draws or not all(isinstance(v, numbers.Real) for v in values):
                break
            rows.append(values)
        else:
            out[key] = torch.tensor(rows, dtype=torch.float32, device=device)
    return out


# ---- conversion ------------------------------------------------------------------------------------
def _as_data(posterior, data):
    if data is None:
        return None, None
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be a pair (x, y) of inputs and targets, got {type(data).__name__}")
    x, y = posterior.validate(data[0], data[1], "data")
    return posterior.standardizer.x(x.to(posterior.device)), y.to(posterior.device)


def _check_draws(what: str, values: dict, chains: int, draws: int) -> None:
    for name, value in values.items():
        if not torch.is_tensor(value) or tuple(value.shape[:2]) != (chains, draws):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{what} returned {name!r} with shape {shape}: expected a tensor of shape "
                             f"(chain, draw, ...) = ({chains}, {draws}, ...)")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def _draw(posterior, x, y, chains: int, draws: int, sites: list[str], chunk_size: int, seed: int | None) -> dict:
    """Run through ``chains * draws`` weight draws once: kept sites, group norms, and on data the
    pointwise log-likelihood and a replicated target per draw; then the hyperparameters."""
    net, lik, std = posterior.net, posterior.model.likelihood, posterior.standardizer
    regression = posterior.task == "regression"
    log_y_scale = math.log(std.y_scale) if regression else 0.0
    y_std = std.y(y) if (regression and y is not None) else y
    bad = [name for name, p in lik.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"{posterior.name}: the likelihood's {', '.join(bad)} is not finite: the fit diverged")
    kept = {s: [] for s in sites}
    norms = {layer.name: [] for layer in net.param_layers}
    loglik, replicas = [], []
    devices = [posterior.device] if posterior.device.type == "cuda" else []
    count = 0
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for params in posterior.draw_weights(chains * draws):
            count += 1
            for s in sites:
                kept[s].append(params[s])
            for layer in net.param_layers:
                w = params[f"{layer.name}.weight"].reshape(layer.num_groups, -1)
                norms[layer.name].append(w.pow(2).sum(1) + params[f"{layer.name}.bias"].pow(2))
            if x is not None:
                f = torch.cat([net(x[i:i + chunk_size], params) for i in range(0, len(x), chunk_size)])
                loglik.append(lik.log_prob(f, y_std) - log_y_scale)
                # the replicas draw from a stream of their own, so that the weight draws are those of
                # Posterior.predict / log_likelihood with the same seed
                with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                    if seed is not None:
                        torch.manual_seed(seed + count)
                    try:
                        rep = lik.distribution(f).sample()
                    except ValueError as err:  # Pyro validates the parameters: non-finite outputs
                        raise FloatingPointError(f"{posterior.name}: draw {count - 1} gives invalid network "
                                                 f"outputs ({err.args[0].splitlines()[0]})") from None
                replicas.append(std.y_inverse(rep) if regression else rep)
        if count != chains * draws:
            raise RuntimeError(f"{posterior.name}: draw_weights({chains * draws}) gave {count} draws")
        hyper = posterior.arviz_hyperparameters(draws)
    _check_draws(f"{type(posterior).__name__}.arviz_hyperparameters", hyper, chains, draws)

    def stack(values):
        t = torch.stack(values)
        return t.reshape(chains, draws, *t.shape[1:])

    out = {"sites": {s: stack(v) for s, v in kept.items()}, "hyper": hyper, "norms": {}, "rms": {}}
    for layer in net.param_layers:
        sq = stack(norms[layer.name])
        size = math.prod(layer.weight_shape) + layer.num_groups
        out["norms"][layer.name] = sq.sqrt()
        out["rms"][layer.name] = (sq.sum(-1) / size).sqrt()
    if x is not None:
        out["loglik"], out["replicas"] = stack(loglik), stack(replicas)
        finite = torch.isfinite(out["loglik"]).all((1, 2))
        if not finite.all():
            raise FloatingPointError(f"{posterior.name}: the log-likelihood is not finite for chains "
                                     f"{torch.nonzero(~finite).flatten().tolist()}: their draws diverged")
    return out


def _numeric_list(values) -> bool:
    return (isinstance(values, list) and bool(values)
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values))


def _training_group(posterior: ArvizExportable, chains: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The ``training`` group's variables from the posterior's history (see the module docstring)."""
    history: TrainingHistory = posterior.history
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for key, values in (("loss", history.loss), ("epoch_seconds", history.epoch_seconds)):
        if not values:
            continue
        arr = np.asarray(values, dtype=float)
        if posterior.stores_samples and chains > 1 and len(arr) % chains == 0:
            out[key] = (arr.reshape(chains, -1), ["chain", "epoch"])
        else:
            out[key] = (arr, ["epoch"])
    for key, values in history.extra.items():
        if key != "chains" and key not in out and _numeric_list(values):
            out[key] = (np.asarray(values, dtype=float), [f"{key}_step"])
    records = history.extra.get("chains")
    if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
        for key in records[0]:
            try:
                arr = np.asarray([r[key] for r in records], dtype=float)
            except (KeyError, TypeError, ValueError):  # ragged or not numeric: not an array
                continue
            if arr.ndim < 2 or arr.shape[1] == 0:
                continue
            dims = ["chain", "sample"] + [f"{key}_dim_{i}" for i in range(arr.ndim - 2)]
            out[f"chains.{key}"] = (arr, dims)
    return out


def to_arviz(posterior: ArvizExportable, data=None, *, num_samples: int = 100, sites="auto", seed: int | None = 0,
             chunk_size: int = 4096):
    """ArviZ data of a fitted ``posterior`` (layout in the module docstring).

    ``data = (x, y)`` (raw units; usually the training data, for LOO) adds the ``log_likelihood``,
    ``posterior_predictive`` and ``observed_data`` groups. ``num_samples`` draws from a guide (one
    chain); a sample posterior gives all its stored draws. ``sites`` chooses the weights to keep
    (:func:`select_sites`). With a ``seed`` the draws are reproducible and the global random state is
    left untouched. ``posterior`` is anything that implements :class:`ArvizExportable`.
    """
    _check_exportable(posterior)
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    net = posterior.net
    chosen, note = select_sites(net, sites)
    x, y = _as_data(posterior, data)
    chains = int(posterior.num_chains)
    draws = int(posterior.arviz_draws_per_chain(int(num_samples)))
    if chains < 1 or draws < 1:
        raise RuntimeError(f"{posterior.name} has no draws to convert ({chains} chains of {draws} draws)")
    got = _draw(posterior, x, y, chains, draws, chosen, chunk_size, seed)

    post, dims = {}, {}
    coords: dict[str, list] = {}
    for layer in net.param_layers:
        coords[f"{layer.name}.out"] = list(range(layer.num_groups))
    for s, value in got["sites"].items():
        post[s], dims[s] = _numpy(value), site_dims(net, s)
        for d, n in zip(dims[s], value.shape[2:]):
            coords.setdefault(d, list(range(n)))
    for name, value in got["hyper"].items():
        post[name] = _numpy(value)
        d = _hyper_dims(net, name, tuple(value.shape[2:]))
        if d is not None:
            dims[name] = d
    for layer in net.param_layers:
        post[f"{layer.name}.group_norm"] = _numpy(got["norms"][layer.name])
        dims[f"{layer.name}.group_norm"] = [f"{layer.name}.out"]
        post[f"{layer.name}.rms"] = _numpy(got["rms"][layer.name])

    groups: dict[str, dict] = {"posterior": post}
    stats = posterior.arviz_sample_stats()
    _check_draws(f"{type(posterior).__name__}.arviz_sample_stats", stats, chains, draws)
    if stats:
        groups["sample_stats"] = {k: _numpy(v) for k, v in stats.items()}

    constant = {}
    keep = posterior.sparsity()["keep"]
    for layer in net.param_layers:
        constant[f"{layer.name}.keep"] = keep[layer.name].cpu().numpy()
        dims[f"{layer.name}.keep"] = [f"{layer.name}.out"]
    groups["constant_data"] = constant

    if x is not None:
        groups["log_likelihood"] = {"obs": _numpy(got["loglik"])}
        groups["posterior_predictive"] = {"obs": _numpy(got["replicas"])}
        groups["observed_data"] = {"obs": _numpy(y)}
        dims["obs"] = ["obs_id"]
        coords["obs_id"] = list(range(len(y)))

    attrs = {
        "bnnzoo_model": posterior.name,
        "task": posterior.task,
        "network": repr(net),
        "inference": "stored samples" if posterior.stores_samples else "independent draws of a guide",
        "num_chains": chains,
        "num_draws": draws,
        "weights": note,
        "config": json.dumps(posterior.config, default=str),
    }
    if posterior.task == "regression":
        std = posterior.standardizer
        attrs.update(y_loc=float(std.y_mean), y_scale=std.y_scale, noise_scale=posterior.noise_scale() * std.y_scale)
    return _build(groups, dims=dims, coords=coords, attrs=attrs, extra={"training": _training_group(posterior, chains)})


def _build(groups: dict[str, dict[str, np.ndarray]], *, dims: dict, coords: dict, attrs: dict,
           extra: dict[str, dict[str, tuple[np.ndarray, list[str]]]]):
    """The ArviZ object from ``{group: {var: array}}`` (sample groups ``(chain, draw, ...)``; the data
    groups ``observed_data`` / ``constant_data`` without them), named ``dims`` and ``coords``, and
    ``extra`` groups of ``{var: (array, dims)}`` that are not indexed by draw. The only function here
    that depends on the ArviZ version: 0.x ``InferenceData``, 1.x ``xarray.DataTree``."""
    import arviz as az  # lazy: heavy, kept off the path of import bnnzoo and the CLI's start-up
    import xarray as xr  # lazy: heavy, as arviz

    extras = {name: xr.Dataset({k: (d, v) for k, (v, d) in variables.items()})
              for name, variables in extra.items() if variables}
    if arviz_major() >= 1:  # arviz-base: one nested dict (groups named "*data*" get no sample dims), a DataTree
        tree = az.from_dict(groups, dims=dims, coords=coords, attrs={"/": attrs})
        for name, ds in extras.items():
            tree[name] = xr.DataTree(ds)
        return tree
    idata = az.from_dict(**groups, dims=dims, coords=coords, attrs=attrs)
    if extras:
        idata.add_groups(extras)
    return idata


# ---- files -----------------------------------------------------------------------------------------
def save(idata, path: str | Path) -> Path:
    """Write ArviZ data to a netCDF file (every group, the ``training`` group included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path))
    return path


def load(path: str | Path):
    """Read ArviZ data written by :func:`save`."""
    import arviz as az  # lazy: heavy, kept off the path of import bnnzoo and the CLI's start-up

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no netCDF file at {path}")
    return az.from_netcdf(str(path))


# ---- helpers the command and the tutorial share -------------------------------------------------------
def group_variable(idata, layer: str) -> str:
    """The per-group posterior variable of ``layer`` that a forest plot shows (:data:`GROUP_VARIABLES`)."""
    names = set(idata.posterior.data_vars)
    for var in GROUP_VARIABLES:
        if f"{layer}.{var}" in names:
            return f"{layer}.{var}"
    raise KeyError(f"no per-group variable of layer {layer!r} in the posterior group")


def summary_variables(idata) -> list[str]:
    """The posterior variables of the summary table: hyperparameters and per-layer scales, i.e. every
    variable that is neither a weight site nor indexed by a layer's groups."""
    out = []
    for name, var in idata.posterior.data_vars.items():
        sample_dims = [d for d in var.dims if d not in ("chain", "draw")]
        if name.endswith((".weight", ".bias")) or any(d.endswith(".out") for d in sample_dims):
            continue
        out.append(name)
    return out
