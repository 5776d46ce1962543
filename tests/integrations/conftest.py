"""Fixtures for the framework-callback tests: a detector that alarms where a test says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from guard_detector import AlarmAtStep

from stabilitybench.monitor.registry import register_detector, unregister_detector


@pytest.fixture
def alarm_at_step() -> Iterator[type[AlarmAtStep]]:
    register_detector(AlarmAtStep)
    yield AlarmAtStep
    AlarmAtStep.steps = set()
    unregister_detector("alarm_at_step")
