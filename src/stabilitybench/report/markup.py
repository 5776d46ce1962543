"""HTML building blocks of the report: escaping, number formats, tables, notices, figures."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterable, Sequence
from html import escape
from importlib.resources import files
from pathlib import Path
from typing import Any

from stabilitybench.report import figures as figs


def stylesheet() -> str:
    """The report's one stylesheet (report/style.css), inlined into the page."""
    return files("stabilitybench.report").joinpath("style.css").read_text(encoding="utf-8")


def esc(value: Any) -> str:
    """Text as HTML, quotes included: every user-provided string goes through here."""
    return escape(str(value), quote=True)


def fmt_number(value: float | int | None, digits: int = 3) -> str:
    """A number for a table cell (`—` when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    number = float(value)
    if math.isinf(number):
        return "−∞" if number < 0 else "∞"
    if abs(number) < 1e-12:
        return "0"
    if number == int(number) and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.{digits}g}"


def fmt_rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{100 * value:.0f}%"


def with_interval(
    value: float | None,
    interval: Sequence[float | None] | None,
    point: Callable[[Any], str] = fmt_number,
) -> str:
    """`value [lo, hi]`, or the value alone without a (complete) interval."""
    shown = point(value)
    if value is None or not interval or interval[0] is None or interval[1] is None:
        return shown
    return f"{shown} [{point(interval[0])}, {point(interval[1])}]"


def why(value: float | None, shown: str, notes: Sequence[str], field: str = "") -> str:
    """A cell: the number, or (when it could not be estimated) the note that says why."""
    if value is not None:
        return esc(shown)
    reason = next((n for n in notes if not field or field in n or ":" not in n), None)
    return f'<span class="why">{esc(reason or "—")}</span>'


def duration(seconds: float) -> str:
    """`12.0 s`, `3.5 min`, `1.2 h`: the largest unit that keeps the number at 1 or more."""
    unit, size = next(((u, n) for u, n in (("h", 3600), ("min", 60)) if seconds >= n), ("s", 1))
    return f"{seconds / size:.1f} {unit}"


def notice(message: str, *, error: bool = False) -> str:
    cls = "notice error" if error else "notice"
    return f'<p class="{cls}">{message}</p>'


def table(
    headers: Sequence[tuple[str, bool]],
    rows: Iterable[Sequence[str]],
    row_classes: Sequence[str] = (),
) -> str:
    """An HTML table; `headers` are (title, numeric); cells are already-escaped HTML."""
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in headers
    )
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(
            f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
            for cell, (_, num) in zip(row, headers, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


EMBED_DPI = 100


class Figures:
    """Embeds figures in the page and, when asked, writes each as a PNG file."""

    def __init__(self, figures_dir: Path | None, dpi: int = 150) -> None:
        self.figures_dir = figures_dir
        self.dpi = dpi  # of the PNG files; the page embeds its figures at EMBED_DPI
        self.written: list[Path] = []

    def embed(self, name: str, fig: Any, caption: str) -> str:
        import matplotlib.pyplot as plt

        try:
            png = figs.png_bytes(fig, dpi=EMBED_DPI)
            data = base64.b64encode(png).decode("ascii")
            if self.figures_dir is not None:
                path = self.figures_dir / f"{name}.png"
                if self.dpi == EMBED_DPI:  # the embedded image itself: no second rendering
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(png)
                    self.written.append(path)
                else:
                    self.written.append(figs.save_png(fig, path, dpi=self.dpi))
        finally:
            plt.close(fig)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
