"""Performance vs stability: the decoupling scatter with Spearman rho per workload and pooled."""

from __future__ import annotations

import math

import pandas as pd

from stabilitybench.metrics.decoupling import WorkloadCorrelation
from stabilitybench.report import figures as figs
from stabilitybench.report.data import ReportData
from stabilitybench.report.markup import Figures, esc, fmt_number, notice


def rho_text(stats: WorkloadCorrelation) -> str:
    """`Spearman ρ = 0.12 [−0.3, 0.5], n = 24 (decoupled)`, or '' without a rho."""
    if stats.rho is None or not math.isfinite(stats.rho):
        return ""
    ci = ""
    if stats.ci and all(v is not None and math.isfinite(v) for v in stats.ci):
        ci = f" [{fmt_number(stats.ci[0], 2)}, {fmt_number(stats.ci[1], 2)}]"
    verdict = stats.verdict.replace("_", " ")
    return f"Spearman ρ = {fmt_number(stats.rho, 2)}{ci}, n = {stats.n} ({verdict})"


def section_decoupling(data: ReportData, figures: Figures) -> str:
    """Final performance vs stability score, with Spearman rho."""
    parts = ['<h2 id="decoupling">Performance vs stability (decoupling)</h2>']
    if data.summary is None:
        parts.append(notice(f"No stability metrics: {esc(data.summary_error or 'no summary')}."))
        return "\n".join(parts)
    rows = [
        {
            "workload": r.workload,
            "perturbation": r.perturbation,
            "final_perf": r.final_perf,
            "stability_score": r.stability_before_final,
        }
        for r in data.summary.runs
        if r.final_perf is not None
        and r.stability_before_final is not None
        and math.isfinite(r.final_perf)
    ]
    decoupling = data.summary.decoupling
    per = {c.workload: rho_text(c) for c in decoupling.per_workload}
    if overall := rho_text(decoupling.pooled):
        parts.append(
            f"<p><b>{esc(overall)}</b> (all runs; both ranked within each workload and "
            "perturbation; stability measured before the final window)</p>"
        )
    if per:
        items = "".join(f"<li>{esc(w)}: {esc(t)}</li>" for w, t in per.items() if t)
        parts.append(f"<ul>{items}</ul>")
    if len(rows) < 2:
        parts.append(
            notice("Fewer than two runs have a finite final performance and stability score.")
        )
        return "\n".join(parts)
    fig = figs.decoupling_figure(
        pd.DataFrame(rows), stats=per, title="final performance vs stability before the end"
    )
    caption = "final performance vs stability before the final window, per workload"
    parts.append(figures.embed("decoupling", fig, caption))
    if excluded := len(data.summary.runs) - len(rows):
        parts.append(
            f'<p class="muted">{excluded} runs without a finite final performance or '
            "stability score (diverged or failed) are not drawn.</p>"
        )
    return "\n".join(parts)
