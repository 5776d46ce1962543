"""`monitor evaluate` as a table that fits an 80-column terminal (`--wide`: every column)."""

from __future__ import annotations

from typing import Any

from stabilitybench.metrics.display import fmt, print_table, render_table
from stabilitybench.monitor.alarms import AlarmStats
from stabilitybench.monitor.results import Evaluation


def _two(value: float | None) -> str:
    return fmt(None if value is None else round(value, 2))


def _range(values: list[float] | None, digits: int) -> str:
    if values is None:
        return ""
    return "[" + ",".join(fmt(round(v, digits) if digits else round(v)) for v in values) + "]"


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
        console.print(f"[yellow]note:[/] {note}", highlight=False)
