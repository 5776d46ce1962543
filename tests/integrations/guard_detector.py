"""A test detector for guards in the framework callbacks: alarms at the run's given steps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from stabilitybench.detectors.base import BaseDetector, register_detector, unregister_detector


@dataclass
class AlarmAtStep(BaseDetector):
    """Score 1 at the run's optimizer steps in `steps` (`run_step`), else 0; alarm when > 0.5."""

    name: ClassVar[str] = "alarm_at_step"
    title: ClassVar[str] = "alarms at given steps (integration tests)"
    steps: ClassVar[set[int]] = set()
    threshold: float = 0.5
    native_threshold: ClassVar[str] = "threshold"

    def update(self, row: Mapping[str, Any]) -> float:
        return 1.0 if int(row["run_step"]) in self.steps else 0.0


@pytest.fixture(name="alarm_at_step")
def alarm_at_step_fixture() -> Iterator[type[AlarmAtStep]]:
    """`AlarmAtStep` registered for one test (import this name into the test module)."""
    register_detector(AlarmAtStep)
    yield AlarmAtStep
    AlarmAtStep.steps = set()
    unregister_detector("alarm_at_step")
