"""Alarms and their thresholds, shared by the monitor (fit-time calibration) and the evaluation.

Pure functions over arrays. A detector is *in warning* while its score is at or above a
threshold; a maximal stretch of warning is an **episode** (below-threshold gaps of at most `gap`
steps are merged into it; a step a detector could not score, NaN, is no observation and carries
the state across it). An episode raises an **alarm** when it starts and again every `sop` steps
while it stays on (renewal, as in seizure prediction: Winterhalder et al. 2003); `sop=None`
raises one alarm per episode. A threshold is calibrated on healthy runs for a target number of
(false) alarms per 1,000 steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def warning_mask(scores: np.ndarray, threshold: float, gap: int = 0) -> np.ndarray:
    """(n,) bool: the steps in an episode (score >= threshold; NaN carries the previous scored
    step's state; gaps of at most `gap` steps between two stretches are filled)."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    above = values >= threshold  # NaN compares False
    observed = ~np.isnan(values)
    last = np.maximum.accumulate(np.where(observed, np.arange(values.size), -1))
    on = np.where(last >= 0, above[np.maximum(last, 0)], False)
    if gap > 0 and on.any():
        on = _fill_gaps(on, gap)
    return on


def _fill_gaps(on: np.ndarray, gap: int) -> np.ndarray:
    """`on` with each run of False of length <= gap between two True stretches set True."""
    starts, ends = episode_bounds(on)
    out = on.copy()
    for end, nxt in zip(ends[:-1], starts[1:], strict=True):
        if nxt - end - 1 <= gap:
            out[end + 1 : nxt] = True
    return out


def episode_bounds(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends): the first and last index of each stretch of True in `on` (inclusive)."""
    edges = np.diff(np.concatenate([[0], np.asarray(on, dtype=np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1


def renewed_alarms(
    on: np.ndarray, steps: np.ndarray | None = None, sop: int | None = None
) -> np.ndarray:
    """(n,) bool: the alarms of the episodes in `on`: each episode's first step, then the first
    step at least `sop` steps (of `steps`; the index without) after the previous alarm while the
    episode lasts. `sop=None`: the first step only."""
    on = np.asarray(on, dtype=bool)
    alarms = np.zeros(on.size, dtype=bool)
    starts, ends = episode_bounds(on)
    alarms[starts] = True
    if sop is None:
        return alarms
    at = np.arange(on.size) if steps is None else np.asarray(steps)
    for start, end in zip(starts, ends, strict=True):
        nxt = start
        while True:
            target = at[nxt] + sop
            nxt = int(np.searchsorted(at, target, side="left"))
            if nxt > end:
                break
            alarms[nxt] = True
    return alarms


def alarm_events(
    scores: np.ndarray,
    threshold: float,
    *,
    sop: int | None = None,
    gap: int = 0,
    steps: np.ndarray | None = None,
) -> np.ndarray:
    """(n,) bool: the alarms of the score's episodes above `threshold` (see the module)."""
    return renewed_alarms(warning_mask(scores, threshold, gap), steps, sop)


def false_alarm_rate(
    scores: Sequence[np.ndarray], threshold: float, *, sop: int | None = None, gap: int = 0
) -> float:
    """Alarms per 1,000 steps over a set of runs (each (n_i,)) that nothing happened to."""
    steps = sum(len(s) for s in scores)
    if steps == 0:
        return 0.0
    events = sum(int(alarm_events(s, threshold, sop=sop, gap=gap).sum()) for s in scores)
    return 1000.0 * events / steps


def calibrate_threshold(
    scores: Sequence[np.ndarray], target_per_1k: float, *, sop: int | None = None, gap: int = 0
) -> float:
    """Smallest threshold at which this and every stricter threshold give at most
    `target_per_1k` false alarms per 1,000 steps on these runs.

    scores: one (n_i,) array per held-out healthy run. Candidates are the observed values from
    the median up, scanned down from the top until one misses the target (the largest finite
    value plus a margin is always feasible). The rate need not fall with the threshold: a lower
    one merges episodes into fewer (renewed) alarms, so a threshold far below the first miss
    can meet the target again while it keeps the alarm on most of the time; the scan never
    reaches past the first miss. Returns +inf for no data.
    """
    values = np.concatenate([np.asarray(s, dtype=float) for s in scores]) if scores else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    top = float(values.max())
    best = top + max(1e-9, 1e-6 * abs(top))
    candidates = np.unique(np.quantile(values, np.linspace(0.5, 1.0, 201)))
    for candidate in candidates[::-1]:
        if false_alarm_rate(scores, float(candidate), sop=sop, gap=gap) > target_per_1k:
            break
        best = float(candidate)
    return best
