"""Alarms and their thresholds, shared by the monitor (fit-time calibration) and the evaluation.

Pure functions over arrays. An alarm is an up-crossing of a threshold (a step a detector could
not score, NaN, is no observation: the alarm state carries across it); a threshold is calibrated
on healthy runs for a target number of false alarms per 1,000 steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def alarm_events(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(n,) bool: steps where the score crosses up to `threshold` (the first scored step counts
    if above). NaN steps never alarm and do not end an alarm: above, NaN, above is one event."""
    values = np.asarray(scores, dtype=float)
    above = values >= threshold  # NaN compares False
    if above.size == 0:
        return above
    observed = ~np.isnan(values)
    last = np.maximum.accumulate(np.where(observed, np.arange(values.size), -1))
    before = np.concatenate([[-1], last[:-1]])  # the last scored step strictly before each step
    prev = np.where(before >= 0, above[np.maximum(before, 0)], False)
    return above & ~prev


def false_alarm_rate(scores: Sequence[np.ndarray], threshold: float) -> float:
    """Up-crossings of `threshold` per 1,000 steps over a set of runs (each (n_i,))."""
    steps = sum(len(s) for s in scores)
    if steps == 0:
        return 0.0
    events = sum(int(alarm_events(s, threshold).sum()) for s in scores)
    return 1000.0 * events / steps


def calibrate_threshold(scores: Sequence[np.ndarray], target_per_1k: float) -> float:
    """Smallest threshold whose false-alarm rate on these runs is at most `target_per_1k`.

    scores: one (n_i,) array per held-out healthy run. Candidates are the observed values
    (the largest finite one plus a margin is always feasible). Returns +inf for no data.
    """
    values = np.concatenate([np.asarray(s, dtype=float) for s in scores]) if scores else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.inf
    top = float(values.max())
    fallback = top + max(1e-9, 1e-6 * abs(top))
    candidates = np.unique(np.quantile(values, np.linspace(0.5, 1.0, 201)))
    lo, hi = 0, len(candidates) - 1
    best = fallback
    # The rate falls (nearly) monotonically with the threshold: bisect, then confirm.
    while lo <= hi:
        mid = (lo + hi) // 2
        if false_alarm_rate(scores, float(candidates[mid])) <= target_per_1k:
            best = float(candidates[mid])
            hi = mid - 1
        else:
            lo = mid + 1
    if false_alarm_rate(scores, best) > target_per_1k:
        best = fallback
    return best
