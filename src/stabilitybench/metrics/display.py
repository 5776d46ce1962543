"""Shared terminal formatting for the summary and evaluation tables (rich).

Numbers are shown with three significant digits without exponents for everyday magnitudes;
a value within 1e-12 of zero (a Wilson bound of 5.55e-17) prints as `0`. Tables fit an
80-column terminal: numeric cells never wrap, text cells wrap only between words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DASH = "–"


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: `–` for None/NaN, yes/no for booleans, numbers rounded to `digits` significant."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return DASH
        if math.isinf(value):
            return "-inf" if value < 0 else "inf"
        if abs(value) < 1e-12:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            text = f"{value:.{digits}g}"
            return text if "e" not in text else f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ci(point: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    """`point [lo, hi]`, or the point alone when the interval is missing."""
    if point is None:
        return DASH
    if not ci or ci[0] is None or ci[1] is None:
        return fmt(point, digits)
    return f"{fmt(point, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def fmt_rate(value: float | None) -> str:
    """A rate as a whole percentage."""
    return DASH if value is None else f"{100 * value:.0f}%"


def fmt_rate_ci(point: float | None, ci: Sequence[float | None] | None) -> str:
    """`67% [21–94]`: a rate with its interval in percent."""
    if point is None:
        return DASH
    if not ci or ci[0] is None or ci[1] is None:
        return fmt_rate(point)
    return f"{fmt_rate(point)} [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]"


def render_table(
    title: str,
    columns: Sequence[tuple[str, bool]],
    rows: Sequence[Sequence[str]],
    caption: str | None = None,
) -> Any:
    """A compact rich table; `columns` are (header, numeric). Numeric cells never wrap; a text
    column is at least as wide as its longest word, so text wraps only between words."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for i, (header, numeric) in enumerate(columns):
        if numeric:
            table.add_column(header, justify="right", no_wrap=True)
            continue
        words = [w for row in rows for w in _plain(row[i]).split()] + header.split()
        words = [w for w in words]
        table.add_column(header, min_width=min(max(map(len, words), default=1), 40))
    for row in rows:
        table.add_row(*row)
    return table


def _plain(text: str) -> str:
    """Cell text without rich markup (for measuring)."""
    from rich.text import Text

    return Text.from_markup(text).plain


def print_table(console: Any, table: Any, wide: bool) -> None:
    """Print a table; `wide` lays it out at its natural width (wider than the terminal)."""
    if not wide:
        console.print(table)
        return
    from rich.measure import Measurement

    options = console.options.update(width=10_000, max_width=10_000)
    width, terminal = Measurement.get(console, options, table).maximum, console.width
    # Rich never prints wider than its console. Put back the console's own setting afterwards
    # (None: follow the terminal), not the width it had now: else the next table, in a process
    # that prints many, is laid out at this terminal's width for good.
    setting = getattr(console, "_width", terminal)
    console.width = max(width, terminal)
    try:
        console.print(table)
    finally:
        console._width = setting
