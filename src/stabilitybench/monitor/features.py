"""Telemetry rows → a fixed per-step feature vector, robustly normalised on baseline runs.

The monitor reads what the training *does*, never what the audit *sets*: columns that echo a
control (the learning rate, the entropy coefficient, the `perturbed` flag, a column a
perturbation writes, a knob recorded as a column) are left out, each with its reason, unless an
ablation asks for them (`include_controls`). Where they come from is declared next to what sets
them: `Probe.controls`, `Perturbation.sets_columns`, `PerturbationSchedule.flag_column`,
`LOGGED_CONTROLS` here, and the run's knobs (run.json).

Each known telemetry column (optionally prefixed by an optimizer role, `actor/grad_norm`) gets the
scaling its probe declares (`Probe.columns`; logged scalars such as losses in `LOGGED_SCALARS`):
norms and rates are log10-scaled, losses signed-log-scaled, coherences and fractions kept as
they are. The feature set is fixed at fit time (columns present in every baseline run);
a column missing from a later run, or a value missing on one step, carries the last value
forward (the baseline median at the start). A non-finite value, or a step whose gradients are
non-finite, is a divergence: its features are +inf and the `nonfinite` flag fires. A network
reads the clipped view (`[-CLIP, CLIP]`); scores that must keep growing with the distance read the
unclipped one (`transform(..., clip=False)`).

`view` chooses what is read of each column: its level (the default), its change over the last
`change_window` rows (`delta:<column>`: a log-growth rate for a norm, so that a recipe that sits
at another level from its start is not a deviation while its growth is healthy), or both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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
# What the monitor reads of each column: its normalised `level`, its `change` over the last
# `change_window` rows (the difference of the transformed values: a log-growth rate for norms),
# or both. A change feature is named `delta:<column>`.
VIEWS = ("level", "change", "level+change")
CHANGE_PREFIX = "delta:"
DEFAULT_CHANGE_WINDOW = 16


def check_view(view: str, change_window: int, where: str = "") -> None:
    """A feature view and change window, or one clear error naming the field (`where`: a
    prefix for the field, e.g. "monitor ")."""
    from stabilitybench.errors import StabilityBenchError

    if view not in VIEWS:
        raise StabilityBenchError(
            f"{where}feature_view must be one of {', '.join(VIEWS)}; got {view!r}"
        )
    if change_window < 1:
        raise StabilityBenchError(
            f"{where}change_window must be an integer >= 1; got {change_window}"
        )


# Logged scalars that are a setting, not a measurement: SB3 logs the entropy coefficient (a knob;
# SAC's automatic temperature is its own controller's output, not a sign of health).
LOGGED_CONTROLS: dict[str, str] = {
    "ent_coef": "the entropy coefficient (a knob, or SAC's temperature controller)",
}


def column_scalings() -> dict[str, str]:
    """Base column → scaling, from every Probe subclass's `columns` and `LOGGED_SCALARS`.

    Read afresh on each call (a probe class defined later is seen); callers keep the result.
    """
    from stabilitybench.telemetry import probes, stability_probes
    from stabilitybench.telemetry.base import Probe

    del probes, stability_probes  # imported for their Probe subclasses
    found: dict[str, str] = {}
    pending: list[type[Probe]] = [Probe]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        found.update({c: kind for c, kind in cls.columns.items() if kind is not None})
    return {**found, **LOGGED_SCALARS}


def control_columns(knobs: Iterable[str] = ()) -> dict[str, str]:
    """Base column → why it is a control, from every declaration (see the module docstring).

    `knobs`: the knob names of the runs being fitted; a knob logged under its own name is a
    control too.
    """
    from stabilitybench.perturbations.base import registry
    from stabilitybench.perturbations.schedule import PerturbationSchedule
    from stabilitybench.telemetry.base import Probe

    found: dict[str, str] = {}
    for cls in _subclasses(Probe):
        for column in sorted(cls.controls):
            found.setdefault(column, f"probe {cls.name!r} records a setting, not a measurement")
    for name, perturbation in sorted(registry().items()):
        for column in perturbation.sets_columns:
            found.setdefault(column, f"set by the perturbation {name!r}")
    found.setdefault(PerturbationSchedule.flag_column, "the perturbation schedule's flag")
    for column, why in LOGGED_CONTROLS.items():
        found.setdefault(column, why)
    for knob in sorted(knobs):
        found.setdefault(knob, f"the knob {knob!r}")
    return found


def control_reason(column: str, controls: Mapping[str, str]) -> str | None:
    """Why `column` is a control (its base name, role prefix `actor/lr` or group suffix
    `lr/group1` stripped), or None when it is a measurement."""
    for part in (column, *column.split("/")):
        if part in controls:
            return controls[part]
    return None


def _subclasses(root: type) -> list[Any]:
    out, pending = [], [root]
    while pending:
        cls = pending.pop()
        out.append(cls)
        pending.extend(cls.__subclasses__())
    return out


def base_name(column: str, scalings: Mapping[str, str] | None = None) -> str:
    """`actor/grad_norm` → `grad_norm`; a numbered layer's column (`attn_logit_max/2`, one per
    transformer block) → its probe's column; other per-tensor columns (`grad_norm/0.weight`)
    keep their slash (not features: one per tensor is too many)."""
    known = column_scalings() if scalings is None else scalings
    if column.count("/") == 1:
        role, base = column.split("/")
        if base in known and role not in known:
            return base
        if role in known and base.isdigit():
            return role
    return column


def layer_of(column: str) -> str | None:
    """The layer a per-layer column names (`attn_logit_max/2` → `2`), or None."""
    if column.count("/") == 1:
        suffix = column.split("/")[1]
        if suffix.isdigit():
            return suffix
    return None


def feature_columns(
    tables: Sequence[pd.DataFrame], controls: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(features, excluded): known telemetry columns with at least one finite value in every
    table, in a stable order, and column → reason for each column left out that a reader might
    expect (every control present, known columns some tables lack). `controls`
    (`control_columns()`) are left out; pass `{}` to keep them (the ablation)."""
    if not tables:
        return [], {}
    scalings = column_scalings()
    controls = control_columns() if controls is None else controls
    common: set[str] | None = None
    seen: set[str] = set()
    excluded: dict[str, str] = {}
    for table in tables:
        for column in table.columns:
            why = control_reason(str(column), controls)
            if why is not None:
                excluded[str(column)] = f"control: {why}"
        present = {
            c
            for c in table.columns
            if base_name(c, scalings) in scalings
            and np.isfinite(pd.to_numeric(table[c], errors="coerce")).any()
        }
        seen |= present
        common = present if common is None else common & present
    for column in sorted(seen - (common or set())):
        excluded.setdefault(column, "missing from some healthy runs")
    features = []
    for column in sorted(common or set()):
        why = control_reason(column, controls)
        if why is None:
            features.append(column)
        else:
            excluded[column] = f"control: {why}"
    return features, dict(sorted(excluded.items()))


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


def _counter_of(column: str, base: str) -> str:
    """The `nonfinite_grads` column of `column`'s optimizer role (`actor/grad_norm` →
    `actor/nonfinite_grads`): recorded on the rows where that optimizer stepped."""
    return column[: len(column) - len(base)] + "nonfinite_grads"


def divergence_mask(table: pd.DataFrame, scalings: Mapping[str, str] | None = None) -> np.ndarray:
    """Per row: non-finite gradients were recorded (`nonfinite_grads` > 0 or a non-finite grad norm).

    A missing grad norm is a divergence only on a row where its optimizer stepped: where the
    same role's `nonfinite_grads` was recorded (or, without that column, always). A role that
    did not step on that row — TD3's actor, updated every `policy_delay` critic steps — leaves
    its columns empty, and that is no divergence (it made every other TD3 step +inf)."""
    known = column_scalings() if scalings is None else scalings
    mask = np.zeros(len(table), dtype=bool)
    for column in table.columns:
        base = base_name(column, known)
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        if base == "nonfinite_grads":
            mask |= np.nan_to_num(values, nan=0.0) > 0
        elif base == "grad_norm":
            counter = _counter_of(str(column), base)
            stepped = (
                ~np.isnan(pd.to_numeric(table[counter], errors="coerce").to_numpy(dtype=float))
                if counter in table.columns
                else True
            )
            mask |= np.isinf(values) | (np.isnan(values) & stepped)
    return mask


@dataclass
class FeatureExtractor:
    """The fitted feature map: columns, transforms, and robust centre/scale per feature."""

    columns: list[str]
    center: np.ndarray  # (d,) median of the transformed column on baseline runs
    scale: np.ndarray  # (d,) robust spread (IQR / 1.349), floored
    # Candidate columns left out, each with its reason (controls, columns some runs lack).
    excluded: dict[str, str] = field(default_factory=dict)
    include_controls: bool = False  # the ablation that reads the controls too
    view: str = "level"  # one of VIEWS
    change_window: int = DEFAULT_CHANGE_WINDOW  # rows over which a change feature is taken
    change_center: np.ndarray | None = None  # (c,) median change on baseline runs
    change_scale: np.ndarray | None = None  # (c,) its robust spread, floored
    _last: np.ndarray | None = field(default=None, repr=False)  # online carry-forward state
    # Online: the last change_window + 1 finite (carried-forward) normalised levels.
    _history: list[np.ndarray] = field(default_factory=list, repr=False)
    # Base column → scaling, read once from the probe declarations (column_scalings()).
    scalings: dict[str, str] = field(default_factory=column_scalings, repr=False)

    def kind(self, column: str) -> str:
        """How a feature column is scaled (log, signed_log, identity)."""
        return self.scalings[base_name(column, self.scalings)]

    def __post_init__(self) -> None:
        check_view(self.view, self.change_window)

    @property
    def reads_level(self) -> bool:
        return self.view in ("level", "level+change")

    @property
    def reads_change(self) -> bool:
        return self.view in ("change", "level+change")

    @property
    def names(self) -> list[str]:
        levels = list(self.columns) if self.reads_level else []
        changes = [CHANGE_PREFIX + c for c in self.columns] if self.reads_change else []
        return [*levels, *changes, NONFINITE_FEATURE]

    @property
    def dim(self) -> int:
        return len(self.names)

    @classmethod
    def fit(
        cls,
        tables: Sequence[pd.DataFrame],
        include_controls: bool = False,
        knobs: Iterable[str] = (),
        view: str = "level",
        change_window: int = DEFAULT_CHANGE_WINDOW,
        exclude: Iterable[str] = (),
    ) -> FeatureExtractor:
        """Choose the columns present in every table, leave out the controls (unless
        `include_controls`; `knobs`: the runs' knob names) and normalise each column with its
        robust statistics; with a `change` view, each column's change over `change_window` rows
        too (normalised on the same tables). `exclude`: base column names left out as well."""
        controls = {} if include_controls else control_columns(knobs)
        columns, excluded = feature_columns(tables, controls)
        scalings = column_scalings()
        left_out = set(exclude)
        for column in [c for c in columns if base_name(c, scalings) in left_out]:
            columns.remove(column)
            excluded[column] = "left out by the monitor's configuration (exclude_features)"
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
        found = cls(
            columns,
            np.asarray(centers, dtype=float),
            np.asarray(scales, dtype=float),
            excluded=excluded,
            include_controls=include_controls,
            view=view,
            change_window=change_window,
        )
        if found.reads_change:
            changes = np.concatenate([found._changes(found._levels(t)) for t in tables])
            changes = np.where(np.isfinite(changes), changes, np.nan)
            with np.errstate(all="ignore"):
                q25, q50, q75 = np.nan_to_num(np.nanpercentile(changes, [25, 50, 75], axis=0))
            found.change_center = np.asarray(q50, dtype=float).reshape(len(columns))
            found.change_scale = np.maximum((q75 - q25) / 1.349, MIN_SCALE).reshape(len(columns))
        return found

    def _levels(self, table: pd.DataFrame) -> np.ndarray:
        """(n, c) normalised levels of the columns, carried forward (+inf: non-finite)."""
        n = len(table)
        out = np.zeros((n, len(self.columns)), dtype=float)
        diverged = divergence_mask(table, self.scalings)
        for j, column in enumerate(self.columns):
            if column not in table.columns:
                continue  # missing column: the baseline median (0 after normalisation)
            raw = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
            values = (transform_array(raw, self.kind(column)) - self.center[j]) / self.scale[j]
            bad = ~np.isfinite(raw) & (np.isinf(raw) | diverged)
            missing = np.isnan(raw) & ~bad
            values[bad] = math.inf
            values[missing] = np.nan
            out[:, j] = _carry_forward(values)
        return out

    def _changes(self, levels: np.ndarray) -> np.ndarray:
        """(n, c) un-normalised changes: transformed value now minus `change_window` rows ago
        (the first row before that), from the last finite level; +inf where the level is."""
        finite = pd.DataFrame(np.where(np.isfinite(levels), levels, np.nan)).ffill().fillna(0.0)
        past = finite.to_numpy(dtype=float)
        index = np.maximum(np.arange(len(levels)) - self.change_window, 0)
        with np.errstate(invalid="ignore"):
            return (levels - past[index]) * self.scale

    def _normalised_changes(self, changes: np.ndarray) -> np.ndarray:
        assert self.change_center is not None and self.change_scale is not None
        return (changes - self.change_center) / self.change_scale

    def _assemble(self, levels: np.ndarray, changes: np.ndarray | None) -> list[np.ndarray]:
        parts = [levels] if self.reads_level else []
        if self.reads_change:
            assert changes is not None
            parts.append(self._normalised_changes(changes))
        return parts

    def transform(self, table: pd.DataFrame, clip: bool = True) -> np.ndarray:
        """Telemetry table (n rows) → (n, d) normalised features, clipped to [-CLIP, CLIP].

        `clip=False`: the same values unclipped (a divergence is +inf), for scores that must keep
        growing with the distance; `transform(t)` is `np.clip(transform(t, clip=False))`.
        """
        n = len(table)
        out = np.zeros((n, self.dim), dtype=float)
        diverged = divergence_mask(table, self.scalings)
        levels = self._levels(table)
        changes = self._changes(levels) if self.reads_change else None
        parts = self._assemble(levels, changes)
        if parts:
            out[:, :-1] = np.concatenate(parts, axis=1)
        out[:, -1] = np.where(diverged | _row_has_inf(table, self.columns), math.inf, 0.0)
        out[:, :-1][np.isinf(out[:, -1])] = math.inf
        return np.clip(out, -CLIP, CLIP) if clip else out

    def reset(self) -> None:
        """Forget the online carry-forward state (start of a new run)."""
        self._last = None
        self._history = []

    def online_state(self) -> tuple[np.ndarray | None, list[np.ndarray]]:
        """A copy of the online state (the carried-forward levels and, for a change view, the
        recent finite levels), for `set_online_state`."""
        last = None if self._last is None else self._last.copy()
        return last, [h.copy() for h in self._history]

    def set_online_state(self, state: tuple[np.ndarray | None, list[np.ndarray]] | None) -> None:
        last, history = (None, []) if state is None else state
        self._last = None if last is None else last.copy()
        self._history = [h.copy() for h in history]

    def transform_row(self, row: Mapping[str, Any], clip: bool = True) -> np.ndarray:
        """One telemetry row (a mapping) → (d,) features; same result as `transform` row by row
        (each call is the next row: it advances the online state)."""
        c = len(self.columns)
        last = np.zeros(c, dtype=float) if self._last is None else self._last
        out = last.copy()
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
                out[j] = math.inf
        self._last = out
        changes = None
        if self.reads_change:
            previous = self._history[-1] if self._history else np.zeros(c, dtype=float)
            self._history.append(np.where(np.isfinite(out), out, previous))
            if len(self._history) > self.change_window + 1:
                self._history.pop(0)
            with np.errstate(invalid="ignore"):
                changes = ((out - self._history[0]) * self.scale)[None, :]
        full = np.zeros(self.dim, dtype=float)
        parts = self._assemble(out[None, :], changes)
        if parts:
            full[:-1] = np.concatenate(parts, axis=1)[0]
        full[-1] = math.inf if (diverged or infinite) else 0.0
        if diverged or infinite:
            full[:-1] = math.inf
        return np.clip(full, -CLIP, CLIP) if clip else full

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "excluded": self.excluded,
            "include_controls": self.include_controls,
            "view": self.view,
            "change_window": self.change_window,
            "change_center": None if self.change_center is None else self.change_center.tolist(),
            "change_scale": None if self.change_scale is None else self.change_scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureExtractor:
        """The extractor of `to_dict()`; fields an older file lacks take their defaults."""
        given = {
            "excluded": {},
            "include_controls": False,
            "view": "level",
            "change_window": DEFAULT_CHANGE_WINDOW,
            "change_center": None,
            "change_scale": None,
            **data,
        }
        return cls(
            list(given["columns"]),
            np.asarray(given["center"], dtype=float),
            np.asarray(given["scale"], dtype=float),
            excluded=dict(given["excluded"]),
            include_controls=bool(given["include_controls"]),
            view=str(given["view"]),
            change_window=int(given["change_window"]),
            change_center=_array_or_none(given["change_center"]),
            change_scale=_array_or_none(given["change_scale"]),
        )


def _array_or_none(values: Any) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=float)


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
            v = float(value)
            if math.isinf(v):
                return True
            if math.isnan(v):  # missing, unless its optimizer stepped (`divergence_mask`)
                counter = row.get(_counter_of(column, base), 0.0)
                if counter is not None and not math.isnan(float(counter)):
                    return True
    return False
