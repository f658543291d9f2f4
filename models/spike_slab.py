"""The group spike-and-slab Gaussian prior (Ke & Fan 2022; Rockova & George 2014; Rockova 2018).

Every weight of a group ``g`` of ``m`` weights shares one inclusion indicator:

    pi      ~ Beta(a, b)                                   one inclusion rate for the network
    gamma_g ~ Bernoulli(pi)                                one indicator per group
    theta_g ~ gamma_g N(0, s1^2 I_m) + (1 - gamma_g) N(0, s0^2 I_m),   s0 << s1  (spike, slab)

Groups (see :class:`GroupLayout`), chosen by ``groups``:

- ``"output"`` (default): the output neurons of dense layers and the output filters of conv layers
  (a weight row plus its bias entry), for every layer but the output layer. With
  ``first_layer="inputs"`` the first layer is grouped by its *inputs* instead (the column of
  weights that reads one input feature, or the slice that reads one input channel), so that whole
  input features can be switched off; its biases then get the slab ``N(0, s1^2)`` alone. The
  output layer's weights get ``N(0, output_scale^2)`` (default: the slab scale) and are never pruned.
- ``"input"``: Ke & Fan's groups (their released code): every dense layer, the output layer
  included, is grouped by its input columns (``weight[:, j]``: the weights that read input ``j``),
  every conv layer by its kernels (``weight[o, i]``: the ``k x k`` kernel from input channel ``i``
  to output filter ``o``). Biases are in no group and get the slab (the output layer's:
  ``output_scale``); ``first_layer`` does not apply. A hidden unit all of whose outgoing groups
  are pruned no longer affects the output; :func:`dead_units` finds them.

With ``scaling="fan_in"`` every scale of a layer is divided by the square root of its fan-in (the
inputs one neuron or filter reads), so that ``s1``, ``s0`` describe the scale of a neuron's
pre-activation for unit-variance inputs and one setting suits layers of any width (LeNet-5's conv
and dense layers); ``scaling="absolute"`` uses the same scales in every layer.

Pyro sites, in sampling order: ``pi``, ``<layer>.gamma`` (shape ``(G,)``) for every grouped layer,
then the network's weight sites (``fc1.weight``, ``fc1.bias``, ...).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .networks import Network
from .priors import SCALINGS

FIRST_LAYER_GROUPS = ("neurons", "inputs")
#: ``"output"``: neurons / filters of the hidden layers; ``"input"``: Ke & Fan's input columns / kernels
GROUPINGS = ("output", "input")


@dataclass(frozen=True)
class GroupLayout:
    """How one layer's weights fall into groups.

    ``axis="out"``: group ``g`` = ``weight[g]`` and ``bias[g]`` (a neuron or an output filter);
    ``axis="in"``: group ``g`` = ``weight[:, g]`` (one input feature or input channel; the bias is
    not in any group); ``axis="kernel"`` (conv): group ``g = o * C_in + i`` = ``weight[o, i]`` (one
    ``k x k`` kernel; the bias is not in any group). ``size`` is the number of weights ``m`` in one
    group.
    """

    layer: str
    axis: str
    num_groups: int
    size: int
    weight_shape: tuple[int, ...]

    @property
    def weight_site(self) -> str:
        return f"{self.layer}.weight"

    @property
    def bias_site(self) -> str:
        return f"{self.layer}.bias"

    def sites(self) -> tuple[str, ...]:
        """The sites holding members of this layer's groups."""
        return (self.weight_site, self.bias_site) if self.axis == "out" else (self.weight_site,)

    def view(self, site: str, per_group: torch.Tensor) -> torch.Tensor:
        """``per_group`` (shape ``(..., G)``) as a view that broadcasts over ``site``'s shape."""
        lead = per_group.shape[:-1]
        if site == self.bias_site:
            return per_group
        ndim = len(self.weight_shape)
        if self.axis == "out":
            return per_group.reshape(*lead, self.num_groups, *([1] * (ndim - 1)))
        if self.axis == "kernel":
            return per_group.reshape(*lead, *self.weight_shape[:2], *([1] * (ndim - 2)))
        return per_group.reshape(*lead, 1, self.num_groups, *([1] * (ndim - 2)))

    def squared_norms(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``||theta_g||^2`` of every group, shape ``(..., G)`` (leading sample dimensions allowed)."""
        w = params[self.weight_site]
        lead = w.dim() - len(self.weight_shape)
        if self.axis == "out":
            sq = w.pow(2).flatten(lead + 1).sum(-1)
            return sq + params[self.bias_site].pow(2)
        if self.axis == "kernel":
            return w.pow(2).sum((-2, -1)).flatten(lead)
        dims = [lead] + list(range(lead + 2, w.dim()))
        return w.pow(2).sum(dims)

    def expand(self, site: str, per_group: torch.Tensor) -> torch.Tensor:
        """``per_group`` (shape ``(G,)``) repeated over every entry of ``site``."""
        shape = self.weight_shape if site == self.weight_site else (self.num_groups,)
        return self.view(site, per_group).expand(shape)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def group_layouts(net: Network, first_layer: str = "neurons", groups: str = "output") -> list[GroupLayout]:
    """The groups of ``net``: with ``groups="output"`` those of its hidden layers (every parametric
    layer but the output layer; the first by its inputs if ``first_layer="inputs"``), with
    ``groups="input"`` the input columns of every dense layer and the kernels of every conv layer."""
    if first_layer not in FIRST_LAYER_GROUPS:
        raise ValueError(f"first_layer must be one of {FIRST_LAYER_GROUPS}, got {first_layer!r}")
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    out = []
    if groups == "input":
        for layer in net.param_layers:
            shape = tuple(layer.weight_shape)
            if len(shape) == 2:
                out.append(GroupLayout(layer.name, "in", shape[1], shape[0], shape))
            else:
                out.append(GroupLayout(layer.name, "kernel", shape[0] * shape[1], math.prod(shape[2:]), shape))
        return out
    for i, layer in enumerate(net.hidden_layers()):
        shape = tuple(layer.weight_shape)
        if i == 0 and first_layer == "inputs":
            out.append(GroupLayout(layer.name, "in", shape[1], math.prod(shape) // shape[1], shape))
        else:
            out.append(GroupLayout(layer.name, "out", shape[0], math.prod(shape[1:]) + 1, shape))
    return out


class SpikeSlabPrior(nn.Module):
    """The group spike-and-slab prior over ``net``'s weights (see the module docstring).

    ``slab_scale`` ``s1`` and ``spike_scale`` ``s0`` are the standard deviations of the two
    components, ``a``, ``b`` the Beta prior of the inclusion rate ``pi``. The constants are kept as
    Python numbers (``*_value``, read without a device synchronisation) and as non-persistent
    buffers, so ``prior.to("cuda")`` moves every distribution it builds. ``forward()`` samples every
    site under Pyro and returns the weights (site name -> tensor), as
    :class:`~bnnzoo.models.BayesianNeuralNetwork` expects of a prior.
    """

    def __init__(self, net: Network, slab_scale: float = 1.0, spike_scale: float = 0.01, a: float = 1.0,
                 b: float = 1.0, output_scale: float | None = None, first_layer: str = "neurons",
                 scaling: str = "absolute", groups: str = "output"):
        super().__init__()
        if len(net.param_layers) < 2:
            raise ValueError(f"the spike-and-slab prior prunes hidden groups, but {net!r} has no hidden layer")
        self.net = net
        self.slab_scale_value = _positive("slab_scale", slab_scale)
        self.spike_scale_value = _positive("spike_scale", spike_scale)
        if not self.spike_scale_value < self.slab_scale_value:
            raise ValueError(f"the spike must be narrower than the slab, got spike_scale={spike_scale} "
                             f">= slab_scale={slab_scale}")
        self.a_value, self.b_value = _positive("a", a), _positive("b", b)
        self.output_scale_value = self.slab_scale_value if output_scale is None else _positive("output_scale",
                                                                                               output_scale)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.first_layer, self.scaling, self.groups = first_layer, scaling, groups
        self.layouts = group_layouts(net, first_layer, groups)
        for name in ("slab_scale", "spike_scale", "a", "b", "output_scale"):
            self.register_buffer(name, torch.tensor(getattr(self, f"{name}_value")), persistent=False)

    # ---- structure -----------------------------------------------------------------------------
    def layout(self, layer: str) -> GroupLayout:
        for lay in self.layouts:
            if lay.layer == layer:
                return lay
        raise KeyError(f"layer {layer!r} has no spike-and-slab groups; grouped layers: "
                       f"{[lay.layer for lay in self.layouts]}")

    def grouped_site(self, site: str) -> GroupLayout | None:
        """The layout whose groups contain ``site``'s weights, or ``None`` (slab-only sites)."""
        for lay in self.layouts:
            if site in lay.sites():
                return lay
        return None

    def layer_factor(self, layer: str) -> float:
        """What the scales of ``layer`` are multiplied by: 1, or ``1/sqrt(fan_in)``."""
        return 1.0 if self.scaling == "absolute" else self.net.layer(layer).fan_in ** -0.5

    def scales(self, layer: str) -> tuple[float, float]:
        """``(s0, s1)``, the spike and slab scales of ``layer``."""
        f = self.layer_factor(layer)
        return self.spike_scale_value * f, self.slab_scale_value * f

    @property
    def num_groups(self) -> int:
        return sum(lay.num_groups for lay in self.layouts)

    def fixed_scale(self, site: str) -> float:
        """The prior scale of a site outside every group: the output layer's, or the slab's."""
        layer = site.rpartition(".")[0]
        base = self.output_scale_value if layer == self.net.param_layers[-1].name else self.slab_scale_value
        return base * self.layer_factor(layer)

    # ---- distributions --------------------------------------------------------------------------
    def pi_distribution(self) -> dist.Distribution:
        return dist.Beta(self.a, self.b)

    def gamma_distribution(self, layer: str, pi: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(pi.unsqueeze(-1)).expand(pi.shape + (self.layout(layer).num_groups,)).to_event(1)

    def site_distribution(self, site: str, gamma: torch.Tensor | None = None) -> dist.Distribution:
        """The prior of one weight site; for a grouped site, given its layer's indicators ``gamma``
        (``1`` = slab, ``0`` = spike)."""
        shapes = self.net.sites()
        if site not in shapes:
            raise KeyError(f"unknown site {site!r}; sites are {list(shapes)}")
        shape = shapes[site]
        layer = site.rpartition(".")[0]
        factor = self.layer_factor(layer)
        lay = self.grouped_site(site)
        if lay is None:
            scale = (self.output_scale if layer == self.net.param_layers[-1].name else self.slab_scale) * factor
            return dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))
        if gamma is None:
            raise ValueError(f"site {site} is in spike-and-slab groups: its prior needs the indicators gamma")
        scale = lay.view(site, factor * (self.spike_scale + gamma * (self.slab_scale - self.spike_scale)))
        batch = gamma.shape[:-1]
        return dist.Normal(torch.zeros_like(scale), scale).expand(batch + shape).to_event(len(shape))

    def forward(self) -> dict[str, torch.Tensor]:
        """Sample ``pi``, every layer's ``gamma``, then every weight site under Pyro."""
        pi = pyro.sample("pi", self.pi_distribution())
        gammas = {lay.layer: pyro.sample(f"{lay.layer}.gamma", self.gamma_distribution(lay.layer, pi))
                  for lay in self.layouts}
        out = {}
        for site in self.net.sites():
            lay = self.grouped_site(site)
            out[site] = pyro.sample(site, self.site_distribution(site, None if lay is None else gammas[lay.layer]))
        return out

    def extra_repr(self) -> str:
        return (f"slab_scale={self.slab_scale_value:g}, spike_scale={self.spike_scale_value:g}, "
                f"pi~Beta({self.a_value:g}, {self.b_value:g}), output_scale={self.output_scale_value:g}, "
                f"first_layer={self.first_layer!r}, scaling={self.scaling!r}, groups={self.groups!r}")


def dead_units(net: Network, layouts: list[GroupLayout], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For input-grouped layers (``axis`` ``"in"`` or ``"kernel"``): per earlier layer, ``True`` for
    each unit (neuron or filter) that still feeds a kept group of the next layer, ``False`` for a
    unit whose every outgoing group is pruned (it no longer affects the output and can be removed
    with its incoming weights and bias). ``keep`` holds each layout's group mask. Layers not
    followed by an input-grouped layer are left out."""
    by_layer = {lay.layer: lay for lay in layouts}
    layers = net.param_layers
    out = {}
    for prev, layer in itertools.pairwise(layers):
        lay = by_layer.get(layer.name)
        if lay is None or lay.axis == "out":
            continue
        k = keep[lay.layer]
        used_inputs = k.reshape(lay.weight_shape[:2]).any(0) if lay.axis == "kernel" else k
        # input feature/channel j of `layer` is fed by unit (j // per) of `prev` (a flattened conv map
        # feeds a dense layer channel by channel, contiguously: PyTorch's order)
        per = used_inputs.numel() // prev.num_groups
        out[prev.name] = used_inputs.reshape(prev.num_groups, per).any(1)
    return out
