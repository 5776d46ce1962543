"""What the report shows, read from the store: runs grouped by condition, curves, windows, latents.

Everything here is plain pandas/numpy; drawing lives in `figures.py`, the page in `html.py`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import RunData, RunStore

TELEMETRY_SIGNALS: tuple[str, ...] = ("grad_norm", "grad_cos_prev", "grad_cos_ema", "update_ratio")
MAX_CURVE_POINTS = 400  # telemetry is binned to at most this many points per run


@dataclass
class ReportData:
    """Everything the page needs, loaded once from the store."""

    audit: dict[str, Any]
    infos: list[dict[str, Any]]  # every run.json, whatever its status
    runs: dict[str, RunData]  # finished runs, by run_id
    summary: dict[str, Any] | None = None
    summary_error: str | None = None
    evaluation: dict[str, Any] | None = None
    evaluation_error: str | None = None
    summary_runs: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_report_data(store: RunStore) -> ReportData:
    """Read the audit, its runs, the metrics summary and the monitor evaluation (each optional)."""
    audit = store.audit() if store.exists() else {}
    infos = store.infos()
    runs = {run.run_id: run for run in store.iter_runs(status="done")}
    data = ReportData(audit=audit, infos=infos, runs=runs)
    try:
        from stabilitybench.metrics.summary import summarize
    except ImportError:
        data.summary_error = "the metrics module is not installed in this version"
    else:
        try:
            data.summary = summarize(store)
        except StabilityBenchError as exc:
            data.summary_error = str(exc)
    if data.summary is not None:
        for row in _as_list(data.summary.get("runs")):
            if isinstance(row, Mapping) and row.get("run_id") is not None:
                data.summary_runs[str(row["run_id"])] = dict(row)
    evaluation_path = store.root / "monitor" / "evaluation.json"
    if evaluation_path.exists():
        try:
            loaded = json.loads(evaluation_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            data.evaluation_error = f"{evaluation_path.name} could not be read: {exc}"
        else:
            if isinstance(loaded, dict):
                data.evaluation = loaded
            else:
                data.evaluation_error = f"{evaluation_path.name} is not a JSON object"
    return data


# -- labels ------------------------------------------------------------------------------------
def knob_text(knobs: Mapping[str, Any] | None) -> str:
    """`a=1, b=0.1` in key order, or `defaults` when a workload sweeps nothing."""
    if not knobs:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def perturbation_label(info: Mapping[str, Any]) -> str:
    """The run's perturbation label (`none` for a baseline)."""
    pert = info.get("perturbation")
    if isinstance(pert, str):
        return pert
    if not isinstance(pert, Mapping):
        return "none"
    kind = str(pert.get("kind", "none"))
    return "none" if kind == "none" else str(pert.get("label") or kind)


def is_baseline(info: Mapping[str, Any]) -> bool:
    return perturbation_label(info) == "none"


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


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, Mapping):
        return list(value.values())
    return []


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
    if run.info.get("kind") == "rl":
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


def onset_step(run: RunData) -> float | None:
    """The first perturbation window's start (optimizer step), or None for a baseline."""
    events = run.events
    if events.empty or "start_step" not in events.columns:
        return None
    starts = pd.to_numeric(events["start_step"], errors="coerce").dropna()
    return float(starts.min()) if len(starts) else None


def collapse_point(
    run: RunData, summary_row: Mapping[str, Any] | None
) -> tuple[float, float] | None:
    """(x, perf) of the evaluation where the run collapsed, or None if it did not.

    With a metrics summary, the run's onset plus its `collapse_step` (optimizer steps from onset)
    is used; without one, a run whose loss went non-finite is marked at its last evaluation.
    """
    perf = perf_series(run)
    if perf.empty:
        return None
    step = collapse_at_step(run, summary_row)
    if step is None:
        return None
    after = perf[perf["step"] >= step]
    row = after.iloc[0] if len(after) else perf.iloc[-1]
    return float(row["x"]), float(row["perf"])


def collapse_at_step(run: RunData, summary_row: Mapping[str, Any] | None) -> float | None:
    """The optimizer step of the run's collapse (+inf: its last step), or None if it held."""
    if summary_row is not None:
        if not summary_row.get("collapsed"):
            return None
        onset = as_float(summary_row.get("onset_step"))
        if onset is None:
            onset = onset_step(run)
        delta = as_float(summary_row.get("collapse_step"))
        if onset is None or delta is None or math.isnan(onset + delta):
            return math.inf
        return onset + delta
    outcome = run.info.get("outcome") or {}
    perf = pd.to_numeric(run.evals.get("perf", pd.Series(dtype=float)), errors="coerce")
    if outcome.get("diverged") or np.isneginf(perf.to_numpy(dtype=float)).any():
        return math.inf
    return None


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
