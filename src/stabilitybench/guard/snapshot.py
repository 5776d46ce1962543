"""Snapshots of a training state: parameters (and buffers), optimizer state, RNG.

Two kinds, for two actions:
- `StepUndo` (skip): the state just before this step's update, copied into buffers that are
  allocated once and reused, on the parameters' own device (one `copy_` per tensor per step, no
  allocation after the first step, no host transfer).
- `Snapshot` (rollback): a CPU copy of the model's `state_dict()` (parameters and buffers), every
  optimizer's per-parameter state and the RNG states (torch CPU, CUDA if used, Python, NumPy).
  Hyper-parameters in `param_groups` (the learning rate) are NOT restored: LR schedulers and
  perturbation schedules own them, and time goes on.
- `ProbeHistory` (rollback): the state telemetry probes carry from step to step (the gradient
  coherence's previous gradient and EMA, the edge-of-stability probe's previous gradient and
  parameters), so that after a rollback they compare new gradients with those of the restored
  timeline, not with the thrown-away steps' (which made a restored run look abnormally coherent).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

State = dict[str, Any]  # one parameter's optimizer state: tensors and plain values


def _copy_value(value: Any, into: Any, device: torch.device | None) -> Any:
    """`value` copied (a tensor into `into` when shapes match, else a fresh clone)."""
    if not isinstance(value, torch.Tensor):
        return value
    if (
        isinstance(into, torch.Tensor)
        and into.shape == value.shape
        and into.dtype == value.dtype
        and (device is None or into.device == device)
    ):
        return into.copy_(value)
    target = value.device if device is None else device
    return value.detach().to(target, copy=True)


def _optimizer_states(optimizers: Sequence[torch.optim.Optimizer]) -> list[State | None]:
    """Per parameter of every optimizer (in group order): its state dict, None if not created."""
    out: list[State | None] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                out.append(state if state else None)
    return out


def _params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"]]


def _capture_states(
    states: Iterable[State | None], previous: list[State | None] | None, device: torch.device | None
) -> list[State | None]:
    out: list[State | None] = []
    old = previous or []
    for i, state in enumerate(states):
        if state is None:
            out.append(None)
            continue
        into = old[i] if i < len(old) and old[i] is not None else {}
        assert into is not None
        out.append({k: _copy_value(v, into.get(k), device) for k, v in state.items()})
    return out


def _restore_states(
    optimizers: Sequence[torch.optim.Optimizer], saved: Sequence[State | None]
) -> None:
    i = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = saved[i]
                i += 1
                if state is None:
                    optimizer.state.pop(p, None)  # created by the undone step: forget it
                    continue
                current = optimizer.state.setdefault(p, {})
                for key, value in state.items():
                    now = current.get(key)
                    if isinstance(value, torch.Tensor):
                        if isinstance(now, torch.Tensor) and now.shape == value.shape:
                            now.copy_(value)  # in place: keeps the optimizer's own tensor
                        else:
                            current[key] = value.to(
                                p.device if value.dim() else value.device, copy=True
                            )
                    else:
                        current[key] = value
                for key in [k for k in current if k not in state]:
                    del current[key]


@dataclass
class StepUndo:
    """The state before the current step's update, on the device, in reused buffers."""

    optimizers: Sequence[torch.optim.Optimizer]
    model: torch.nn.Module | None = None  # its buffers and untrained tensors (target networks)
    params: list[torch.Tensor] = field(default_factory=list)
    states: list[State | None] = field(default_factory=list)
    step: int = -1

    def _live(self) -> list[torch.Tensor]:
        """The optimizers' parameters, then the model's other state tensors (buffers, target
        networks that a Polyak update changes within the step)."""
        params = [p.detach() for p in _params(self.optimizers)]
        if self.model is None:
            return params
        seen = {t.data_ptr() for t in params}
        others = []
        for tensor in self.model.state_dict().values():
            if tensor.is_floating_point() and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                others.append(tensor)
        return params + others

    @torch.no_grad()
    def capture(self, step: int) -> None:
        """Copy every parameter, model buffer and optimizer state tensor (one `copy_` each,
        same device)."""
        live = self._live()
        if len(self.params) != len(live):
            self.params = [p.clone() for p in live]
        else:
            torch._foreach_copy_(self.params, live)
        self.states = _capture_states(_optimizer_states(self.optimizers), self.states, None)
        self.step = step

    @torch.no_grad()
    def restore(self) -> None:
        """Put the captured state back (parameters in place, optimizer state per parameter)."""
        torch._foreach_copy_(self._live(), self.params)
        _restore_states(self.optimizers, self.states)

    def nbytes(self) -> int:
        return _nbytes(self.params) + sum(_nbytes(s.values()) for s in self.states if s)


@dataclass
class Snapshot:
    """A CPU copy of everything a rollback restores, taken before optimizer step `step`."""

    step: int
    model: dict[str, torch.Tensor] | None
    params: list[torch.Tensor]
    states: list[State | None]
    rng: dict[str, Any]
    extra: Any = None  # e.g. the detector's online state at that step

    @classmethod
    @torch.no_grad()
    def take(
        cls,
        step: int,
        model: torch.nn.Module | None,
        optimizers: Sequence[torch.optim.Optimizer],
        extra: Any = None,
    ) -> Snapshot:
        cpu = torch.device("cpu")
        # A copy of every tensor to host memory (a device→host transfer on an accelerator).
        model_state = (
            {k: v.detach().to(cpu, copy=True) for k, v in model.state_dict().items()}
            if model is not None
            else None
        )
        # Parameters an optimizer steps that the model does not hold (all of them without a
        # model; SAC's entropy coefficient beside the policy).
        params = [p.detach().to(cpu, copy=True) for p in _outside(model, optimizers)]
        states = _capture_states(_optimizer_states(optimizers), None, cpu)
        return cls(step, model_state, params, states, rng_state(), extra)

    @torch.no_grad()
    def restore(
        self, model: torch.nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]
    ) -> None:
        if model is not None and self.model is not None:
            model.load_state_dict(self.model)  # copies into the live tensors, any device
        for live, saved in zip(_outside(model, optimizers), self.params, strict=True):
            live.data.copy_(saved)
        _restore_states(optimizers, self.states)
        set_rng_state(self.rng)

    def nbytes(self) -> int:
        tensors = [*(self.model.values() if self.model is not None else ()), *self.params]
        return _nbytes(tensors) + sum(_nbytes(s.values()) for s in self.states if s)


def _outside(
    model: torch.nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]
) -> list[torch.nn.Parameter]:
    """The optimizers' parameters that `model.state_dict()` does not cover, in group order."""
    inside = {id(t) for t in model.parameters()} if model is not None else set()
    return [p for p in _params(optimizers) if id(p) not in inside]


def rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device in use), Python and NumPy global RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _nbytes(values: Iterable[Any]) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


# Probe attributes that hold earlier steps' values (GradCoherence: `_state`, `_valid`;
# EdgeOfStability: `_prev_grads`, `_prev_params`, `_prev_lr`). Probes have no public way to save
# and restore their history yet; these names are the contract until they do.
PROBE_HISTORY = ("_state", "_valid", "_prev_grads", "_prev_params", "_prev_lr")


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.detach().to("cpu", copy=True), value.device)
    if isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
        return [(v.detach().to("cpu", copy=True), v.device) for v in value]
    return value


def _to_device(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        return value[0].to(value[1], copy=True)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


@dataclass
class ProbeHistory:
    """CPU copies of every probe's step-to-step state (see `PROBE_HISTORY`)."""

    states: list[dict[str, Any]]

    @classmethod
    @torch.no_grad()
    def take(cls, probes: Sequence[Any]) -> ProbeHistory:
        return cls(
            [{n: _to_host(getattr(p, n)) for n in PROBE_HISTORY if hasattr(p, n)} for p in probes]
        )

    @torch.no_grad()
    def restore(self, probes: Sequence[Any]) -> None:
        """Put the saved state back (fresh device copies: the snapshot can be restored again)."""
        for probe, state in zip(probes, self.states, strict=True):
            for name, value in state.items():
                setattr(probe, name, _to_device(value))

    def nbytes(self) -> int:
        total = 0
        for state in self.states:
            for value in state.values():
                items = value if isinstance(value, list) else [value]
                total += _nbytes(v[0] for v in items if isinstance(v, tuple))
        return total
