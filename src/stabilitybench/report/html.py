"""One self-contained HTML page per audit: inline CSS, figures as PNG data URIs, no requests."""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.report import figures as figs
from stabilitybench.report.data import (
    ReportData,
    as_float,
    collapse_at_step,
    collapse_point,
    is_baseline,
    knob_text,
    latent_columns,
    load_report_data,
    onset_step,
    perf_series,
    perturbation_label,
    project_2d,
    telemetry_series,
    unique_slugs,
    window_spans,
    x_column,
)
from stabilitybench.store import RunData, RunStore

MAX_CONDITION_FIGURES = 24
MAX_SERIES_PER_FIGURE = 10
MAX_LATENT_POINTS = 300
DETECTOR_NAMES = {
    "msm": "Meta-State Monitor",
    "zclip": "ZClip (gradient-norm EMA z-score)",
    "olmo": "OLMo stability monitor (rolling z-score)",
    "lightning": "Lightning spike detection (loss)",
    "megatron": "Megatron-LM spiky-loss check",
    "ews": "early-warning signals (variance, lag-1 AC)",
    "pca": "linear meta-state (PCA + Mahalanobis)",
}

CSS = """
:root { --ink:#1d232a; --muted:#5b6570; --line:#dde2e7; --band:#f5f7f9; --accent:#2a6f97; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); margin: 0; background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 64px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 12px; }
h1 { font-size: 26px; margin: 8px 0 4px; word-break: break-word; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; word-break: break-word; }
.meta, .muted { color: var(--muted); font-size: 13px; }
nav { font-size: 13px; margin: 8px 0 0; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 8px 0 12px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--band); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .why { white-space: normal; color: var(--muted); font-size: 12px; }
td:first-child { min-width: 12em; }
tr.best td { background: #eaf4ea; }
.notice { background: #fff8e6; border-left: 4px solid #e0a800; padding: 8px 12px; margin: 8px 0; }
.error { background: #fdecec; border-left: 4px solid #c62828; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; }
pre { background: var(--band); padding: 10px; overflow-x: auto; font-size: 12px; }
details > summary { cursor: pointer; color: var(--accent); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; }
code { background: var(--band); padding: 1px 4px; border-radius: 3px; }
"""


def esc(value: Any) -> str:
    """Text as HTML, quotes included: every user-provided string goes through here."""
    return escape(str(value), quote=True)


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number for a table cell; a string (e.g. "too few runs") is shown as given."""
    if isinstance(value, str):
        return value
    number = as_float(value)
    if number is None or math.isnan(number):
        return "—"
    if math.isinf(number):
        return "−∞" if number < 0 else "∞"
    if number == int(number) and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.{digits}g}"


def fmt_rate(value: Any) -> str:
    number = as_float(value)
    if isinstance(value, str):
        return value
    if number is None or math.isnan(number):
        return "—"
    return f"{100 * number:.0f}%"


def with_interval(value: Any, interval: Any, point: Callable[[Any], str] = fmt_number) -> str:
    """`value [lo, hi]`; a text interval that repeats the value's text is not shown twice."""
    shown = point(value)
    return shown if interval == value else shown + fmt_interval(interval, point)


def fmt_interval(value: Any, point: Callable[[Any], str] = fmt_number) -> str:
    """`[lo, hi]` from a two-item list, or the text given instead (empty when missing)."""
    if isinstance(value, str):
        return f" ({value})"
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = (point(v) for v in value)
        return f" [{low}, {high}]"
    return ""


class Figures:
    """Embeds figures in the page and, when asked, writes each as a PNG file."""

    def __init__(self, figures_dir: Path | None) -> None:
        self.figures_dir = figures_dir
        self.written: list[Path] = []

    def embed(self, name: str, fig: Any, caption: str) -> str:
        import matplotlib.pyplot as plt

        try:
            data = base64.b64encode(figs.png_bytes(fig)).decode("ascii")
            if self.figures_dir is not None:
                self.written.append(figs.save_png(fig, self.figures_dir / f"{name}.png"))
        finally:
            plt.close(fig)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )


def notice(message: str, *, error: bool = False) -> str:
    cls = "notice error" if error else "notice"
    return f'<p class="{cls}">{message}</p>'


def table(
    headers: Sequence[tuple[str, bool]],
    rows: Iterable[Sequence[str]],
    row_classes: Sequence[str] = (),
) -> str:
    """An HTML table; `headers` are (title, numeric); cells are already-escaped HTML."""
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in headers
    )
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
            for cell, (_, num) in zip(row, headers, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- sections ----------------------------------------------------------------------------------
def audit_name(data: ReportData, store: RunStore) -> str:
    spec: Mapping[str, Any] = (
        data.audit["spec"] if isinstance(data.audit.get("spec"), Mapping) else {}
    )
    return str(data.audit.get("name") or spec.get("name") or store.root.name)


def section_overview(data: ReportData, store: RunStore) -> str:
    """Spec, versions, runs by status, wall time, failed runs."""
    from stabilitybench import __version__

    audit = data.audit
    spec = audit.get("spec") if isinstance(audit.get("spec"), Mapping) else audit
    version = (
        audit.get("version") or audit.get("package_version") or audit.get("stabilitybench_version")
    )
    counts: dict[str, int] = {}
    for info in data.infos:
        status = str(info.get("status", "pending"))
        counts[status] = counts.get(status, 0) + 1
    wall = [float(w) for i in data.infos if (w := as_float(i.get("wall_s"))) is not None]
    started = [float(s) for i in data.infos if (s := as_float(i.get("started"))) is not None]
    finished = [float(f) for i in data.infos if (f := as_float(i.get("finished"))) is not None]
    elapsed = max(finished) - min(started) if started and finished else None
    cards = [("runs", str(len(data.infos)))]
    cards += [(status, str(n)) for status, n in sorted(counts.items())]
    cards.append(("compute time", _duration(sum(wall)) if wall else "—"))
    cards.append(("elapsed", _duration(elapsed) if elapsed is not None and elapsed >= 0 else "—"))
    parts = ['<h2 id="overview">Overview</h2>']
    parts.append(
        '<div class="cards">'
        + "".join(
            f'<div class="card"><b>{esc(v)}</b><span class="muted">{esc(k)}</span></div>'
            for k, v in cards
        )
        + "</div>"
    )
    workloads = spec.get("workloads") if isinstance(spec, Mapping) else None
    rows = [
        ("audit folder", esc(store.root)),
        ("package version (audit)", esc(version or "unknown")),
        ("package version (report)", esc(__version__)),
    ]
    if isinstance(workloads, list):
        names = [
            f"{w.get('name', '?')} ({w.get('kind', '?')})"
            for w in workloads
            if isinstance(w, Mapping)
        ]
        rows.append(("workloads", esc(", ".join(names))))
    if isinstance(spec, Mapping) and isinstance(spec.get("seeds"), list):
        rows.append(("seeds", esc(", ".join(str(s) for s in spec["seeds"]))))
    if isinstance(spec, Mapping) and isinstance(spec.get("perturbations"), list):
        rows.append(("perturbations", esc("; ".join(_short(p) for p in spec["perturbations"]))))
    parts.append(
        table([("", False), ("", False)], rows).replace(
            "<thead><tr><th></th><th></th></tr></thead>", ""
        )
    )
    parts.append(
        "<details><summary>the resolved spec (audit.json)</summary><pre>"
        + esc(json.dumps(audit, indent=2, sort_keys=True, default=str))
        + "</pre></details>"
    )
    failed = [i for i in data.infos if i.get("status") == "failed"]
    if failed:
        parts.append(f"<h3>Failed runs ({len(failed)})</h3>")
        for info in failed:
            error = str(info.get("error") or "no error text recorded").strip()
            last = error.splitlines()[-1] if error else ""
            parts.append(
                f"<details><summary>{esc(info.get('label') or info.get('run_id'))}: {esc(last)}</summary>"
                f"<pre>{esc(error)}</pre></details>"
            )
    if counts.get("pending") or counts.get("running"):
        parts.append(
            notice(
                f"{counts.get('pending', 0) + counts.get('running', 0)} runs have not finished; "
                "they are left out of every section below."
            )
        )
    return "\n".join(parts)


def _short(perturbation: Any) -> str:
    """`lr_spike(at=0.3, factor=10)` for one perturbation, `a + b` for a list, `none` for []."""
    if isinstance(perturbation, Mapping):
        args = ", ".join(f"{k}={v}" for k, v in perturbation.items() if k != "kind")
        return f"{perturbation.get('kind', '?')}({args})"
    if isinstance(perturbation, list):
        return " + ".join(_short(p) for p in perturbation) or "none"
    return str(perturbation)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def section_conditions(data: ReportData) -> str:
    """Per condition: collapse rate with CI, median collapse time, recovery rate, final-perf IQM."""
    parts = ['<h2 id="conditions">Conditions</h2>']
    conditions = data.summary.get("conditions") if data.summary else None
    if not isinstance(conditions, list) or not conditions:
        reason = data.summary_error or "the summary lists no conditions"
        parts.append(notice(f"No stability metrics: {esc(reason)}."))
        parts.append(_conditions_from_store(data))
        return "\n".join(parts)
    headers = [
        ("workload", False),
        ("knobs", False),
        ("perturbation", False),
        ("runs", True),
        ("collapse rate [95% CI]", True),
        ("median collapse time (steps)", True),
        ("recovery rate", True),
        ("final perf IQM [95% CI]", True),
    ]
    rows = []
    for c in conditions:
        if not isinstance(c, Mapping):
            continue
        rows.append(
            [
                esc(c.get("workload", "?")),
                esc(knob_text(c.get("knobs") if isinstance(c.get("knobs"), Mapping) else None)),
                esc(_pert_text(c.get("perturbation"))),
                esc(fmt_number(c.get("n_runs"))),
                esc(with_interval(c.get("collapse_rate"), c.get("collapse_rate_ci"), fmt_rate)),
                esc(fmt_number(c.get("median_collapse_steps"))),
                esc(fmt_rate(c.get("recovery_rate"))),
                esc(with_interval(c.get("final_perf_iqm"), c.get("final_perf_iqm_ci"))),
            ]
        )
    parts.append(table(headers, rows))
    notes = (
        (data.summary or {}).get("audit", {}).get("notes")
        if isinstance((data.summary or {}).get("audit"), Mapping)
        else None
    )
    if isinstance(notes, list) and notes:
        parts.append("<ul>" + "".join(f'<li class="muted">{esc(n)}</li>' for n in notes) + "</ul>")
    parts.append(
        '<p class="muted">Collapse: the first evaluation after onset whose progress falls below the '
        "collapse threshold; recovery rate: share of collapsed runs that regain the recovery "
        "threshold; IQM: interquartile mean over seeds (stratified bootstrap CI).</p>"
    )
    return "\n".join(parts)


def _pert_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return perturbation_label({"perturbation": value})
    return str(value if value is not None else "none")


def _conditions_from_store(data: ReportData) -> str:
    """Without metrics: at least the conditions and their runs by status."""
    groups: dict[tuple[str, str, str], dict[str, int]] = {}
    for info in data.infos:
        key = (
            str(info.get("workload", "?")),
            knob_text(info.get("knobs")),
            perturbation_label(info),
        )
        status = str(info.get("status", "pending"))
        groups.setdefault(key, {}).setdefault(status, 0)
        groups[key][status] += 1
    if not groups:
        return notice("This audit has no runs yet.")
    rows = [
        [esc(w), esc(k), esc(p), esc(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))]
        for (w, k, p), counts in sorted(groups.items())
    ]
    return table(
        [("workload", False), ("knobs", False), ("perturbation", False), ("runs", False)], rows
    )


def _group_runs(runs: Iterable[RunData]) -> dict[tuple[str, str], dict[str, list[RunData]]]:
    """(workload, perturbation) → knob setting → runs; baselines first within a workload."""
    grouped: dict[tuple[str, str], dict[str, list[RunData]]] = {}
    for run in runs:
        key = (str(run.info.get("workload", "?")), perturbation_label(run.info))
        grouped.setdefault(key, {}).setdefault(knob_text(run.info.get("knobs")), []).append(run)
    order = sorted(grouped, key=lambda k: (k[0], k[1] != "none", k[1]))
    return {k: dict(sorted(grouped[k].items())) for k in order}


def section_curves(data: ReportData, figures: Figures) -> str:
    """Performance with telemetry panels below, one figure per workload × perturbation."""
    parts = ['<h2 id="curves">Performance and telemetry</h2>']
    grouped = _group_runs(data.runs.values())
    if not grouped:
        parts.append(notice("No finished runs: nothing to plot yet."))
        return "\n".join(parts)
    parts.append(
        '<p class="muted">Top panel: performance, median over seeds with the inter-quartile band; '
        "the dashed line is the unperturbed baseline with the same knobs. Shaded: perturbation "
        "windows; ×: collapse points. The panels below share the time axis: gradient norm, "
        "gradient coherence, update ratio and the monitor's meta-state deviation (when fitted).</p>"
    )
    keys = list(grouped)
    shown = keys[:MAX_CONDITION_FIGURES]
    slugs = unique_slugs(f"{w}-{p}" for w, p in shown)
    for (workload, pert), name in zip(shown, slugs, strict=True):
        settings = grouped[(workload, pert)]
        series = []
        windows: set[tuple[float, float]] = set()
        x_label = "optimizer step"
        for knobs, runs in list(settings.items())[:MAX_SERIES_PER_FIGURE]:
            baseline = [] if pert == "none" else grouped.get((workload, "none"), {}).get(knobs, [])
            collapses = [
                point
                for run in runs
                if (
                    point := collapse_point(
                        run, data.summary_runs.get(run.run_id) if data.summary else None
                    )
                )
            ]
            series.append(
                figs.ConditionSeries(
                    label=knobs,
                    perf=[perf_series(r) for r in runs],
                    telemetry=[telemetry_series(r) for r in runs],
                    baseline_perf=[perf_series(r) for r in baseline],
                    collapses=collapses,
                )
            )
            for run in runs:
                windows.update((round(a, 6), round(b, 6)) for a, b in window_spans(run))
                if x_column(run) == "env_step":
                    x_label = "environment step"
        title = f"{workload} · {pert}"
        parts.append(f"<h3>{esc(title)}</h3>")
        if len(settings) > MAX_SERIES_PER_FIGURE:
            parts.append(
                notice(
                    f"Showing the first {MAX_SERIES_PER_FIGURE} of {len(settings)} knob settings."
                )
            )
        fig = figs.condition_figure(
            series, windows=sorted(windows)[:24], title=title, x_label=x_label
        )
        parts.append(
            figures.embed(f"performance_{name}", fig, f"{title}: performance and telemetry")
        )
    if len(keys) > len(shown):
        parts.append(notice(f"Showing {len(shown)} of {len(keys)} workload × perturbation groups."))
    return "\n".join(parts)


def section_latent(data: ReportData, figures: Figures) -> str:
    """Latent meta-state trajectories in 2-D: baseline manifold, perturbed runs, collapse points."""
    parts = ['<h2 id="latent">Meta-state trajectories</h2>']
    with_scores = [r for r in data.runs.values() if latent_columns(r.scores)]
    if not with_scores:
        parts.append(
            notice(
                "No meta-state latents yet: fit the monitor with "
                "<code>stabilitybench monitor fit DIR</code> and write the report again."
            )
        )
        return "\n".join(parts)
    parts.append(
        '<p class="muted">Each line is one run\'s latent state over training. Grey: unperturbed '
        "runs (the healthy manifold); colour: perturbed runs; ○ perturbation onset; × collapse.</p>"
    )
    by_workload: dict[str, list[RunData]] = {}
    for run in with_scores:
        by_workload.setdefault(str(run.info.get("workload", "?")), []).append(run)
    slugs = unique_slugs(sorted(by_workload))
    for (workload, runs), name in zip(sorted(by_workload.items()), slugs, strict=True):
        columns = latent_columns(runs[0].scores)
        if len(columns) < 2:
            parts.append(
                notice(f"{esc(workload)}: the latent state has one dimension; no 2-D view.")
            )
            continue
        arrays, steps = [], []
        for run in runs:
            assert run.scores is not None
            frame = (
                run.scores[["step", *columns]]
                if "step" in run.scores.columns
                else run.scores[columns]
            )
            frame = (
                frame.apply(pd.to_numeric, errors="coerce")
                .replace([np.inf, -np.inf], np.nan)
                .dropna()
            )
            arrays.append(frame[columns].to_numpy(dtype=float))
            steps.append(
                frame["step"].to_numpy(dtype=float)
                if "step" in frame.columns
                else np.arange(len(frame), dtype=float)
            )
        base = [a for a, r in zip(arrays, runs, strict=True) if is_baseline(r.info) and len(a)]
        reference = (
            np.concatenate(base)
            if base
            else np.concatenate([a for a in arrays if len(a)] or [np.zeros((0, len(columns)))])
        )
        if len(reference) < 3:
            parts.append(notice(f"{esc(workload)}: too few latent points to draw."))
            continue
        projected, axis_label = project_2d(reference, arrays)
        trajectories = []
        for run, xy, step in zip(runs, projected, steps, strict=True):
            stride = max(1, len(xy) // MAX_LATENT_POINTS)
            onset = onset_step(run)
            collapse = collapse_at_step(
                run, data.summary_runs.get(run.run_id) if data.summary else None
            )
            trajectories.append(
                figs.LatentTrajectory(
                    group="baseline" if is_baseline(run.info) else perturbation_label(run.info),
                    xy=xy[::stride],
                    onset_index=_index_at(step[::stride], onset),
                    collapse_index=_index_at(step[::stride], collapse),
                )
            )
        fig = figs.latent_figure(
            trajectories, axis_label=axis_label, title=f"{workload}: latent meta-state"
        )
        parts.append(
            figures.embed(f"latent_{name}", fig, f"{workload}: latent meta-state ({axis_label})")
        )
    return "\n".join(parts)


def _index_at(steps: np.ndarray, step: float | None) -> int | None:
    """Index of the first entry at or after `step` (the last one for +inf)."""
    if step is None or not len(steps):
        return None
    after = np.nonzero(steps >= step)[0]
    return int(after[0]) if len(after) else len(steps) - 1


def section_detectors(data: ReportData) -> str:
    """The detector comparison table from the monitor evaluation."""
    parts = ['<h2 id="detectors">Early-warning detectors</h2>']
    if data.evaluation_error:
        parts.append(notice(esc(data.evaluation_error), error=True))
        return "\n".join(parts)
    evaluation = data.evaluation
    if evaluation is None:
        parts.append(
            notice(
                "No monitor evaluation yet: run <code>stabilitybench monitor fit DIR</code> and "
                "<code>stabilitybench monitor evaluate DIR</code>, then write the report again."
            )
        )
        return "\n".join(parts)
    detectors = evaluation.get("detectors")
    if not isinstance(detectors, Mapping) or not detectors:
        parts.append(notice("The monitor evaluation lists no detectors."))
        return "\n".join(parts)
    parts.append(
        f'<p class="muted">Thresholds set on baseline runs for '
        f"{esc(fmt_number(evaluation.get('target_false_alarms_per_1k')))} false alarms per 1,000 steps; "
        f"{esc(fmt_number(evaluation.get('n_collapsed')))} collapsed, "
        f"{esc(fmt_number(evaluation.get('n_recovered')))} recovered, "
        f"{esc(fmt_number(evaluation.get('n_baseline')))} baseline runs. Lead time is in optimizer "
        "steps before the collapse (positive is early). AUROC: how well the score right after "
        "onset separates runs that will collapse from runs that recover.</p>"
    )
    headers = [
        ("detector", False),
        ("AUROC [95% CI]", True),
        ("recall", True),
        ("precision", True),
        ("lead time, median [IQR]", True),
        ("false alarms / 1k steps", True),
    ]
    aurocs = {n: as_float(d.get("auroc")) for n, d in detectors.items() if isinstance(d, Mapping)}
    finite = [v for v in aurocs.values() if v is not None and math.isfinite(v)]
    best = max(finite) if finite else None
    rows, classes = [], []
    for name, result in detectors.items():
        if not isinstance(result, Mapping):
            rows.append([esc(name), esc(fmt_number(result)), "—", "—", "—", "—"])
            classes.append("")
            continue
        shown = DETECTOR_NAMES.get(str(name))
        label = f'{esc(shown)} <span class="muted">({esc(name)})</span>' if shown else esc(name)
        rows.append(
            [
                label,
                _cell(
                    result.get("auroc"), with_interval(result.get("auroc"), result.get("auroc_ci"))
                ),
                _cell(result.get("recall"), fmt_rate(result.get("recall"))),
                _cell(result.get("precision"), fmt_rate(result.get("precision"))),
                _cell(
                    result.get("lead_time_median"),
                    with_interval(result.get("lead_time_median"), result.get("lead_time_iqr")),
                ),
                _cell(
                    result.get("false_alarms_per_1k"), fmt_number(result.get("false_alarms_per_1k"))
                ),
            ]
        )
        classes.append("best" if best is not None and aurocs.get(name) == best else "")
    parts.append(table(headers, rows, classes))
    return "\n".join(parts)


def _cell(value: Any, shown: str) -> str:
    """A table cell's HTML: a number as is, an explanation (text value) in small wrapping type."""
    return f'<span class="why">{esc(shown)}</span>' if isinstance(value, str) else esc(shown)


def _rho_text(stats: Any) -> str:
    """`Spearman ρ = 0.12 [−0.3, 0.5], n = 24` from a decoupling entry, or ''."""
    if not isinstance(stats, Mapping):
        return ""
    rho = next((stats[k] for k in ("rho", "spearman_rho", "spearman") if k in stats), None)
    if rho is None:
        return ""
    ci = next((stats[k] for k in ("rho_ci", "ci", "spearman_ci") if k in stats), None)
    n = stats.get("n", stats.get("n_runs"))
    out = f"Spearman ρ = {fmt_number(rho, 2)}{fmt_interval(ci, lambda v: fmt_number(v, 2))}"
    out += f", n = {fmt_number(n)}" if n is not None else ""
    verdict = stats.get("verdict")
    return out + (f" ({str(verdict).replace('_', ' ')})" if verdict else "")


def _per_workload_rho(decoupling: Any) -> tuple[str, dict[str, str]]:
    """The overall rho text and one per workload, from the summary's decoupling entry."""
    per: dict[str, str] = {}
    if isinstance(decoupling, list):
        for item in decoupling:
            if isinstance(item, Mapping) and "workload" in item:
                per[str(item["workload"])] = _rho_text(item)
        return "", per
    if not isinstance(decoupling, Mapping):
        return "", per
    for key in ("per_workload", "workloads", "by_workload"):
        nested = decoupling.get(key)
        if isinstance(nested, Mapping):
            per.update({str(w): _rho_text(s) for w, s in nested.items()})
        elif isinstance(nested, list):
            per.update(
                {
                    str(s["workload"]): _rho_text(s)
                    for s in nested
                    if isinstance(s, Mapping) and "workload" in s
                }
            )
    return _rho_text(decoupling.get("pooled", decoupling)), per


def section_decoupling(data: ReportData, figures: Figures) -> str:
    """Final performance vs stability score, with Spearman rho."""
    parts = ['<h2 id="decoupling">Performance vs stability (decoupling)</h2>']
    if data.summary is None:
        parts.append(notice(f"No stability metrics: {esc(data.summary_error or 'no summary')}."))
        return "\n".join(parts)
    rows = []
    for run in data.summary_runs.values():
        perf, score = as_float(run.get("final_perf")), as_float(run.get("stability_score"))
        if perf is None or score is None or not (math.isfinite(perf) and math.isfinite(score)):
            continue
        rows.append(
            {
                "workload": str(run.get("workload", "?")),
                "perturbation": _pert_text(run.get("perturbation")),
                "final_perf": perf,
                "stability_score": score,
            }
        )
    overall, per = _per_workload_rho(data.summary.get("decoupling"))
    if overall:
        parts.append(
            f"<p><b>{esc(overall)}</b> (all runs; final performance ranked within each workload)</p>"
        )
    if per:
        parts.append(
            "<ul>" + "".join(f"<li>{esc(w)}: {esc(t)}</li>" for w, t in per.items() if t) + "</ul>"
        )
    excluded = len(data.summary_runs) - len(rows)
    if len(rows) < 2:
        parts.append(
            notice("Fewer than two runs have a finite final performance and stability score.")
        )
        return "\n".join(parts)
    fig = figs.decoupling_figure(
        pd.DataFrame(rows), stats=per, title="final performance vs stability score"
    )
    parts.append(
        figures.embed("decoupling", fig, "final performance vs stability score, per workload")
    )
    if excluded:
        parts.append(
            f'<p class="muted">{excluded} runs without a finite final performance or '
            "stability score (diverged or failed) are not drawn.</p>"
        )
    return "\n".join(parts)


def dose_response_points(data: ReportData) -> pd.DataFrame:
    """Collapse rate vs a knob or magnitude: from the summary's dose_response, else its conditions.

    Panels with fewer than two distinct x values are left out (one point is no dose-response).
    """
    columns = ["panel", "series", "x", "rate", "lo", "hi"]
    summary = data.summary or {}
    dose = summary.get("dose_response")
    entries: list[Any] = []
    if isinstance(dose, Mapping):
        for group in ("knobs", "magnitude"):
            entries += list(dose.get(group) or [])
    elif isinstance(dose, list):
        entries = dose
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        workload = entry.get("workload", "?")
        if "knob" in entry:
            panel = f"{workload} · {entry['knob']}"
            series = _pert_text(entry.get("perturbation", "all perturbations"))
        else:
            kind = entry.get("perturbation_kind", entry.get("perturbation", "perturbation"))
            panel, series = f"{workload} · {kind} magnitude", str(kind)
        points = entry.get("points")
        for point in points if isinstance(points, list) else [entry]:
            if isinstance(point, Mapping) and (row := _dose_row(point, panel, series)) is not None:
                rows.append(row)
    if not rows:
        rows = _dose_from_conditions(summary.get("conditions") or [])
    frame = pd.DataFrame(rows, columns=columns)
    distinct = frame.groupby("panel")["x"].transform(lambda x: x.astype(str).nunique())
    return frame[distinct >= 2].reset_index(drop=True)


def _dose_row(point: Mapping[str, Any], panel: str, series: str) -> dict[str, Any] | None:
    x = next((point[k] for k in ("x", "value", "magnitude", "level") if k in point), None)
    rate = as_float(point.get("collapse_rate"))
    if x is None or rate is None or math.isnan(rate):
        return None
    ci = point.get("ci", point.get("collapse_rate_ci"))
    low, high = (
        (as_float(v) for v in ci) if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    )
    return {
        "panel": panel,
        "series": series,
        "x": x,
        "rate": rate,
        "lo": np.nan if low is None else low,
        "hi": np.nan if high is None else high,
    }


def _dose_from_conditions(conditions: Sequence[Any]) -> list[dict[str, Any]]:
    """For every knob a workload sweeps: collapse rate per value, one series per perturbation."""
    rows: list[dict[str, Any]] = []
    by_workload: dict[str, list[Mapping[str, Any]]] = {}
    for c in conditions:
        if isinstance(c, Mapping) and _pert_text(c.get("perturbation")) != "none":
            by_workload.setdefault(str(c.get("workload", "?")), []).append(c)
    for workload, conds in by_workload.items():
        knob_values: dict[str, set[str]] = {}
        for c in conds:
            for k, v in (c.get("knobs") or {}).items():
                knob_values.setdefault(k, set()).add(json.dumps(v))
        for knob in sorted(k for k, values in knob_values.items() if len(values) > 1):
            for c in conds:
                knobs = dict(c.get("knobs") or {})
                value = knobs.pop(knob, None)
                rest = knob_text(knobs) if knobs else ""
                ci = c.get("collapse_rate_ci")
                low, high = (
                    (as_float(v) for v in ci)
                    if isinstance(ci, list | tuple) and len(ci) == 2
                    else (None, None)
                )
                rate = as_float(c.get("collapse_rate"))
                if rate is None:
                    continue
                pert = _pert_text(c.get("perturbation"))
                rows.append(
                    {
                        "panel": f"{workload} · {knob}",
                        "series": f"{pert} [{rest}]" if rest else pert,
                        "x": value,
                        "rate": rate,
                        "lo": np.nan if low is None else low,
                        "hi": np.nan if high is None else high,
                    }
                )
    return rows


def section_dose_response(data: ReportData, figures: Figures) -> str:
    """Collapse rate against the stochasticity knobs (and perturbation magnitudes)."""
    parts = ['<h2 id="dose-response">Stochasticity dose-response</h2>']
    if data.summary is None:
        parts.append(notice(f"No stability metrics: {esc(data.summary_error or 'no summary')}."))
        return "\n".join(parts)
    points = dose_response_points(data)
    if points.empty:
        parts.append(
            notice(
                "No dose-response: the audit sweeps no knob (or magnitude) across perturbed conditions."
            )
        )
        return "\n".join(parts)
    parts.append(
        '<p class="muted">Collapse rate under perturbation for each value of a swept knob, with '
        "95% confidence intervals. A falling curve means more stochasticity buffers the run.</p>"
    )
    fig = figs.dose_response_figure(points, title="collapse rate vs knob / magnitude")
    parts.append(figures.embed("dose_response", fig, "collapse rate vs knob or magnitude"))
    return "\n".join(parts)


def section_runs(data: ReportData) -> str:
    """Every run: label, status, collapse, final performance, stability score, error."""
    parts = ['<h2 id="runs">All runs</h2>']
    if not data.infos:
        parts.append(notice("This audit has no runs yet."))
        return "\n".join(parts)
    headers = [
        ("run", False),
        ("status", False),
        ("seed", True),
        ("collapsed", False),
        ("collapse step", True),
        ("final perf", True),
        ("stability score", True),
        ("wall time", True),
        ("error", False),
    ]
    rows = []
    for info in sorted(data.infos, key=lambda i: str(i.get("label", i.get("run_id", "")))):
        s = data.summary_runs.get(str(info.get("run_id")), {})
        outcome = info.get("outcome") or {}
        collapsed = s.get("collapsed")
        collapsed_text = (
            "—"
            if collapsed is None
            else ("irreversible" if s.get("irreversible") else "yes")
            if collapsed
            else "no"
        )
        error = str(info.get("error") or "").strip()
        wall = as_float(info.get("wall_s"))
        rows.append(
            [
                f'{esc(info.get("label") or info.get("run_id"))}<br><span class="muted">{esc(info.get("run_id", ""))}</span>',
                esc(info.get("status", "pending")),
                esc(fmt_number(info.get("seed"))),
                esc(collapsed_text),
                esc(fmt_number(s.get("collapse_step"))),
                esc(fmt_number(s.get("final_perf", outcome.get("final_perf")))),
                esc(fmt_number(s.get("stability_score"))),
                esc(_duration(wall) if wall is not None else "—"),
                esc(error.splitlines()[-1] if error else ""),
            ]
        )
    parts.append(f"<details><summary>{len(rows)} runs</summary>{table(headers, rows)}</details>")
    return "\n".join(parts)


# -- the page ----------------------------------------------------------------------------------
def render_report(store: RunStore, figures_dir: Path | None = None) -> tuple[str, list[Path]]:
    """The page's HTML and the PNG files written (when `figures_dir` is given)."""
    data = load_report_data(store)
    figures = Figures(figures_dir)
    name = audit_name(data, store)
    sections = [
        section_overview(data, store),
        section_conditions(data),
        section_curves(data, figures),
        section_latent(data, figures),
        section_detectors(data),
        section_decoupling(data, figures),
        section_dose_response(data, figures),
        section_runs(data),
    ]
    nav = "".join(
        f'<a href="#{anchor}">{title}</a>'
        for anchor, title in (
            ("overview", "Overview"),
            ("conditions", "Conditions"),
            ("curves", "Curves"),
            ("latent", "Meta-state"),
            ("detectors", "Detectors"),
            ("decoupling", "Decoupling"),
            ("dose-response", "Dose-response"),
            ("runs", "Runs"),
        )
    )
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>StabilityBench report: {esc(name)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f'<header><div class="meta">StabilityBench stability report</div><h1>{esc(name)}</h1>'
        f'<div class="meta">generated {esc(generated)}</div><nav>{nav}</nav></header>\n'
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )
    return page, figures.written


def write_report(
    store: RunStore | str | Path,
    output: str | Path | None = None,
    figures_dir: str | Path | None = None,
) -> Path:
    """Write the audit's self-contained HTML report (default DIR/report.html); returns its path."""
    if not isinstance(store, RunStore):
        store = RunStore.open(store)
    path = Path(output) if output is not None else store.root / "report.html"
    if path.is_dir():
        raise StabilityBenchError(
            f"--output: {path} is a folder; give a file name such as report.html"
        )
    fig_dir = Path(figures_dir) if figures_dir is not None else None
    if fig_dir is not None and fig_dir.exists() and not fig_dir.is_dir():
        raise StabilityBenchError(
            f"--figures: {fig_dir} is a file; give a folder for the PNG figures"
        )
    page, _ = render_report(store, fig_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
