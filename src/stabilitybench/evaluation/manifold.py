"""Is healthy training low-dimensional, and do collapsing runs leave its manifold before they
collapse? PCA of the healthy runs' standardized telemetry, and how far each collapsing run's
pre-collapse rows sit from it, inside the top components and in the residual.

The features are the Meta-State Monitor's (`FeatureExtractor`, level view, unclipped, the knobs
and other controls left out), fitted on the healthy runs as `PCADetector.fit` does. The PCA is an
SVD of the concatenated, mean-centred healthy rows: each feature keeps the monitor's robust
scale (median / IQR), so a feature whose healthy runs move more weighs more. k is the number of
components that explain at least `variance` of the healthy variance. A feature constant on
healthy rows (a gradient norm always at its clip) stays in, with a note: any change of it is
residual. Two distances per row:

- the in-subspace Mahalanobis distance, sqrt(sum_i z_i**2 / var_i) over the top k scores;
- the residual norm, |x - mean - reconstruction| (what the top k components cannot express).

Each is divided by its 99th percentile on healthy rows. By default those percentiles are taken
in-sample (on the rows the PCA was fitted on, a note says so): with thousands of rows and a few
features the fit itself barely overfits, but a new seed may sit further from the fit than the
fitted seeds do. `held_out=True` fits on every other healthy run and takes the percentiles on
the rest. A collapsing run is measured only on its rows with onset <= step < c (every row
before c where the onset is unknown), never at or after the collapse; rows with a non-finite
value (a divergence) are skipped and counted in a note. By construction 1% of healthy rows
exceed the 99th percentile, so a first exceedance over a long stretch can be chance: read the
leads with the ratios.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.monitor.features import NONFINITE_FEATURE, FeatureExtractor

SIGNALS = (
    "loss",
    "grad_norm",
    "grad_norm_max_layer",
    "grad_cos_prev",
    "grad_cos_ema",
    "update_ratio",
    "update_norm",
    "param_norm",
)
"""The optimizer's telemetry the report reads (also as `role/signal`): the signals every
workload records through the optimizer hooks, and what a findings folder keeps, so that a
folder re-judged from its per-run data gives the same figures as its audit."""
PERCENTILE = 99.0  # the healthy level a collapsing run's distance is compared with
MIN_HEALTHY_ROWS = 20  # and at least two rows per feature
SHOWN_COMPONENTS = 10  # cumulative explained variance reported for this many components
# A feature whose standardized healthy values spread less than this is constant (a gradient
# norm always at its clip): it stays in the PCA, where any change of it is residual.
CONSTANT_SPREAD = 1e-3


def signal_columns(columns: Sequence[str]) -> list[str]:
    """The columns of a telemetry table this report reads (`SIGNALS`, or `role/signal`)."""
    return [c for c in columns if c in SIGNALS or c.partition("/")[2] in SIGNALS]


@dataclass
class ManifoldResult:
    """What PCA of a workload's healthy telemetry explains, and how far its collapsing runs
    leave the healthy manifold in the window before they collapse."""

    n_features: int  # standardized telemetry features in the PCA
    features: list[str]
    n_components_90: int | None  # components explaining >= `variance` of the healthy variance
    explained_variance_ratio: list[float]  # cumulative, first min(10, n_features) components
    n_healthy_runs: int
    n_collapsed_runs: int
    # Median over collapsed runs of max over [c - window, c) (and >= onset) of the distance
    # divided by its healthy 99th percentile: in the top-k components, and in the residual.
    subspace_ratio_median: float | None
    residual_ratio_median: float | None
    # Median over collapsed runs whose distance exceeds the healthy 99th percentile at some
    # step in [onset, c) of c minus the first such step, in optimizer steps.
    subspace_lead_median: float | None
    residual_lead_median: float | None
    subspace_runs_exceeding: int = 0  # collapsed runs with such a step (the leads' runs)
    residual_runs_exceeding: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Manifold:
    """The fitted healthy manifold: features, PCA and the healthy percentiles of both distances."""

    extractor: FeatureExtractor
    used: np.ndarray  # (d_all,) bool: extractor features kept (all but `nonfinite`)
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d)
    variances: np.ndarray  # (k,)
    fitted_rows: np.ndarray  # (n, d) the healthy rows the PCA was fitted on
    subspace_level: float = np.nan  # healthy 99th percentiles
    residual_level: float = np.nan

    def rows(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
        """(features (n, d) of the finite rows, their steps (n,), rows skipped as non-finite)."""
        x = self.extractor.transform(table, clip=False)[:, self.used]
        steps = _steps(table)
        finite = np.isfinite(x).all(axis=1)
        return x[finite], steps[finite], int((~finite).sum())

    def distances(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) features → (in-subspace Mahalanobis distance (n,), residual norm (n,))."""
        centred = x - self.mean
        scores = centred @ self.components.T  # (n, k)
        subspace = np.sqrt((scores**2 / self.variances).sum(axis=1))
        residual = np.linalg.norm(centred - scores @ self.components, axis=1)
        return subspace, residual


@dataclass
class _Excursion:
    """One collapsing run's distances before its collapse, relative to the healthy levels."""

    subspace_ratio: float | None = None
    residual_ratio: float | None = None
    subspace_lead: int | None = None
    residual_lead: int | None = None
    skipped_rows: int = 0


def manifold_report(
    healthy: Sequence[pd.DataFrame],
    collapsing: Sequence[tuple[pd.DataFrame, int, int | None]],
    *,
    window: int,
    variance: float = 0.9,
    knobs: Collection[str] = (),
    held_out: bool = False,
) -> ManifoldResult:
    """PCA of the healthy runs' telemetry and the collapsing runs' excursions from it.

    `healthy`: telemetry tables of a workload's healthy runs; `collapsing`: (telemetry table,
    collapse step c, onset step or None) of its collapsed runs, steps as in the `step` column;
    `window`: the warning horizon in optimizer steps; `knobs`: the runs' knob names (left out
    of the features); `held_out`: the 99th percentiles on healthy runs the PCA was not fitted
    on (every other run) rather than in-sample.
    """
    _check(window, variance)
    notes: list[str] = []
    result = ManifoldResult(
        0, [], None, [], len(healthy), len(collapsing), None, None, None, None, notes=notes
    )
    if not collapsing:
        notes.append("no collapsed runs: nothing to measure against the healthy manifold")
    fit_tables, level_tables = _split(healthy, held_out, notes)
    manifold = _fit(fit_tables, variance, knobs, result)
    if manifold is None:
        return result
    if level_tables is fit_tables:
        _calibrate(manifold, manifold.fitted_rows, False, notes)
    else:
        held = [manifold.rows(t)[0] for t in level_tables]
        _calibrate(manifold, np.concatenate(held), True, notes)
    excursions = [_excursion(manifold, t, c, onset, window) for t, c, onset in collapsing]
    _summarise(result, excursions, manifold)
    return result


def _check(window: int, variance: float) -> None:
    """The warning horizon and variance share, or one clear error naming the field."""
    if window < 1:
        raise StabilityBenchError(f"window must be an integer >= 1 (steps); got {window}")
    if not 0.0 < variance <= 1.0:
        raise StabilityBenchError(f"variance must be a share in (0, 1]; got {variance}")


def _split(
    healthy: Sequence[pd.DataFrame], held_out: bool, notes: list[str]
) -> tuple[Sequence[pd.DataFrame], Sequence[pd.DataFrame]]:
    """(tables the PCA is fitted on, tables the 99th percentiles are taken on)."""
    if not held_out:
        return healthy, healthy
    if len(healthy) < 2:
        notes.append("held_out needs two healthy runs: the percentiles are in-sample")
        return healthy, healthy
    return healthy[0::2], healthy[1::2]


def _fit(
    tables: Sequence[pd.DataFrame],
    variance: float,
    knobs: Collection[str],
    result: ManifoldResult,
) -> _Manifold | None:
    """Fit the features and the PCA on healthy tables (filling `result`'s PCA fields), or None
    with a note saying why not."""
    notes = result.notes
    if not tables:
        notes.append("no healthy runs: no manifold to fit")
        return None
    extractor = FeatureExtractor.fit(tables, knobs=knobs)
    names = list(extractor.names)
    rows = [extractor.transform(t, clip=False) for t in tables]
    x = np.concatenate(rows) if rows else np.zeros((0, len(names)))
    finite = np.isfinite(x).all(axis=1)
    if (~finite).any():
        notes.append(f"{int((~finite).sum())} non-finite healthy rows skipped")
    x = x[finite]
    used = np.asarray([n != NONFINITE_FEATURE for n in names])  # 0 on every finite row
    x = x[:, used]
    result.features = [n for n, keep in zip(names, used, strict=True) if keep]
    result.n_features = len(result.features)
    if not _varies(x, result.features, notes):
        return None
    if len(x) < max(MIN_HEALTHY_ROWS, 2 * result.n_features):
        notes.append(
            f"too few finite healthy rows ({len(x)}) for {result.n_features} features "
            f"(at least {max(MIN_HEALTHY_ROWS, 2 * result.n_features)})"
        )
        return None
    return _pca(extractor, used, x, variance, result)


def _varies(x: np.ndarray, names: Sequence[str], notes: list[str]) -> bool:
    """Whether some feature varies on the healthy rows `x` (n, d); constant ones are noted."""
    if not names:
        notes.append("no telemetry feature common to the healthy runs: no manifold to fit")
        return False
    spread = x.std(axis=0) if len(x) else np.zeros(len(names))
    constant = [n for n, s in zip(names, spread, strict=True) if s < CONSTANT_SPREAD]
    if len(constant) == len(names):
        notes.append("no telemetry feature varies on the healthy rows: no manifold to fit")
        return False
    if constant:
        notes.append(
            f"constant on healthy rows (kept: any change of it is residual): {', '.join(constant)}"
        )
    return True


def _pca(
    extractor: FeatureExtractor,
    used: np.ndarray,
    x: np.ndarray,
    variance: float,
    result: ManifoldResult,
) -> _Manifold:
    """SVD of the centred healthy rows (n, d); k components explain >= `variance`."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)  # s: (min(n, d),), vt: (., d)
    power = s**2
    cumulative = np.cumsum(power) / power.sum()
    result.explained_variance_ratio = [float(v) for v in cumulative[:SHOWN_COMPONENTS]]
    k = int(np.searchsorted(cumulative, variance - 1e-12) + 1)
    k = min(k, len(s))
    result.n_components_90 = k
    variances = np.maximum(power[:k] / max(len(x) - 1, 1), 1e-12)
    return _Manifold(extractor, used, mean, vt[:k], variances, x)


def _calibrate(manifold: _Manifold, x: np.ndarray, held_out: bool, notes: list[str]) -> None:
    """Set the healthy 99th percentiles of both distances on healthy rows `x` (n, d);
    `held_out`: rows of runs the PCA was not fitted on."""
    if len(x) == 0:
        notes.append("no finite healthy rows to take the 99th percentiles on")
        return
    subspace, residual = manifold.distances(x)
    manifold.subspace_level = float(np.percentile(subspace, PERCENTILE))
    manifold.residual_level = float(np.percentile(residual, PERCENTILE))
    where = "held-out healthy runs" if held_out else "the healthy runs fitted (in-sample)"
    notes.append(f"99th percentiles of both distances are of {where}")
    k, d = manifold.components.shape
    if k == d:
        notes.append(f"the top {k} components span every feature: no residual to measure")
        manifold.residual_level = np.nan


def _excursion(
    manifold: _Manifold, table: pd.DataFrame, collapse: int, onset: int | None, window: int
) -> _Excursion:
    """One collapsing run, on its rows with onset <= step < collapse only."""
    x, steps, skipped = manifold.rows(table[_steps(table) < collapse])  # never read past c
    start = -np.inf if onset is None else onset
    before = (steps >= start) & (steps < collapse)
    x, steps = x[before], steps[before]
    found = _Excursion(skipped_rows=skipped)
    if len(x) == 0:
        return found
    subspace, residual = manifold.distances(x)
    in_window = steps >= collapse - window
    found.subspace_ratio, found.subspace_lead = _measure(
        subspace, steps, in_window, manifold.subspace_level, collapse
    )
    found.residual_ratio, found.residual_lead = _measure(
        residual, steps, in_window, manifold.residual_level, collapse
    )
    return found


def _measure(
    distance: np.ndarray, steps: np.ndarray, in_window: np.ndarray, level: float, collapse: int
) -> tuple[float | None, int | None]:
    """(max distance in the window / the healthy level, collapse - first step above it)."""
    if not np.isfinite(level) or level <= 0:
        return None, None
    ratio = float(distance[in_window].max() / level) if in_window.any() else None
    above = distance > level
    lead = int(collapse - steps[above].min()) if above.any() else None
    return ratio, lead


def _summarise(result: ManifoldResult, excursions: Sequence[_Excursion], fit: _Manifold) -> None:
    """Medians over collapsed runs, and notes for what could not be measured."""
    notes = result.notes
    empty = sum(1 for e in excursions if e.subspace_ratio is None and e.residual_ratio is None)
    measurable = np.isfinite(fit.subspace_level) or np.isfinite(fit.residual_level)
    if empty and measurable:
        notes.append(f"{empty} collapsed runs have no finite row in their window before collapse")
    skipped = sum(e.skipped_rows for e in excursions)
    if skipped:
        notes.append(f"{skipped} non-finite rows of collapsed runs skipped")
    result.subspace_ratio_median = _median([e.subspace_ratio for e in excursions])
    result.residual_ratio_median = _median([e.residual_ratio for e in excursions])
    result.subspace_lead_median = _median([e.subspace_lead for e in excursions])
    result.residual_lead_median = _median([e.residual_lead for e in excursions])
    result.subspace_runs_exceeding = sum(1 for e in excursions if e.subspace_lead is not None)
    result.residual_runs_exceeding = sum(1 for e in excursions if e.residual_lead is not None)
    if excursions and result.subspace_runs_exceeding == 0 and np.isfinite(fit.subspace_level):
        notes.append("no collapsed run exceeds the healthy 99th percentile in the subspace")
    if excursions and result.residual_runs_exceeding == 0 and np.isfinite(fit.residual_level):
        notes.append("no collapsed run exceeds the healthy 99th percentile in the residual")


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.median(present)) if present else None


def _steps(table: pd.DataFrame) -> np.ndarray:
    """(n,) each row's optimizer step (the `step` column; the row number where it is absent)."""
    if "step" in table.columns:
        return pd.to_numeric(table["step"], errors="coerce").to_numpy(dtype=float)
    return np.arange(len(table), dtype=float)
