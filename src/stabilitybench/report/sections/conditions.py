"""Conditions: collapse rate with its CI, median collapse time, recovery rate, final-perf IQM."""

from __future__ import annotations

from collections import Counter

from stabilitybench.metrics.summary_printing import condition_order
from stabilitybench.report.data import ReportData, knob_text
from stabilitybench.report.markup import esc, fmt_number, fmt_rate, notice, table, with_interval

HEADERS = [
    ("workload", False),
    ("knobs", False),
    ("perturbation", False),
    ("runs", True),
    ("collapse rate [95% CI]", True),
    ("median collapse time (steps)", True),
    ("recovery rate", True),
    ("final perf IQM [95% CI]", True),
]
EXPLANATION = (
    '<p class="muted">Collapse: the first evaluation after onset whose progress falls below the '
    "collapse threshold; recovery rate: share of collapsed runs that regain the recovery "
    "threshold; IQM: interquartile mean over seeds (stratified bootstrap CI).</p>"
)


def section_conditions(data: ReportData) -> str:
    """Per condition: collapse rate with CI, median collapse time, recovery rate, final-perf IQM."""
    parts = ['<h2 id="conditions">Conditions</h2>']
    if data.summary is None or not data.summary.conditions:
        reason = data.summary_error or "the summary lists no conditions"
        parts.append(notice(f"No stability metrics: {esc(reason)}."))
        parts.append(_conditions_from_records(data))
        return "\n".join(parts)
    rows = [
        [
            esc(c.workload),
            esc(knob_text(c.knobs)),
            esc(c.perturbation),
            esc(fmt_number(c.n_runs)),
            esc(with_interval(c.collapse_rate, c.collapse_rate_ci, fmt_rate)),
            esc(fmt_number(c.median_collapse_steps)),
            esc(fmt_rate(c.recovery_rate)),
            esc(with_interval(c.final_perf_iqm, c.final_perf_iqm_ci)),
        ]
        for c in sorted(data.summary.conditions, key=condition_order)
    ]
    parts.append(table(HEADERS, rows))
    if notes := data.summary.audit.notes:
        parts.append("<ul>" + "".join(f'<li class="muted">{esc(n)}</li>' for n in notes) + "</ul>")
    parts.append(EXPLANATION)
    return "\n".join(parts)


def _conditions_from_records(data: ReportData) -> str:
    """Without metrics: at least the conditions and their runs by status."""
    groups: dict[tuple[str, str, str], Counter[str]] = {}
    for r in data.records:
        key = (r.workload, knob_text(r.knobs), r.perturbation)
        groups.setdefault(key, Counter())[r.status] += 1
    if not groups:
        return notice("This audit has no runs yet.")
    rows = [
        [esc(w), esc(k), esc(p), esc(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))]
        for (w, k, p), counts in sorted(groups.items())
    ]
    headers = [("workload", False), ("knobs", False), ("perturbation", False), ("runs", False)]
    return table(headers, rows)
