"""`stabilitybench summary` as tables that fit an 80-column terminal (`--wide`: every column)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.markup import escape

from stabilitybench.metrics.conditions import ConditionSummary
from stabilitybench.metrics.decoupling import WorkloadCorrelation
from stabilitybench.metrics.display import (
    fmt,
    fmt_ci,
    fmt_rate,
    fmt_rate_ci,
    print_table,
    render_table,
)
from stabilitybench.metrics.records import RunRecord, knobs_key
from stabilitybench.metrics.summary import AuditSummary

CAPTION = "95% CIs; stability: median per-run score"
WIDE_CAPTION = CAPTION + "; disp./risk: Chan et al. 2020"


def knobs_text(knobs: Mapping[str, Any]) -> str:
    """`a=1 b=0.1` (space-separated, so a cell wraps between knobs), or `–`."""
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "–"


def short_perturbation(kind: str, magnitude: float | None) -> str:
    """`none`, or the kind with its magnitude: `lr_spike×50`."""
    if kind == "none" or magnitude is None:
        return kind
    return f"{kind}×{magnitude:g}"


def condition_order(item: ConditionSummary | RunRecord) -> tuple[Any, ...]:
    """Sort by workload, knobs, then perturbation (the baseline first, then kind and size)."""
    seed = item.seed if isinstance(item, RunRecord) else None
    return (
        item.workload,
        knobs_key(item.knobs),
        item.perturbation_kind != "none",
        item.perturbation_kind,
        item.magnitude if item.magnitude is not None else float("-inf"),
        item.perturbation,
        item.guard != "none",
        item.guard,
        -1 if seed is None else seed,
    )


def _guard_suffix(guard: str) -> str:
    """` +guard zclip:rollback` for a guarded condition, nothing for an unguarded one."""
    return "" if guard == "none" else f" +guard {guard}"


def _condition_row(c: ConditionSummary, wide: bool) -> list[str]:
    runs = f"{c.n_runs}" + (f" +{c.n_failed} failed" if c.n_failed else "")
    row = [escape(f"{c.workload} {knobs_text(c.knobs)}")]
    row.append(
        escape(short_perturbation(c.perturbation_kind, c.magnitude) + _guard_suffix(c.guard))
    )
    row += [runs, fmt_rate_ci(c.collapse_rate, c.collapse_rate_ci)]
    if wide:
        excess = c.collapse_excess
        row.append("" if excess is None else f"{fmt_ci(excess, c.collapse_excess_ci, 2)}")
        row.append(fmt(c.median_collapse_steps))
    row += [fmt_rate(c.recovery_rate)]
    row.append(fmt_ci(c.final_perf_iqm, c.final_perf_iqm_ci) if wide else fmt(c.final_perf_iqm))
    row.append(fmt(c.stability_score_median))
    if wide:
        row += [fmt(c.dispersion_across_time), fmt(c.dispersion_across_runs)]
        row.append(fmt(c.risk_across_runs))
    return row


def conditions_table(summary: AuditSummary, wide: bool = False) -> Any:
    columns = [("workload, knobs", False), ("perturbation", False), ("runs", True)]
    columns += [("collapse\n[95% CI]", True)]
    columns += [("excess over\ncontrol", True), ("median\ncollapse step", True)] if wide else []
    columns += [("recov.", True), ("perf\nIQM", True), ("stab.", True)]
    if wide:
        columns += [("disp.\ntime", True), ("disp.\nruns", True), ("risk\nruns", True)]
    rows = [_condition_row(c, wide) for c in sorted(summary.conditions, key=condition_order)]
    audit = summary.audit
    title = f"audit {audit.name}: {audit.n_done} finished of {audit.n_runs} runs"
    return render_table(title, columns, rows, WIDE_CAPTION if wide else CAPTION)


def guards_table(summary: AuditSummary) -> Any:
    """Each guarded condition beside the same condition unguarded."""
    columns = [("condition", False), ("guard", False), ("collapse\nguarded", True)]
    columns += [("collapse\nunguarded", True), ("irreversible\nguarded", True)]
    columns += [("irreversible\nunguarded", True), ("interv.\n/run", True)]
    columns += [("extra\ncompute", True), ("final Δ\nvs unguarded", True), ("wall\nratio", True)]
    rows = []
    # Grouped by condition (the unperturbed one first), then by guard.
    order = sorted(
        summary.guards,
        key=lambda g: (
            g.workload,
            knobs_text(g.knobs),
            g.perturbation != "none",
            g.perturbation,
            g.guard,
        ),
    )
    for g in order:
        condition = f"{g.workload} {knobs_text(g.knobs)} {g.perturbation}"
        rows.append(
            [
                escape(condition),
                escape(g.guard),
                fmt_rate_ci(g.collapse.rate, g.collapse.ci),
                fmt_rate_ci(g.collapse_unguarded.rate, g.collapse_unguarded.ci),
                fmt_rate(g.irreversible.rate),
                fmt_rate(g.irreversible_unguarded.rate),
                fmt(g.interventions_per_run),
                fmt_rate(g.extra_compute),
                fmt_ci(g.final_difference.value, g.final_difference.ci)
                if g.final_difference is not None
                else "–",
                fmt(g.wall_time_ratio),
            ]
        )
    caption = (
        "extra compute: updates skipped or rolled back / steps trained; final Δ: IQM of final "
        "performance guarded − unguarded; 95% CIs; interventions on unperturbed runs are false"
    )
    return render_table("guards", columns, rows, caption)


def run_status(r: RunRecord) -> str:
    if r.status == "failed":
        return f"[red]failed[/]: {escape(str(r.error))}"
    reason = r.collapse.reason if r.collapse is not None else None
    if r.collapsed is None:
        # "not learned at onset", "not testable: …", "unconfirmed: …": the words before the colon
        return escape(reason.split(":")[0]) if reason else r.status
    if r.collapsed:
        if r.collapse is not None and r.collapse.irreversible is None:
            return "[red]collapsed[/] (censored)"
        irreversible = r.collapse is not None and r.collapse.irreversible
        return "[red]irreversible[/]" if irreversible else "[yellow]recovered[/]"
    return "[green]stable[/]"


def runs_table(summary: AuditSummary, wide: bool = False) -> Any:
    columns = [("run", False), ("condition", False), ("seed", True), ("status", False)]
    columns += [("collapse\nstep", True)] + ([("recovery\nsteps", True)] if wide else [])
    columns += [("final\nperf", True), ("stability", True)]
    rows = []
    for r in sorted(summary.runs, key=condition_order):
        condition = escape(
            f"{r.workload} {knobs_text(r.knobs)} "
            + short_perturbation(r.perturbation_kind, r.magnitude)
            + _guard_suffix(r.guard)
        )
        c = r.collapse
        row = [r.run_id if wide else r.run_id[:8], condition, fmt(r.seed), run_status(r)]
        row.append(fmt(None if c is None else c.collapse_step))
        row += [fmt(None if c is None else c.recovery_steps)] if wide else []
        rows.append([*row, fmt(r.final_perf), fmt(r.stability_score)])
    return render_table("runs", columns, rows)


def _rho(item: WorkloadCorrelation) -> str:
    return f"rho={fmt_ci(item.rho, item.ci)} (n={item.n}) → {item.verdict}: {item.reason}"


def print_summary(summary: AuditSummary, console: Any, wide: bool = False) -> None:
    """Render a summary as rich tables: conditions, runs, decoupling, notes."""
    print_table(console, conditions_table(summary, wide), wide)
    for line in false_positive_lines(summary):
        console.print(escape(line), highlight=False)
    print_table(console, runs_table(summary, wide), wide)
    if summary.guards:
        print_table(console, guards_table(summary), wide)
    for item in summary.decoupling.per_workload:
        console.print(f"decoupling {escape(item.workload)}: {_rho(item)}", highlight=False)
    console.print(f"decoupling pooled: {_rho(summary.decoupling.pooled)}", highlight=False)
    for note in summary.audit.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def false_positive_lines(summary: AuditSummary) -> list[str]:
    """Per workload, what the criterion flags when nothing harmful happened, and each perturbed
    condition's collapse rate beyond its control arm paired by seed: the lines to read every
    collapse rate beside."""
    lines = []
    for c in sorted(summary.conditions, key=condition_order):
        if c.collapse_excess is not None:
            low, high = c.collapse_excess_ci
            what = short_perturbation(c.perturbation_kind, c.magnitude) + _guard_suffix(c.guard)
            lines.append(
                f"{c.workload} {knobs_text(c.knobs)} {what}: collapse rate in excess of "
                f"{c.control}, paired by seed: {c.collapse_excess:+.2f} [{fmt(low)}, {fmt(high)}] "
                f"({c.n_pairs} seeds)"
            )
    for item in summary.false_positives:
        if item.n_runs == 0:
            continue
        judged = f"{item.n_judged} of {item.n_runs} sham/unperturbed runs judged"
        if item.sham_flag_rate is None:
            lines.append(f"{item.workload}: criterion false-positive rate unknown ({judged})")
            continue
        low, high = item.sham_flag_rate_ci
        lines.append(
            f"{item.workload}: criterion false-positive rate {item.sham_flag_rate:.2f} "
            f"[{low:.2f}, {high:.2f}] ({item.n_flagged} flagged; {judged})"
        )
    return lines
