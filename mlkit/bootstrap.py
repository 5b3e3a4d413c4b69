"""Percentile bootstrap over users: the confidence intervals of every table and of the gate.

Why per user: users are the independent units of an offline evaluation (a user's items are
not), so every interval ShopML reports resamples users, seeded and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ConfidenceInterval:
    """Percentile bootstrap interval of a mean over users."""

    mean: float
    low: float
    high: float
    alpha: float
    n_boot: int


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement) of ``values``; seeded, deterministic.

    Resampling is chunked so memory stays bounded for large user counts.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("bootstrap needs a non-empty 1-d array of per-user values")
    if np.isnan(v).any():
        raise ValueError("per-user values contain NaN")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = len(v)
    chunk = max(1, 2_000_000 // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = v[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> ConfidenceInterval:
    """Percentile ``1 - alpha`` CI of the mean of per-user ``values`` (resampling users).

    Users, not events, are resampled because users are the independent unit: one heavy user's
    items are correlated. Pass per-user differences to get a paired interval.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = np.asarray(values, dtype=np.float64)
    means = bootstrap_means(v, n_boot, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(float(v.mean()), float(low), float(high), alpha, n_boot)


def paired_ci(
    values: pd.Series, reference: pd.Series, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> ConfidenceInterval:
    """Percentile CI of the mean per-user difference ``values - reference``, both indexed by
    user: the paired interval every comparison of two models on one split reports. The two
    must cover the same users (models compared on different users are not paired)."""
    if set(values.index) != set(reference.index):
        raise ValueError(
            f"a paired comparison needs the same users: {len(values)} and {len(reference)} "
            f"users, {len(set(values.index) ^ set(reference.index))} in only one of them"
        )
    diff = values.sort_index() - reference.sort_index()
    return bootstrap_ci(diff.to_numpy(), n_boot=n_boot, alpha=alpha, seed=seed)
