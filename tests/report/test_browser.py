"""The report opened in a real headless Chromium: no errors, no requests, sections, not blank.

Chromium comes from Debian (`make test` installs it). Without it these tests FAIL: a report
that was never opened in a browser is not tested.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from .synthetic import fast_summary, make_audit

SCRIPT = "<script>alert(1)</script>"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def open_page(browser: Any, path: Path) -> tuple[Any, dict[str, list[str]]]:
    """Load a local file, recording console errors, page errors, requests and dialogs."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen: dict[str, list[str]] = {"console": [], "pageerror": [], "requests": [], "dialogs": []}
    page.on(
        "console",
        lambda m: seen["console"].append(m.text) if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: seen["pageerror"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, seen


def test_report_loads_cleanly_and_is_not_blank(
    browser: Any, full_report: tuple[Path, Path]
) -> None:
    path, _ = full_report
    page, seen = open_page(browser, path)
    try:
        assert seen["console"] == [] and seen["pageerror"] == []
        assert seen["requests"], "the page itself should have been requested"
        assert all(url.startswith(("file:", "data:")) for url in seen["requests"]), seen["requests"]
        headings = page.locator("h2").all_inner_texts()
        for title in (
            "Overview",
            "Conditions",
            "Performance and telemetry",
            "Meta-state trajectories",
            "Early-warning detectors",
            "Performance vs stability",
            "dose-response",
            "All runs",
        ):
            assert any(title.lower() in h.lower() for h in headings), (title, headings)
        # every embedded figure decoded into a real image
        sizes = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth])"
        )
        assert len(sizes) == 5 and all(done and width > 300 for done, width in sizes)
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
        assert shot.size[1] > 3000  # the whole page, figures included
        stat = ImageStat.Stat(shot)
        assert stat.stddev[0] > 10 and len(set(shot.getdata())) > 50
    finally:
        page.close()


def test_script_in_names_stays_text_in_the_browser(browser: Any, tmp_path: Path) -> None:
    from stabilitybench.report.html import write_report

    store = make_audit(
        tmp_path / "a",
        name=SCRIPT,
        workload=f"toy{SCRIPT}",
        label_suffix=SCRIPT,
        scores=False,
        evaluation=False,
    )
    with fast_summary():
        path = write_report(store)
    page, seen = open_page(browser, path)
    try:
        assert seen["dialogs"] == [] and seen["pageerror"] == []
        assert page.locator("h1").inner_text() == SCRIPT
        assert page.locator("script").count() == 0
        assert page.title() == f"StabilityBench report: {SCRIPT}"
    finally:
        page.close()
