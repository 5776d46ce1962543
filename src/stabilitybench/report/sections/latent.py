"""Meta-state trajectories: each run's latent state in 2-D, healthy runs as the manifold."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stabilitybench.report import figures as figs
from stabilitybench.report.data import (
    ReportData,
    collapse_at_step,
    latent_columns,
    onset_step,
    project_2d,
    unique_slugs,
)
from stabilitybench.report.markup import Figures, esc, notice, table
from stabilitybench.store import RunData

MAX_LATENT_POINTS = 300
INTRO = (
    '<p class="muted">Each line is one run\'s latent state over training. Grey: unperturbed '
    "runs (the healthy manifold); colour: perturbed runs; ○ perturbation onset; × collapse.</p>"
)


def index_at(steps: np.ndarray, step: float | None) -> int | None:
    """Index of the first entry at or after `step` (the last one for +inf)."""
    if step is None or not len(steps):
        return None
    after = np.nonzero(steps >= step)[0]
    return int(after[0]) if len(after) else len(steps) - 1


def _latents(run: RunData, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) finite latents of a run and their (n,) steps."""
    assert run.scores is not None
    has_step = "step" in run.scores.columns
    frame = run.scores[["step", *columns]] if has_step else run.scores[columns]
    frame = frame.apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
    steps = frame["step"].to_numpy(dtype=float) if has_step else np.arange(len(frame), dtype=float)
    return frame[columns].to_numpy(dtype=float), steps


def _trajectory(
    data: ReportData, run: RunData, xy: np.ndarray, step: np.ndarray
) -> figs.LatentTrajectory:
    stride = max(1, len(xy) // MAX_LATENT_POINTS)
    identity = data.identity(run.run_id)
    collapse = collapse_at_step(run, data.record(run.run_id))
    return figs.LatentTrajectory(
        group="baseline" if identity.is_baseline else identity.perturbation,
        xy=xy[::stride],
        onset_index=index_at(step[::stride], onset_step(identity)),
        collapse_index=index_at(step[::stride], collapse),
    )


def _workload_figure(
    data: ReportData, workload: str, runs: list[RunData], figures: Figures, name: str
) -> str:
    columns = latent_columns(runs[0].scores)
    if len(columns) < 2:
        return notice(f"{esc(workload)}: the latent state has one dimension; no 2-D view.")
    arrays, steps = zip(*(_latents(run, columns) for run in runs), strict=True)
    healthy = [a for a, r in zip(arrays, runs, strict=True) if data.identity(r.run_id).is_baseline]
    base = [a for a in healthy if len(a)] or [a for a in arrays if len(a)]
    reference = np.concatenate(base) if base else np.zeros((0, len(columns)))
    if len(reference) < 3:
        return notice(f"{esc(workload)}: too few latent points to draw.")
    projected, axis_label = project_2d(reference, list(arrays))
    trajectories = [
        _trajectory(data, run, xy, step)
        for run, xy, step in zip(runs, projected, steps, strict=True)
    ]
    title = f"{workload}: latent meta-state"
    fig = figs.latent_figure(trajectories, axis_label=axis_label, title=title)
    return figures.embed(f"latent_{name}", fig, f"{workload}: latent meta-state ({axis_label})")


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
    parts.append(INTRO)
    by_workload: dict[str, list[RunData]] = {}
    for run in with_scores:
        by_workload.setdefault(data.identity(run.run_id).workload, []).append(run)
    slugs = unique_slugs(sorted(by_workload))
    for (workload, runs), name in zip(sorted(by_workload.items()), slugs, strict=True):
        parts.append(_workload_figure(data, workload, runs, figures, name))
    parts.append(_where_it_started(data))
    return "\n".join(parts)


MAX_ATTRIBUTION_ROWS = 40
ATTRIBUTION_INTRO = (
    '<p class="muted">At the monitor\'s first alarm on each perturbed run: the deviation term '
    "that dominated (latent state, one-step prediction, features) and the features that moved it "
    "most — each one's share of that term, its deviation from healthy runs at the same progress, "
    "and, for a per-layer maximum, the layer or tensor it came from.</p>"
)


def _where_it_started(data: ReportData) -> str:
    """Per perturbed run with a monitor alarm: its step, dominant term and top features."""
    healthy = {r.run_id for r in data.records if r.is_baseline}
    found = [
        (run_id, entry)
        for run_id, entry in sorted(data.attributions.items())
        if run_id not in healthy and isinstance(entry, dict)
    ]
    if not found:
        return ""
    blank = {"workload": "", "label": None, "step": "", "term": "", "text": ""}
    found = [(run_id, {**blank, **entry}) for run_id, entry in found]
    found.sort(key=lambda item: (str(item[1]["workload"]), str(item[1]["label"])))
    rows = [
        [
            esc(entry["workload"]),
            esc(entry["label"] or run_id),
            esc(entry["step"]),
            esc(entry["term"]),
            esc(entry["text"]),
        ]
        for run_id, entry in found[:MAX_ATTRIBUTION_ROWS]
    ]
    more = len(found) - MAX_ATTRIBUTION_ROWS
    tail = f'<p class="muted">… and {more} more runs.</p>' if more > 0 else ""
    headers = [
        ("workload", False),
        ("run", False),
        ("first alarm (step)", True),
        ("dominant term", False),
        ("features that moved it (layer)", False),
    ]
    return (
        '<h3 id="latent-attribution">Where the deviation started</h3>'
        + ATTRIBUTION_INTRO
        + table(headers, rows)
        + tail
    )
