"""Telemetry rows → a fixed per-step feature vector, robustly normalised on baseline runs.

Each known telemetry column (optionally prefixed by an optimizer role, `actor/grad_norm`) gets the
scaling its probe declares (`Probe.columns`; logged scalars such as losses in `LOGGED_SCALARS`):
norms and rates are log10-scaled, losses signed-log-scaled, coherences and fractions kept as
they are. The feature set is fixed at fit time (columns present in every baseline run);
a column missing from a later run, or a value missing on one step, carries the last value
forward (the baseline median at the start). A non-finite value, or a step whose gradients are
non-finite, is a divergence: its features are set to `+CLIP` and the `nonfinite` flag fires.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

CLIP = 50.0  # normalised features live in [-CLIP, CLIP]
LOG_FLOOR = 1e-12
MIN_SCALE = 0.05  # a log10 change of 0.05 (~12%) is the smallest unit of deviation

LOG = "log"
SIGNED_LOG = "signed_log"
IDENTITY = "identity"

# Scalars that workloads and integrations log next to the probes (losses, the RL algorithm's
# own statistics, the pre-clip gradient norm) and how the monitor scales them. Probe columns
# are declared by each probe class (`Probe.columns`); `column_scalings()` merges the two.
LOGGED_SCALARS: dict[str, str] = {
    "grad_norm_raw": LOG,
    "loss": SIGNED_LOG,
    "value_loss": SIGNED_LOG,
    "critic_loss": SIGNED_LOG,
    "actor_loss": SIGNED_LOG,
    "entropy": SIGNED_LOG,
    "approx_kl": LOG,
    "clip_fraction": IDENTITY,
    "explained_variance": IDENTITY,
    "ent_coef": LOG,
}
NONFINITE_FEATURE = "nonfinite"


def column_scalings() -> dict[str, str]:
    """Base column → scaling, from every Probe subclass's `columns` and `LOGGED_SCALARS`.

    Read afresh on each call (a probe class defined later is seen); callers keep the result.
    """
    from stabilitybench.telemetry import probes
    from stabilitybench.telemetry.base import Probe

    del probes  # imported for its Probe subclasses
    found: dict[str, str] = {}
    pending: list[type[Probe]] = [Probe]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        found.update({c: kind for c, kind in cls.columns.items() if kind is not None})
    return {**found, **LOGGED_SCALARS}


def base_name(column: str, scalings: Mapping[str, str] | None = None) -> str:
    """`actor/grad_norm` → `grad_norm`; per-layer columns (`grad_norm/0.weight`) keep their slash."""
    known = column_scalings() if scalings is None else scalings
    if column.count("/") == 1:
        role, base = column.split("/")
        if base in known and role not in known:
            return base
    return column


def feature_columns(tables: Sequence[pd.DataFrame]) -> list[str]:
    """Known telemetry columns with at least one finite value in every table, in a stable order."""
    if not tables:
        return []
    scalings = column_scalings()
    common: set[str] | None = None
    for table in tables:
        present = {
            c
            for c in table.columns
            if base_name(c, scalings) in scalings
            and np.isfinite(pd.to_numeric(table[c], errors="coerce")).any()
        }
        common = present if common is None else common & present
    return sorted(common or set())


def transform_value(value: float, kind: str) -> float:
    """Apply one column's transform to a finite value."""
    if kind == LOG:
        return math.log10(abs(value) + LOG_FLOOR)
    if kind == SIGNED_LOG:
        return math.copysign(math.log10(1.0 + abs(value)), value)
    return value


def transform_array(values: np.ndarray, kind: str) -> np.ndarray:
    """Vectorised `transform_value` (non-finite entries stay non-finite)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if kind == LOG:
            return np.log10(np.abs(values) + LOG_FLOOR)
        if kind == SIGNED_LOG:
            return np.sign(values) * np.log10(1.0 + np.abs(values))
        return values.astype(float)


def divergence_mask(table: pd.DataFrame, scalings: Mapping[str, str] | None = None) -> np.ndarray:
    """Per row: non-finite gradients were recorded (`nonfinite_grads` > 0 or a non-finite grad norm)."""
    known = column_scalings() if scalings is None else scalings
    mask = np.zeros(len(table), dtype=bool)
    for column in table.columns:
        base = base_name(column, known)
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        if base == "nonfinite_grads":
            mask |= np.nan_to_num(values, nan=0.0) > 0
        elif base == "grad_norm":
            mask |= np.isinf(values) | np.isnan(values)
    return mask


@dataclass
class FeatureExtractor:
    """The fitted feature map: columns, transforms, and robust centre/scale per feature."""

    columns: list[str]
    center: np.ndarray  # (d,) median of the transformed column on baseline runs
    scale: np.ndarray  # (d,) robust spread (IQR / 1.349), floored
    _last: np.ndarray | None = field(default=None, repr=False)  # online carry-forward state
    # Base column → scaling, read once from the probe declarations (column_scalings()).
    scalings: dict[str, str] = field(default_factory=column_scalings, repr=False)

    def kind(self, column: str) -> str:
        """How a feature column is scaled (log, signed_log, identity)."""
        return self.scalings[base_name(column, self.scalings)]

    @property
    def names(self) -> list[str]:
        return [*self.columns, NONFINITE_FEATURE]

    @property
    def dim(self) -> int:
        return len(self.columns) + 1

    @classmethod
    def fit(cls, tables: Sequence[pd.DataFrame]) -> FeatureExtractor:
        """Choose the columns present in every table and normalise with their robust statistics."""
        columns = feature_columns(tables)
        scalings = column_scalings()
        centers, scales = [], []
        for column in columns:
            kind = scalings[base_name(column, scalings)]
            values = np.concatenate(
                [
                    transform_array(
                        pd.to_numeric(t[column], errors="coerce").to_numpy(dtype=float), kind
                    )
                    for t in tables
                ]
            )
            values = values[np.isfinite(values)]
            q25, q50, q75 = np.percentile(values, [25, 50, 75]) if values.size else (0.0, 0.0, 0.0)
            centers.append(q50)
            scales.append(max((q75 - q25) / 1.349, MIN_SCALE))
        return cls(columns, np.asarray(centers, dtype=float), np.asarray(scales, dtype=float))

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        """Telemetry table (n rows) → (n, d) normalised features, clipped to [-CLIP, CLIP]."""
        n = len(table)
        out = np.zeros((n, self.dim), dtype=float)
        diverged = divergence_mask(table, self.scalings)
        for j, column in enumerate(self.columns):
            if column not in table.columns:
                continue  # missing column: the baseline median (0 after normalisation)
            raw = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
            values = (transform_array(raw, self.kind(column)) - self.center[j]) / self.scale[j]
            bad = ~np.isfinite(raw) & (np.isinf(raw) | diverged)
            missing = np.isnan(raw) & ~bad
            values[bad] = CLIP
            values[missing] = np.nan
            out[:, j] = _carry_forward(values)
        out[:, -1] = np.where(diverged | _row_has_inf(table, self.columns), CLIP, 0.0)
        out[:, :-1][out[:, -1] == CLIP] = CLIP
        return np.clip(out, -CLIP, CLIP)

    def reset(self) -> None:
        """Forget the online carry-forward state (start of a new run)."""
        self._last = None

    def transform_row(self, row: Mapping[str, Any]) -> np.ndarray:
        """One telemetry row (a mapping) → (d,) features; same result as `transform` row by row."""
        if self._last is None:
            self._last = np.zeros(self.dim, dtype=float)
        out = self._last.copy()
        diverged = _row_diverged(row, self.scalings)
        infinite = False
        for j, column in enumerate(self.columns):
            value = row.get(column)
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                kind = self.kind(column)
                out[j] = (transform_value(value, kind) - self.center[j]) / self.scale[j]
            elif math.isinf(value) or diverged:
                infinite = infinite or math.isinf(value)
                out[j] = CLIP
        out[-1] = CLIP if (diverged or infinite) else 0.0
        if diverged or infinite:
            out[:-1] = CLIP
        np.clip(out, -CLIP, CLIP, out=out)
        self._last = out
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureExtractor:
        return cls(
            list(data["columns"]),
            np.asarray(data["center"], dtype=float),
            np.asarray(data["scale"], dtype=float),
        )


def _carry_forward(values: np.ndarray) -> np.ndarray:
    """Replace NaN by the last non-NaN value (0 before the first)."""
    series = pd.Series(values).ffill().fillna(0.0)
    return series.to_numpy(dtype=float)


def _row_has_inf(table: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    mask = np.zeros(len(table), dtype=bool)
    for column in columns:
        if column in table.columns:
            mask |= np.isinf(pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float))
    return mask


def _row_diverged(row: Mapping[str, Any], scalings: Mapping[str, str]) -> bool:
    """The online twin of `divergence_mask` for one row."""
    for column, value in row.items():
        base = base_name(column, scalings)
        if base == "nonfinite_grads" and value is not None:
            v = float(value)
            if math.isfinite(v) and v > 0:
                return True
        elif base == "grad_norm":
            if value is None:
                continue
            if not math.isfinite(float(value)):
                return True
    return False
