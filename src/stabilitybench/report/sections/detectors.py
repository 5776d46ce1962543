"""Early-warning detectors: the prospective-warning evaluation, one table per workload and the
macro average, the best step AUROC of each table highlighted."""

from __future__ import annotations

from stabilitybench.detectors.base import detector_classes
from stabilitybench.evaluation.results import DetectorResult, Evaluation
from stabilitybench.report.data import ReportData
from stabilitybench.report.markup import esc, fmt_number, fmt_rate, notice, table, with_interval

HEADERS = [
    ("detector", False),
    ("event recall", True),
    ("chance (p95)", True),
    ("clock at its FA", True),
    ("lead time, median [IQR]", True),
    ("false alarms / 1k steps, healthy", True),
    ("… perturbed, not collapsed", True),
    ("time in warning", True),
    ("step AUROC [95% CI]", True),
    ("outcome AUROC", True),
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
        esc(fmt_rate(d.event_recall)),
        esc(f"{fmt_rate(d.chance_recall)} ({fmt_rate(d.chance_recall_p95)})"),
        esc(fmt_rate(d.clock_recall)),
        esc(with_interval(d.lead_time_median, d.lead_time_iqr)),
        esc(fmt_number(d.false_alarms_per_1k)),
        esc(fmt_number(d.false_alarms_per_1k_not_collapsed)),
        esc(fmt_rate(d.time_in_warning)),
        esc(with_interval(d.auroc, d.auroc_ci)),
        esc(fmt_number(d.outcome_auroc)),
    ]


def _intro(e: Evaluation) -> str:
    return (
        f'<p class="muted">Thresholds set leave-one-seed-out on healthy runs for '
        f"{esc(fmt_number(e.target_false_alarms_per_1k))} false alarms per 1,000 steps; "
        f"SPH {e.protocol.sph}, SOP {e.horizon} optimizer steps: a detector's alarm episode "
        "alarms when it starts and again every SOP steps while it stays on; an alarm at step t is "
        "true if the run's collapse starts in [t + SPH, t + SPH + SOP]. Event recall: collapses "
        "with a true alarm, beside chance (a random predictor with the same alarm rate and time in "
        "warning; in brackets the 95th percentile of the recall with each run's alarms shifted at "
        "random) and the clock control (the best schedule of alarms from a fixed delay after the "
        "onset of the run's perturbation, one or more, matched per perturbation (not per dose) to "
        "the detector's own false-alarm rate on that perturbation's runs that did not collapse; a "
        "perturbation none of whose runs escaped: the clock warns); lead time: collapse start "
        "minus the start of the episode that holds the first true alarm; false alarms per 1,000 "
        "steps on held-out healthy runs and on perturbed runs that did not collapse; step AUROC: "
        "how well the score ranks the steps where an alarm would be true (bootstrap over seeds); "
        "outcome AUROC: the score right after a perturbation's onset, collapsed vs not. Per "
        "workload, then the mean over workloads (never pooled).</p>"
    )


def _table(detectors: dict[str, DetectorResult]) -> str:
    aurocs = [d.auroc for d in detectors.values() if d.auroc is not None]
    best = max(aurocs) if aurocs else None
    items = detectors.items()
    rows = [_row(name, d) for name, d in items]
    classes = ["best" if best is not None and d.auroc == best else "" for _, d in items]
    return table(HEADERS, rows, classes)


def _notes(prefix: str, detectors: dict[str, DetectorResult]) -> str:
    notes = [f"{prefix}{name}: {n}" for name, d in detectors.items() for n in d.notes]
    if not notes:
        return ""
    return "<ul>" + "".join(f'<li class="why">{esc(n)}</li>' for n in notes) + "</ul>"


def section_detectors(data: ReportData) -> str:
    """The detector comparison tables from the monitor evaluation."""
    parts = ['<h2 id="detectors">Early-warning detectors</h2>']
    if data.evaluation_error:
        parts.append(notice(esc(data.evaluation_error), error=True))
        return "\n".join(parts)
    evaluation = data.evaluation
    if evaluation is None:
        parts.append(notice(NOT_YET))
        return "\n".join(parts)
    if not evaluation.workloads:
        parts.append(notice("The monitor evaluation lists no workloads."))
        return "\n".join(parts)
    parts.append(_intro(evaluation))
    for name, entry in evaluation.workloads.items():
        parts.append(
            f"<h3>{esc(name)}</h3>"
            f'<p class="muted">{entry.n_collapsed} collapsed, {entry.n_not_collapsed} not '
            f"collapsed, {entry.n_healthy} healthy runs.</p>"
        )
        parts.append(_table(entry.detectors))
        parts.append(_notes("", entry.detectors))
        count = evaluation.protocol.no_lead_possible.get(name)
        if count:
            parts.append(
                f'<p class="why">{count} collapses came within '
                f"{evaluation.protocol.no_lead_steps} step of a jolt: no lead was possible "
                "(left out of event recall and lead time).</p>"
            )
    parts.append(f"<h3>Macro average over {len(evaluation.workloads)} workloads</h3>")
    parts.append(_table(evaluation.detectors))
    parts.append(_notes("", evaluation.detectors))
    notes = evaluation.protocol.notes
    if notes:
        parts.append("<ul>" + "".join(f'<li class="why">{esc(n)}</li>' for n in notes) + "</ul>")
    return "\n".join(p for p in parts if p)
