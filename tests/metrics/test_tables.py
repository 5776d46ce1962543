"""The summary and evaluation tables fit an 80-column terminal without breaking a word."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from stabilitybench.metrics.display import fmt, fmt_rate_ci
from stabilitybench.metrics.summary import summarize
from stabilitybench.metrics.summary_printing import print_summary
from stabilitybench.store import RunStore

from .test_summary import store as store


def _render(summary: object, wide: bool = False) -> list[str]:
    console = Console(width=80, record=True, color_system=None, file=io.StringIO())
    print_summary(summary, console, wide=wide)  # type: ignore[arg-type]
    return console.export_text().splitlines()


def test_numbers_are_plain_and_a_tiny_wilson_bound_is_zero() -> None:
    assert fmt(5.551115123125783e-17) == "0" and fmt(-0.0) == "0"
    assert fmt(1500.0) == "1500" and fmt(0.123456) == "0.123" and fmt(None) == "–"
    assert fmt_rate_ci(0.5, [5.55e-17, 0.9]) == "50% [0–90]"


def test_summary_fits_80_columns_and_keeps_words_whole(store: RunStore) -> None:
    summary = summarize(store, reps=50)
    lines = _render(summary)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text  # no cell cut off
    for c in summary.conditions:  # every cell value appears whole on one line (none cut off)
        assert c.workload in text
        assert fmt(c.stability_score_median) in text and fmt(c.final_perf_iqm) in text
        for key, value in c.knobs.items():
            assert f"{key}={value}" in text
    for r in summary.runs:
        assert r.run_id[:8] in text
    assert "lr_spike×50" in text and "irreversible" in text and "2 +1 failed" in text
    assert not re.search(r"lr_spi\s*$", text, re.M)


def test_rows_are_sorted_by_workload_knobs_and_perturbation(store: RunStore) -> None:
    lines = _render(summarize(store, reps=50))
    table = lines[: next(i for i, line in enumerate(lines) if "stability: median" in line)]
    blocks: list[str] = []  # one condition row, its wrapped cell lines joined
    for line in table:
        if line.startswith("toy"):
            blocks.append(line)
        elif blocks and line.strip():
            blocks[-1] += " " + line
    keys = [
        (re.search(r"noise=(\S+)", b).group(1), re.search(r"(none|lr_spike×\d+)", b).group(1))  # type: ignore[union-attr]
        for b in blocks
    ]
    assert keys == [
        ("0.0", "none"),
        ("0.0", "lr_spike×3"),
        ("0.0", "lr_spike×50"),
        ("0.1", "none"),
        ("0.1", "lr_spike×50"),
    ]


def test_wide_shows_every_column(store: RunStore, tmp_path: Path) -> None:
    text = "\n".join(_render(summarize(store, reps=50), wide=True))
    for header in ("median", "disp.", "risk", "recovery"):
        assert header in text


def test_cli_summary_wide_flag(store: RunStore) -> None:
    from typer.testing import CliRunner

    from stabilitybench.cli import app

    narrow = CliRunner().invoke(app, ["summary", str(store.root)])
    wide = CliRunner().invoke(app, ["summary", str(store.root), "--wide"])
    assert narrow.exit_code == 0 and wide.exit_code == 0
    assert "disp." not in narrow.stdout and "disp." in wide.stdout
    # --wide put back the console's own setting: the next table follows the terminal again.
    after = CliRunner().invoke(app, ["summary", str(store.root)], env={"COLUMNS": "300"})
    assert max(len(line) for line in after.stdout.splitlines()) > 100
