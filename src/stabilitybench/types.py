"""Small types shared across the package: step context, schedules, run status."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class RunStatus(StrEnum):
    """Life cycle of one run in an audit."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Phase(StrEnum):
    """Where in the optimizer step a hook fires."""

    PRE_STEP = "pre_step"  # after backward, before optimizer.step()
    POST_STEP = "post_step"  # after optimizer.step()


class Schedule(Protocol):
    """Decides on which optimizer steps something happens."""

    def __call__(self, step: int) -> bool: ...


@dataclass(frozen=True)
class Every:
    """Every `n` optimizer steps, starting at `offset`."""

    n: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            from stabilitybench.errors import StabilityBenchError

            raise StabilityBenchError(f"every: n must be >= 1, got {self.n}")

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0


@dataclass(frozen=True)
class LogSpaced:
    """About `per_decade` steps per factor of ten in step count: dense early, sparse late."""

    per_decade: int = 10

    def __call__(self, step: int) -> bool:
        if step == 0:
            return True
        k = self.per_decade
        return math.floor(k * math.log10(step + 1)) > math.floor(k * math.log10(step))


def as_schedule(value: int | Schedule) -> Schedule:
    """An int n means `Every(n)`; a schedule is used as given."""
    if isinstance(value, int):
        return Every(value)
    return value


@dataclass
class StepContext:
    """What a probe or a perturbation may look at during one optimizer step.

    Flat views of gradients and parameters are computed at most once per step and shared by every
    probe that asks for them (each is a copy of every gradient/parameter: that is the cost).
    """

    step: int
    phase: Phase
    model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    params: Sequence[torch.Tensor]  # trainable parameters, in a fixed order
    param_names: Sequence[str]
    env_step: int | None = None
    total_steps: int | None = None
    role: str = ""  # which optimizer, when several are instrumented ("actor", "critic")
    scalars: dict[str, float] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute a per-step shared quantity once (e.g. the flat gradient)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def grads(self) -> list[torch.Tensor]:
        """One gradient per trainable parameter; a zero tensor where `.grad` is None."""
        import torch

        def compute() -> list[torch.Tensor]:
            return [
                p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params
            ]

        out: list[torch.Tensor] = self.cached("grads", compute)
        return out

    def grad_flat(self) -> torch.Tensor:
        """All gradients as one float32 vector (a copy of every gradient)."""
        import torch

        out: torch.Tensor = self.cached(
            "grad_flat", lambda: torch.cat([g.reshape(-1).float() for g in self.grads()])
        )
        return out

    def param_flat(self) -> torch.Tensor:
        """All trainable parameters as one float32 vector (a copy of every parameter)."""
        import torch

        out: torch.Tensor = self.cached(
            "param_flat",
            lambda: torch.cat([p.detach().reshape(-1).float() for p in self.params]),
        )
        return out

    def named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.param_names, self.params, strict=True)
