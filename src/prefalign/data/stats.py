"""Small statistics shared by dataset cards and reward evaluation (numpy only)."""

from __future__ import annotations

import numpy as np
import torch


def _as_array(values) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n with ties given the mean of their ranks (as scipy.stats.rankdata)."""
    x = _as_array(values)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1
            start = end
    return ranks


def pearson_correlation(a, b) -> float:
    x, y = _as_array(a), _as_array(b)
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman_correlation(a, b) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks."""
    return pearson_correlation(average_ranks(a), average_ranks(b))


def pairwise_agreement(score_difference, label_0) -> tuple[float, int]:
    """Share of non-tie comparisons where sign(s_0 − s_1) matches the label (label_0 > 0.5 means
    image 0 won); a zero difference counts as half right. Returns (accuracy, comparisons)."""
    difference, label = _as_array(score_difference), _as_array(label_0)
    decided = label != 0.5
    if not decided.any():
        return float("nan"), 0
    wins = label[decided] > 0.5
    d = difference[decided]
    correct = np.where(d == 0, 0.5, ((d > 0) == wins).astype(np.float64))
    return float(correct.mean()), int(decided.sum())


def binomial_interval(accuracy: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion."""
    if count == 0 or not np.isfinite(accuracy):
        return float("nan"), float("nan")
    denominator = 1 + z * z / count
    centre = (accuracy + z * z / (2 * count)) / denominator
    half = z * np.sqrt(accuracy * (1 - accuracy) / count + z * z / (4 * count * count)) / denominator
    return float(centre - half), float(centre + half)


__all__ = ["average_ranks", "pearson_correlation", "spearman_correlation", "pairwise_agreement", "binomial_interval"]
