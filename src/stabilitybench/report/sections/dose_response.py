"""Stochasticity dose-response: collapse rate against each swept knob and perturbation size."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.metrics.conditions import ConditionSummary
from stabilitybench.metrics.stability import DosePoint
from stabilitybench.metrics.summary import AuditSummary
from stabilitybench.report import figures as figs
from stabilitybench.report.data import ReportData, knob_text
from stabilitybench.report.markup import Figures, esc, notice

COLUMNS = ["panel", "series", "x", "rate", "lo", "hi"]
INTRO = (
    '<p class="muted">Collapse rate under perturbation for each value of a swept knob, with '
    "95% confidence intervals. A falling curve means more stochasticity buffers the run.</p>"
)


def _row(panel: str, series: str, x: Any, rate: float | None, ci: Sequence[Any]) -> dict[str, Any]:
    low, high = (np.nan if v is None else v for v in [*ci, None, None][:2])
    return {"panel": panel, "series": series, "x": x, "rate": rate, "lo": low, "hi": high}


def _point_rows(panel: str, series: str, points: Sequence[DosePoint]) -> list[dict[str, Any]]:
    return [
        _row(panel, series, p.x, p.collapse_rate, p.ci)
        for p in points
        if not math.isnan(p.collapse_rate)
    ]


def _from_conditions(conditions: Sequence[ConditionSummary]) -> list[dict[str, Any]]:
    """For every knob a workload sweeps: collapse rate per value, one series per perturbation."""
    rows: list[dict[str, Any]] = []
    perturbed = [c for c in conditions if c.perturbation_kind != "none"]
    for workload in dict.fromkeys(c.workload for c in perturbed):
        conds = [c for c in perturbed if c.workload == workload]
        values: dict[str, set[str]] = {}
        for c in conds:
            for k, v in c.knobs.items():
                values.setdefault(k, set()).add(json.dumps(v))
        for knob in sorted(k for k, v in values.items() if len(v) > 1):
            for c in conds:
                if c.collapse_rate is None:
                    continue
                rest = {k: v for k, v in c.knobs.items() if k != knob}
                series = f"{c.perturbation} [{knob_text(rest)}]" if rest else c.perturbation
                rows.append(
                    _row(
                        f"{workload} · {knob}",
                        series,
                        c.knobs.get(knob),
                        c.collapse_rate,
                        c.collapse_rate_ci,
                    )
                )
    return rows


def dose_response_points(summary: AuditSummary) -> pd.DataFrame:
    """Collapse rate vs a knob or magnitude: from the summary's dose-response, else its conditions.

    Panels with fewer than two distinct x values are left out (one point is no dose-response).
    """
    dose = summary.dose_response
    rows: list[dict[str, Any]] = []
    for k in dose.knobs:
        rows += _point_rows(f"{k.workload} · {k.knob}", "all perturbations", k.points)
    for m in dose.magnitude:
        kind = m.perturbation_kind
        rows += _point_rows(f"{m.workload} · {kind} magnitude", kind, m.points)
    if not rows:
        rows = _from_conditions(summary.conditions)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    distinct = frame.groupby("panel")["x"].transform(lambda x: x.astype(str).nunique())
    return frame[distinct >= 2].reset_index(drop=True)


def section_dose_response(data: ReportData, figures: Figures) -> str:
    """Collapse rate against the stochasticity knobs (and perturbation magnitudes)."""
    parts = ['<h2 id="dose-response">Stochasticity dose-response</h2>']
    if data.summary is None:
        parts.append(notice(f"No stability metrics: {esc(data.summary_error or 'no summary')}."))
        return "\n".join(parts)
    points = dose_response_points(data.summary)
    if points.empty:
        parts.append(
            notice(
                "No dose-response: the audit sweeps no knob (or magnitude) across perturbed "
                "conditions."
            )
        )
        return "\n".join(parts)
    parts.append(INTRO)
    fig = figs.dose_response_figure(points, title="collapse rate vs knob / magnitude")
    parts.append(figures.embed("dose_response", fig, "collapse rate vs knob or magnitude"))
    return "\n".join(parts)
