"""The console account of an import: one row per run, what each tag became, what was skipped."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from stabilitybench.importers import ImportResult


def print_import(result: ImportResult, console: Any) -> None:
    table = Table(
        title=f"imported {escape(result.name)} ({result.fmt}) → {escape(str(result.out))}"
    )
    for column, justify in (
        ("run", "left"),
        ("run_id", "left"),
        ("steps", "right"),
        ("evals", "right"),
        ("perf from", "left"),
        ("diverged at", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for run in result.runs:
        table.add_row(
            escape(run.label),
            run.run_id or "[yellow]not imported[/]",
            f"{run.telemetry_rows:,}",
            f"{run.eval_rows:,}",
            escape(run.perf_source or "—"),
            "—" if run.diverged_step is None else f"[red]{run.diverged_step:,}[/]",
        )
    console.print(table)
    for run in result.runs:
        if run.columns:
            mapped = ", ".join(f"{tag} → {col}" for tag, col in run.columns.items())
            console.print(f"[bold]{escape(run.label)}[/]: {escape(mapped)}", highlight=False)
        for note in run.notes:
            console.print(
                f"[yellow]skipped[/] {escape(run.label)}: {escape(note)}", highlight=False
            )
    if result.replaced:
        console.print("replaced the earlier import of the same source in this folder")
    if any(run.run_id and run.perf_source is None for run in result.runs):
        console.print(
            "[yellow]note:[/] some runs have no evaluation tag, so no final performance; "
            "name one with --map TAG=eval_loss or --map TAG=eval_return",
            highlight=False,
        )
    console.print(
        f"{sum(1 for r in result.runs if r.run_id)} run(s) in {result.wall_s:.1f} s; next: "
        f"stabilitybench summary {escape(str(result.out))}",
        highlight=False,
    )
