"""Early-warning detectors: the monitor evaluation as one table, best AUROC highlighted."""

from __future__ import annotations

from stabilitybench.monitor.registry import detector_classes
from stabilitybench.monitor.results import DetectorResult, Evaluation
from stabilitybench.report.data import ReportData
from stabilitybench.report.markup import esc, fmt_number, fmt_rate, notice, table, with_interval

HEADERS = [
    ("detector", False),
    ("AUROC [95% CI]", True),
    ("recall", True),
    ("precision", True),
    ("lead time, median [IQR]", True),
    ("false alarms / 1k steps", True),
]
NOT_YET = (
    "No monitor evaluation yet: run <code>stabilitybench monitor fit DIR</code> and "
    "<code>stabilitybench monitor evaluate DIR</code>, then write the report again."
)


def detector_label(name: str) -> str:
    """`Title (name)` for a registered detector, else the name."""
    cls = detector_classes().get(name)
    if cls is None:
        return esc(name)
    return f'{esc(cls.title)} <span class="muted">({esc(name)})</span>'


def _row(name: str, d: DetectorResult) -> list[str]:
    return [
        detector_label(name),
        esc(with_interval(d.auroc, d.auroc_ci)),
        esc(fmt_rate(d.recall)),
        esc(fmt_rate(d.precision)),
        esc(with_interval(d.lead_time_median, d.lead_time_iqr)),
        esc(fmt_number(d.false_alarms_per_1k)),
    ]


def _intro(e: Evaluation) -> str:
    return (
        f'<p class="muted">Thresholds set on baseline runs for '
        f"{esc(fmt_number(e.target_false_alarms_per_1k))} false alarms per 1,000 steps; "
        f"{e.n_collapsed} collapsed, {e.n_recovered} recovered, {e.n_baseline} baseline runs. "
        "Lead time is in optimizer steps before the collapse (positive is early). AUROC: how "
        "well the score right after onset separates runs that will collapse from runs that "
        "recover.</p>"
    )


def section_detectors(data: ReportData) -> str:
    """The detector comparison table from the monitor evaluation."""
    parts = ['<h2 id="detectors">Early-warning detectors</h2>']
    if data.evaluation_error:
        parts.append(notice(esc(data.evaluation_error), error=True))
        return "\n".join(parts)
    evaluation = data.evaluation
    if evaluation is None:
        parts.append(notice(NOT_YET))
        return "\n".join(parts)
    if not evaluation.detectors:
        parts.append(notice("The monitor evaluation lists no detectors."))
        return "\n".join(parts)
    parts.append(_intro(evaluation))
    aurocs = [d.auroc for d in evaluation.detectors.values() if d.auroc is not None]
    best = max(aurocs) if aurocs else None
    items = evaluation.detectors.items()
    rows = [_row(name, d) for name, d in items]
    classes = ["best" if best is not None and d.auroc == best else "" for _, d in items]
    parts.append(table(HEADERS, rows, classes))
    notes = [f"{name}: {n}" for name, d in items for n in d.notes]
    if notes:
        parts.append("<ul>" + "".join(f'<li class="why">{esc(n)}</li>' for n in notes) + "</ul>")
    return "\n".join(parts)
