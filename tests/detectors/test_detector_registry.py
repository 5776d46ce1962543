"""A detector registered in this file shows up in scores.parquet, the evaluation, the CLI table
and the report, with no other change: one class and one registration."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from monitor_synthetic import make_audit
from stabilitybench.detectors.base import (
    BaseDetector,
    detector_classes,
    register_detector,
    unregister_detector,
)
from stabilitybench.evaluation.evaluate import evaluate_audit, fit_audit, print_evaluation

FAST = {"max_epochs": 2, "window": 32, "hidden": 8}


class LossLevel(BaseDetector):
    """A toy guard: the loss itself; its native rule fires above 5."""

    name = "toy_loss"
    title = "Toy loss level"
    citation = "this test"

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return pd.to_numeric(table["loss"], errors="coerce").to_numpy(dtype=float)

    def native(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > 5.0

    def update(self, row: Mapping[str, Any]) -> float:
        return float(row["loss"])


@pytest.fixture
def toy_registered() -> Iterator[None]:
    register_detector(LossLevel)
    yield
    unregister_detector(LossLevel.name)


def test_a_registered_detector_is_picked_up_everywhere(
    tmp_path: Path, toy_registered: None
) -> None:
    from stabilitybench.report.html import write_report

    assert list(detector_classes())[-1] == "toy_loss"
    store = make_audit(tmp_path / "a", seeds=(0, 1), factors=(None, 1.2, 30.0))
    fit_audit(store, latent_dim=2, monitor_options=FAST)
    scores = store.load(store.run_ids()[0]).scores
    assert scores is not None and {"toy_loss", "toy_loss_native"} <= set(scores.columns)
    result = evaluate_audit(store)
    toy = result.workloads["synth"].detectors["toy_loss"]
    assert toy.false_alarms_per_1k is not None and "toy_loss" in result.detectors
    console = Console(width=80, record=True, file=io.StringIO())
    print_evaluation(result, console)
    table = console.export_text()
    assert "toy_loss" in table and "…" not in table  # nothing cut off
    assert max(len(line) for line in table.splitlines()) <= 80
    html = write_report(store).read_text(encoding="utf-8")
    detectors = html.split('id="detectors"')[1].split('id="decoupling"')[0]
    assert "Toy loss level" in detectors and "(toy_loss)" in detectors
