"""The Workload protocol: something that trains a model for one RunSpec and writes its run folder."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, SupportsFloat

from stabilitybench.registry import Registry
from stabilitybench.store import RunWriter
from stabilitybench.types import RunSpec

if TYPE_CHECKING:
    from stabilitybench.guard.core import Guard
    from stabilitybench.perturbations.schedule import PerturbationSchedule

RunOutcome = dict[str, Any]
"""What `Workload.run` returns, stored as run.json's `outcome`: at least `final_perf` (mean perf of
the last 3 evaluations, may be -inf), `diverged` (bool: a non-finite loss was seen), `steps`
(optimizer steps taken) and, for RL, `env_steps`."""


class Workload(Protocol):
    """Trains one run. Creates model, optimizer, Telemetry (with `writer` as a sink) and the
    perturbation schedule; writes telemetry, evals and events tables through `writer`."""

    kind: str

    def validate(self, spec: RunSpec) -> None:
        """Raise StabilityBenchError if the spec cannot run here (before any training starts)."""
        ...

    def run(self, spec: RunSpec, writer: RunWriter) -> RunOutcome: ...


WorkloadFactory = Callable[[dict[str, Any]], Workload]
REGISTRY: Registry[WorkloadFactory] = Registry(
    "kind",
    {
        "rl": "stabilitybench.workloads.rl",
        "lm": "stabilitybench.workloads.lm",
        "toy": "stabilitybench.workloads.toy",
    },
)


def register_workload(kind: str, factory: WorkloadFactory) -> None:
    """Make a workload kind available to audit specs (`kind: <name>`)."""
    REGISTRY.register(kind, factory)


def workload_kinds() -> list[str]:
    return REGISTRY.names()


def build_workload(config: dict[str, Any]) -> Workload:
    """Build the workload for a resolved workload config (the `workload` field of a RunSpec)."""
    factory = REGISTRY.get(config.get("kind"), where=f"workload {config.get('name', '?')!r}")
    return factory(config)


def finish_run(
    writer: RunWriter,
    evals: list[dict[str, Any]],
    events: Sequence[Mapping[str, Any]],
    *,
    extra_eval_column: str,
    diverged: bool,
    steps: int,
    env_steps: int | None,
) -> RunOutcome:
    """Write a run's `evals` and `events` tables and return its outcome (shared by workloads).

    `evals` rows are dicts with `step`, `env_step`, `perf` and `extra_eval_column`
    (`val_loss` for LM/toy, `return_std` for RL); final performance is the mean perf of the last
    three evaluations, or −inf for a diverged run.
    """
    import pandas as pd

    frame = pd.DataFrame(evals, columns=["step", "env_step", "perf", extra_eval_column])
    frame["step"] = frame["step"].astype("int64")
    frame["env_step"] = frame["env_step"].astype("Int64")
    writer.write_table("evals", frame)
    writer.write_events(events)
    last = [e["perf"] for e in evals[-3:]]
    final_perf = -math.inf if diverged or not last else sum(last) / len(last)
    return {"final_perf": final_perf, "diverged": diverged, "steps": steps, "env_steps": env_steps}


def val_loss_row(step: int, val_loss: float) -> dict[str, Any]:
    """An `evals` row of a workload judged by validation loss (perf = −loss; −inf if not finite)."""
    perf = -val_loss if math.isfinite(val_loss) else -math.inf
    return {"step": step, "env_step": None, "perf": perf, "val_loss": val_loss}


class LoopResult(NamedTuple):
    """What `train_and_validate` leaves for `finish_run`."""

    evals: list[dict[str, Any]]  # `val_loss_row`s, the first before any training
    diverged: bool
    steps: int  # optimizer steps taken


def train_and_validate(
    total_steps: int,
    eval_every: int,
    train_step: Callable[[int], SupportsFloat],
    validation_loss: Callable[[], float],
    guard: Guard | None,
    *,
    stop_on_nonfinite_validation: bool,
    writer: RunWriter | None = None,
) -> LoopResult:
    """The optimizer-step loop of a workload judged by validation loss (toy, LM).

    Evaluates once before training, then calls `train_step(step)` (one optimizer step, its
    telemetry logged; returns the training loss) and the guard after each step, and evaluates
    every `eval_every` steps and after the last. A non-finite training loss that the guard did
    not roll back ends the run as diverged (an evaluation row with perf −inf at that step); so
    does a non-finite validation loss when `stop_on_nonfinite_validation`. With a `writer`, the
    guard's interventions are streamed to the run's events as the host learns of them (`watch`).
    """
    evals = [val_loss_row(0, validation_loss())]
    streamed = 0
    for step in range(total_steps):
        loss = train_step(step)
        action = guard.after_step() if guard is not None else None
        if guard is not None and writer is not None and len(guard.interventions) > streamed:
            writer.stream_events([i.event() for i in guard.interventions[streamed:]])
            streamed = len(guard.interventions)
        if not math.isfinite(float(loss)) and action != "rollback":  # a host sync
            evals.append(val_loss_row(step, math.inf))
            return LoopResult(evals, True, step + 1)
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            val_loss = validation_loss()
            evals.append(val_loss_row(step, val_loss))
            if stop_on_nonfinite_validation and not math.isfinite(val_loss):
                return LoopResult(evals, True, step + 1)
    return LoopResult(evals, False, total_steps)


def finish_validated_run(
    writer: RunWriter,
    result: LoopResult,
    schedule: PerturbationSchedule | None,
    guard: Guard | None,
) -> RunOutcome:
    """`finish_run` after `train_and_validate`: its evaluations, then as events the
    perturbations' windows and the guard's interventions."""
    return finish_run(
        writer,
        result.evals,
        [
            *(schedule.events() if schedule is not None else []),
            *(guard.events() if guard is not None else []),
        ],
        extra_eval_column="val_loss",
        diverged=result.diverged,
        steps=result.steps,
        env_steps=None,
    )
