"""A detector that calibrates on the run itself: no healthy runs, no fitted monitor.

Per signal that comes before a collapse — the loss, the gradient norm before clipping, the update
ratio, Adam's second-moment RMS ratio and the attention / output logit maxima where the stability
probes record them — it learns the normal range online from the run's own last `window` logged
values, robustly (their median, and MAD·1.4826 as the scale), and scores how many robust σ the
value rises above it. The score at a step is the largest rise over the signals, held for
`persist` steps: the least of the last `persist` of them, so one noisy step does not alarm; a
non-finite value scores +inf at once. `attribution` names the signal that moved it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike

from stabilitybench.detectors.base import BaseDetector, register_detector
from stabilitybench.detectors.columns import (
    GRAD_NORM_COLUMNS,
    LOSS_COLUMNS,
    Signal,
    first_column,
    max_column,
)
from stabilitybench.detectors.scores import (
    MAD_TO_STD,
    RangeScore,
    RecentRangeState,
    recent_range_scores,
)
from stabilitybench.errors import StabilityBenchError

_EPS = 1e-12  # the least scale of all, for a signal whose median is 0


@dataclass(frozen=True)
class Watched:
    """One signal the detector reads: its first present column among `candidates`, or with
    `base`, the largest of that column over optimizer roles (`base`, `actor/base`, …)."""

    candidates: tuple[str, ...]
    base: str | None = None

    @classmethod
    def roles(cls, base: str) -> Watched:
        return cls((base, f"actor/{base}", f"critic/{base}"), base)

    def series(self, table: pd.DataFrame) -> np.ndarray:
        """The signal's values per row (n,): NaN not logged, +inf a divergence."""
        if self.base is not None:
            return max_column(table, self.base)
        return first_column(table, self.candidates)

    def column(self, table: pd.DataFrame) -> str | None:
        """What the attribution calls the signal in `table`; None when it has no value there."""
        if self.base is not None:
            return self.base if (~np.isnan(self.series(table))).any() else None
        for name in self.candidates:
            if name in table.columns and pd.to_numeric(table[name], errors="coerce").notna().any():
                return name
        return None

    def online(self) -> Signal:
        return Signal(base=self.base) if self.base is not None else Signal(self.candidates)


# Every signal is watched for a rise: a loss, a gradient norm, an update, Adam's lag behind the
# gradients, a logit that grows — each one rises before a collapse.
WATCHED: tuple[Watched, ...] = (
    Watched(LOSS_COLUMNS),
    Watched(GRAD_NORM_COLUMNS),  # `grad_norm_raw` (before clipping) first
    Watched.roles("update_ratio"),
    Watched.roles("adam_rms_max"),  # `probes: stability`
    Watched.roles("attn_logit_max"),  # `probes: stability`, GPT-2 models
    Watched.roles("out_logit_max"),
)


# -- pure scoring functions ----------------------------------------------------------------------
def robust_rise(median: ArrayLike, mad: ArrayLike, value: ArrayLike, scale_floor: float) -> Any:
    """(value − median) / scale, at least 0, with scale = max(MAD·1.4826, scale_floor·|median|,
    1e-12): how many robust σ `value` rises above the median."""
    scale = np.maximum(np.multiply(MAD_TO_STD, mad), np.multiply(scale_floor, np.abs(median)))
    return np.maximum(np.subtract(value, median) / np.maximum(scale, _EPS), 0.0)


def rise_scores(
    values: np.ndarray, window: int = 128, warmup: int = 50, scale_floor: float = 0.05
) -> np.ndarray:
    """How far each value rises above the run's recent range, in robust σ (values: (n,) → (n,)).

    Against the previous `window` logged values (at most): their median and MAD·1.4826 (at least
    `scale_floor` × |median|). 0 until `warmup` values are logged, and for a value at or below
    the median. NaN (not logged) scores NaN and is not part of any window; ±inf scores +inf and
    is not part of any window either (`scores.recent_range_scores`).
    """
    return recent_range_scores(values, window, warmup, _rise(scale_floor))


def _rise(scale_floor: float) -> RangeScore:
    return lambda median, mad, value: robust_rise(median, mad, value, scale_floor)


def persistent(raw: np.ndarray, persist: int = 3) -> np.ndarray:
    """The least of the last `persist` scored values, per row (raw: (n,) → (n,)).

    NaN (nothing scored) stays NaN and is not part of any window; +inf stays +inf (a divergence
    needs no persistence). Before `persist` values are scored, the least of those there are.
    """
    raw = np.asarray(raw, dtype=float)
    out = np.full(raw.size, np.nan)
    scored = ~np.isnan(raw)
    values = raw[scored]  # (m,)
    held = np.empty(values.size)
    for i in range(min(persist - 1, values.size)):
        held[i] = values[: i + 1].min()
    if values.size >= persist:
        held[persist - 1 :] = sliding_window_view(values, persist).min(axis=1)
    held[np.isinf(values)] = np.inf
    out[scored] = held
    return out


class RiseState(RecentRangeState):
    """Online twin of `rise_scores`: the last `window` logged values of one signal."""

    def __init__(self, window: int, warmup: int, scale_floor: float) -> None:
        super().__init__(window, warmup, _rise(scale_floor))


def _check(name: str, value: Any, ok: bool, must_be: str) -> None:
    if not ok:
        raise StabilityBenchError(f"auto.{name}: must be {must_be}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


# -- the detector --------------------------------------------------------------------------------
@register_detector
@dataclass
class AutoDetector(BaseDetector):
    """Self-calibrating: a rise of any cheap signal above the run's own recent range.

    Per signal logged (loss; gradient norm, `grad_norm_raw` first; update ratio; Adam's RMS ratio
    `adam_rms_max`; `attn_logit_max`; `out_logit_max`), `rise_scores` over its last 128 logged
    values (50 of warm-up, a scale of at least 5 % of the median); per row the largest of them;
    the score is the least of the last 3 such rows (`persistent`). Native rule: score > 6.

    Cost per row, online: per signal a median and a MAD over at most `window` values (O(window)),
    about 40 µs per signal logged on one CPU core (a quarter of a millisecond for all six).
    Offline, the medians of all windows are taken at once: a 1,000-row table scores in about
    0.05 s.
    """

    name = "auto"
    title = "self-calibrating rise (rolling median / MAD, persistent)"
    citation = "this package: robust z over the run's own history (cf. OLMo's 6σ spike rule)"
    reads = tuple(w.candidates for w in WATCHED)

    window: int = 128  # logged values of each signal the median and MAD are taken over (>= 8)
    warmup: int = 50  # logged values of a signal before it scores (1 <= warmup <= window)
    persist: int = 3  # rows the rise must last: the score is the least of the last `persist`
    z_thresh: float = 6.0  # native rule: score > z_thresh (robust σ)
    scale_floor: float = 0.05  # the least robust σ, as a fraction of the median's magnitude
    native_threshold = "z_thresh"

    def __post_init__(self) -> None:
        w = self.window
        _check("window", w, _is_int(w) and w >= 8, "an integer >= 8")
        ok = _is_int(self.warmup) and 1 <= self.warmup <= w
        _check("warmup", self.warmup, ok, f"an integer from 1 to window ({w})")
        _check(
            "persist", self.persist, _is_int(self.persist) and self.persist >= 1, "an integer >= 1"
        )
        z = self.z_thresh
        _check("z_thresh", z, _is_number(z) and math.isfinite(z) and z > 0, "a number > 0")
        f = self.scale_floor
        _check("scale_floor", f, _is_number(f) and math.isfinite(f) and f >= 0, "a number >= 0")
        super().__post_init__()

    def signal_scores(self, table: pd.DataFrame) -> list[np.ndarray]:
        """Each watched signal's rise per row (NaN where it is not logged), in `WATCHED` order."""
        return [
            rise_scores(w.series(table), self.window, self.warmup, self.scale_floor)
            for w in WATCHED
        ]

    def score(self, table: pd.DataFrame) -> np.ndarray:
        raw = np.full(len(table), np.nan)
        for rises in self.signal_scores(table):
            raw = np.fmax(raw, rises)
        return persistent(raw, self.persist)

    def reset(self) -> None:
        self._states = [RiseState(self.window, self.warmup, self.scale_floor) for _ in WATCHED]
        self._signals = [w.online() for w in WATCHED]
        self._recent: deque[float] = deque(maxlen=self.persist)

    def rolled_back(self, current: Any) -> Any:
        """A signal still in its warm-up at the snapshot keeps what it has learned since: its
        range is a property of the run, not of the restored state, and a warm-up restarted
        from the snapshot's few values scores the same level as a rise again at the same offset
        after every rollback (a rollback loop: `adam_rms_max` on the tiny GPT-2, which climbs
        during the first 50 steps and then holds)."""
        if isinstance(current, AutoDetector):
            for i, state in enumerate(self._states):
                if len(state.history) < self.warmup <= len(current._states[i].history):
                    self._states[i] = current._states[i]
        return self

    def update(self, row: Mapping[str, Any]) -> float:
        raw = math.nan
        for state, signal in zip(self._states, self._signals, strict=True):
            raw = float(np.fmax(raw, state.update(signal.value(row))))
        if math.isnan(raw):
            return math.nan
        self._recent.append(raw)
        return math.inf if math.isinf(raw) else min(self._recent)

    def attribution(
        self,
        table: pd.DataFrame,
        index: int,
        index_names: Mapping[str, Sequence[str]] | None = None,
    ) -> str | None:
        """The signal with the largest rise at row `index`, as `grad_norm_raw (+7.3σ)`
        (`loss (non-finite)` for a divergence); None when no signal is logged."""
        best: tuple[float, str] | None = None
        for watched, rises in zip(WATCHED, self.signal_scores(table), strict=True):
            column = watched.column(table)
            value = float(rises[index])
            if column is None or math.isnan(value):
                continue
            if best is None or value > best[0]:
                best = (value, column)
        if best is None:
            return None
        value, column = best
        return f"{column} (non-finite)" if math.isinf(value) else f"{column} ({value:+.1f}σ)"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
