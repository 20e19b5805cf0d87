"""Confidence intervals: Wilson for proportions, cluster bootstrap for means and paired gaps."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(rate, low, high) of a binomial proportion with the Wilson 95% interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # The interval always holds p; at p = 0 or 1 rounding could leave it a hair short.
    return p, max(0.0, min(p, mid - half)), min(1.0, max(p, mid + half))


def cluster_bootstrap(values: Sequence[Sequence[float]], reps: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over all items and a 95% percentile interval from resampling
    whole clusters (sequences or prompts), because items inside a cluster are correlated.
    For a paired gap pass per-item differences (method minus dense)."""
    clusters = [np.asarray(v, dtype=np.float64) for v in values if len(v)]
    if not clusters:
        return float("nan"), float("nan"), float("nan")
    sums = np.array([c.sum() for c in clusters])
    counts = np.array([len(c) for c in clusters], dtype=np.float64)
    mean = sums.sum() / counts.sum()
    if len(clusters) == 1:
        return float(mean), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(clusters), size=(reps, len(clusters)))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(mean), float(lo), float(hi)


def fmt_ci(mean: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    """'12.3 [10.1, 14.0]' (scaled, e.g. to percentage points)."""
    if math.isnan(lo):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def bootstrap_mean(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of independent per-sample values (e.g. paired differences) with a 95%
    percentile bootstrap interval."""
    return cluster_bootstrap([[v] for v in values], reps, seed)


def stratified_bootstrap(groups: Sequence[Sequence[float]], reps: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean of group means, low, high): the macro average over groups (tasks), with a 95% interval
    from resampling samples within each group independently."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean([g.mean() for g in groups]))
    if any(len(g) < 2 for g in groups):
        # A group of one sample has no sampling spread to resample: no honest interval.
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = np.zeros(reps)
    for g in groups:
        boot += g[rng.integers(0, len(g), size=(reps, len(g)))].mean(1)
    boot /= len(groups)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return mean, float(lo), float(hi)
