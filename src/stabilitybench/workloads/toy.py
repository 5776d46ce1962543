"""A small, fast, real workload: a 2-layer MLP student learns a fixed random teacher with Adam.

It exists so that audits, the runner, the monitor and the report can be exercised in seconds
(an 8-run grid trains in a few seconds on one core). Config (the `workload` dict of a RunSpec)::

    name: toy
    kind: toy
    total_steps: 300                 # optimizer steps
    eval: {every: 20, batches: 2}    # every N optimizer steps; batches × 256 validation samples
    knobs: {lr: 0.01, hidden: 64, noise: 0.1, dropout: 0.0, batch_size: 32}

`noise` is the label-noise standard deviation (the stochasticity knob, with `dropout`).
Testing aids (knobs, for the runner's own tests): `fail_at_step` makes the run raise at that
optimizer step (a bug in a workload); `crash_at_step` kills the process with SIGKILL there (what
the OS does on out-of-memory). An `lr_spike` with a factor of ~50 kills the student's ReLUs and
collapses it for good; a factor of ~3 is absorbed within a few dozen steps.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from stabilitybench.guard.protection import guard_for_run
from stabilitybench.store import RunWriter
from stabilitybench.telemetry import Telemetry
from stabilitybench.types import RunSpec
from stabilitybench.workloads.base import (
    RunOutcome,
    finish_validated_run,
    register_workload,
    train_and_validate,
)
from stabilitybench.workloads.config import (
    EvalConfig,
    WorkloadConfig,
    total_steps_validator,
    workload_name,
)

INPUT_DIM = 16
TEACHER_HIDDEN = 32
VAL_BATCH = 256

DEFAULT_KNOBS: dict[str, Any] = {
    "lr": 0.01,
    "hidden": 64,
    "noise": 0.1,
    "dropout": 0.0,
    "batch_size": 32,
    "fail_at_step": None,
    "crash_at_step": None,
}
ADAPTERS: set[str] = set()  # perturbations act through optimizer hooks / parameter edits only


def _check_knobs(knobs: Any) -> dict[str, Any]:
    """Every knob, defaults filled in, each checked for type and range."""
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise ValueError(
            f"unknown knob knobs.{unknown[0]}; allowed: {', '.join(sorted(DEFAULT_KNOBS))}"
        )
    values = {**DEFAULT_KNOBS, **knobs}

    def number(key: str, low: float, high: float = math.inf, integer: bool = False) -> None:
        value = values[key]
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not (low <= value < high):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"knobs.{key} must be {kind} in [{low}, {high}), got {value!r}")

    number("lr", 1e-12)
    number("hidden", 1, integer=True)
    number("noise", 0.0)
    number("dropout", 0.0, 1.0)
    number("batch_size", 1, integer=True)
    for key in ("fail_at_step", "crash_at_step"):
        if values[key] is not None:
            number(key, 0, integer=True)
    return values


class ToyEval(EvalConfig):
    """When and how much a toy run evaluates: every `every` optimizer steps, on `batches` ×
    256 validation samples (other keys are ignored)."""

    unknown_word: ClassVar[str | None] = None
    shape: ClassVar[str] = "{every: N, batches: M}"

    every: int = 20
    batches: int = 2


class ToyConfig(WorkloadConfig):
    """A checked toy workload config with every default filled in (keys it does not read are
    ignored); its fields in the order they are checked."""

    default_name: ClassVar[str] = "toy"

    total_steps: int = Field(default=None, validate_default=True)  # optimizer steps
    eval: ToyEval = Field(default_factory=ToyEval)
    knobs: dict[str, Any] = Field(default_factory=dict, validate_default=True)  # all, filled in

    _total_steps = total_steps_validator()
    _knobs = field_validator("knobs", mode="before")(_check_knobs)


class _ToyTrainer:
    """The task, the student, its optimizer and one `train_step()`: the toy loop's state."""

    def __init__(self, knobs: dict[str, Any], eval_batches: int, data_seed: int) -> None:
        """Build the task and the student (initialised from the global torch RNG, seeded first)."""
        self.data_gen = torch.Generator().manual_seed(data_seed)
        # The teacher (the task) is the same for every seed; only the student and data vary.
        task_gen = torch.Generator().manual_seed(12345)
        self.teacher_w1 = torch.randn(INPUT_DIM, TEACHER_HIDDEN, generator=task_gen) / math.sqrt(
            INPUT_DIM
        )
        self.teacher_w2 = torch.randn(TEACHER_HIDDEN, 1, generator=task_gen) / math.sqrt(
            TEACHER_HIDDEN
        )
        self.val_x = torch.randn(eval_batches * VAL_BATCH, INPUT_DIM, generator=task_gen)
        self.val_y = self.teacher(self.val_x)
        self.model = _student(int(knobs["hidden"]), float(knobs["dropout"]))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=float(knobs["lr"]))
        self.batch_size = int(knobs["batch_size"])
        self.noise = float(knobs["noise"])
        self.fail_at, self.crash_at = knobs["fail_at_step"], knobs["crash_at_step"]

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed random network the student learns: (B, INPUT_DIM) → (B, 1)."""
        return torch.tanh(x @ self.teacher_w1) @ self.teacher_w2  # (B, 1)

    def train_step(self, step: int) -> torch.Tensor:
        """One Adam step on a fresh noisy batch; returns the training loss (a tensor, no sync)."""
        if self.fail_at is not None and step == self.fail_at:
            raise RuntimeError(f"toy workload: fail_at_step={self.fail_at} reached (testing aid)")
        if self.crash_at is not None and step == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(self.batch_size, INPUT_DIM, generator=self.data_gen)
        y = self.teacher(x) + self.noise * torch.randn(self.batch_size, 1, generator=self.data_gen)
        loss = nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def validation_loss(self) -> float:
        """MSE on the fixed validation set, without dropout (a host sync)."""
        self.model.eval()
        with torch.no_grad():
            val_loss = float(nn.functional.mse_loss(self.model(self.val_x), self.val_y))
        self.model.train()
        return val_loss


def _student(hidden: int, dropout: float) -> nn.Sequential:
    """The two-hidden-layer ReLU MLP that learns the teacher."""
    return nn.Sequential(
        nn.Linear(INPUT_DIM, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 1),
    )


class ToyWorkload:
    """Teacher-student regression with Adam; perf = −validation MSE."""

    kind = "toy"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.name = workload_name(config, ToyConfig.default_name)

    def _schedule(self, spec: RunSpec, total_steps: int) -> Any:
        """The perturbation schedule, or None for a baseline run."""
        if not spec.perturbations:
            return None
        from stabilitybench.perturbations import PerturbationSchedule, build

        return PerturbationSchedule(
            [build(dict(p)) for p in spec.perturbations], total_steps=total_steps, seed=spec.seed
        )

    def validate(self, spec: RunSpec) -> None:
        """Check knobs, budget and that every perturbation can act on this workload."""
        settings = ToyConfig.read(spec.workload)
        schedule = self._schedule(spec, settings.total_steps)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {self.name!r} (kind toy)")

    def run(self, spec: RunSpec, writer: RunWriter) -> RunOutcome:
        """Train the student for `total_steps` optimizer steps, writing the run's three tables."""
        settings = ToyConfig.read(spec.workload)
        total_steps = settings.total_steps
        torch.manual_seed(spec.seed)
        trainer = _ToyTrainer(settings.knobs, settings.eval.batches, data_seed=spec.seed * 7919 + 1)
        telemetry = Telemetry(
            trainer.model, trainer.optimizer, probes="cheap", sink=writer, total_steps=total_steps
        )
        schedule = self._schedule(spec, total_steps)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {self.name!r} (kind toy)")
            schedule.attach(telemetry)
            schedule.add_reseed(trainer.data_gen.manual_seed)  # a sham restarts the data stream
        guard = guard_for_run(spec.guard, telemetry)  # after the schedule: sees the spiked LR

        def train_step(step: int) -> torch.Tensor:
            loss = trainer.train_step(step)
            telemetry.log(loss=loss)
            return loss.detach()

        try:
            result = train_and_validate(
                total_steps,
                settings.eval.every,
                train_step,
                trainer.validation_loss,
                guard,
                writer=writer,
                stop_on_nonfinite_validation=False,
            )
        finally:
            telemetry.close(read_back=False)
        return finish_validated_run(writer, result, schedule, guard)


register_workload("toy", ToyWorkload)
