"""Fixtures for the report tests: the synthetic audit and its report, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stabilitybench.store import RunStore

from .synthetic import fast_summary, make_audit


@pytest.fixture
def quick_summary() -> Iterator[None]:
    """Use the real summary with few bootstrap resamples during one test."""
    with fast_summary():
        yield


@pytest.fixture(scope="session")
def full_audit(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    """The synthetic audit with scores and a monitor evaluation (built once per session)."""
    return make_audit(tmp_path_factory.mktemp("audit") / "full")


@pytest.fixture(scope="session")
def full_report(
    full_audit: RunStore, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(report.html, figures folder) for the full synthetic audit, written once per session."""
    from stabilitybench.report.html import write_report

    figures = tmp_path_factory.mktemp("figures")
    with fast_summary():
        return write_report(full_audit, figures_dir=figures), figures
