"""Evaluation metrics: regression (RMSE, test log-likelihood) and classification (accuracy, NLL,
expected calibration error with 15 equal-width bins as in Guo et al. 2017, Brier score)."""

from __future__ import annotations

import torch


def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    return float(((mean - y) ** 2).mean().sqrt())


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(-1) == y).float().mean())


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class."""
    p = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return float(-torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)).mean())


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over examples of the squared distance between ``probs`` and the one-hot label."""
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(-1).mean())


def _bin_sums(probs: torch.Tensor, y: torch.Tensor, num_bins: int):
    """Per equal-width confidence bin ``(b/B, (b+1)/B]``: count, summed confidence, summed correctness."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).to(probs.dtype)
    bins = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=probs.dtype, device=probs.device).index_add_(0, bins, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    return count, conf_sum, acc_sum


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    """ECE: the count-weighted gap between accuracy and confidence over equal-width bins."""
    _, conf_sum, acc_sum = _bin_sums(probs, y, num_bins)
    return float((conf_sum - acc_sum).abs().sum() / len(y))


def reliability_curve(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count (the reliability diagram's data)."""
    count, conf_sum, acc_sum = _bin_sums(probs, y, num_bins)
    return {
        "confidence": (conf_sum / count.clamp_min(1)).tolist(),
        "accuracy": (acc_sum / count.clamp_min(1)).tolist(),
        "count": count.long().tolist(),
    }


def classification_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, y),
        "nll": nll(probs, y),
        "ece": expected_calibration_error(probs, y),
        "brier": brier(probs, y),
    }
