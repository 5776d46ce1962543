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
from typing import Any

import torch
from torch import nn

from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.core import guard_for_run
from stabilitybench.store import RunWriter
from stabilitybench.telemetry import Telemetry
from stabilitybench.types import RunSpec
from stabilitybench.workloads.base import RunOutcome, finish_run, register_workload

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


def _check_knobs(name: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every knob's type and range."""
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise StabilityBenchError(
            f"workload {name!r}: unknown knob knobs.{unknown[0]}; "
            f"allowed: {', '.join(sorted(DEFAULT_KNOBS))}"
        )
    values = {**DEFAULT_KNOBS, **knobs}

    def number(key: str, low: float, high: float = math.inf, integer: bool = False) -> None:
        value = values[key]
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not (low <= value < high):
            kind = "an integer" if integer else "a number"
            raise StabilityBenchError(
                f"workload {name!r}: knobs.{key} must be {kind} in [{low}, {high}), got {value!r}"
            )

    number("lr", 1e-12)
    number("hidden", 1, integer=True)
    number("noise", 0.0)
    number("dropout", 0.0, 1.0)
    number("batch_size", 1, integer=True)
    for key in ("fail_at_step", "crash_at_step"):
        if values[key] is not None:
            number(key, 0, integer=True)
    return values


class ToyWorkload:
    """Teacher-student regression with Adam; perf = −validation MSE."""

    kind = "toy"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.name = str(config.get("name", "toy"))

    def _settings(self, spec: RunSpec) -> tuple[int, int, int, dict[str, Any]]:
        cfg = spec.workload
        total_steps = cfg.get("total_steps")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise StabilityBenchError(
                f"workload {self.name!r}: total_steps must be an integer >= 1, got {total_steps!r}"
            )
        evaluation = cfg.get("eval") or {}
        every, batches = evaluation.get("every", 20), evaluation.get("batches", 2)
        for key, value in (("every", every), ("batches", batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StabilityBenchError(
                    f"workload {self.name!r}: eval.{key} must be an integer >= 1, got {value!r}"
                )
        return total_steps, every, batches, _check_knobs(self.name, dict(cfg.get("knobs") or {}))

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
        total_steps, _, _, _ = self._settings(spec)
        schedule = self._schedule(spec, total_steps)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {self.name!r} (kind toy)")

    def run(self, spec: RunSpec, writer: RunWriter) -> RunOutcome:
        """Train the student for `total_steps` optimizer steps, writing the run's three tables."""
        total_steps, eval_every, eval_batches, knobs = self._settings(spec)
        torch.manual_seed(spec.seed)
        data_gen = torch.Generator().manual_seed(spec.seed * 7919 + 1)
        # The teacher (the task) is the same for every seed; only the student and data vary.
        task_gen = torch.Generator().manual_seed(12345)
        teacher_w1 = torch.randn(INPUT_DIM, TEACHER_HIDDEN, generator=task_gen) / math.sqrt(
            INPUT_DIM
        )
        teacher_w2 = torch.randn(TEACHER_HIDDEN, 1, generator=task_gen) / math.sqrt(TEACHER_HIDDEN)

        def teacher(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ teacher_w1) @ teacher_w2  # (B, 1)

        val_x = torch.randn(eval_batches * VAL_BATCH, INPUT_DIM, generator=task_gen)
        val_y = teacher(val_x)

        hidden = int(knobs["hidden"])
        model = nn.Sequential(
            nn.Linear(INPUT_DIM, hidden),
            nn.ReLU(),
            nn.Dropout(float(knobs["dropout"])),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(float(knobs["dropout"])),
            nn.Linear(hidden, 1),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=float(knobs["lr"]))
        telemetry = Telemetry(
            model, optimizer, probes="cheap", sink=writer, total_steps=total_steps
        )
        schedule = self._schedule(spec, total_steps)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {self.name!r} (kind toy)")
            schedule.attach(telemetry)
        guard = guard_for_run(spec.guard, telemetry)  # after the schedule: sees the spiked LR

        evals: list[dict[str, Any]] = []

        def evaluate(step: int) -> float:
            model.eval()
            with torch.no_grad():
                val_loss = float(nn.functional.mse_loss(model(val_x), val_y))
            model.train()
            perf = -val_loss if math.isfinite(val_loss) else -math.inf
            evals.append({"step": step, "env_step": None, "perf": perf, "val_loss": val_loss})
            return perf

        batch_size = int(knobs["batch_size"])
        noise = float(knobs["noise"])
        fail_at, crash_at = knobs["fail_at_step"], knobs["crash_at_step"]
        diverged = False
        steps_taken = 0
        try:
            evaluate(0)
            for step in range(total_steps):
                if fail_at is not None and step == fail_at:
                    raise RuntimeError(
                        f"toy workload: fail_at_step={fail_at} reached (testing aid)"
                    )
                if crash_at is not None and step == crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                x = torch.randn(batch_size, INPUT_DIM, generator=data_gen)
                y = teacher(x) + noise * torch.randn(batch_size, 1, generator=data_gen)
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                telemetry.log(loss=loss)
                action = guard.after_step() if guard is not None else None
                steps_taken = step + 1
                if not math.isfinite(float(loss.detach())) and action != "rollback":
                    diverged = True
                    evals.append(
                        {"step": step, "env_step": None, "perf": -math.inf, "val_loss": math.inf}
                    )
                    break
                if steps_taken % eval_every == 0 or steps_taken == total_steps:
                    evaluate(step)
        finally:
            telemetry.close(read_back=False)
        return finish_run(
            writer,
            evals,
            [
                *(schedule.events() if schedule is not None else []),
                *(guard.events() if guard is not None else []),
            ],
            extra_eval_column="val_loss",
            diverged=diverged,
            steps=steps_taken,
            env_steps=None,
        )


register_workload("toy", ToyWorkload)
