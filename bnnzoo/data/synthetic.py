"""Sparse teacher-student regression (as in Ke & Fan's notebooks).

``x ~ N(0, I_p)``; a small teacher MLP (``p-5-3-1`` by default) whose first layer reads only the
first ``n_relevant`` inputs; ``y = teacher(x) + N(0, noise_var)``. The teacher output is centred
and scaled so that its variance over ``x ~ N(0, I)`` equals ``signal_var``
(default ``4 * noise_var``, or 1 without noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dataset import Dataset
from .errors import DataError

_ACTS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass
class TeacherNet:
    """The noiseless teacher: ``teacher(x)`` gives ``(N,)`` outputs for ``x`` of shape ``(N, p)``."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str = "relu"

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        act, h, out = _ACTS[self.activation], x, []
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = act(h @ w.to(x).T + b.to(x))
            out.append(h)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)[-1] if len(self.weights) > 1 else x
        return (h @ self.weights[-1].to(x).T + self.biases[-1].to(x))[:, 0]


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"make_sparse_teacher: {name} must be an integer >= {low}, got {value!r}")
    return value


def _draw_teacher(gen, x_probe, n_features, n_relevant, hidden, activation, tries: int = 100) -> TeacherNet:
    """Random weights, redrawn until every hidden unit is active on 5-95% of the probe inputs."""
    sizes = [n_features, *hidden, 1]
    for _ in range(tries):
        weights, biases = [], []
        for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            eff_in = n_relevant if k == 0 else fan_in
            w = torch.randn(fan_out, fan_in, generator=gen) / eff_in**0.5
            if k == 0:
                w[:, n_relevant:] = 0.0
            weights.append(w)
            biases.append(0.1 * torch.randn(fan_out, generator=gen))
        net = TeacherNet(weights, biases, activation)
        if activation == "relu":
            fracs = [(h > 0).float().mean(0) for h in net.hidden(x_probe)]
            if any(bool(((f < 0.05) | (f > 0.95)).any()) for f in fracs):
                continue
        if float(net(x_probe).var()) > 1e-8:
            return net
    raise DataError(f"make_sparse_teacher: no usable teacher found in {tries} draws (hidden={hidden})")


def make_sparse_teacher(
    n_train: int = 10240,
    n_test: int = 2000,
    n_features: int = 1000,
    n_relevant: int = 10,
    hidden: tuple[int, ...] = (5, 3),
    noise_var: float = 1.0,
    seed: int = 0,
    activation: str = "relu",
    signal_var: float | None = None,
) -> Dataset:
    """Teacher-student regression data; deterministic for a ``seed``.

    The dataset's ``relevant_features`` lists the inputs the teacher reads; ``meta["teacher"]`` is
    the noiseless :class:`TeacherNet`, with ``meta["noise_var"]`` and ``meta["signal_var"]``.
    """
    _check_int(n_train, "n_train", 1)
    _check_int(n_test, "n_test", 1)
    _check_int(n_features, "n_features", 1)
    _check_int(n_relevant, "n_relevant", 1)
    if n_relevant > n_features:
        raise DataError(f"make_sparse_teacher: n_relevant={n_relevant} exceeds n_features={n_features}")
    hidden = tuple(hidden)
    for h in hidden:
        _check_int(h, "every hidden size", 1)
    if activation not in _ACTS:
        raise DataError(f"make_sparse_teacher: activation must be one of {sorted(_ACTS)}, got {activation!r}")
    if not noise_var >= 0:
        raise DataError(f"make_sparse_teacher: noise_var must be >= 0, got {noise_var!r}")
    if signal_var is None:
        signal_var = 4.0 * noise_var if noise_var > 0 else 1.0
    if not signal_var > 0:
        raise DataError(f"make_sparse_teacher: signal_var must be > 0, got {signal_var!r}")

    gen = torch.Generator().manual_seed(int(seed))
    x_train = torch.randn(n_train, n_features, generator=gen)
    x_test = torch.randn(n_test, n_features, generator=gen)
    probe = torch.randn(4096, n_features, generator=gen)  # fixes the scale independently of n_train
    teacher = _draw_teacher(gen, probe, n_features, n_relevant, hidden, activation)
    f_probe = teacher(probe)
    mean, scale = f_probe.mean(), signal_var**0.5 / float(f_probe.std())
    teacher.weights[-1] = teacher.weights[-1] * scale
    teacher.biases[-1] = (teacher.biases[-1] - mean) * scale
    noise_sd = float(noise_var) ** 0.5
    y_train = teacher(x_train) + noise_sd * torch.randn(n_train, generator=gen)
    y_test = teacher(x_test) + noise_sd * torch.randn(n_test, generator=gen)
    return Dataset(
        name="sparse-teacher",
        task="regression",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        source=f"synthetic (seed={seed})",
        relevant_features=list(range(n_relevant)),
        meta={"teacher": teacher, "noise_var": float(noise_var), "signal_var": float(signal_var), "seed": seed},
    )
