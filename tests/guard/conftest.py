"""A test detector that alarms exactly where a test says."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from stabilitybench.detectors.base import BaseDetector, register_detector, unregister_detector


@dataclass
class AlarmAt(BaseDetector):
    """A test detector: score 1 at the run's steps in `steps`, else 0; native rule score > 0.5.

    It reads `run_step` (the optimizer steps the run has taken), not `step` (the step of the
    restored timeline, behind it after skips and rollbacks)."""

    name: ClassVar[str] = "alarm_at"
    title: ClassVar[str] = "alarms at given steps (tests)"
    steps: ClassVar[set[int]] = set()
    threshold: float = 0.5
    native_threshold: ClassVar[str] = "threshold"

    def update(self, row: Mapping[str, Any]) -> float:
        return 1.0 if int(row["run_step"]) in self.steps else 0.0


@pytest.fixture
def alarm_at() -> Iterator[type[AlarmAt]]:
    register_detector(AlarmAt)
    yield AlarmAt
    AlarmAt.steps = set()
    unregister_detector("alarm_at")
