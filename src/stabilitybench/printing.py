"""What the light verbs print (`status`, `query`): rich tables from the store, no analysis."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from stabilitybench.types import last_error_line

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from stabilitybench.store import RunStore


def print_status(store: RunStore, audit_dir: Path, console: Console) -> None:
    """Counts of runs by status, the last error line of each failed run, and how to resume."""
    counts = store.status_counts()
    # Names are free text: every one shown through rich is escaped (`[red]` stays text).
    table = Table(title=escape(f"audit {store.audit().name or audit_dir}"))
    table.add_column("status")
    table.add_column("runs", justify="right")
    for name, count in counts.items():
        table.add_row(name, str(count))
    console.print(table)
    failed = [i for i in store.infos() if i.status == "failed"]
    for info in failed:
        # A traceback's last line is the one that says what went wrong.
        line = last_error_line(info.error) if (info.error or "").strip() else "?"
        console.print(
            "[red]failed[/] " + escape(f"{info.run_id} ({info.label}): {line}"), highlight=False
        )
    unfinished = counts.get("pending", 0) + counts.get("running", 0) + len(failed)
    if unfinished:
        console.print(
            escape(
                f"{unfinished} run(s) not done; unless the audit is still running, rerun "
                f"`stabilitybench audit SPEC --out {audit_dir}` to resume"
            ),
            highlight=False,
        )


def print_query(frame: pd.DataFrame, console: Console, *, as_json: bool, limit: int) -> None:
    """A query's result as JSON records, or as a table of its first `limit` rows."""
    if as_json:
        sys.stdout.write(frame.to_json(orient="records", date_format="iso") + "\n")
        return
    table = Table(show_lines=False)
    for column in frame.columns:
        table.add_column(escape(str(column)), overflow="fold")
    for row in frame.head(limit).itertuples(index=False):
        table.add_row(*[_cell(v) for v in row])
    console.print(table)
    if len(frame) > limit:
        console.print(f"… {len(frame) - limit} more rows (use --limit or --json)")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return escape(str(value))
