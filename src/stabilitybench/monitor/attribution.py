"""Which signal deviated first: per-signal standardised deviations at one step of a run.

For a fitted detector the reference is the healthy runs it was fitted on (its features' robust
centre and scale, the same normalisation the model reads); for a guard it is the run's own
values before that step (median and IQR / 1.349, after the column's monitor scaling, e.g. log10
for norms). A value that is non-finite at the step deviates infinitely.

The Meta-State Monitor explains itself instead (`MonitorAttribution`): at its first alarm, each
feature's share of the dominant deviation term, and for a per-layer maximum the layer it came
from (`attn_logit_max/3` → block 3; `grad_norm_layer_max` → the tensor its argmax column names
in run.json's `telemetry_index`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


# -- the monitor's own attribution: which features moved its deviation ------------------------


@dataclass(frozen=True)
class Contribution:
    """One feature's part in the monitor's deviation at a step."""

    feature: str  # the feature column (`attn_logit_max/3`, `grad_norm_layer_max`, `nonfinite`)
    share: float  # its fraction of the dominant term's squared distance (shares sum to 1)
    z: float  # its signed deviation from healthy in the progress bin (healthy per-bin std units)
    layer: str | None = None  # the layer or tensor it points at, where the column says


@dataclass(frozen=True)
class MonitorAttribution:
    """What moved the Meta-State Monitor's deviation at one step (its first alarm)."""

    step: int
    term: str  # the dominant deviation term (latent, prediction, features)
    contributions: list[Contribution] = field(default_factory=list)

    def text(self, top: int = 2) -> str:
        """`grad_norm_layer_max @ h.3.attn.c_attn.weight (+8.1σ, 62%), …` (top `top`)."""
        parts = []
        for c in self.contributions[:top]:
            where = f" @ {c.layer}" if c.layer else ""
            z = "non-finite" if math.isinf(c.z) else f"{c.z:+.1f}σ"
            parts.append(f"{c.feature}{where} ({z}, {100 * c.share:.0f}%)")
        return ", ".join(parts)


def argmax_columns() -> dict[str, tuple[str, str]]:
    """`<x>_max` column → (`<x>_argmax` column, the probe whose `index_names` it indexes), from
    every probe that declares both (`layer_max`, `adam_rms`): the tensor a maximum came from."""
    from stabilitybench.monitor.features import _subclasses, column_scalings
    from stabilitybench.telemetry.base import Probe

    column_scalings()  # imports the built-in probes
    found: dict[str, tuple[str, str]] = {}
    for cls in _subclasses(Probe):
        for column in cls.columns:
            if column.endswith("_argmax"):
                stem = column[: -len("_argmax")]
                for candidate in (f"{stem}_max", stem):
                    if candidate in cls.columns:
                        found[candidate] = (column, cls.name)
    return found


def layer_name(
    table: pd.DataFrame,
    column: str,
    index: int,
    index_names: Mapping[str, Sequence[str]] | None,
    argmax: Mapping[str, tuple[str, str]],
) -> str | None:
    """The layer a feature points at on row `index`: `block N` for a per-block column
    (`attn_logit_max/N`), or the tensor named by the matching argmax column through run.json's
    `telemetry_index` (its index when the run did not record the names)."""
    from stabilitybench.monitor.features import layer_of

    block = layer_of(column)
    if block is not None:
        return f"block {block}"
    if column not in argmax or argmax[column][0] not in table.columns:
        return None
    source, probe = argmax[column]
    values = pd.to_numeric(table[source], errors="coerce").to_numpy(dtype=float)
    value = _value_at(values, index)
    if not math.isfinite(value):
        return None
    names = (index_names or {}).get(probe) or []
    position = int(value)
    return str(names[position]) if 0 <= position < len(names) else f"tensor #{position}"
