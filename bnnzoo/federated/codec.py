"""The TDAMP messages between server and clients as Flower's lists of numpy arrays.

The global posterior (server -> clients): every weight site's data message ``(eta, precision)``,
every layer's prior ``(logit_rho, sigma^2)`` and the noise variance, i.e. what
:meth:`~bnnzoo.guides.TDAMPGuide.set_state` reads. A client's local posterior (client -> server):
every weight site's slab posterior mean and variance, every hidden neuron's inclusion probability
and the pass's noise statistics (sums over the client's examples). The order of the arrays is fixed
by the network, so both sides decode them without names on the wire. Tensors are converted once per
round, never inside the passes.
"""

from __future__ import annotations

import numpy as np
import torch


def global_layout(net) -> list[tuple[str, str | None]]:
    layers = [layer.name for layer in net.param_layers]
    return ([("message_eta", s) for s in net.sites()] + [("message_precision", s) for s in net.sites()]
            + [("logit_rho", n) for n in layers] + [("prior_var", n) for n in layers] + [("noise_var", None)])


def reply_layout(net) -> list[tuple[str, str | None]]:
    return ([("slab_mean", s) for s in net.sites()] + [("slab_var", s) for s in net.sites()]
            + [("inclusion", layer.name) for layer in net.hidden_layers()]
            + [("noise_sum", None), ("num_seen", None), ("log_evidence_sum", None)])


def to_ndarrays(state: dict, layout) -> list[np.ndarray]:
    """The entries ``state[key][name]`` (or ``state[key]``) of ``layout`` as numpy arrays."""
    out = []
    for key, name in layout:
        value = state[key] if name is None else state[key][name]
        out.append(value.detach().cpu().numpy())
    return out


def from_ndarrays(arrays: list[np.ndarray], layout, device) -> dict:
    """The inverse of :func:`to_ndarrays`: nested dicts of tensors on ``device``."""
    if len(arrays) != len(layout):
        raise ValueError(f"expected {len(layout)} arrays, got {len(arrays)}: the two sides run different networks")
    out: dict = {}
    for (key, name), value in zip(layout, arrays):
        t = torch.as_tensor(np.asarray(value), device=device)
        if name is None:
            out[key] = t
        else:
            out.setdefault(key, {})[name] = t
    return out
