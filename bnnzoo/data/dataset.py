"""The :class:`Dataset` container shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import DataError

TASKS = ("regression", "classification")


@dataclass
class Dataset:
    """A train/test pair of tensors plus what a model needs to know about them.

    Regression: ``x`` float32 ``(N, D)``, ``y`` float32 ``(N,)``, raw (not standardised) values.
    Classification: ``x`` float32 (images ``(N, C, H, W)`` in ``[0, 1]``), ``y`` int64 ``(N,)``.
    ``meta`` holds loader-specific extras (UCI protocol ``n_hidden``/``n_epochs`` and the data-file
    rows of the split's ``train_rows``/``test_rows``, the sparse teacher function, ...).
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None
    split: int | None = None
    source: str = ""
    relevant_features: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"dataset {self.name!r}: unknown task {self.task!r} (expected one of {TASKS})")
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: x_{part} has {x.shape[0]} rows but y_{part} has {y.shape[0]}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"dataset {self.name!r}: x_train rows have shape {tuple(self.x_train.shape[1:])} "
                f"but x_test rows have shape {tuple(self.x_test.shape[1:])}"
            )
        if self.task == "classification" and (self.num_classes is None or self.num_classes < 2):
            raise DataError(f"dataset {self.name!r}: classification needs num_classes >= 2, got {self.num_classes}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def output_dim(self) -> int:
        return 1 if self.task == "regression" else int(self.num_classes)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with all four tensors on ``device`` (``meta`` is shared, not moved)."""
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            meta=dict(self.meta),
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Dataset":
        """Random subsets (without replacement) of the train and/or test parts, for quick runs.

        ``None`` keeps a part whole; a size larger than the part keeps it whole (shuffled).
        """
        gen = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None, arg: str):
            if n is None:
                return x, y
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise DataError(f"subset: {arg} must be a positive integer, got {n!r}")
            idx = torch.randperm(x.shape[0], generator=gen)[: min(n, x.shape[0])].to(x.device)
            return x[idx], y[idx]

        x_tr, y_tr = pick(self.x_train, self.y_train, n_train, "n_train")
        x_te, y_te = pick(self.x_test, self.y_test, n_test, "n_test")
        return replace(self, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, meta=dict(self.meta))

    def validation_split(self, fraction: float = 0.2, seed: int | None = 0) -> "Dataset":
        """The training part cut in two: ``1 - fraction`` of its rows become the training part and
        the rest the test part; the test part is dropped, so defaults chosen on the result never see
        the test data (the UCI protocol's model selection). With a ``seed`` the validation rows are
        the first ``fraction`` of a fixed random permutation; with ``seed=None`` they are the last
        ``fraction`` of the rows as stored (the UCI splits' training rows are in random order; MNIST's
        are sorted by label, so it needs a seed)."""
        if not 0 < fraction < 1:
            raise DataError(f"validation_split: fraction must be in (0, 1), got {fraction!r}")
        n = self.n_train
        n_val = round(fraction * n)
        if n_val < 1 or n_val >= n:
            raise DataError(f"validation_split: {n} training rows cannot give a validation part of {fraction:g}")
        if seed is None:
            order = torch.arange(n - 1, -1, -1)
            fit, val = order[n_val:].flip(0), order[:n_val].flip(0)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            fit, val = order[n_val:], order[:n_val]
        fit, val = fit.to(self.x_train.device), val.to(self.x_train.device)
        return replace(self, x_train=self.x_train[fit], y_train=self.y_train[fit], x_test=self.x_train[val],
                       y_test=self.y_train[val], meta={**self.meta, "validation": {"fraction": fraction, "seed": seed}})

    def __repr__(self) -> str:
        extra = f", num_classes={self.num_classes}" if self.num_classes is not None else ""
        split = f", split={self.split}" if self.split is not None else ""
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={self.n_train}, test={self.n_test}, "
            f"input_shape={self.input_shape}{extra}{split}, source={self.source!r})"
        )
