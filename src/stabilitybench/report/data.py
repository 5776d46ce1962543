"""What the report shows, read from the store: runs grouped by condition, curves, windows, latents.

Everything here is plain pandas/numpy; drawing lives in `figures.py`, the page in `html.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.analysis import Analysis
from stabilitybench.errors import StabilityBenchError
from stabilitybench.evaluation.results import (
    Evaluation,
)
from stabilitybench.evaluation.scoring import ScoreResult, load_score_result, score_path
from stabilitybench.metrics.records import Onset, RunRecord, audit_records, run_record
from stabilitybench.metrics.summary import AuditSummary
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import AuditRecord, RunData, RunStore

TELEMETRY_SIGNALS: tuple[str, ...] = ("grad_norm", "grad_cos_prev", "grad_cos_ema", "update_ratio")
MAX_CURVE_POINTS = 400  # telemetry is binned to at most this many points per run


@dataclass
class ReportData:
    """Everything the page needs, loaded once: typed records and results, and the stored runs."""

    audit: AuditRecord  # audit.json (the resolved spec)
    records: list[RunRecord]  # every run, whatever its status
    runs: dict[str, RunData]  # finished runs, by run_id
    summary: AuditSummary | None = None
    summary_error: str | None = None
    evaluation: Evaluation | None = None
    evaluation_error: str | None = None
    alarms: ScoreResult | None = None  # what `monitor score` said per run (score.json)
    # What moved the monitor at its first alarm, per run_id (monitor/attribution.json).
    attributions: dict[str, Any] = field(default_factory=dict)

    def record(self, run_id: str) -> RunRecord | None:
        """A run's record with its collapse analysis (None without a metrics summary)."""
        return None if self.summary is None else self.summary.run(run_id)

    def identity(self, run_id: str) -> RunRecord:
        """A run's record for its identity and onset (present with or without a summary)."""
        found = next((r for r in self.records if r.run_id == run_id), None)
        if found is None:
            raise KeyError(run_id)
        return found


def load_report_data(store: RunStore, analysis: Analysis | None = None) -> ReportData:
    """Read the audit, its runs, and its analysis (the summary and the saved evaluation, each
    optional; `analysis` if it was already made)."""
    from stabilitybench.analysis import analyse

    audit = store.audit() if store.exists() else AuditRecord()
    runs = {run.run_id: run for run in store.iter_runs(status="done")}
    data = ReportData(audit=audit, records=[], runs=runs)
    if analysis is None:
        try:
            analysis = analyse(store)
        except StabilityBenchError as exc:
            data.summary_error = str(exc)
    if analysis is not None:
        data.summary, data.evaluation = analysis.summary, analysis.evaluation
        data.evaluation_error = "; ".join(analysis.notes) or None
    if data.summary is not None:
        data.records = data.summary.runs
    else:
        try:
            data.records = audit_records(store)
        except StabilityBenchError:
            config = CollapseSettings()
            data.records = [run_record(i, None, Onset(), config) for i in store.infos()]
    if score_path(store.root).exists():
        try:
            data.alarms = load_score_result(store.root)
        except StabilityBenchError:
            data.alarms = None  # an unreadable score.json only loses the overlay
    from stabilitybench.evaluation.fitting import read_attributions

    data.attributions = read_attributions(store.root)
    return data


# -- labels ------------------------------------------------------------------------------------
def knob_text(knobs: Mapping[str, Any] | None) -> str:
    """`a=1, b=0.1` in key order, or `defaults` when a workload sweeps nothing."""
    if not knobs:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe, lower-case version of a label."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (out[:limit].rstrip("-")) or "x"


def unique_slugs(texts: Iterable[str]) -> list[str]:
    """Slugs, with `-2`, `-3`… added where two labels would share a file name."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        base = slug(text)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def as_float(value: Any) -> float | None:
    """A number as float, or None for missing / textual values (NaN stays NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return None


# -- per-run series ----------------------------------------------------------------------------
def x_column(run: RunData) -> str:
    """RL runs are plotted against environment steps, everything else against optimizer steps."""
    if run.info.kind == "rl":
        for frame in (run.evals, run.telemetry):
            if "env_step" in frame.columns and frame["env_step"].notna().any():
                return "env_step"
    return "step"


def _step_to_x(run: RunData, x_col: str) -> pd.Series | None:
    """Map optimizer step → env_step through telemetry (None when x is the optimizer step)."""
    if x_col == "step" or "step" not in run.telemetry.columns:
        return None
    if x_col not in run.telemetry.columns:
        return None
    table = run.telemetry[["step", x_col]].dropna().drop_duplicates("step")
    return pd.Series(table[x_col].to_numpy(dtype=float), index=table["step"].to_numpy())


def perf_series(run: RunData) -> pd.DataFrame:
    """Columns `x`, `step`, `perf` of one run's evaluations, sorted by x."""
    evals = run.evals
    if evals.empty or "perf" not in evals.columns:
        return pd.DataFrame({"x": [], "step": [], "perf": []}, dtype=float)
    x_col = x_column(run)
    step = (
        evals["step"].astype(float)
        if "step" in evals.columns
        else pd.Series(np.nan, index=evals.index)
    )
    x = evals[x_col].astype(float) if x_col in evals.columns else step
    out = pd.DataFrame(
        {"x": x.to_numpy(), "step": step.to_numpy(), "perf": evals["perf"].astype(float).to_numpy()}
    )
    return out.dropna(subset=["x"]).sort_values("x", kind="stable").reset_index(drop=True)


def _signal_column(columns: Iterable[str], signal: str) -> str | None:
    """`signal`, or the first optimizer's `role/signal` when several optimizers were instrumented."""
    columns = list(columns)
    if signal in columns:
        return signal
    for column in columns:
        if column.endswith("/" + signal) and column.count("/") == 1:
            return column
    return None


def telemetry_series(run: RunData) -> pd.DataFrame:
    """Columns `x` plus each available telemetry signal and `msd` (from scores), binned."""
    telemetry = run.telemetry
    if telemetry.empty or "step" not in telemetry.columns:
        return pd.DataFrame({"x": []}, dtype=float)
    x_col = x_column(run)
    frame = pd.DataFrame({"step": telemetry["step"].astype(float)})
    frame["x"] = telemetry[x_col].astype(float) if x_col in telemetry.columns else frame["step"]
    for signal in TELEMETRY_SIGNALS:
        column = _signal_column(telemetry.columns, signal)
        if column is not None:
            frame[signal] = pd.to_numeric(telemetry[column], errors="coerce").astype(float)
    scores = run.scores
    if scores is not None and "msd" in scores.columns and "step" in scores.columns:
        msd = scores[["step", "msd"]].astype(float).drop_duplicates("step")
        frame = frame.merge(msd, on="step", how="left")
    frame = frame.replace([np.inf, -np.inf], np.nan).dropna(subset=["x"]).sort_values("x")
    return _bin(frame.drop(columns=["step"]), MAX_CURVE_POINTS)


def _bin(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Average consecutive rows so that at most `max_points` remain (x is the bin's mean x)."""
    if len(frame) <= max_points:
        return frame.reset_index(drop=True)
    bins = np.arange(len(frame)) * max_points // len(frame)
    return frame.groupby(bins).mean().reset_index(drop=True)


def window_spans(run: RunData) -> list[tuple[float, float]]:
    """Perturbation windows of one run as (start_x, end_x), in the run's x units."""
    events = run.events
    if events.empty or "start_step" not in events.columns:
        return []
    x_col = x_column(run)
    step_to_x = _step_to_x(run, x_col)
    spans = []
    for row_dict in events.to_dict("records"):
        if row_dict.get("kind") == "guard":
            continue  # an intervention, not a perturbation window
        start, end = as_float(row_dict.get("start_step")), as_float(row_dict.get("end_step"))
        if start is None or math.isnan(start):
            continue
        end = start if end is None or math.isnan(end) else end
        if x_col != "step":
            start_x = as_float(row_dict.get(f"start_{x_col}"))
            end_x = as_float(row_dict.get(f"end_{x_col}"))
            if (start_x is None or math.isnan(start_x)) and step_to_x is not None:
                start_x = float(step_to_x.get(start, np.nan))
                end_x = float(step_to_x.get(end, np.nan))
            if start_x is None or math.isnan(start_x):
                continue
            end_x = start_x if end_x is None or math.isnan(end_x) else end_x
            spans.append((start_x, end_x))
        else:
            spans.append((start, end + 1.0))  # end_step is inclusive
    return spans


def guard_marks(run: RunData) -> list[tuple[str, float]]:
    """A guarded run's interventions as (action taken, x), in the run's x units."""
    events = run.events
    if events.empty or "kind" not in events.columns or "start_step" not in events.columns:
        return []
    marks = []
    for row in events[events["kind"] == "guard"].to_dict("records"):
        step = as_float(row["start_step"])
        if step is not None and not math.isnan(step):
            marks.append((str(row["name"]), step_x(run, step)))
    return marks


def step_x(run: RunData, step: float) -> float:
    """An optimizer step in the run's x units (environment steps for RL runs)."""
    mapping = _step_to_x(run, x_column(run))
    if mapping is None:
        return float(step)
    return float(mapping.get(step, np.nan))


def collapse_point(run: RunData, record: RunRecord | None) -> tuple[float, float] | None:
    """(x, perf) of the evaluation where the run collapsed, or None if it did not.

    With a record (from the metrics summary) the collapse is at its `collapse_at` step; without
    one, a run whose loss went non-finite is marked at its last evaluation.
    """
    perf = perf_series(run)
    if perf.empty:
        return None
    step = collapse_at_step(run, record)
    if step is None:
        return None
    after = perf[perf["step"] >= step]
    row = after.iloc[0] if len(after) else perf.iloc[-1]
    return float(row["x"]), float(row["perf"])


def collapse_at_step(run: RunData, record: RunRecord | None) -> float | None:
    """The optimizer step of the run's collapse (+inf: its last step), or None if it held."""
    if record is not None:
        collapse = record.collapse
        if collapse is None or not collapse.collapsed:
            return None
        return math.inf if collapse.collapse_at is None else float(collapse.collapse_at)
    perf = perf_series(run)["perf"].to_numpy(dtype=float)
    return math.inf if np.isneginf(perf).any() else None


def onset_step(record: RunRecord | None) -> float | None:
    """The perturbation onset of a perturbed run (None for a baseline or without a record)."""
    if record is None or record.is_baseline or record.onset.step is None:
        return None
    return float(record.onset.step)


def latent_columns(scores: pd.DataFrame | None) -> list[str]:
    """`z_1..z_k` in numeric order."""
    if scores is None:
        return []
    found = [c for c in scores.columns if re.fullmatch(r"z_\d+", str(c))]
    return sorted(found, key=lambda c: int(c[2:]))


def project_2d(baseline: np.ndarray, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """Project latents to 2-D: as is for k = 2, else onto the baseline's first two principal axes."""
    k = baseline.shape[1] if baseline.ndim == 2 else 0
    if k == 2:
        return arrays, "z_1 / z_2"
    finite = baseline[np.isfinite(baseline).all(axis=1)]
    mean = finite.mean(axis=0)
    _, _, vt = np.linalg.svd(finite - mean, full_matrices=False)
    axes = vt[:2].T  # (k, 2)
    return [(a - mean) @ axes for a in arrays], "PC 1 / PC 2 of z (baseline runs)"
