"""Standardisation of inputs and targets with the training data's statistics only."""

from __future__ import annotations

import torch


class Standardizer:
    """``x -> (x - x_mean) / x_std`` and, for regression, ``y -> (y - y_mean) / y_std``.

    Tabular inputs are standardised per feature; images with one mean and standard deviation over
    all pixels (a per-pixel statistic is meaningless on MNIST's constant borders). A feature that is
    constant in the training data is centred only.
    """

    def __init__(self, x_mean, x_std, y_mean=None, y_std=None):
        self.x_mean, self.x_std = x_mean, x_std
        self.y_mean, self.y_std = y_mean, y_std

    @classmethod
    def from_data(cls, x: torch.Tensor, y: torch.Tensor, task: str) -> "Standardizer":
        if x.dim() > 2:
            x_mean, x_std = x.mean().reshape(()), x.std().reshape(())
        else:
            x_mean, x_std = x.mean(0), x.std(0)
        x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
        if task == "regression":
            y_std = y.std() if len(y) > 1 else torch.ones(())
            y_std = torch.where(y_std > 0, y_std, torch.ones_like(y_std))
            return cls(x_mean, x_std, y.mean(), y_std)
        return cls(x_mean, x_std)

    def x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_std

    def y(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else (y - self.y_mean) / self.y_std

    def y_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else y * self.y_std + self.y_mean

    @property
    def y_scale(self) -> float:
        return 1.0 if self.y_std is None else float(self.y_std)

    def to(self, device) -> "Standardizer":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Standardizer(move(self.x_mean), move(self.x_std), move(self.y_mean), move(self.y_std))

    def state_dict(self) -> dict:
        return {k: (None if v is None else v.detach().cpu()) for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Standardizer":
        return cls(state["x_mean"], state["x_std"], state.get("y_mean"), state.get("y_std"))
