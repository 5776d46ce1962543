"""Per-run stability scores, ranks within groups, and dose-response curves (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from stabilitybench.metrics.intervals import wilson_interval

COLLAPSE_WEIGHT = 0.75
DISPERSION_HALF_POINT = 0.1  # dispersion (in curve ranges per evaluation) that halves its term


def stability_score(
    collapsed: bool | None,
    irreversible: bool | None,
    recovery_steps: int | None,
    steps_after_collapse: int | None,
    dispersion: float | None,
) -> float:
    """A run's stability in [0, 1], higher is more stable.

    `score = 0.75·C + 0.25·D`, where C is the collapse term — 1 without a collapse, 0 for an
    irreversible one, `1 − recovery_steps / steps_after_collapse` for a recovered one (the share
    of the time left after the collapse that the run spent recovered) — and D the dispersion
    term `1 / (1 + dispersion / 0.1)` with `dispersion` the run's dispersion across time in units
    of its curve range (D = 0.5 when the middle half of per-evaluation changes spans a tenth of
    the curve's range). Collapse dominates because it is the event an audit is about; D orders
    runs that never collapse by how jittery they are. Without a usable dispersion (NaN/None),
    the score is C alone. A run that could not be judged (`collapsed` None) has C = 1.
    """
    if collapsed and irreversible:
        collapse_term = 0.0
    elif collapsed:
        if recovery_steps is None or not steps_after_collapse or steps_after_collapse <= 0:
            collapse_term = 0.5
        else:
            collapse_term = float(np.clip(1.0 - recovery_steps / steps_after_collapse, 0.0, 1.0))
    else:
        collapse_term = 1.0
    if dispersion is None or not math.isfinite(dispersion):
        return collapse_term
    dispersion_term = 1.0 / (1.0 + max(dispersion, 0.0) / DISPERSION_HALF_POINT)
    return COLLAPSE_WEIGHT * collapse_term + (1 - COLLAPSE_WEIGHT) * dispersion_term


def stability_before_final(perf: ArrayLike, final_window: int = 3) -> float | None:
    """A run's stability measured away from its final performance: 1 − the largest drawdown of
    its evaluations *before* the last `final_window` (the ones final performance averages), in
    units of the run's gain over its first evaluation; 0 if it diverged there (perf: (n,), NaN
    skipped, -inf a divergence). None with fewer than 3 such evaluations or no gain."""
    p = np.asarray(perf, dtype=float)
    p = p[~np.isnan(p)]
    head = p[:-final_window] if final_window else p
    if head.size < 3:
        return None
    if np.isneginf(head).any():
        return 0.0
    gain = float(np.max(head) - head[0])
    if gain <= 0:
        return None
    drawdown = float(np.max(np.maximum.accumulate(head) - head)) / gain
    return float(1.0 - min(max(drawdown, 0.0), 1.0))


@dataclass
class DosePoint:
    """Collapse rate (Wilson 95% CI) of the runs at one dose x."""

    x: float
    collapse_rate: float
    ci: list[float]
    n: int
    n_collapsed: int


def within_group_rank(values: ArrayLike, groups: Sequence[str]) -> np.ndarray:
    """Each value's rank within its group scaled to [0, 1] (values: (n,)), for pooling workloads."""
    arr = np.asarray(values, dtype=float)
    out = np.full(arr.shape, np.nan)
    group_arr = np.asarray(groups, dtype=object)
    for group in dict.fromkeys(groups):
        mask = (group_arr == group) & ~np.isnan(arr)
        count = int(mask.sum())
        if count == 1:
            out[mask] = 0.5
        elif count > 1:
            out[mask] = (stats.rankdata(arr[mask]) - 1) / (count - 1)
    return out


def collapse_rate_by(x: Sequence[float], collapsed: Sequence[bool | None]) -> list[DosePoint]:
    """Collapse rate with a Wilson 95% CI at each distinct x (dose-response).

    x: (n_runs,) numeric dose (perturbation magnitude or knob value); collapsed: (n_runs,) with
    None for runs that could not be judged (skipped). Returns points sorted by x.
    """
    counts: dict[float, list[int]] = {}
    for dose, hit in zip(x, collapsed, strict=True):
        if hit is None or dose is None or not math.isfinite(float(dose)):
            continue
        entry = counts.setdefault(float(dose), [0, 0])
        entry[0] += int(bool(hit))
        entry[1] += 1
    points = []
    for dose in sorted(counts):
        hits, n = counts[dose]
        low, high = wilson_interval(hits, n)
        points.append(DosePoint(dose, hits / n, [low, high], n, hits))
    return points
