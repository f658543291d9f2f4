"""Any ``torch.nn.Module`` as a network: its linear and convolutional layers become the weight sites.

:class:`ModuleNetwork` gives a user's module the interface of :class:`~bnnzoo.models.networks.Network`
(the functional description every prior, guide and kernel works with), so the catalog's methods fit
it as they fit the built-in architectures:

* **Weight sites.** Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of the module is a
  parametric layer named by its path in the module (``"blocks.0.mlp.fc1"``), with the sites
  ``"<path>.weight"`` and ``"<path>.bias"`` as PyTorch names the parameters. A layer built without a
  bias gains one (a site initialised at zero), so that every group is a weight row plus its bias
  entry; before a normalisation layer it changes nothing but one more parameter per group.
* **Groups.** One group per output neuron of a linear layer and per output channel of a
  convolution (with its bias), as for the built-in networks. The layer registered last is the
  output layer (never pruned); the others are the hidden layers.
* **The forward pass** is the module's own: while :meth:`ModuleNetwork.apply` runs, each parametric
  layer's ``forward`` is replaced by the method's linear operation ``linear(layer, h)`` (a drawn
  weight, a local-reparameterised draw, a masked posterior mean), and everything else (residual
  additions, attention, pooling, normalisation) runs as the module defines it.
* **Every other parameter is a point estimate**: normalisation layers' scales and shifts,
  embeddings, class tokens, position embeddings. They stay ``nn.Parameter`` s of the network, and the
  Pyro model registers them with the param store, so SVI fits (MAP, mean-field, horseshoe, BMR)
  learn them by maximising the ELBO (type-II maximum likelihood); samplers hold them at their values.
  Normalisation layers' running statistics follow the module's training and evaluation modes:
  batch statistics while the network trains, the running averages once it is put in ``eval()``.

Unsupported: convolutions with a ``padding_mode`` other than ``"zeros"`` (refused with the layer's
name) and layers whose forward is not ``op(h, weight, bias)`` (their parameters become point
estimates, as any other parameter).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .site_layout import SiteLayout

#: the module types whose weights become sites, with the kind of their layer spec
SITE_MODULES: dict[type, str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


@dataclass(frozen=True)
class ModuleLayer:
    """A parametric layer of a :class:`ModuleNetwork`: the spec the guides see (``name``, ``kind``,
    ``weight_shape``, ``num_groups``, ``fan_in``, ``op``, ``out_mask_shape``)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups of a convolution

    @property
    def num_groups(self) -> int:
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def op(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(h, weight, bias)
        if self.kind == "conv1d":
            return F.conv1d(h, weight, bias, **self.conv)
        return F.conv2d(h, weight, bias, **self.conv)

    def out_mask_shape(self) -> tuple[int, ...]:
        return {"linear": (-1,), "conv1d": (-1, 1), "conv2d": (-1, 1, 1)}[self.kind]


def _layer_spec(name: str, module: nn.Module) -> ModuleLayer:
    kind = SITE_MODULES[type(module)]
    conv = {}
    if kind != "linear":
        if module.padding_mode != "zeros":
            raise ConfigError(f"layer {name!r}: padding_mode {module.padding_mode!r} is not supported "
                              f"(only 'zeros')")
        conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                "groups": module.groups}
    return ModuleLayer(name, kind, tuple(module.weight.shape), conv)


class ModuleNetwork(SiteLayout, nn.Module):
    """A user's ``nn.Module`` (copied; the original is never changed) as a network whose linear and
    convolutional layers are weight sites (module docstring). ``input_shape`` is the shape of one
    input without the batch dimension; a forward pass on zeros checks that the module runs on it."""

    #: the wiring between layers is the module's code, not a chain: a pruned group's outgoing
    #: weights are not counted as removed (:func:`~bnnzoo.models.sparsity.input_groups`)
    is_chain = False

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], name: str | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name or type(module).__name__
        self.module = copy.deepcopy(module).cpu()
        self.param_layers: list[ModuleLayer] = []
        self._leaves: dict[str, nn.Module] = {}
        self._initial: dict[str, torch.Tensor] = {}
        for path, mod in self.module.named_modules():
            if type(mod) not in SITE_MODULES:
                continue
            if not path:
                raise ConfigError("the module is a single layer: wrap it in a module with an output layer")
            layer = _layer_spec(path, mod)
            self.param_layers.append(layer)
            self._leaves[path] = mod
            self._initial[f"{path}.weight"] = mod.weight.detach().clone()
            bias = mod.bias.detach().clone() if mod.bias is not None else torch.zeros(layer.num_groups)
            self._initial[f"{path}.bias"] = bias
            # the weights live in the guide from now on: the copy keeps no parameter for them
            del mod.weight
            del mod.bias
            mod.weight, mod.bias = None, None
        if not self.param_layers:
            raise ConfigError(f"module {self.name} has no nn.Linear, nn.Conv1d or nn.Conv2d layer to put a prior on")
        #: the network's layers, as the guides that walk a chain see them (the parametric ones)
        self.layers = list(self.param_layers)
        with torch.no_grad():
            was_training = self.module.training
            self.module.eval()
            try:
                out = self.forward(torch.zeros((2,) + self.input_shape), self._initial)
            except Exception as exc:  # the user's module may raise anything on a wrong shape
                raise ConfigError(f"module {self.name} does not run on inputs of shape {self.input_shape}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.module.train(was_training)
        if out.dim() != 2 or out.shape[1] != self.output_dim:
            raise ConfigError(f"module {self.name} must return (batch, {self.output_dim}) outputs from its last "
                              f"layer {self.param_layers[-1].name!r}, got shape {tuple(out.shape)}")

    # ---- structure -------------------------------------------------------------------------
    def point_parameters(self) -> dict[str, nn.Parameter]:
        """The module's parameters that are not weight sites (point estimates)."""
        return dict(self.module.named_parameters())

    # ---- forward -----------------------------------------------------------------------------
    @contextmanager
    def _linear_ops(self, linear: Callable[[ModuleLayer, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        for layer in self.param_layers:
            self._leaves[layer.name].forward = lambda h, layer=layer: linear(layer, h)
        try:
            yield
        finally:
            for layer in self.param_layers:
                del self._leaves[layer.name].forward

    def apply(self, x: torch.Tensor, linear: Callable[[ModuleLayer, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the module, letting ``linear(layer, h)`` compute each parametric layer."""
        with self._linear_ops(linear):
            return self.module(x)

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Outputs for one set of weights ``params`` (site name -> tensor). Where ``params`` also
        holds entries of :meth:`state_buffers` (a sampler's draw records them), the module runs with
        those normalisation statistics in place of its own."""
        with self._buffers_from(params):
            return self.apply(x, lambda layer, h: layer.op(h, params[f"{layer.name}.weight"],
                                                           params[f"{layer.name}.bias"]))

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the module's floating-point buffers (BatchNorm's running means and variances),
        by their names in the module: they follow the weights, so each stored draw of a sampler
        needs its own."""
        return {name: b.detach().clone() for name, b in self.module.named_buffers() if b.is_floating_point()}

    @contextmanager
    def _buffers_from(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        swapped = []
        for name, buf in self.module.named_buffers():
            if name in params and buf.is_floating_point():
                owner, _, attr = name.rpartition(".")
                mod = self.module.get_submodule(owner) if owner else self.module
                swapped.append((mod, attr, mod._buffers[attr]))
                mod._buffers[attr] = params[name]
        try:
            yield
        finally:
            for mod, attr, original in swapped:
                mod._buffers[attr] = original

    # ---- initialisation, description, export ---------------------------------------------------
    def init_params(self, generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """The module's own initial weights (and zero biases where it had none); with a ``generator``
        a fresh draw from PyTorch's default initialisation of each layer (uniform within
        ``1/sqrt(fan_in)``), as :meth:`Network.init_params` draws for a new chain."""
        if generator is None:
            return {k: v.to(device) for k, v in self._initial.items()}
        out = {}
        for layer in self.param_layers:
            bound = 1.0 / math.sqrt(layer.fan_in)
            for param, shape in (("weight", layer.weight_shape), ("bias", (layer.num_groups,))):
                out[f"{layer.name}.{param}"] = torch.empty(shape, device=device).uniform_(-bound, bound,
                                                                                         generator=generator)
        return out

    def spec(self) -> dict:
        """What describes this network in a saved run: its name, input shape and sites (the module
        itself is code, passed again when the run is loaded)."""
        return {"module": self.name, "input_shape": list(self.input_shape),
                "sites": {k: list(v) for k, v in self.sites().items()}}

    def __repr__(self) -> str:
        widths = "-".join(str(layer.num_groups) for layer in self.param_layers)
        return f"ModuleNetwork({self.name}: {'x'.join(map(str, self.input_shape))}-{widths})"

    def to_torch(self, params: Mapping[str, torch.Tensor] | None = None,
                 keep: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain copy of the module with these weights: ``params`` fills in every site (the initial
        weights otherwise) and every layer gets its bias. A ``keep`` mask over a layer's groups
        removes them physically where that is exact (the hidden units of a submodule's
        ``prunable_pairs``, such as the MLPs of :mod:`~bnnzoo.models.architectures`, and, in eval
        mode, the inner channels of its ``prunable_channels`` that the ReLU after BatchNorm zeroes:
        :func:`_shrink_channels`) and is applied
        with :func:`torch.nn.utils.parametrize` elsewhere (pruned rows read as zero, also after
        further training), so the exported module's outputs equal the masked network's."""
        values = {k: v.detach().cpu() for k, v in (params or self._initial).items()}
        keep = {name: k.detach().cpu().bool() for name, k in (keep or {}).items()}
        out = copy.deepcopy(self.module)
        leaves = dict(out.named_modules())
        for layer in self.param_layers:
            mod = leaves[layer.name]
            del mod.weight
            del mod.bias
            mod.weight = nn.Parameter(values[f"{layer.name}.weight"].clone())
            mod.bias = nn.Parameter(values[f"{layer.name}.bias"].clone())
        shrunk = _shrink_pairs(out, keep)
        keep = {**keep, **_shrink_channels(out, keep)}
        leaves = dict(out.named_modules())
        for layer in self.param_layers:
            k = keep.get(layer.name)
            if k is not None and layer.name not in shrunk and not bool(k.all()):
                mod = leaves[layer.name]
                parametrize.register_parametrization(mod, "weight", _RowMask(k, tuple(mod.weight.shape)))
                parametrize.register_parametrization(mod, "bias", _RowMask(k, (len(k),)))
        return out


def _shrink_pairs(module: nn.Module, keep: Mapping[str, torch.Tensor]) -> set[str]:
    """Remove pruned hidden units physically where a submodule declares it exact: a submodule's
    ``prunable_pairs`` lists ``(producer, consumer)`` child names of two ``nn.Linear`` s between which
    only an activation with ``f(0) = 0`` runs elementwise (an MLP's ``fc1 -> gelu -> fc2``). The
    producer's pruned rows and the consumer's matching input columns are dropped (a pruned unit
    outputs exactly 0 there, so nothing changes); returns the producers shrunk."""
    shrunk = set()
    for path, mod in list(module.named_modules()):
        for producer, consumer in getattr(mod, "prunable_pairs", ()):
            name = f"{path}.{producer}" if path else producer
            k = keep.get(name)
            first, second = getattr(mod, producer), getattr(mod, consumer)
            if k is None or not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
                continue
            idx = torch.nonzero(k).flatten()
            smaller_first = nn.Linear(first.in_features, len(idx))
            smaller_second = nn.Linear(len(idx), second.out_features, bias=second.bias is not None)
            with torch.no_grad():
                smaller_first.weight.copy_(first.weight[idx])
                smaller_first.bias.copy_(first.bias[idx])
                smaller_second.weight.copy_(second.weight[:, idx])
                if second.bias is not None:
                    smaller_second.bias.copy_(second.bias)
            setattr(mod, producer, smaller_first)
            setattr(mod, consumer, smaller_second)
            shrunk.add(name)
    return shrunk


def _shrink_channels(module: nn.Module, keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove pruned inner channels of convolutional blocks physically where that is exact in eval
    mode: a submodule's ``prunable_channels`` lists ``(producer, norm, consumer)`` child names, two
    ``nn.Conv2d`` with a ``nn.BatchNorm2d`` (running statistics) and then a ReLU between them (a
    residual block's ``conv1 -> bn1 -> relu -> conv2``). A pruned channel of the producer outputs 0,
    which the normalisation maps to the constant ``c = beta - gamma mu / sqrt(var + eps)``; where
    ``relu(c) = 0`` the channel adds nothing to the consumer, so it is dropped with its normalisation
    entries and the consumer's input channel. Where ``c > 0`` it adds a constant image, which the
    consumer's zero padding makes position-dependent at the borders, so no bias can stand for it:
    that channel stays, masked. Returns, per producer changed, the keep mask of its remaining
    channels (the masked ones among them False)."""
    out = {}
    for path, mod in list(module.named_modules()):
        for producer, norm, consumer in getattr(mod, "prunable_channels", ()):
            name = f"{path}.{producer}" if path else producer
            k = keep.get(name)
            first, bn, second = getattr(mod, producer), getattr(mod, norm), getattr(mod, consumer)
            if k is None or not (isinstance(first, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                                 and isinstance(second, nn.Conv2d) and bn.track_running_stats
                                 and first.groups == 1 and second.groups == 1):
                continue
            with torch.no_grad():
                gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
                beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                constant = beta - gamma * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
            stays = k | (constant > 0).cpu()
            if bool(stays.all()):
                continue
            idx = torch.nonzero(stays).flatten()
            with torch.no_grad():
                smaller_first = copy.deepcopy(first)
                smaller_first.weight = nn.Parameter(first.weight[idx].clone())
                if first.bias is not None:
                    smaller_first.bias = nn.Parameter(first.bias[idx].clone())
                smaller_first.out_channels = len(idx)
                smaller_bn = copy.deepcopy(bn)
                smaller_bn.num_features = len(idx)
                for attr in ("weight", "bias"):
                    if getattr(bn, attr) is not None:
                        setattr(smaller_bn, attr, nn.Parameter(getattr(bn, attr)[idx].clone()))
                for attr in ("running_mean", "running_var"):
                    setattr(smaller_bn, attr, getattr(bn, attr)[idx].clone())
                smaller_second = copy.deepcopy(second)
                smaller_second.weight = nn.Parameter(second.weight[:, idx].clone())
                smaller_second.in_channels = len(idx)
            setattr(mod, producer, smaller_first)
            setattr(mod, norm, smaller_bn)
            setattr(mod, consumer, smaller_second)
            out[name] = k[idx]
    return out


class _RowMask(nn.Module):
    """A parametrization zeroing the pruned groups (rows) of a weight or bias."""

    def __init__(self, keep: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("keep", keep.reshape((-1,) + (1,) * (len(shape) - 1)))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.keep
