"""Alarm statistics of the evaluation (alarms and thresholds themselves: `metrics.alarms`).

Pure functions over arrays. An alarm at step t is true when the run's collapse starts in
[t + SPH, t + SPH + SOP] (`true_alarms`); beside a detector's recall stand what chance
(`chance_recall`, `surrogate_recalls`) and the clock control (`clock_recall_at`) score; the step
AUROC's bootstrap resamples units (seeds) through `pair_counts`; the outcome AUROC separates
runs that collapse from runs that do not by the score right after onset.
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


# -- alarm episodes (the seizure-prediction characteristic) -----------------------------------


def true_alarms(alarm_steps: np.ndarray, lo: int, sph: int, sop: int) -> np.ndarray:
    """(m,) bool: which alarms (at these steps) predict a collapse that began at `lo`: the
    collapse starts in [t + sph, t + sph + sop]."""
    t = np.asarray(alarm_steps)
    return (t + sph <= lo) & (lo <= t + sph + sop)


def episode_start(on: np.ndarray, index: int) -> int:
    """The first index of the stretch of True in `on` that holds `index`."""
    before = np.flatnonzero(~np.asarray(on[: index + 1], dtype=bool))
    return int(before[-1]) + 1 if before.size else 0


def chance_recall(starts_per_step: float, time_in_warning: float, sop: int) -> float:
    """The recall of a random predictor that is in warning a share `time_in_warning` of the
    time and starts episodes at `starts_per_step` while not in warning: the chance that it is
    in warning, or starts an episode, somewhere in a collapse's `sop`-long window (with renewal
    every `sop`, either gives an alarm there): 1 − (1 − w)·exp(−λ·sop). With point alarms
    (w ≈ 0) this is the classic 1 − exp(−λ·sop) (Snyder et al. 2008)."""
    w = min(max(time_in_warning, 0.0), 1.0)
    return float(1.0 - (1.0 - w) * math.exp(-max(starts_per_step, 0.0) * sop))


def surrogate_recalls(
    runs: Sequence[tuple[np.ndarray, int, int, int]],
    rng: np.random.Generator,
    draws: int = 1000,
) -> np.ndarray:
    """(draws,) event recalls with each run's alarms shifted circularly by a random offset.

    runs: per collapsed run (alarm indices (m,) before the collapse, the number L of steps
    before it, and the index range [a, b] whose alarms would be true). Each draw shifts every
    run's alarms by its own uniform offset in [0, L) — the same alarm rate and episodes, placed
    with no knowledge of the collapse.
    """
    hits = np.zeros((draws, len(runs)), dtype=bool)
    for r, (alarms, length, a, b) in enumerate(runs):
        if alarms.size == 0 or length <= 0 or b < a:
            continue
        offsets = rng.integers(0, length, size=(draws, 1))
        shifted = (alarms[None, :] + offsets) % length
        hits[:, r] = ((shifted >= a) & (shifted <= b)).any(axis=1)
    return hits.mean(axis=1) if runs else np.zeros(draws)


def clock_recall_at(
    collapses: Sequence[tuple[int, int]],
    negatives: Sequence[tuple[int, int]],
    false_alarms_per_1k: float,
    sph: int,
    sop: int,
) -> float | None:
    """The recall of the best `clock` control at `false_alarms_per_1k` on the runs that did not
    collapse: a schedule that knows only the onset, in warning from `d` steps after it for `k`
    alarms (the first at onset + d, then one every `sop`; `k` unbounded: it stays on), over every
    `d` and `k` whose false alarms per 1,000 post-onset steps on those runs are at most the rate.

    collapses: (onset, collapse start) per collapsed run; negatives: (onset, last step) per
    perturbed run that did not collapse. Its alarms at onset + d + j·sop (j < k) warn of a
    collapse at c iff onset + d <= c − sph <= onset + d + k·sop. A single alarm at the onset is
    among them: a detector that only marks the onset, whatever follows, does no better.
    None without negatives."""
    if not negatives or not collapses:
        return None
    onsets = np.asarray([o for o, _ in negatives], dtype=float)
    length = np.maximum(np.asarray([e for _, e in negatives], dtype=float) - onsets + 1, 0)
    steps = float(np.sum(length))
    if steps <= 0:
        return None
    room = np.asarray([c - sph - o for o, c in collapses], dtype=float)
    delays = np.arange(int(np.max(length)) + 1, dtype=float)[:, None]  # (d, 1)
    # alarms a clock that stays on raises on each negative run: 1 + ⌊(L − 1 − d) / sop⌋
    fits = np.where(delays <= length - 1, 1 + np.floor((length - 1 - delays) / sop), 0.0)
    most = int(fits.max())
    best = 0.0
    for k in range(1, most + 2):  # k = most + 1: more than any run holds, it stays on
        rate = 1000.0 * np.minimum(fits, k).sum(axis=1) / steps  # (d,)
        ok = delays[rate <= false_alarms_per_1k, 0]
        if ok.size == 0:
            continue
        span = np.inf if k > most else k * sop
        warned = (room[None, :] >= ok[:, None]) & (room[None, :] <= ok[:, None] + span)
        best = max(best, float(warned.mean(axis=1).max()))
    return best
