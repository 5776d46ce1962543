"""Which telemetry column a detector reads, and when a missing value means divergence.

A value that was not logged is missing, not non-finite: SB3 logs PPO's loss once per rollout,
so most PPO rows have no loss. The store keeps no difference between a NaN and a gap (Parquet
writes both as null), so a NaN is a divergence only on a row that recorded non-finite gradients
(`nonfinite_grads` > 0, any optimizer role); ±inf always is. The "loss" a guard watches is the
`loss` column; an RL run without one uses the best available stand-in: `value_loss`, then
`critic_loss`, then `critic/loss` (see `loss_series`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

LOSS_COLUMNS = ("loss", "value_loss", "critic_loss", "critic/loss")
# The norm before clipping where a workload logs it (a guard like ZClip sees that one).
GRAD_NORM_COLUMNS = ("grad_norm_raw", "grad_norm", "actor/grad_norm", "critic/grad_norm")


NONFINITE_COLUMN = "nonfinite_grads"
# A signal logged on every row from the first, for at least this many rows, that then has no
# value, went non-finite there (a loop that logs NaN for a diverged loss; the store keeps it as
# a gap). A signal logged on a schedule (every k-th row, once per rollout) never qualifies.
DENSE_ROWS = 10


def is_nonfinite_column(name: str) -> bool:
    return name == NONFINITE_COLUMN or name.endswith("/" + NONFINITE_COLUMN)


def role_columns(names: Sequence[Any], base: str) -> list[str]:
    """`base` and its optimizer-role variants (`actor/base`, `critic/base`) among `names`."""
    return [str(c) for c in names if c == base or str(c).endswith("/" + base)]


def divergent_rows(df: pd.DataFrame) -> np.ndarray:
    """(n,) bool: rows that recorded non-finite gradients (`nonfinite_grads` > 0, any role)."""
    mask = np.zeros(len(df), dtype=bool)
    for name in df.columns:
        if is_nonfinite_column(str(name)):
            counts = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
            mask |= np.nan_to_num(counts, nan=0.0) > 0
    return mask


def row_diverged(row: Mapping[str, Any]) -> bool:
    """The online twin of `divergent_rows` for one telemetry row."""
    for name, value in row.items():
        if is_nonfinite_column(str(name)) and value is not None and float(value) > 0:
            return True
    return False


def mark_nonfinite(values: np.ndarray, diverged: np.ndarray) -> np.ndarray:
    """A signal (n,) with NaN meaning "not logged", except where it is a divergence the store
    wrote as a gap: once the signal has been logged, a gap on a row with non-finite gradients
    (`diverged`, (n,) bool), or the first gap of a signal logged on every row from the first for
    at least `DENSE_ROWS` rows. Those become +inf."""
    out = np.asarray(values, dtype=float).copy()
    gaps = np.isnan(out)
    if gaps.all():
        return out
    started = np.arange(out.size) > int(np.argmax(~gaps))  # after the first logged value
    out[gaps & diverged & started] = np.inf
    first = int(np.argmax(gaps))
    if gaps[first] and first >= DENSE_ROWS:
        out[first] = np.inf
    return out


def first_column(df: pd.DataFrame, candidates: Sequence[str]) -> np.ndarray:
    """The first candidate column with a value (see `mark_nonfinite` for NaN and +inf)."""
    for name in candidates:
        if name in df.columns:
            values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
            if not np.all(np.isnan(values)):
                return mark_nonfinite(values, divergent_rows(df))
    return np.full(len(df), np.nan)


def max_column(df: pd.DataFrame, base: str) -> np.ndarray:
    """Per row, the largest value of `base` over optimizer roles (`base`, `actor/base`, …);
    ±inf is +inf (a non-finite value is an alarm whatever its sign)."""
    out = np.full(len(df), np.nan)
    names = role_columns(list(df.columns), base)
    for name in names:
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        out = np.fmax(out, np.where(np.isinf(values), np.inf, values))
    return mark_nonfinite(out, divergent_rows(df)) if names else out


def loss_series(df: pd.DataFrame) -> np.ndarray:
    """The loss a guard watches: `loss`, else `value_loss`, `critic_loss`, `critic/loss` (n,)."""
    return first_column(df, LOSS_COLUMNS)


def grad_norm_series(df: pd.DataFrame) -> np.ndarray:
    """The total gradient norm: `grad_norm_raw` (before clipping), `grad_norm`, else the actor's,
    else the critic's (n,)."""
    return first_column(df, GRAD_NORM_COLUMNS)


class Signal:
    """Online twin of `first_column` / `max_column`: one signal's value per row, with its state
    (rows seen, whether the signal has been logged on every one of them)."""

    def __init__(self, candidates: Sequence[str] = (), base: str | None = None) -> None:
        self.candidates, self.base = tuple(candidates), base
        self.rows, self.dense, self.logged = 0, True, False

    def value(self, row: Mapping[str, Any]) -> float:
        raw = self._raw(row)
        seen, self.rows = self.rows, self.rows + 1
        if not math.isnan(raw):
            self.logged = True
            return raw
        first_gap, self.dense = self.dense, False
        if self.logged and (row_diverged(row) or (first_gap and seen >= DENSE_ROWS)):
            return math.inf
        return math.nan

    def _raw(self, row: Mapping[str, Any]) -> float:
        """The row's value of the signal, NaN if it has none."""
        if self.base is not None:
            best = math.nan
            for name in role_columns(list(row), self.base):
                value = row.get(name)
                if value is not None:
                    number = float(value)
                    best = float(np.fmax(best, math.inf if math.isinf(number) else number))
            return best
        for name in self.candidates:
            value = row.get(name)
            if value is not None:
                return float(value)
        return math.nan


# -- pure scoring functions -------------------------------------------------------------------
