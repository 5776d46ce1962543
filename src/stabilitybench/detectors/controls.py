"""Control detectors: scores that read nothing of how training goes, the yardsticks a warning
must beat.

`clock` counts optimizer steps since the perturbation's onset: a detector that does no better
than it only knows that something was done to the run. `random` draws an i.i.d. uniform number
per step: what chance alone scores. Both run online as offline (`update(row)` returns what
`score` gives for that row) and are marked `control`, so tables and claims keep them apart from
the detectors that read the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import BaseDetector, register_detector

PERTURBED_COLUMN = "perturbed"  # the telemetry flag of a step inside a perturbation window
# The first row's values the random stream is seeded from, the first finite one (then `step`).
SALT_COLUMNS = ("loss", "grad_norm", "step")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


# -- pure scoring functions --------------------------------------------------------------------
def is_flagged(value: Any) -> bool:
    """Whether a row's `perturbed` value is set (None, NaN and pandas' NA are not)."""
    if value is None or value is pd.NA:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


def row_key(row: Mapping[str, Any], index: int) -> int:
    """A row's place on the run's clock: its `step`, or its row index where it has none."""
    step = row.get("step")
    if step is None or step is pd.NA or not math.isfinite(float(step)):
        return index
    return int(step)


def row_keys(table: pd.DataFrame) -> np.ndarray:
    """`row_key` of every row of `table` (n,) int64."""
    keys = np.arange(len(table), dtype=np.int64)
    if "step" in table.columns:
        steps = pd.to_numeric(table["step"], errors="coerce").to_numpy(dtype=float)
        finite = np.isfinite(steps)
        keys[finite] = steps[finite].astype(np.int64)
    return keys


def clock_scores(perturbed: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Steps since the first perturbed row, `keys[i] − keys[onset]` (perturbed: (n,) bool, keys:
    (n,) int) → (n,); 0 before the onset, and everywhere when no row is perturbed."""
    out = np.zeros(len(keys))
    flagged = np.flatnonzero(perturbed)
    if flagged.size:
        onset = int(flagged[0])
        out[onset:] = keys[onset:] - keys[onset]
    return out


def splitmix64_uniform(seed: int, keys: np.ndarray) -> np.ndarray:
    """The SplitMix64 stream seeded with `seed`, at positions `keys` (n,) int, as uniform [0, 1).

    Counter-based: the number at position k depends on (seed, k) only, so a row's number is the
    same whether scored offline or online, and whatever rows come before it.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 means it to
        z = np.uint64(seed) + (np.asarray(keys).astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(float) * 2.0**-53  # the top 53 bits


def stream_seed(first_row: Mapping[str, Any]) -> int:
    """A run's random stream: the bit pattern of its first row's first finite value among
    `SALT_COLUMNS` (its first loss, else gradient norm, else step), else 0. Runs that start
    from the same first row (the arms of one seed) share a stream: harmless for a score that is
    independent of what happens in the run."""
    for column in SALT_COLUMNS:
        value = first_row.get(column)
        if value is None or value is pd.NA:
            continue
        number = float(value)
        if math.isfinite(number):
            return int(np.float64(number).view(np.uint64))
    return 0


# -- the detectors -----------------------------------------------------------------------------
class ControlDetector(BaseDetector):
    """A detector that reads no training signal: a control, with no signal to attribute."""

    control: ClassVar[bool] = True

    def attribution(
        self, table: pd.DataFrame, index: int, index_names: Mapping[str, Any] | None = None
    ) -> str | None:
        return None


@register_detector
@dataclass
class ClockDetector(ControlDetector):
    """The clock control: optimizer steps since the first row marked `perturbed` (0 before it,
    and on a run with none). Its native rule, score > 0, alarms from the step after the onset
    on: a warning that is only "something was done to the run"."""

    name = "clock"
    title = "clock control (steps since the perturbation's onset)"
    citation = "control"
    reads = ((PERTURBED_COLUMN,),)

    limit: float = 0.0
    native_threshold = "limit"  # native rule: score > limit

    def score(self, table: pd.DataFrame) -> np.ndarray:
        if PERTURBED_COLUMN not in table.columns:
            return np.zeros(len(table))
        flags = np.asarray([is_flagged(v) for v in table[PERTURBED_COLUMN]], dtype=bool)
        return clock_scores(flags, row_keys(table))

    def reset(self) -> None:
        self._rows = 0
        self._onset: int | None = None

    def update(self, row: Mapping[str, Any]) -> float:
        key, self._rows = row_key(row, self._rows), self._rows + 1
        if self._onset is None and is_flagged(row.get(PERTURBED_COLUMN)):
            self._onset = key
        return 0.0 if self._onset is None else float(key - self._onset)


@register_detector
@dataclass
class RandomDetector(ControlDetector):
    """The random control: an i.i.d. uniform [0, 1) number per step, the SplitMix64 stream
    seeded from the run's first row (`stream_seed`) at the row's step. The same run always
    scores the same; its native rule, score > 0.999, alarms on one step in 1,000 on average."""

    name = "random"
    title = "random control (uniform score per step)"
    citation = "control"

    limit: float = 0.999
    native_threshold = "limit"  # native rule: score > limit

    def score(self, table: pd.DataFrame) -> np.ndarray:
        if len(table) == 0:
            return np.zeros(0)
        first_row = table.head(1).to_dict("records")[0]
        seed = stream_seed({str(name): value for name, value in first_row.items()})
        return splitmix64_uniform(seed, row_keys(table))

    def reset(self) -> None:
        self._rows = 0
        self._seed: int | None = None

    def update(self, row: Mapping[str, Any]) -> float:
        if self._seed is None:
            self._seed = stream_seed(row)
        key, self._rows = row_key(row, self._rows), self._rows + 1
        return float(splitmix64_uniform(self._seed, np.asarray([key]))[0])
