"""Baselines: mean-field VI and MAP on MNIST train5k -> t10k and Boston housing."""

from __future__ import annotations

from .harness import mnist_protocol, uci_protocol


def mnist(device) -> dict:
    out = {}
    for name in ("meanfield-vi", "map"):
        out[f"{name}-mnist-lenet-300-100"] = mnist_protocol(name, arch="lenet-300-100", device=device, epochs=20,
                                                            batch_size=128)
    return out


def boston(device) -> dict:
    return {f"{name}-boston": uci_protocol(name, "boston", device=device, baseline="adam", progress=True)
            for name in ("meanfield-vi", "map")}


SUITES = {"baselines-mnist": mnist, "baselines-boston": boston}
