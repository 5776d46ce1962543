"""All runs: label, status, collapse, final performance, stability score, wall time, error."""

from __future__ import annotations

from stabilitybench.metrics.records import RunRecord
from stabilitybench.report.data import ReportData
from stabilitybench.report.markup import duration, esc, fmt_number, notice, table

HEADERS = [
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


def collapsed_text(record: RunRecord | None) -> str:
    collapse = None if record is None else record.collapse
    if collapse is None or collapse.collapsed is None:
        return "—"
    if not collapse.collapsed:
        return "no"
    return "irreversible" if collapse.irreversible else "yes"


def _row(data: ReportData, r: RunRecord) -> list[str]:
    judged = data.record(r.run_id)  # with the collapse analysis when there is a summary
    collapse = None if judged is None else judged.collapse
    final = judged.final_perf if judged is not None else r.outcome_final_perf
    wall = r.timing.wall_s
    return [
        f'{esc(r.label or r.run_id)}<br><span class="muted">{esc(r.run_id)}</span>',
        esc(r.status),
        esc(fmt_number(r.seed)),
        esc(collapsed_text(judged)),
        esc(fmt_number(None if collapse is None else collapse.collapse_step)),
        esc(fmt_number(final)),
        esc(fmt_number(None if judged is None else judged.stability_score)),
        esc(duration(wall) if wall is not None else "—"),
        esc(r.error or ""),
    ]


def section_runs(data: ReportData) -> str:
    """Every run: label, status, collapse, final performance, stability score, error."""
    parts = ['<h2 id="runs">All runs</h2>']
    if not data.records:
        parts.append(notice("This audit has no runs yet."))
        return "\n".join(parts)
    records = sorted(data.records, key=lambda r: str(r.label or r.run_id))
    rows = [_row(data, r) for r in records]
    parts.append(f"<details><summary>{len(rows)} runs</summary>{table(HEADERS, rows)}</details>")
    return "\n".join(parts)
