"""The Probe base class: scheduling, detaching and collecting live here; a probe writes `measure()`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from stabilitybench.types import Phase, Schedule, StepContext, as_schedule

Value = float | int | torch.Tensor


class Probe:
    """A per-step signal. Subclasses set `name` and write `measure()`; nothing else is required.

    `phase` says when `measure()` runs: PRE_STEP sees the gradients the optimizer is about to use
    (after any perturbation); POST_STEP sees the updated parameters. A probe that needs the
    parameters from before the step overrides `before_step()`, which runs at PRE_STEP on the steps
    the probe measures. Returned tensors are gathered by `Telemetry` and moved to the host with one
    sync per step, so `measure()` should return 0-d tensors rather than call `.item()`.
    """

    name: ClassVar[str] = ""
    phase: ClassVar[Phase] = Phase.PRE_STEP
    # The columns `measure()` writes and how the monitor scales each as a feature: "log",
    # "signed_log", "identity", or None (recorded, not a monitor feature).
    columns: ClassVar[Mapping[str, str | None]] = {}
    # Columns that echo a setting the audit controls (the optimizer's learning rate) rather than
    # measure the training: the monitor leaves them out unless an ablation asks for them.
    controls: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, every: int | Schedule = 1) -> None:
        self.schedule: Schedule = as_schedule(every)

    def wants(self, step: int) -> bool:
        """Whether this probe writes values on `step`."""
        return self.schedule(step)

    def tracks(self, step: int) -> bool:
        """Whether this probe must see `step` (to keep state), even if it writes nothing then."""
        return self.wants(step)

    def before_step(self, ctx: StepContext) -> None:
        """Runs at PRE_STEP on tracked steps, before the optimizer moves the parameters."""

    def measure(self, ctx: StepContext) -> Mapping[str, Value]:
        raise NotImplementedError

    def observe(self, ctx: StepContext) -> Mapping[str, Value]:
        """Called by Telemetry on tracked steps; returns values only on wanted steps."""
        values = self.measure(ctx)
        return values if self.wants(ctx.step) else {}
