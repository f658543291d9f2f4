"""Which weights and groups a set of pruning masks removes, per layer and overall."""

from __future__ import annotations

import math
import warnings

import torch

from .networks import Network


def input_groups(net: Network) -> dict[str, torch.Tensor | None]:
    """For each parametric layer, the index of the previous layer's group that feeds each input
    feature (dense) or channel (conv); ``None`` for the first layer, which reads the data.

    A flattened conv map feeds a dense layer channel by channel, contiguously (PyTorch's order).
    A network that is not a chain of its parametric layers (``net.is_chain`` false: a user's module,
    whose wiring the description does not hold) attributes no input to a group: ``None`` everywhere.
    """
    out: dict[str, torch.Tensor | None] = {}
    if not getattr(net, "is_chain", True):
        return {layer.name: None for layer in net.param_layers}
    prev = None
    for layer in net.param_layers:
        if prev is None:
            out[layer.name] = None
        else:
            n_in = layer.in_features if hasattr(layer, "in_features") else layer.in_channels
            per = n_in // prev.num_groups
            out[layer.name] = torch.arange(n_in) // per
        prev = layer
    return out


def group_keep(net: Network, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hidden group is removed when all its incoming weights and its bias are pruned."""
    keep = {}
    for layer in net.param_layers:
        w, b = masks.get(f"{layer.name}.weight"), masks.get(f"{layer.name}.bias")
        k = torch.ones(layer.num_groups, dtype=torch.bool)
        if layer is not net.param_layers[-1] and w is not None and b is not None:
            k = w.cpu().reshape(layer.num_groups, -1).any(1) | b.cpu()
        keep[layer.name] = k
    return keep


def sparsity_report(net: Network, masks: dict[str, torch.Tensor]) -> dict:
    """Counts of weights (weight and bias entries) and groups, kept and pruned.

    A weight counts as removed if it is masked, if its group is removed, or if the group that feeds
    it is removed (so the exported smaller network has exactly the kept weights).
    """
    keep = group_keep(net, masks)
    feeds = input_groups(net)
    layers = {}
    total_w = kept_w = 0
    hidden_groups = kept_groups = 0
    for layer in net.param_layers:
        rows = keep[layer.name]
        w_keep = masks.get(f"{layer.name}.weight")
        w_keep = torch.ones(layer.weight_shape, dtype=torch.bool) if w_keep is None else w_keep.cpu().clone()
        w_keep &= rows.view(-1, *([1] * (len(layer.weight_shape) - 1)))
        if feeds[layer.name] is not None:
            cols = keep[net.param_layers[net.param_layers.index(layer) - 1].name][feeds[layer.name]]
            w_keep &= cols.view(1, -1, *([1] * (len(layer.weight_shape) - 2)))
        b_keep = masks.get(f"{layer.name}.bias")
        b_keep = torch.ones(layer.num_groups, dtype=torch.bool) if b_keep is None else b_keep.cpu().clone()
        b_keep &= rows
        n = math.prod(layer.weight_shape) + layer.num_groups
        k = int(w_keep.sum() + b_keep.sum())
        layers[layer.name] = {
            "weights": n, "weights_kept": k, "weights_pruned_fraction": 1 - k / n,
            "groups": layer.num_groups, "groups_kept": int(rows.sum()),
            "groups_pruned_fraction": 1 - float(rows.float().mean()),
        }
        total_w, kept_w = total_w + n, kept_w + k
        if layer is not net.param_layers[-1]:
            hidden_groups, kept_groups = hidden_groups + layer.num_groups, kept_groups + int(rows.sum())
    inputs = "x".join(map(str, net.input_shape))
    return {
        "layers": layers,
        "weights": total_w,
        "weights_kept": kept_w,
        "weights_pruned_fraction": 1 - kept_w / total_w,
        "compression_ratio": total_w / max(kept_w, 1),
        "hidden_groups": hidden_groups,
        "hidden_groups_pruned_fraction": 1 - kept_groups / hidden_groups if hidden_groups else 0.0,
        "architecture": "-".join([inputs] + [str(layers[l.name]["groups_kept"]) for l in net.param_layers]),
        "keep": keep,
    }


class EmptyLayerWarning(UserWarning):
    """A pruning rule would have removed every group of a layer; the best group was kept."""


def protect_layers(keep: dict[str, torch.Tensor], score: dict[str, torch.Tensor], *,
                   allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """The keep masks of a pruning decision, with no hidden layer emptied unless asked.

    ``keep[layer]`` is a boolean tensor over the layer's groups (neurons or filters) that a rule
    keeps; ``score[layer]`` has the same shape, higher meaning more worth keeping (an inclusion
    probability, a log-odds, minus an evidence change, a signal-to-noise ratio). A layer whose mask
    is all ``False`` would cut the network in two (its output would no longer depend on the input),
    so unless ``allow_empty`` the single best-scoring group is kept and an
    :class:`EmptyLayerWarning` names the layer. Returns new tensors; the inputs are untouched.
    """
    out = {}
    for layer, mask in keep.items():
        mask = mask.clone()
        if mask.numel() and not bool(mask.any()) and not allow_empty:
            if layer not in score:
                raise KeyError(f"no score for layer {layer!r}, whose groups would all be pruned")
            mask.view(-1)[torch.argmax(score[layer].reshape(-1))] = True
            warnings.warn(f"the pruning rule would remove every group of layer {layer!r}; its best group is "
                          f"kept (pass allow_empty=True to remove the layer anyway)", EmptyLayerWarning,
                          stacklevel=2)
        out[layer] = mask
    return out
