"""A drop in gradient coherence: the cosine between successive gradients falling below its range.

arXiv 2601.13160 reports that gradient coherence drops sharply before performance collapses.
The `grad_cos` probe logs the cosine of each gradient with the previous one (`grad_cos_prev`)
and with their running mean (`grad_cos_ema`); this guard learns each one's normal range from the
run's own recent history, robustly (rolling median and MAD), and scores how far the value falls
below it. As every guard, it scores a non-finite value +inf and skips a missing one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from stabilitybench.detectors.base import BaseDetector, register_detector
from stabilitybench.detectors.columns import Signal, first_column
from stabilitybench.detectors.scores import (
    MAD_TO_STD,
    RangeScore,
    RecentRangeState,
    recent_range_scores,
)

COS_EMA_COLUMNS = ("grad_cos_ema", "actor/grad_cos_ema", "critic/grad_cos_ema")
COS_PREV_COLUMNS = ("grad_cos_prev", "actor/grad_cos_prev", "critic/grad_cos_prev")


# -- pure scoring function ---------------------------------------------------------------------
def robust_drop(median: ArrayLike, mad: ArrayLike, value: ArrayLike, min_scale: float) -> Any:
    """(median − value) / max(MAD·1.4826, min_scale): how many robust σ `value` is below."""
    return np.subtract(median, value) / np.maximum(np.multiply(MAD_TO_STD, mad), min_scale)


def coherence_drop_scores(
    values: np.ndarray, window: int = 100, warmup: int = 20, min_scale: float = 0.01
) -> np.ndarray:
    """How far each value falls below the run's recent range, in robust σ (values: (n,) → (n,)).

    Against the previous `window` logged values (at most): their median and MAD·1.4826 (at least
    `min_scale`), score (median − value) / scale, positive when the value drops. 0 until
    `warmup` values are logged. NaN (not logged) scores NaN and is not part of any window; ±inf
    scores +inf and is not part of any window either (`scores.recent_range_scores`).
    """
    return recent_range_scores(values, window, warmup, _drop(min_scale))


def _drop(min_scale: float) -> RangeScore:
    return lambda median, mad, value: robust_drop(median, mad, value, min_scale)


class CoherenceState(RecentRangeState):
    """Online twin of `coherence_drop_scores`: the last `window` logged values."""

    def __init__(self, window: int, warmup: int, min_scale: float) -> None:
        super().__init__(window, warmup, _drop(min_scale))


# -- the detector ------------------------------------------------------------------------------
@register_detector
@dataclass
class CoherenceDetector(BaseDetector):
    """A drop of gradient coherence (`grad_cos_ema`, `grad_cos_prev`) below its recent range.

    Per signal logged, `coherence_drop_scores` over the last 100 logged values (20 of warm-up);
    the score is the larger of the two. The native rule is a drop of more than 6 robust σ,
    score > 6 (the level of OLMo's spike rule); a cosine that moved by less than 0.01 is taken
    as having moved by 0.01, so a drop smaller than 0.06 is never an alarm.
    """

    name = "coherence"
    title = "gradient-coherence drop (rolling median / MAD)"
    citation = "arXiv 2601.13160 (gradient coherence drops before collapse)"
    reads = (COS_EMA_COLUMNS, COS_PREV_COLUMNS)

    window: int = 100  # logged values the median and MAD are taken over
    warmup: int = 20  # logged values before the signal scores
    min_scale: float = 0.01  # the least robust σ of a cosine
    threshold: float = 6.0
    native_threshold = "threshold"  # native rule: score > threshold

    def score(self, table: pd.DataFrame) -> np.ndarray:
        ema, prev = (
            coherence_drop_scores(first_column(table, c), self.window, self.warmup, self.min_scale)
            for c in self.reads
        )
        return np.fmax(ema, prev)

    def reset(self) -> None:
        self._states = [CoherenceState(self.window, self.warmup, self.min_scale) for _ in "ep"]
        self._signals = [Signal(columns) for columns in self.reads]

    def update(self, row: Mapping[str, Any]) -> float:
        ema, prev = (
            state.update(signal.value(row))
            for state, signal in zip(self._states, self._signals, strict=True)
        )
        return float(np.fmax(ema, prev))
