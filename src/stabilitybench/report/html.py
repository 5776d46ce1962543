"""The report page: one self-contained HTML file assembled from one builder per section.

Each section lives in `report/sections/`; building blocks in `markup.py`; the stylesheet in
`style.css`; what the page shows is loaded once by `data.load_report_data` (typed records,
summary and evaluation).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stabilitybench.analysis import Analysis
from stabilitybench.errors import StabilityBenchError
from stabilitybench.report.data import load_report_data
from stabilitybench.report.markup import Figures, esc, stylesheet
from stabilitybench.report.sections.conditions import section_conditions
from stabilitybench.report.sections.curves import section_curves
from stabilitybench.report.sections.decoupling import section_decoupling
from stabilitybench.report.sections.detectors import section_detectors
from stabilitybench.report.sections.dose_response import section_dose_response
from stabilitybench.report.sections.guards import section_guards
from stabilitybench.report.sections.latent import section_latent
from stabilitybench.report.sections.overview import audit_name, section_overview
from stabilitybench.report.sections.runs import section_runs
from stabilitybench.store import RunStore

NAV = (
    ("overview", "Overview"),
    ("conditions", "Conditions"),
    ("curves", "Curves"),
    ("latent", "Meta-state"),
    ("detectors", "Detectors"),
    ("guards", "Guards"),
    ("decoupling", "Decoupling"),
    ("dose-response", "Dose-response"),
    ("runs", "Runs"),
)


def render_report(
    store: RunStore,
    figures_dir: Path | None = None,
    figures_dpi: int = 150,
    analysis: Analysis | None = None,
) -> tuple[str, list[Path]]:
    """The page's HTML and the PNG files written (when `figures_dir` is given); `analysis`:
    the audit's analysis if it was already made."""
    data = load_report_data(store, analysis)
    figures = Figures(figures_dir, figures_dpi)
    name = audit_name(data, store)
    sections = [
        section_overview(data, store),
        section_conditions(data),
        section_curves(data, figures),
        section_latent(data, figures),
        section_detectors(data),
        section_guards(data),
        section_decoupling(data, figures),
        section_dose_response(data, figures),
        section_runs(data),
    ]
    body = "\n".join(sections)
    nav = "".join(
        f'<a href="#{anchor}">{title}</a>' for anchor, title in NAV if f'id="{anchor}"' in body
    )
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>StabilityBench report: {esc(name)}</title>"
        f"<style>{stylesheet()}</style></head><body><main>"
        f'<header><div class="meta">StabilityBench stability report</div><h1>{esc(name)}</h1>'
        f'<div class="meta">generated {esc(generated)}</div><nav>{nav}</nav></header>\n'
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )
    return page, figures.written


def write_report(
    store: RunStore | str | Path,
    output: str | Path | None = None,
    figures_dir: str | Path | None = None,
    figures_dpi: int = 150,
    analysis: Analysis | None = None,
) -> Path:
    """Write the audit's self-contained HTML report (default DIR/report.html); returns its path.
    `analysis`: the audit's analysis if it was already made (else it is made here)."""
    if not isinstance(store, RunStore):
        store = RunStore.open(store)
    path = Path(output) if output is not None else store.root / "report.html"
    if path.is_dir():
        raise StabilityBenchError(
            f"--output: {path} is a folder; give a file name such as report.html"
        )
    fig_dir = Path(figures_dir) if figures_dir is not None else None
    if fig_dir is not None and fig_dir.exists() and not fig_dir.is_dir():
        raise StabilityBenchError(
            f"--figures: {fig_dir} is a file; give a folder for the PNG figures"
        )
    page, _ = render_report(store, fig_dir, figures_dpi, analysis)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
