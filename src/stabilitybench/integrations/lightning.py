"""Lightning callback: stability telemetry for any `LightningModule` trained with `Trainer.fit`.

Usage::

    import lightning.pytorch as pl
    from stabilitybench.integrations.lightning import StabilityLightningCallback

    callback = StabilityLightningCallback()
    pl.Trainer(max_steps=1000, callbacks=[callback]).fit(module, data)
    table = callback.telemetry.rows()  # one row per optimizer step, with the training loss

Lightning runs the forward and backward pass *inside* `optimizer.step(closure)`. So that the
telemetry sees this step's gradients (not the previous step's), the callback adds a step
pre-hook that runs the closure first and hands the optimizer a closure returning its result.
With several optimizers (manual optimization) they are instrumented as `optimizer_0`, … and the
first one is the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations._adapter import (
    OnlineMonitor,
    PerturbationHook,
    TelemetryAdapter,
    log_grad_norm_before_step,
    unwrap_optimizer,
)
from stabilitybench.telemetry import Sink, Telemetry
from stabilitybench.telemetry.probes import ProbeSpec
from stabilitybench.types import Schedule


def _run_closure_first(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Step pre-hook: evaluate `closure` now, so later pre-hooks see this step's gradients."""
    # `args` is (optimizer, closure?) as passed to `Optimizer.step`.
    if len(args) > 1:
        closure, head, tail = args[1], args[:1], args[2:]
    else:
        closure, head, tail = kwargs.get("closure"), args, ()
    if closure is None:
        return None
    with torch.enable_grad():
        result = closure()
    new_kwargs = {k: v for k, v in kwargs.items() if k != "closure"}
    new_kwargs["closure"] = lambda: result
    return (*head, *tail), new_kwargs


class StabilityLightningCallback(pl.Callback):
    """Records stability telemetry while a Lightning `Trainer` fits; a thin adapter over Telemetry.

    `probes`, `every`, `sink` and `total_steps` (default: the Trainer's `max_steps`, else its
    estimated number of optimizer steps) go to `Telemetry`. `schedule` (a `PerturbationSchedule`
    of optimizer/parametric/signal perturbations) is attached to the telemetry. `monitor` (any
    object with `.step(row) -> float`) scores each finished row; the score is stored as `msd`.
    The loss is what `training_step` returns (a tensor, or the `loss` of a dict); with gradient
    accumulation, the row holds the mean over the accumulated batches. `guard` (e.g.
    {"detector": "zclip", "action": "rollback"}; see `GuardConfig`) acts on the detector's alarms
    after each optimizer step (`on_train_batch_end`): skip, LR cut or rollback of the module,
    every optimizer's state and the RNGs; the data loader goes on. `guard_events()` lists them.
    """

    def __init__(
        self,
        probes: ProbeSpec = "cheap",
        every: int | Schedule = 1,
        sink: Sink | Iterable[Sink] | None = None,
        *,
        schedule: PerturbationHook | None = None,
        monitor: OnlineMonitor | None = None,
        total_steps: int | None = None,
        guard: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._adapter = TelemetryAdapter(
            "the Lightning callback", probes, every, sink, schedule, monitor, total_steps, guard
        )
        self._closure_hooks: list[Any] = []
        self._last_logged_step = -1

    @property
    def telemetry(self) -> Telemetry:
        """The Telemetry this callback drives (exists once training has started)."""
        if self._adapter.telemetry is None:
            raise StabilityBenchError(
                "StabilityLightningCallback.telemetry: not attached yet; pass the callback to "
                "pl.Trainer(callbacks=[callback]) and call trainer.fit(...) first"
            )
        return self._adapter.telemetry

    def events(self) -> list[dict[str, Any]]:
        """The perturbation windows applied so far (events.parquet rows)."""
        return self._adapter.events()

    def guard_events(self) -> list[dict[str, Any]]:
        """The guard's interventions so far (events.parquet rows, `kind: guard`)."""
        return self._adapter.guard_events()

    # ---- Lightning hooks ------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [unwrap_optimizer(opt) for opt in trainer.optimizers]
        if not optimizers:
            raise StabilityBenchError(
                "StabilityLightningCallback: the LightningModule configured no optimizer"
            )
        self._remove_closure_hooks()
        for opt in optimizers:  # registered before the telemetry's hooks, so they run first
            self._closure_hooks.append(opt.register_step_pre_hook(_run_closure_first))
        instrumented: torch.optim.Optimizer | dict[str, torch.optim.Optimizer] = (
            optimizers[0]
            if len(optimizers) == 1
            else {f"optimizer_{i}": opt for i, opt in enumerate(optimizers)}
        )
        self._adapter.start(pl_module, instrumented, _total_steps(trainer))
        self._last_logged_step = -1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Automatic optimization divides each batch's loss by accumulate_grad_batches: sum.
            self._adapter.add_loss(loss, already_divided=pl_module.automatic_optimization)
        telemetry = self._adapter.telemetry
        # With gradient accumulation, only the window's last batch steps the optimizer.
        if telemetry is not None and telemetry.step > self._last_logged_step:
            self._adapter.log_step_loss()
            self._last_logged_step = telemetry.step
            self._adapter.after_step()  # the guard acts before the next forward pass

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Lightning calls this before it clips: the gradients are still the raw ones.
        telemetry = self._adapter.telemetry
        if telemetry is not None:
            log_grad_norm_before_step(telemetry, unwrap_optimizer(optimizer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._finish()

    # ---- internals ------------------------------------------------------------------------------
    def _finish(self) -> None:
        self._remove_closure_hooks()
        self._adapter.close()

    def _remove_closure_hooks(self) -> None:
        for handle in self._closure_hooks:
            handle.remove()
        self._closure_hooks = []


def _total_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if estimated != float("inf") else None
