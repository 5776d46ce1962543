"""A test detector for guards in the framework callbacks: alarms at the run's given steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from stabilitybench.monitor.registry import BaseDetector


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
