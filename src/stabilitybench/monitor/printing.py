"""`monitor evaluate` as a table that fits an 80-column terminal (`--wide`: every column)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape

from stabilitybench.metrics.display import fmt, print_table, render_table
from stabilitybench.monitor.alarms import AlarmStats
from stabilitybench.monitor.results import Evaluation

if TYPE_CHECKING:
    from stabilitybench.monitor.scoring import DetectorAlarms, RunAlarms, ScoreResult


def _two(value: float | None) -> str:
    """A rate or AUROC with two decimals (a value within 0.005 of zero is `0.00`)."""
    return fmt(None) if value is None else f"{value:.2f}".replace("-0.00", "0.00")


def _range(values: list[float] | None, digits: int) -> str:
    if values is None:
        return ""
    parts = (
        f"{v:.{digits}f}".replace("-0.00", "0.00") if digits else fmt(round(v)) for v in values
    )
    return "[" + ",".join(parts) + "]"


def _lead(stats: AlarmStats) -> str:
    if stats.lead_time_median is None:
        return fmt(None)
    return f"{fmt(round(stats.lead_time_median))} {_range(stats.lead_time_iqr, 0)}".strip()


def _native(stats: AlarmStats | None) -> str:
    if stats is None:
        return "–"
    parts = (stats.recall, stats.precision, stats.false_alarms_per_1k)
    return "/".join(_two(v) for v in parts)


def evaluation_table(result: Evaluation, wide: bool = False) -> Any:
    columns = [("detector", False), ("AUROC [95% CI]", True), ("recall", True)]
    columns += [("prec.", True), ("lead [IQR]", True), ("FA/1k", True)]
    columns += [("native R/P/FA", True), ("threshold", True)] if wide else []
    rows = []
    for name, entry in result.detectors.items():
        row = [name, f"{_two(entry.auroc)} {_range(entry.auroc_ci, 2)}".strip()]
        row += [_two(entry.recall), _two(entry.precision), _lead(entry)]
        row.append(_two(entry.false_alarms_per_1k))
        if wide:
            row += [_native(entry.native), fmt(entry.threshold_median)]
        rows.append(row)
    title = (
        f"early warning at {result.target_false_alarms_per_1k:g} false alarms / 1k steps "
        f"({result.n_collapsed} collapsed, {result.n_recovered} recovered, "
        f"{result.n_baseline} baseline runs)"
    )
    return render_table(title, columns, rows)


def print_evaluation(result: Evaluation, console: Any, wide: bool = False) -> None:
    """The evaluation as a rich table, with notes for figures that could not be estimated."""
    print_table(console, evaluation_table(result, wide), wide)
    notes = list(dict.fromkeys(n for d in result.detectors.values() for n in d.notes))
    for note in [*notes, *result.notes]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _max_score(entry: DetectorAlarms) -> str:
    if entry.max_score_infinite:
        return "inf"
    return fmt(entry.max_score)


def run_alarms_table(run: RunAlarms) -> Any:
    """One run of `monitor score`: per detector, first alarm, alarms, max score, first signal."""
    columns = [("detector", False), ("first alarm", True), ("alarms", True)]
    columns += [("max score", True), ("deviated first", False)]
    rows = []
    for entry in run.detectors:
        if not entry.scored:
            rows.append([entry.detector, "–", "–", "–", entry.note or "skipped"])
            continue
        first = "none" if entry.first_alarm_step is None else f"step {entry.first_alarm_step}"
        rows.append(
            [
                entry.detector,
                first,
                str(entry.alarms),
                _max_score(entry),
                entry.deviated_first or "",
            ]
        )
    end = "" if run.diverged_step is None else f", diverged at step {run.diverged_step}"
    title = f"{run.label}: {run.steps} telemetry steps{end}"
    return render_table(escape(title), columns, [[escape(c) for c in row] for row in rows])


def print_score(result: ScoreResult, console: Any) -> None:
    """`monitor score`'s console output: the monitor used, notes, one table per run."""
    if result.monitor is not None:
        kind = f" (fitted on {result.monitor_kind} runs)" if result.monitor_kind else ""
        console.print(
            escape(f"monitor: {result.monitor}{kind}; features: {', '.join(result.features)}"),
            highlight=False,
        )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for run in result.runs:
        print_table(console, run_alarms_table(run), wide=False)
