"""Performance and telemetry: one figure per workload × perturbation, knob settings as series."""

from __future__ import annotations

from collections.abc import Iterable

from stabilitybench.evaluation.scoring import RunAlarms
from stabilitybench.report import figures as figs
from stabilitybench.report.data import (
    ReportData,
    collapse_point,
    guard_marks,
    knob_text,
    perf_series,
    step_x,
    telemetry_series,
    unique_slugs,
    window_spans,
    x_column,
)
from stabilitybench.report.markup import Figures, esc, notice
from stabilitybench.store import RunData

MAX_CONDITION_FIGURES = 24
MAX_SERIES_PER_FIGURE = 10
MAX_ALARM_LINES = 12  # runs whose `monitor score` alarms are spelled out under a figure
INTRO = (
    '<p class="muted">Top panel: performance, median over seeds with the inter-quartile band; '
    "the dashed line is the unperturbed baseline with the same knobs. Shaded: perturbation "
    "windows; ×: collapse points; dash-dot lines: each detector's first alarm (`monitor score`); "
    "markers along the top: a guard's interventions (▽ skip, □ LR cut, ◇ moment reset, ◁ rollback), one series "
    "per knob setting and guard. The panels below share the time axis: gradient norm, "
    "gradient coherence, update ratio and the monitor's meta-state deviation (when fitted).</p>"
)
Grouped = dict[tuple[str, str], dict[str, list[RunData]]]


def group_runs(data: ReportData, runs: Iterable[RunData]) -> Grouped:
    """(workload, perturbation) → knob setting (and guard) → runs; baselines first."""
    grouped: Grouped = {}
    for run in runs:
        r = data.identity(run.run_id)
        key = (r.workload, r.perturbation)
        setting = knob_text(r.knobs) + ("" if r.guard == "none" else f" · guard {r.guard}")
        grouped.setdefault(key, {}).setdefault(setting, []).append(run)
    order = sorted(grouped, key=lambda k: (k[0], k[1] != "none", k[1]))
    return {k: dict(sorted(grouped[k].items())) for k in order}


def _figure(
    data: ReportData, grouped: Grouped, key: tuple[str, str], figures: Figures, name: str
) -> str:
    workload, pert = key
    settings = grouped[key]
    series: list[figs.ConditionSeries] = []
    windows: set[tuple[float, float]] = set()
    x_label = "optimizer step"
    for knobs, runs in list(settings.items())[:MAX_SERIES_PER_FIGURE]:
        baseline = [] if pert == "none" else grouped.get((workload, "none"), {}).get(knobs, [])
        points = [collapse_point(run, data.record(run.run_id)) for run in runs]
        series.append(
            figs.ConditionSeries(
                label=knobs,
                perf=[perf_series(r) for r in runs],
                telemetry=[telemetry_series(r) for r in runs],
                baseline_perf=[perf_series(r) for r in baseline],
                collapses=[p for p in points if p],
                alarms=[a for run in runs for a in _first_alarms(data, run)],
                interventions=[m for run in runs for m in guard_marks(run)],
            )
        )
        for run in runs:
            windows.update((round(a, 6), round(b, 6)) for a, b in window_spans(run))
            x_label = "environment step" if x_column(run) == "env_step" else x_label
    title = f"{workload} · {pert}"
    parts = [f"<h3>{esc(title)}</h3>"]
    if len(settings) > MAX_SERIES_PER_FIGURE:
        shown = f"Showing the first {MAX_SERIES_PER_FIGURE} of {len(settings)} knob settings."
        parts.append(notice(shown))
    fig = figs.condition_figure(series, windows=sorted(windows)[:24], title=title, x_label=x_label)
    parts.append(figures.embed(f"performance_{name}", fig, f"{title}: performance and telemetry"))
    scored = [a for runs in settings.values() for r in runs if (a := _alarms_of(data, r))]
    parts.extend(_alarm_text(a) for a in scored[:MAX_ALARM_LINES])
    return "\n".join(parts)


def _alarms_of(data: ReportData, run: RunData) -> RunAlarms | None:
    if data.alarms is None:
        return None
    return next((a for a in data.alarms.runs if a.run_id == run.run_id), None)


def _first_alarms(data: ReportData, run: RunData) -> list[tuple[str, float]]:
    """(detector, x) of each detector's first native alarm on this run (`monitor score`)."""
    found = _alarms_of(data, run)
    if found is None:
        return []
    return [
        (d.detector, step_x(run, d.first_alarm_step))
        for d in found.detectors
        if d.first_alarm_step is not None
    ]


def _alarm_text(run: RunAlarms) -> str:
    """One line per scored run: which detector alarmed first, on which signal, then the rest."""
    fired = sorted(
        (d for d in run.detectors if d.first_alarm_step is not None),
        key=lambda d: d.first_alarm_step or 0,
    )
    if not fired:
        return f'<p class="muted">{esc(run.label)}: no detector alarmed.</p>'
    first, rest = fired[0], fired[1:]
    signal = f"; {first.deviated_first} deviated first" if first.deviated_first else ""
    others = ", ".join(f"{d.detector} at {d.first_alarm_step}" for d in rest)
    silent = [d.detector for d in run.detectors if d.scored and d.first_alarm_step is None]
    tail = (f"; then {others}" if others else "") + (
        f"; silent: {', '.join(silent)}" if silent else ""
    )
    end = "" if run.diverged_step is None else f" (diverged at step {run.diverged_step})"
    return (
        f'<p class="muted">{esc(run.label)}{esc(end)}: first alarm '
        f"{esc(first.detector)} at step {first.first_alarm_step}{esc(signal)}{esc(tail)}.</p>"
    )


def section_curves(data: ReportData, figures: Figures) -> str:
    """Performance with telemetry panels below, one figure per workload × perturbation."""
    parts = ['<h2 id="curves">Performance and telemetry</h2>']
    grouped = group_runs(data, data.runs.values())
    if not grouped:
        parts.append(notice("No finished runs: nothing to plot yet."))
        return "\n".join(parts)
    parts.append(INTRO)
    keys = list(grouped)
    shown = keys[:MAX_CONDITION_FIGURES]
    for key, name in zip(shown, unique_slugs(f"{w}-{p}" for w, p in shown), strict=True):
        parts.append(_figure(data, grouped, key, figures, name))
    if len(keys) > len(shown):
        parts.append(notice(f"Showing {len(shown)} of {len(keys)} workload × perturbation groups."))
    return "\n".join(parts)
