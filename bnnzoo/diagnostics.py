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
    of ``y`` (regression subtracts ``log y_std``), so that ``az.loo`` applies.
``posterior_predictive`` / ``observed_data``
    ``obs``: replicated targets (one per draw, original units; ``num_samples`` of them at the one
    draw of a point estimate, whose predictive is still a distribution) and the observed ones.
``prior`` / ``prior_predictive``
    Draws of the model alone (``pyro.infer.Predictive`` on ``posterior.model``, no guide, at the
    training inputs; ``prior_samples`` of them, one chain): the chosen weight sites, every layer's
    ``group_norm`` and ``rms`` as in ``posterior``, and ``obs``, the prior predictive targets in the
    original units. Made with ``data``.
``predictions`` / ``predictions_constant_data``
    With ``new_data``: ``new_obs`` (dim ``pred_id``), a target drawn at every posterior draw for
    every new input (original units), and ``new_x``, those inputs.
``constant_data``
    ``"<layer>.keep"``: the groups (neurons, filters) kept after pruning; and what the fit decided
    that is not drawn (the optional ``arviz_constant_data`` hook): em-tdamp's
    ``"<layer>.inclusion_probability"`` and ``noise_variance``, BMR's ``"<site>.mask"`` and
    ``"<site>.delta_f"`` (dF per weight), with the site's dims.
``sample_stats``
    Per-draw statistics of a sampler (the ``arviz_sample_stats`` hook) under ArviZ's names where it
    has them: ``lp`` (the log joint up to a constant), ``step_size``; then the sampler's own (pruned
    fractions, ...). Absent for guides, whose draws are independent.
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
likelihood's point estimate in the original units. The weights' input dimension of a dense first
layer is labelled by ``feature_names`` where given (integers otherwise).

Guides (``meanfield-vi``, ...) give one chain of ``num_samples`` independent draws; sample
posteriors give their stored ``(chain, draw)`` samples (``num_samples`` is ignored), so R-hat and the
effective sample sizes are real. A point estimate (``posterior.point_estimate``: ``map``) gives one
draw and carries the attribute ``point_estimate = 1`` (on the root and on the ``posterior`` group):
no spread, effective sample size, R-hat or LOO is claimed for it (:func:`is_point_estimate`;
:func:`bnnzoo.loo.loo` refuses it). :func:`summary` is the short table of :func:`summary_variables`
(per-layer and hyperparameter variables, tens of rows), the full one on request. With ArviZ 0.x the result is an ``InferenceData``; everything that
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
from pyro.infer import Predictive

from . import arviz_compat
from .guides.training import TrainingHistory
from .models.errors import ConfigError

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
    empty for a guide). Optional, read when present: ``point_estimate`` (one draw, marked as a
    point estimate) and ``arviz_constant_data()`` (``{name: tensor}`` for ``constant_data``).
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
    """The major version of the installed ArviZ (:func:`bnnzoo.arviz_compat.arviz_major`)."""
    return arviz_compat.arviz_major()


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
def _draw(posterior, x, y, chains: int, draws: int, sites: list[str], chunk_size: int, seed: int | None,
          x_new=None, per_draw: int = 1) -> dict:
    """Run through ``chains * draws`` weight draws once: kept sites, group norms, and on data the
    pointwise log-likelihood and ``per_draw`` replicated targets per draw, on new inputs ``x_new``
    ``per_draw`` predicted targets per draw; then the hyperparameters."""
    net, lik, std = posterior.net, posterior.model.likelihood, posterior.standardizer
    regression = posterior.task == "regression"
    log_y_scale = math.log(std.y_scale) if regression else 0.0
    y_std = std.y(y) if (regression and y is not None) else y
    bad = [name for name, p in lik.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"{posterior.name}: the likelihood's {', '.join(bad)} is not finite: the fit diverged")
    kept = {s: [] for s in sites}
    norms = {layer.name: [] for layer in net.param_layers}
    loglik, replicas, predictions = [], [], []
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
                        rep = lik.distribution(f).sample((per_draw,))
                    except ValueError as err:  # Pyro validates the parameters: non-finite outputs
                        raise FloatingPointError(f"{posterior.name}: draw {count - 1} gives invalid network "
                                                 f"outputs ({err.args[0].splitlines()[0]})") from None
                replicas.append(std.y_inverse(rep) if regression else rep)
            if x_new is not None:
                f = torch.cat([net(x_new[i:i + chunk_size], params) for i in range(0, len(x_new), chunk_size)])
                with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                    if seed is not None:
                        torch.manual_seed(seed + chains * draws + count)
                    rep = lik.distribution(f).sample((per_draw,))
                predictions.append(std.y_inverse(rep) if regression else rep)
        if count != chains * draws:
            raise RuntimeError(f"{posterior.name}: draw_weights({chains * draws}) gave {count} draws")
        hyper = posterior.arviz_hyperparameters(draws)
    _check_draws(f"{type(posterior).__name__}.arviz_hyperparameters", hyper, chains, draws)

    def stack(values, per: int = 1):  # values of (per, ...) when per > 1
        t = torch.stack(values)
        return t.reshape(chains, draws * per, *t.shape[(2 if per > 1 else 1):])

    out = {"sites": {s: stack(v) for s, v in kept.items()}, "hyper": hyper, "norms": {}, "rms": {}}
    for layer in net.param_layers:
        sq = stack(norms[layer.name])
        size = math.prod(layer.weight_shape) + layer.num_groups
        out["norms"][layer.name] = sq.sqrt()
        out["rms"][layer.name] = (sq.sum(-1) / size).sqrt()
    if x_new is not None:
        out["predictions"] = stack([p if per_draw > 1 else p[0] for p in predictions], per_draw)
    if x is not None:
        out["loglik"] = stack(loglik)
        out["replicas"] = stack([r if per_draw > 1 else r[0] for r in replicas], per_draw)
        finite = torch.isfinite(out["loglik"]).all((1, 2))
        if not finite.all():
            raise FloatingPointError(f"{posterior.name}: the log-likelihood is not finite for chains "
                                     f"{torch.nonzero(~finite).flatten().tolist()}: their draws diverged")
    return out


@torch.no_grad()
def _draw_prior(posterior, x, num_draws: int, sites: list[str], seed: int | None) -> dict:
    """``num_draws`` draws of the model with no guide and no data (``pyro.infer.Predictive`` on
    ``posterior.model`` at the standardised inputs ``x``): the kept weight sites, every layer's group
    norms and weight RMS as in the posterior group, and the replicated targets (original units)."""
    net, std = posterior.net, posterior.standardizer
    all_sites = list(net.sites())
    devices = [posterior.device] if posterior.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        drawn = Predictive(posterior.model, num_samples=num_draws, return_sites=[*all_sites, "obs"])(x)
    values = {}  # Predictive may put a batch dim of 1 before a site outside any plate: (draw, *site shape)
    for layer in net.param_layers:
        values[f"{layer.name}.weight"] = drawn[f"{layer.name}.weight"].reshape(num_draws, *layer.weight_shape)
        values[f"{layer.name}.bias"] = drawn[f"{layer.name}.bias"].reshape(num_draws, layer.num_groups)
    out = {"sites": {s: values[s][None] for s in sites}, "norms": {}, "rms": {}}
    for layer in net.param_layers:
        w = values[f"{layer.name}.weight"].reshape(num_draws, layer.num_groups, -1)
        sq = w.pow(2).sum(-1) + values[f"{layer.name}.bias"].pow(2)
        size = math.prod(layer.weight_shape) + layer.num_groups
        out["norms"][layer.name] = sq.sqrt()[None]
        out["rms"][layer.name] = (sq.sum(-1) / size).sqrt()[None]
    obs = drawn["obs"].reshape(num_draws, len(x))
    out["obs"] = (std.y_inverse(obs) if posterior.task == "regression" else obs)[None]
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


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _feature_coords(net, feature_names) -> dict[str, list]:
    """``{"<first layer>.in": names}`` when the first layer is dense and takes one input per name."""
    if feature_names is None:
        return {}
    names = [str(n) for n in feature_names]
    first = net.param_layers[0]
    if len(first.weight_shape) != 2 or first.weight_shape[1] != len(names):
        raise ConfigError(f"feature_names: {len(names)} names for a first layer {first.name!r} of weight shape "
                          f"{tuple(first.weight_shape)}: expected one name per input of a dense first layer")
    if len(set(names)) != len(names):
        raise ConfigError(f"feature_names must be distinct, got {names}")
    return {f"{first.name}.in": names}


def to_arviz(posterior: ArvizExportable, data=None, *, num_samples: int = 100, sites="auto", seed: int | None = 0,
             chunk_size: int = 4096, new_data=None, prior_samples: int = 100, feature_names=None):
    """ArviZ data of a fitted ``posterior`` (layout in the module docstring).

    ``data = (x, y)`` (raw units; usually the training data, for LOO) adds the ``log_likelihood``,
    ``posterior_predictive`` and ``observed_data`` groups, and with ``prior_samples > 0`` the
    ``prior`` and ``prior_predictive`` groups (that many draws of the model alone, at ``x``).
    ``new_data`` (raw inputs) adds the ``predictions`` group: a target drawn for every new input at
    every posterior draw (``obs``, dim ``pred_id``), with the inputs in ``predictions_constant_data``.
    ``num_samples`` draws from a guide (one chain); a sample posterior gives all its stored draws; a
    point estimate (``posterior.point_estimate``, MAP) gives one draw and is marked so by the
    attribute ``point_estimate = 1`` of the result and of its ``posterior`` group. ``sites`` chooses
    the weights to keep (:func:`select_sites`); ``feature_names`` (one per input of a dense first
    layer; a :class:`~bnnzoo.data.Dataset` that has names carries them as ``meta["feature_names"]``)
    label the first layer's input dimension, integers otherwise. With a ``seed`` the draws are
    reproducible and the global random state is left untouched. ``posterior`` is anything that
    implements :class:`ArvizExportable`.
    """
    _check_exportable(posterior)
    num_samples = _count("num_samples", num_samples, 1)
    chunk_size = _count("chunk_size", chunk_size, 1)
    prior_samples = _count("prior_samples", prior_samples, 0)
    net = posterior.net
    chosen, note = select_sites(net, sites)
    coords: dict[str, list] = _feature_coords(net, feature_names)
    x, y = _as_data(posterior, data)
    x_new = x_new_raw = None
    if new_data is not None:
        x_new_raw = posterior.validate(new_data, None, "new_data")[0].to(posterior.device)
        x_new = posterior.standardizer.x(x_new_raw)
    point = bool(getattr(posterior, "point_estimate", False))
    chains = int(posterior.num_chains)
    draws = int(posterior.arviz_draws_per_chain(num_samples))
    if chains < 1 or draws < 1:
        raise RuntimeError(f"{posterior.name} has no draws to convert ({chains} chains of {draws} draws)")
    # a point estimate's predictive is still a distribution: num_samples replicas at its one draw
    got = _draw(posterior, x, y, chains, draws, chosen, chunk_size, seed, x_new, num_samples if point else 1)

    post, dims = {}, {}
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
    for name, value in getattr(posterior, "arviz_constant_data", dict)().items():
        constant[name] = _numpy(value)
        d = _constant_dims(net, name, tuple(value.shape))
        if d is not None:
            dims[name] = d
    groups["constant_data"] = constant

    if x is not None:
        groups["log_likelihood"] = {"obs": _numpy(got["loglik"])}
        groups["posterior_predictive"] = {"obs": _numpy(got["replicas"])}
        groups["observed_data"] = {"obs": _numpy(y)}
        dims["obs"] = ["obs_id"]
        coords["obs_id"] = list(range(len(y)))
        if prior_samples:
            prior = _draw_prior(posterior, x, prior_samples, chosen, seed)
            groups["prior"] = {s: _numpy(v) for s, v in prior["sites"].items()}
            for layer in net.param_layers:
                groups["prior"][f"{layer.name}.group_norm"] = _numpy(prior["norms"][layer.name])
                groups["prior"][f"{layer.name}.rms"] = _numpy(prior["rms"][layer.name])
            groups["prior_predictive"] = {"obs": _numpy(prior["obs"])}
    if x_new is not None:
        groups["predictions"] = {"new_obs": _numpy(got["predictions"])}
        groups["predictions_constant_data"] = {"new_x": _numpy(x_new_raw)}
        input_dims = [f"{net.param_layers[0].name}.in"] if x_new.dim() == 2 else \
            [f"input_dim_{i}" for i in range(x_new.dim() - 1)]
        dims["new_obs"], dims["new_x"] = ["pred_id"], ["pred_id", *input_dims]
        coords["pred_id"] = list(range(len(x_new)))

    inference = "stored samples" if posterior.stores_samples else "independent draws of a guide"
    attrs = {
        "bnnzoo_model": posterior.name,
        "task": posterior.task,
        "network": repr(net),
        "inference": "a point estimate (one draw: no ESS, R-hat or LOO)" if point else inference,
        "num_chains": chains,
        "num_draws": draws,
        "weights": note,
        "config": json.dumps(posterior.config, default=str),
    }
    if point:
        attrs["point_estimate"] = 1
    if posterior.task == "regression":
        std = posterior.standardizer
        attrs.update(y_loc=float(std.y_mean), y_scale=std.y_scale, noise_scale=posterior.noise_scale() * std.y_scale)
    out = _build(groups, dims=dims, coords=coords, attrs=attrs, extra={"training": _training_group(posterior, chains)})
    if point:
        out["posterior"].attrs["point_estimate"] = 1
    return out


def _constant_dims(net, name: str, shape: tuple[int, ...]) -> list[str] | None:
    """``"<site>.<var>"`` of the site's shape -> the site's dims; ``"<layer>.<var>"`` of the layer's
    group count -> ``<layer>.out``."""
    site = name.rpartition(".")[0]
    if site in set(net.sites()):
        layer = net.layer(site.rpartition(".")[0])
        site_shape = tuple(layer.weight_shape) if site.endswith(".weight") else (layer.num_groups,)
        return site_dims(net, site) if shape == site_shape else None
    return _hyper_dims(net, name, shape)


def is_point_estimate(idata) -> bool:
    """Whether ArviZ data from :func:`to_arviz` holds a point estimate (one draw, MAP)."""
    return bool(idata.attrs.get("point_estimate", 0)) or bool(idata["posterior"].attrs.get("point_estimate", 0))


def _build(groups: dict[str, dict[str, np.ndarray]], *, dims: dict, coords: dict, attrs: dict,
           extra: dict[str, dict[str, tuple[np.ndarray, list[str]]]]):
    """The ArviZ object from ``{group: {var: array}}``: :func:`bnnzoo.arviz_compat.from_dict` (0.x
    ``InferenceData``, 1.x ``xarray.DataTree``)."""
    return arviz_compat.from_dict(groups, dims=dims, coords=coords, attrs=attrs, extra=extra)


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


def summary_variables(idata, full: bool = False) -> list[str]:
    """The posterior variables of the summary table. By default the short one: hyperparameters and
    per-layer scales, i.e. every variable that is neither a weight site nor indexed by a layer's
    groups (tens of rows, whatever the network's size); with ``full`` every posterior variable (a row
    per weight, per group, per hyperparameter)."""
    if full:
        return list(idata.posterior.data_vars)
    out = []
    for name, var in idata.posterior.data_vars.items():
        sample_dims = [d for d in var.dims if d not in ("chain", "draw")]
        if name.endswith((".weight", ".bias")) or any(d.endswith(".out") for d in sample_dims):
            continue
        out.append(name)
    return out


def summary(idata, full: bool = False, round_to: int = 4):
    """The summary table (:func:`bnnzoo.arviz_compat.summary`, the same on both ArviZ lines) of
    :func:`summary_variables`: short by default, every variable with ``full``. A point estimate
    (:func:`is_point_estimate`) gets its values only: one draw has no spread, effective sample size
    or R-hat."""
    return arviz_compat.summary(idata, summary_variables(idata, full), diagnostics=not is_point_estimate(idata),
                                round_to=round_to)
