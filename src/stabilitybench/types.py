"""Small types shared across the package: step context, schedules, run status."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from stabilitybench.settings import CollapseSettings

if TYPE_CHECKING:
    import torch


UNKNOWN_ERROR = "unknown error"


def last_error_line(text: object) -> str:
    """The line of a stored error (a traceback) that says what went wrong: its last non-empty one."""
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else UNKNOWN_ERROR


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


PARAM_NORM = "param_norm"
"""`StepContext.cached` key of ‖θ‖ before the update: the update_norm probe stores the norm it
computes at pre-step, and the device guard reads it there instead of computing it again."""


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
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

        out: list[torch.Tensor] = self.cached("grads", compute)
        return out

    def grad_flat(self) -> torch.Tensor:
        """All gradients as one float32 vector (a copy of every gradient)."""
        import torch

        def compute() -> torch.Tensor:
            return torch.cat([g.reshape(-1) for g in self.grads()]).float()

        out: torch.Tensor = self.cached("grad_flat", compute)
        return out

    def grad_norms(self) -> torch.Tensor:
        """Norm of each parameter's gradient, shape (n_params,), accumulated in float64."""
        from stabilitybench.telemetry.reductions import tensor_norms

        out: torch.Tensor = self.cached("grad_norms", lambda: tensor_norms(self.grads()))
        return out

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient (0-d, float64)."""
        import torch

        out: torch.Tensor = self.cached(
            "grad_norm", lambda: torch.linalg.vector_norm(self.grad_norms())
        )
        return out

    def grads_finite(self) -> bool:
        """Whether every gradient entry is finite (reads one scalar: a host sync on GPU; the
        built-in probes use `grad_finite()` instead)."""
        out: bool = self.cached("grads_finite", lambda: bool(self.grad_finite()))
        return out

    def grad_finite(self) -> torch.Tensor:
        """0-d bool tensor on the device: every gradient entry is finite (no host sync)."""
        out: torch.Tensor = self.cached("grad_finite", lambda: self.grad_norm().isfinite())
        return out

    def nonfinite_grad_count(self) -> torch.Tensor:
        """0-d tensor: how many gradient entries are NaN or ±inf (two passes over the flat
        gradient; no host sync)."""
        import torch

        def compute() -> torch.Tensor:
            # g·0 is 0 where g is finite and NaN where it is not; NaN counts as non-zero.
            return torch.count_nonzero(self.grad_flat() * 0.0)

        out: torch.Tensor = self.cached("nonfinite_grad_count", compute)
        return out

    def param_flat(self) -> torch.Tensor:
        """All trainable parameters as one float32 vector (a copy of every parameter)."""
        import torch

        def compute() -> torch.Tensor:
            return torch.cat([p.detach().reshape(-1) for p in self.params]).float()

        out: torch.Tensor = self.cached("param_flat", compute)
        return out

    def named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.param_names, self.params, strict=True)


@dataclass(frozen=True)
class RunSpec:
    """One run of an audit: a workload with every knob fixed, its perturbations, and a seed.

    `workload` is the workload's resolved config (`name`, `kind`, kind-specific fields such as
    `algo`/`env` or `size`/`corpus`, `total_steps`, `eval`, and `knobs` with one value each).
    `perturbations` is empty for a baseline run; otherwise each item is a perturbation config
    such as {"kind": "lr_spike", "at": 0.3, "factor": 10, "duration": 10}.
    """

    workload: dict[str, Any]
    perturbations: tuple[dict[str, Any], ...] = ()
    seed: int = 0
    audit: str = ""
    collapse: dict[str, float] = field(default_factory=lambda: CollapseSettings().recorded())
    # The guard's config as the spec gave it ({"detector": ..., "action": ..., ...}); None:
    # unguarded (and then the run id is what it was before guards existed).
    guard: dict[str, Any] | None = None

    @property
    def run_id(self) -> str:
        """A stable hash of everything that defines the run (not the audit's name)."""
        import hashlib
        import json

        identity: dict[str, Any] = {
            "workload": self.workload,
            "perturbations": list(self.perturbations),
            "seed": self.seed,
        }
        if self.guard is not None:
            identity["guard"] = self.guard
        payload = json.dumps(
            identity,
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def perturbation_label(self) -> str:
        """`none`, or the perturbations as `kind(k=v,…)` joined by `+`."""
        if not self.perturbations:
            return "none"
        parts = []
        for p in self.perturbations:
            args = ",".join(f"{k}={v}" for k, v in p.items() if k != "kind")
            parts.append(f"{p['kind']}({args})")
        return "+".join(parts)

    @property
    def guard_label(self) -> str:
        """`none`, or `detector:action` plus the other settings given, e.g. `zclip:rollback(every=10)`."""
        return guard_label(self.guard)

    @property
    def label(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in sorted(self.workload.get("knobs", {}).items()))
        knob_part = f"[{knobs}]" if knobs else ""
        guard_part = f"/guard={self.guard_label}" if self.guard is not None else ""
        return (
            f"{self.workload.get('name', '?')}{knob_part}/{self.perturbation_label}"
            f"{guard_part}/seed{self.seed}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "workload": self.workload,
            "perturbations": list(self.perturbations),
            "seed": self.seed,
            "audit": self.audit,
            "collapse": dict(self.collapse),
        }
        if self.guard is not None:
            out["guard"] = dict(self.guard)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """The RunSpec of `to_dict()` (a missing field takes its default)."""
        given: dict[str, Any] = {
            "perturbations": [],
            "seed": 0,
            "audit": "",
            "collapse": None,
            "guard": None,
        }
        given.update(data)
        return cls(
            workload=dict(given["workload"]),
            perturbations=tuple(dict(p) for p in given["perturbations"]),
            seed=int(given["seed"]),
            audit=str(given["audit"]),
            collapse=dict(given["collapse"] or CollapseSettings().recorded()),
            guard=dict(given["guard"]) if given["guard"] else None,
        )


def guard_label(guard: Mapping[str, Any] | None) -> str:
    """How a run's guard is shown: `none`, or `detector:action(k=v,...)` (the monitor folder is
    left out: it is in run.json)."""
    if not guard:
        return "none"
    extra = ",".join(
        f"{k}={v}" for k, v in guard.items() if k not in ("detector", "action", "monitor")
    )
    return f"{guard.get('detector')}:{guard.get('action')}" + (f"({extra})" if extra else "")
