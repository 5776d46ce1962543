"""The Workload protocol: something that trains a model for one RunSpec and writes its run folder."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from stabilitybench.registry import Registry
from stabilitybench.store import RunWriter
from stabilitybench.types import RunSpec

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
