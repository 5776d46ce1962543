"""What the Hugging Face and Lightning callbacks share: a lazily built Telemetry with its extras."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry import Sink, Telemetry
from stabilitybench.telemetry.probes import ProbeSpec
from stabilitybench.types import Schedule


class OnlineMonitor(Protocol):
    """Anything that turns a finished telemetry row into a deviation score (a fitted monitor)."""

    def step(self, row: Mapping[str, Any]) -> float: ...


class PerturbationHook(Protocol):
    """The part of a `PerturbationSchedule` a callback uses."""

    def validate(self, adapters: set[str], where: str) -> None: ...

    def attach(self, telemetry: Telemetry) -> None: ...

    def events(self) -> list[dict[str, Any]]: ...


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework wrapper (accelerate's AcceleratedOptimizer, say)."""
    # Wrappers keep the real optimizer in `.optimizer` (and may subclass Optimizer themselves).
    found, inner = None, optimizer
    for _ in range(8):
        if isinstance(inner, torch.optim.Optimizer):
            found = inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
    if found is not None and hasattr(found, "_optimizer_step_pre_hooks"):
        return found
    raise StabilityBenchError(
        f"cannot find a torch.optim.Optimizer inside {type(optimizer).__name__}; "
        "telemetry needs a torch optimizer to hook"
    )


class TelemetryAdapter:
    """Builds the Telemetry when training begins, attaches a schedule and a monitor, logs losses.

    Training losses are collected per forward/backward pass and logged once per optimizer step
    (their mean, or their sum when the framework already divided each by the accumulated batch).
    """

    def __init__(
        self,
        where: str,
        probes: ProbeSpec,
        every: int | Schedule,
        sink: Sink | Iterable[Sink] | None,
        schedule: PerturbationHook | None,
        monitor: OnlineMonitor | None,
        total_steps: int | None,
    ) -> None:
        self.where = where
        self.probes, self.every, self.sink = probes, every, sink
        self.schedule, self.monitor = schedule, monitor
        self.total_steps = total_steps
        self.telemetry: Telemetry | None = None
        self._losses: list[torch.Tensor] = []
        self._sum_losses = False

    @property
    def started(self) -> bool:
        return self.telemetry is not None

    def start(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
        total_steps: int | None,
    ) -> Telemetry:
        """Create the Telemetry on the framework's model and (unwrapped) optimizer(s)."""
        if self.telemetry is not None:
            self.telemetry.close()
        if self.schedule is not None:
            # Batch and environment perturbations need the workload's data path, not a callback.
            self.schedule.validate(set(), where=self.where)
        telemetry = Telemetry(
            model,
            optimizer,
            probes=self.probes,
            every=self.every,
            sink=self.sink,
            total_steps=self.total_steps if self.total_steps is not None else total_steps,
        )
        if self.schedule is not None:
            self.schedule.attach(telemetry)
        if self.monitor is not None:
            telemetry.on_row(self._score_row)
        self.telemetry = telemetry
        self._losses = []
        return telemetry

    def add_loss(self, loss: Any, *, already_divided: bool = False) -> None:
        """Keep one forward pass's training loss until the optimizer step it belongs to."""
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().reshape(-1).mean())
        elif isinstance(loss, int | float):
            self._losses.append(torch.tensor(float(loss)))
        self._sum_losses = already_divided

    def log_step_loss(self) -> None:
        """Log the losses seen since the last optimizer step into that step's row."""
        if self.telemetry is None or not self._losses:
            return
        device = self._losses[0].device
        stacked = torch.stack([loss.to(device) for loss in self._losses])
        value = stacked.sum() if self._sum_losses else stacked.mean()
        self._losses = []
        self.telemetry.log(loss=value)  # one host sync per optimizer step

    def close(self) -> None:
        """Remove the telemetry's hooks and finish its sinks (its rows stay readable)."""
        if self.telemetry is not None:
            self.telemetry.close()

    def events(self) -> list[dict[str, Any]]:
        """The perturbation windows applied so far (events.parquet rows)."""
        return self.schedule.events() if self.schedule is not None else []

    def _score_row(self, row: dict[str, Any]) -> None:
        assert self.monitor is not None
        row["msd"] = float(self.monitor.step(row))
