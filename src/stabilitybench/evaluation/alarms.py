"""Alarm statistics of the evaluation (alarms and thresholds themselves: `metrics.alarms`).

Pure functions over arrays. Prospective warning with
horizon H: an alarm at step t is a true warning when the run collapses in (t, t + H]; the step
AUROC ranks every step by "collapse within H" with a bootstrap interval over runs; the outcome
AUROC separates runs that collapse from runs that do not by the score right after onset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stabilitybench.metrics.intervals import two_sample_bootstrap_ci

BOOTSTRAP = 2000


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count 1/2); scores/labels: (n,), labels bool."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_of(positives: np.ndarray, negatives: np.ndarray) -> float:
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    return auroc(np.concatenate([positives, negatives]), labels)


def auroc_bootstrap_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the AUROC, resampling positives and negatives separately (stratified)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    return two_sample_bootstrap_ci(
        scores[labels], scores[~labels], _auroc_of, rng=rng, reps=reps, confidence=level
    )


def window_max(scores: np.ndarray, steps: np.ndarray, start: int, end: int) -> float:
    """Largest score over steps in [start, end] (NaN if no step there or all NaN)."""
    mask = (steps >= start) & (steps <= end)
    values = np.asarray(scores, dtype=float)[mask]
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan


# -- prospective warning ------------------------------------------------------------------------


def warning_window(steps: np.ndarray, collapse_at: int, horizon: int) -> np.ndarray:
    """(n,) bool: the steps t whose alarm would be a true warning, collapse_at in (t, t + H]."""
    steps = np.asarray(steps)
    return (steps < collapse_at) & (steps >= collapse_at - horizon)


def first_true_warning(
    events: np.ndarray, steps: np.ndarray, collapse_at: int, horizon: int
) -> int | None:
    """The step of the earliest alarm event within the horizon before `collapse_at`, or None."""
    hits = np.flatnonzero(
        np.asarray(events, dtype=bool) & warning_window(steps, collapse_at, horizon)
    )
    return int(np.asarray(steps)[hits[0]]) if hits.size else None


def quartiles(values: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """(median, [q25, q75]) of the values (numpy's linear interpolation), (None, None) if empty."""
    if len(values) == 0:
        return None, None
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q50), [float(q25), float(q75)]


def pair_counts(
    scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mann–Whitney counts between runs, so that a bootstrap over runs needs no re-ranking.

    scores[r], labels[r]: (n_r,) for run r (NaN-free). Returns `pairs` (R, R), where
    pairs[r, s] counts the (positive step of r, negative step of s) pairs the positive outranks
    (ties 1/2), and the positives (R,) and negatives (R,) per run. With run weights c (R,),
    AUROC = c·pairs·c / ((c·positives)(c·negatives)); c = 1 is the plain step AUROC.
    """
    n = len(scores)
    pos = [
        np.asarray(s, float)[np.asarray(lab, bool)] for s, lab in zip(scores, labels, strict=True)
    ]
    neg = [
        np.sort(np.asarray(s, float)[~np.asarray(lab, bool)])
        for s, lab in zip(scores, labels, strict=True)
    ]
    pairs = np.zeros((n, n))
    if not any(p.size for p in pos):
        return pairs, np.zeros(n), np.asarray([x.size for x in neg], float)
    all_pos = np.concatenate(pos)
    owner = np.repeat(np.arange(n), [p.size for p in pos])
    for s, negatives in enumerate(neg):
        if negatives.size == 0:
            continue
        below = np.searchsorted(negatives, all_pos, side="left")
        at_most = np.searchsorted(negatives, all_pos, side="right")
        pairs[:, s] = np.bincount(owner, weights=below + 0.5 * (at_most - below), minlength=n)
    return pairs, np.asarray([p.size for p in pos], float), np.asarray([x.size for x in neg], float)


def weighted_auroc(
    pairs: np.ndarray, positives: np.ndarray, negatives: np.ndarray, weights: np.ndarray
) -> float:
    """The step AUROC of runs repeated `weights` (R,) times (see `pair_counts`); NaN if a class
    is empty."""
    n_pos, n_neg = float(weights @ positives), float(weights @ negatives)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float(weights @ pairs @ weights / (n_pos * n_neg))


def run_bootstrap(
    pairs: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    rng: np.random.Generator,
    reps: int = BOOTSTRAP,
) -> np.ndarray:
    """(reps,) step AUROCs of runs resampled with replacement (NaN where a draw lacks a class)."""
    n = len(positives)
    out = np.full(reps, np.nan)
    for i in range(reps):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        out[i] = weighted_auroc(pairs, positives, negatives, weights)
    return out


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> list[float] | None:
    """The percentile interval of the finite draws, or None when fewer than half are finite."""
    finite = np.asarray(draws, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or finite.size < 0.5 * len(draws):
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def too_few(what: str, n_collapsed: int, n_other: int) -> str:
    return f"too few runs for {what}: {n_collapsed} collapsed, {n_other} not collapsed"
