"""`monitor evaluate` as tables that fit an 80-column terminal (`--wide`: full headers).

One table per workload and one for the macro average over workloads; then the notes that say
why a figure is missing. `monitor score`'s per-run tables live here too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from stabilitybench.evaluation.results import NO_VALUE, DetectorResult, Evaluation
from stabilitybench.metrics.display import fmt, print_table, render_table

if TYPE_CHECKING:
    from stabilitybench.evaluation.scoring import DetectorAlarms, RunAlarms, ScoreResult


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


def _lead(entry: DetectorResult) -> str:
    if entry.lead_time_median is None:
        return fmt(None)
    return f"{fmt(round(entry.lead_time_median))} {_range(entry.lead_time_iqr, 0)}".strip()


HEADERS = {
    False: [
        "detector",
        "recall",
        "p95",
        "clock",
        "lead [IQR]",
        "FA/1k",
        "FA nc",
        "warn",
        "AUROC",
        "outc.",
    ],
    True: [
        "detector",
        "event recall",
        "chance (p95 of shifted alarms)",
        "clock at its FA",
        "lead, steps [IQR]",
        "FA/1k healthy",
        "FA/1k not collapsed",
        "FA/1k collapsed",
        "time in warning",
        "step AUROC [95% CI]",
        "outcome AUROC",
    ],
}
LEGEND = (
    "recall: collapses with a true alarm (collapse starting SPH to SPH + SOP steps after it); p95: "
    "the 95th percentile of recall with each run's alarms shifted at random (chance); clock: the "
    "recall of the best alarm schedule that knows only the onset of each run's perturbation (not "
    "its dose), at the detector's own false-alarm rate on that perturbation's runs that did not "
    "collapse; lead: collapse − start of the first true alarm's episode; FA/1k: false alarms per "
    "1,000 steps on held-out healthy runs (FA nc: on perturbed runs that did not collapse, after "
    "onset); warn: share of healthy steps in warning; AUROC: step AUROC; outc.: onset-window "
    "outcome AUROC"
)


def detector_rows(detectors: dict[str, DetectorResult], wide: bool = False) -> list[list[str]]:
    """One row per detector: the fields of its JSON entry, in the table's order."""
    rows = []
    for name, entry in detectors.items():
        chance = _two(entry.chance_recall_p95)
        if wide and entry.chance_recall is not None:
            chance = f"{_two(entry.chance_recall)} ({chance})"
        row = [name, _two(entry.event_recall), chance, _two(entry.clock_recall), _lead(entry)]
        row += [_two(entry.false_alarms_per_1k), _two(entry.false_alarms_per_1k_not_collapsed)]
        if wide:
            row.append(_two(entry.false_alarms_per_1k_collapsed))
        row.append(_two(entry.time_in_warning))
        auroc = _two(entry.auroc)
        row.append(f"{auroc} {_range(entry.auroc_ci, 2)}".strip() if wide else auroc)
        row.append(_two(entry.outcome_auroc))
        rows.append(row)
    return rows


def evaluation_tables(result: Evaluation, wide: bool = False) -> list[Any]:
    """One table per workload, then the macro average."""
    columns = [(h, i > 0) for i, h in enumerate(HEADERS[wide])]
    tables = []
    for name, entry in result.workloads.items():
        title = (
            f"{name}: {entry.n_collapsed} collapsed, {entry.n_not_collapsed} not collapsed, "
            f"{entry.n_healthy} healthy runs (SPH {entry.sph}, SOP {entry.horizon} steps, "
            f"{entry.target_false_alarms_per_1k:g} FA/1k)"
        )
        rows = detector_rows(entry.detectors, wide)
        tables.append(render_table(escape(title), columns, rows))
    title = (
        f"macro average, {len(result.workloads)} workloads "
        f"({result.target_false_alarms_per_1k:g} FA/1k, SOP {result.horizon} steps)"
    )
    tables.append(render_table(escape(title), columns, detector_rows(result.detectors, wide)))
    return tables


def manifold_lines(result: Evaluation) -> list[str]:
    """Per workload: how many principal components hold 90 % of the healthy telemetry, and how
    far collapsing runs leave that manifold before they collapse."""
    lines = []
    for name, entry in result.workloads.items():
        m = entry.manifold
        if m is None or m.n_components_90 is None:
            continue
        line = (
            f"{name}: {m.n_components_90} of {m.n_features} principal components hold 90% of "
            "the healthy runs' standardized telemetry"
        )
        if m.residual_ratio_median is not None and m.subspace_ratio_median is not None:
            line += (
                f"; in the SOP before collapse, collapsing runs reach {m.subspace_ratio_median:.1f}× "
                f"the healthy 99th percentile within it and {m.residual_ratio_median:.1f}× off it "
                "(medians)"
            )
        lines.append(line)
    return lines


def _once(prefix: str, detectors: dict[str, DetectorResult]) -> list[str]:
    """The detectors' notes; a note that every detector has is said once, for all of them."""
    per = [set(d.notes) for d in detectors.values()]
    common = set.intersection(*per) if len(per) > 1 else set()
    ordered = dict.fromkeys(n for d in detectors.values() for n in d.notes)
    out = [f"{prefix}{n}" for n in ordered if n in common]
    for name, detector in detectors.items():
        out += [f"{prefix}{name}: {n}" for n in detector.notes if n not in common]
    return out


def evaluation_notes(result: Evaluation) -> list[str]:
    """Every note once, per workload, then the macro average's and the protocol's."""
    out: list[str] = []
    for workload, entry in result.workloads.items():
        out += _once(f"{workload}: ", entry.detectors)
    for workload, count in result.protocol.no_lead_possible.items():
        sph = result.workloads[workload].sph if workload in result.workloads else None
        out.append(
            f"{workload}: {count} collapses began less than SPH = {sph} steps after their "
            "onset: no lead was possible"
        )
    # "no workload has a value" repeats the workloads' own notes; the JSON keeps it
    macro = {
        name: DetectorResult(notes=[n for n in d.notes if not n.endswith(NO_VALUE)])
        for name, d in result.detectors.items()
    }
    out += _once("macro average: ", macro)
    return list(dict.fromkeys([*out, *result.protocol.notes]))


def first_alarm_lines(attributions: Mapping[str, Any], top: int = 3) -> list[str]:
    """Per workload, what moved the monitor most at its first alarm, over the runs it alarmed
    on (attribution.json): the leading feature (and layer) and on how many runs it led."""
    by_workload: dict[str, Counter[str]] = defaultdict(Counter)
    for entry in attributions.values():
        if not isinstance(entry, Mapping) or not entry.get("contributions"):
            continue
        lead = entry["contributions"][0]
        where = f" @ {lead['layer']}" if lead.get("layer") else ""
        by_workload[str(entry.get("workload"))][f"{lead['feature']}{where}"] += 1
    lines = []
    for workload, counts in sorted(by_workload.items()):
        total = sum(counts.values())
        common = ", ".join(f"{name} ({n} of {total} runs)" for name, n in counts.most_common(top))
        lines.append(f"{workload}: the monitor's first alarm was moved most by {common}")
    return lines


def print_evaluation(
    result: Evaluation,
    console: Any,
    wide: bool = False,
    attributions: Mapping[str, Any] | None = None,
) -> None:
    """The evaluation as rich tables, with notes for figures that could not be estimated, then
    what moved the monitor at its first alarms (`attributions`: attribution.json)."""
    for table in evaluation_tables(result, wide):
        print_table(console, table, wide)
    if not wide:
        console.print(f"[dim]{escape(LEGEND)}[/]", highlight=False)
    for note in evaluation_notes(result):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for line in manifold_lines(result):
        console.print(f"[cyan]manifold:[/] {escape(line)}", highlight=False)
    for line in first_alarm_lines(attributions or {}):
        console.print(f"[cyan]where:[/] {escape(line)}", highlight=False)


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
