"""Which signal deviated first: per-signal standardised deviations at one step of a run.

For a fitted detector the reference is the healthy runs it was fitted on (its features' robust
centre and scale, the same normalisation the model reads); for a guard it is the run's own
values before that step (median and IQR / 1.349, after the column's monitor scaling, e.g. log10
for norms). A value that is non-finite at the step deviates infinitely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stabilitybench.monitor.features import (
    IDENTITY,
    MIN_SCALE,
    FeatureExtractor,
    base_name,
    column_scalings,
    transform_array,
)

MIN_HISTORY = 3  # earlier values a guard's signal needs for a deviation


def _value_at(values: np.ndarray, index: int) -> float:
    """The value at `index`; a value missing there is carried forward from the last logged one,
    except right after a logged value (a signal that stops at the alarm went non-finite)."""
    value = float(values[index])
    if not math.isnan(value):
        return value
    if index > 0 and math.isfinite(values[index - 1]):
        return math.inf
    earlier = values[:index][~np.isnan(values[:index])]
    return float(earlier[-1]) if earlier.size else math.nan


def deviations(
    table: pd.DataFrame,
    columns: Sequence[str],
    index: int,
    features: FeatureExtractor | None = None,
) -> dict[str, float]:
    """Column → signed standardised deviation at row `index` (±inf: non-finite, NaN: unknown)."""
    scalings = column_scalings() if features is None else features.scalings
    out: dict[str, float] = {}
    for column in columns:
        raw = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        value = _value_at(raw, index)
        if math.isinf(value):
            out[column] = value
            continue
        kind = scalings.get(base_name(column, scalings), IDENTITY)
        x = float(transform_array(np.asarray([value]), kind)[0])
        if features is not None and column in features.columns:
            j = features.columns.index(column)
            out[column] = (x - float(features.center[j])) / float(features.scale[j])
            continue
        history = transform_array(raw[:index], kind)
        history = history[np.isfinite(history)]
        if history.size < MIN_HISTORY or math.isnan(x):
            out[column] = math.nan
            continue
        q25, q50, q75 = np.percentile(history, [25, 50, 75])
        out[column] = (x - q50) / max((q75 - q25) / 1.349, MIN_SCALE)
    return out


def strongest(found: Mapping[str, float]) -> str | None:
    """`name (+4.2σ)` of the largest |deviation| (`name (non-finite)` for ±inf); a lone signal
    without a deviation is named bare; None when nothing was read."""
    known = {c: v for c, v in found.items() if not math.isnan(v)}
    if not known:
        return next(iter(found), None)
    column = max(known, key=lambda c: abs(known[c]))
    value = known[column]
    if math.isinf(value):
        return f"{column} (non-finite)"
    return f"{column} ({value:+.1f}σ)"
