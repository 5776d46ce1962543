"""What the Hugging Face and Lightning callbacks share: a lazily built Telemetry with its extras."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry import Sink, Telemetry
from stabilitybench.telemetry.probes import ProbeSpec
from stabilitybench.telemetry.reductions import tensor_norms
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


# ---- the pre-clip gradient norm ------------------------------------------------------------------
# SB3 (PPO, A2C, DQN) clips with `torch.nn.utils.clip_grad_norm_`; the HF Trainer clips (or, with
# max_grad_norm 0, measures) with `accelerate.Accelerator.clip_grad_norm_`, which accelerate
# >= 1.16 no longer routes through torch's function (it calls `get_total_norm` and
# `clip_grads_with_norm_` itself). Both return the total norm BEFORE clipping; the optimizer's
# step hooks only ever see the clipped gradients. While a callback is active, the clipping
# function it names is wrapped (once, however many callbacks listen) and the value it returns is
# logged as `grad_norm_raw` of the optimizer that owns the parameters. The value stays a device
# tensor.

_ClipListener = tuple[frozenset[int], Callable[[torch.Tensor], None]]


class _ClipTarget:
    """One clipping function, `owner.name`, that returns the pre-clip total norm; `method` when
    it is an unbound method (its parameters come after `self`)."""

    def __init__(self, owner: Any, name: str, *, method: bool = False) -> None:
        self.owner, self.name, self.method = owner, name, method
        self.listeners: dict[int, _ClipListener] = {}
        self.original: Callable[..., Any] | None = None
        self._installed: Callable[..., Any] | None = None

    def _wrapper(self) -> Callable[..., Any]:
        def clip(*args: Any, **kwargs: Any) -> Any:
            assert self.original is not None
            at = 1 if self.method else 0
            given = list(args)
            parameters = given[at] if len(given) > at else kwargs.pop("parameters")
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            if len(given) > at:
                given[at] = params
            else:
                kwargs["parameters"] = params
            total = self.original(*given, **kwargs)
            trained = next((p for p in params if p.requires_grad), None)  # frozen: no optimizer
            if trained is not None and isinstance(total, torch.Tensor):
                first = id(trained)
                for ids, callback in list(self.listeners.values()):
                    if first in ids:
                        callback(total.detach())
            return total

        clip.__wrapped__ = self.original  # type: ignore[attr-defined]
        return clip

    def listen(self, telemetry: Telemetry) -> Callable[[], None]:
        keys = []
        for optimizer in telemetry.optimizers.values():
            ids = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])

            def log(total: torch.Tensor, optimizer: torch.optim.Optimizer = optimizer) -> None:
                telemetry.log_before_step(optimizer, grad_norm_raw=total)

            listener: _ClipListener = (ids, log)
            keys.append(id(listener))
            self.listeners[id(listener)] = listener
        if self.original is None:
            self.original = getattr(self.owner, self.name)
            self._installed = self._wrapper()
            setattr(self.owner, self.name, self._installed)

        def release() -> None:
            for key in keys:
                self.listeners.pop(key, None)
            keys.clear()
            if not self.listeners and self.original is not None:
                if getattr(self.owner, self.name) is self._installed:
                    setattr(self.owner, self.name, self.original)
                self.original = None

        return release


_torch_clip = _ClipTarget(torch.nn.utils, "clip_grad_norm_")
_accelerate_clip: _ClipTarget | None = None


def capture_clip_grad_norm(telemetry: Telemetry) -> Callable[[], None]:
    """Log what `torch.nn.utils.clip_grad_norm_` returns (the pre-clip total norm) as
    `grad_norm_raw` in the row of the optimizer step that follows; returns a function that stops
    listening (and unwraps torch's function when no one else listens)."""
    return _torch_clip.listen(telemetry)


def capture_accelerate_clip_grad_norm(telemetry: Telemetry) -> Callable[[], None]:
    """The same for `accelerate.Accelerator.clip_grad_norm_`, the HF Trainer's one way to clip
    and to measure the gradient norm."""
    global _accelerate_clip
    if _accelerate_clip is None:
        from accelerate import Accelerator

        _accelerate_clip = _ClipTarget(Accelerator, "clip_grad_norm_", method=True)
    return _accelerate_clip.listen(telemetry)


def log_grad_norm_before_step(telemetry: Telemetry, optimizer: torch.optim.Optimizer) -> None:
    """Log the norm of `optimizer`'s current gradients as `grad_norm_raw` of its next step (for
    frameworks with a hook between backward and clipping; no host sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads:
        with torch.no_grad():
            norm = torch.linalg.vector_norm(tensor_norms(grads))  # float64, as `grad_norm`
        telemetry.log_before_step(optimizer, grad_norm_raw=norm)


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
        guard: Mapping[str, Any] | None = None,
    ) -> None:
        from stabilitybench.guard.config import parse_guard

        self.where = where
        # Checked now (a bad guard is an error before training starts); built at `start`.
        self.guard_config = parse_guard(guard, where="guard") if guard is not None else None
        self.guard: Any = None  # stabilitybench.guard.Guard once started
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
        if self.guard_config is not None:  # after the schedule: the guard sees its LR
            from stabilitybench.guard.protection import guard_for_run

            self.guard = guard_for_run(self.guard_config.to_dict(), telemetry)
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
        self.telemetry.log(loss=value)  # stays on the device until the telemetry flushes

    def after_step(self) -> None:
        """Let the guard score the step just finished and act before the next forward pass
        (call after `log_step_loss`, once the optimizer has stepped)."""
        if self.guard is not None and self.telemetry is not None and self.telemetry.step >= 0:
            self.guard.after_step()

    def guard_events(self) -> list[dict[str, Any]]:
        """The guard's interventions so far (events.parquet rows, `kind: guard`)."""
        return self.guard.events() if self.guard is not None else []

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
