"""Aggregates with uncertainty, in the manner of Agarwal et al. 2021 (rliable).

Scores are arranged `(n_runs, n_tasks)` as in rliable (a 1-D array is one task). Every random
procedure takes an explicit `rng: np.random.Generator`, so a summary is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

DEFAULT_REPS = 2000
DEFAULT_CONFIDENCE = 0.95


def _as_runs_by_tasks(scores: ArrayLike) -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    return arr[:, None] if arr.ndim == 1 else arr


def iqm(scores: ArrayLike) -> float:
    """Interquartile mean: the mean of the middle 50% of all scores (scores: (n_runs[, n_tasks]))."""
    arr = np.asarray(scores, dtype=float).reshape(-1)
    if arr.size == 0:
        return float("nan")
    return float(stats.trim_mean(arr, proportiontocut=0.25, axis=None))


def stratified_bootstrap_ci(
    scores: ArrayLike,
    statistic: Callable[[np.ndarray], float] = iqm,
    *,
    rng: np.random.Generator,
    reps: int = DEFAULT_REPS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic`, resampling runs within each task (stratified).

    scores: (n_runs,) or (n_runs, n_tasks). Returns (low, high); (NaN, NaN) with no runs. With
    one run the interval is the point estimate (no spread can be seen).
    """
    arr = _as_runs_by_tasks(scores)
    n_runs, n_tasks = arr.shape
    if n_runs == 0:
        return float("nan"), float("nan")
    run_idx = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    task_idx = np.arange(n_tasks)[None, None, :]
    resampled = arr[run_idx, task_idx]  # (reps, n_runs, n_tasks)
    if statistic is iqm:  # vectorised: one trimmed mean per replicate
        values = stats.trim_mean(resampled.reshape(reps, -1), proportiontocut=0.25, axis=1)
    else:
        values = np.array([statistic(sample) for sample in resampled])
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def two_sample_bootstrap_ci(
    x: ArrayLike,
    y: ArrayLike,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    rng: np.random.Generator,
    reps: int = DEFAULT_REPS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic(x, y)`, resampling x and y separately (x: (n,),
    y: (m,), both non-empty) — e.g. an AUROC with positives x and negatives y."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    values = np.empty(reps)
    for i in range(reps):
        sample_x = xa[rng.integers(0, len(xa), len(xa))]
        sample_y = ya[rng.integers(0, len(ya), len(ya))]
        values[i] = statistic(sample_x, sample_y)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def probability_of_improvement(scores_x: ArrayLike, scores_y: ArrayLike) -> float:
    """P(X > Y) + ½·P(X = Y) for a random run of each, averaged over tasks.

    scores_x: (n_runs_x[, n_tasks]); scores_y: (n_runs_y[, n_tasks]) with the same tasks.
    """
    x = _as_runs_by_tasks(scores_x)
    y = _as_runs_by_tasks(scores_y)
    per_task = []
    for task in range(x.shape[1]):
        xs, ys = x[:, task][:, None], y[:, task][None, :]
        per_task.append(float(np.mean((xs > ys) + 0.5 * (xs == ys))))
    return float(np.mean(per_task))


def wilson_interval(
    successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval for a rate `successes / n`; (NaN, NaN) when n = 0.

    Chosen over the normal (Wald) interval because audits have a handful of seeds per condition
    and rates of 0 or 1 are common: Wilson stays inside [0, 1] and is not of zero width at 0/n.
    """
    if n <= 0:
        return float("nan"), float("nan")
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (x, y: (n,)); NaN if n < 3 or either side is constant."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.size < 3 or np.all(xa == xa[0]) or np.all(ya == ya[0]):
        return float("nan")
    rx, ry = stats.rankdata(xa), stats.rankdata(ya)
    return float(np.corrcoef(rx, ry)[0, 1])


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair (x, y: (reps, n)) → (reps,); NaN where a row is constant."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=1) / denom, np.nan)


def spearman_ci(
    x: ArrayLike,
    y: ArrayLike,
    *,
    rng: np.random.Generator,
    reps: int = DEFAULT_REPS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, tuple[float, float]]:
    """Spearman rho and a percentile bootstrap CI over resampled (x, y) pairs (x, y: (n,)).

    Resamples in which one side is constant are skipped; NaN bounds if rho is undefined.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho = spearman(xa, ya)
    if np.isnan(rho):
        return rho, (float("nan"), float("nan"))
    idx = rng.integers(0, xa.size, size=(reps, xa.size))
    values = _rowwise_spearman(xa[idx], ya[idx])
    if np.all(np.isnan(values)):
        return rho, (float("nan"), float("nan"))
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return rho, (float(low), float(high))
