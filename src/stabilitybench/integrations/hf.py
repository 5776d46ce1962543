"""Hugging Face `Trainer` callback: stability telemetry for any model trained with `Trainer`.

Usage::

    from transformers import Trainer
    from stabilitybench.integrations.hf import StabilityTrainerCallback

    callback = StabilityTrainerCallback()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    table = callback.telemetry.rows()  # one row per optimizer step, with the training loss

The telemetry hooks the torch optimizer inside the Trainer's wrapper (accelerate's
`AcceleratedOptimizer`). The training loss is read from the model's output (`outputs.loss`) on
each training forward pass and logged once per optimizer step; with a `compute_loss_func` or
label smoothing the model returns no loss, and the rows have no `loss` column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations._adapter import (
    OnlineMonitor,
    PerturbationHook,
    TelemetryAdapter,
    capture_accelerate_clip_grad_norm,
    unwrap_optimizer,
)
from stabilitybench.telemetry import Sink, Telemetry
from stabilitybench.telemetry.probes import ProbeSpec
from stabilitybench.types import Schedule


class StabilityTrainerCallback(TrainerCallback):
    """Records stability telemetry while a `transformers.Trainer` trains; a thin adapter.

    `probes`, `every`, `sink` and `total_steps` (default: the Trainer's `max_steps`) go to
    `Telemetry`. `schedule` (a `PerturbationSchedule` of optimizer/parametric/signal
    perturbations) is attached to the telemetry. `monitor` (any object with `.step(row) -> float`)
    scores each finished row; the score is stored in the row as `msd`. The telemetry is created
    when training begins and closed when it ends; `telemetry.rows()` stays readable.
    `guard` (e.g. {"detector": "zclip", "action": "rollback"}; see `GuardConfig`) acts on the
    detector's alarms after each optimizer step (`on_step_end`): skip, LR cut (the Trainer's LR
    scheduler keeps owning the LR) or rollback of the model, the optimizer state and the RNGs;
    the Trainer's data loader goes on with the next batches. `guard_events()` lists them.
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
        self._adapter = TelemetryAdapter(
            "the Hugging Face Trainer callback",
            probes,
            every,
            sink,
            schedule,
            monitor,
            total_steps,
            guard,
        )
        self._forward_hook: Any = None
        self._release_clip: Any = None

    @property
    def telemetry(self) -> Telemetry:
        """The Telemetry this callback drives (exists once training has begun)."""
        if self._adapter.telemetry is None:
            raise StabilityBenchError(
                "StabilityTrainerCallback.telemetry: not attached yet; pass the callback to "
                "Trainer(..., callbacks=[callback]) and call trainer.train() first"
            )
        return self._adapter.telemetry

    def events(self) -> list[dict[str, Any]]:
        """The perturbation windows applied so far (events.parquet rows)."""
        return self._adapter.events()

    def guard_events(self) -> list[dict[str, Any]]:
        """The guard's interventions so far (events.parquet rows, `kind: guard`)."""
        return self._adapter.guard_events()

    # ---- Trainer events -------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start(state, **kwargs)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start(state, **kwargs)  # the optimizer may only exist now (DeepSpeed, custom loops)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start(state, **kwargs)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._adapter.log_step_loss()
        self._adapter.after_step()  # the guard acts before the next forward pass

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._adapter.log_step_loss()
        self._remove_forward_hook()
        if self._release_clip is not None:
            self._release_clip()
            self._release_clip = None
        self._adapter.close()
        self._active = False

    # ---- internals ------------------------------------------------------------------------------
    _active = False

    def _start(
        self, state: TrainerState, model: Any = None, optimizer: Any = None, **_: Any
    ) -> None:
        """Create the telemetry once per `train()` call, as soon as the optimizer exists (the
        Trainer passes its `model` and `optimizer` to every event; None until it has one)."""
        if self._active or optimizer is None:
            return
        total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        telemetry = self._adapter.start(model, unwrap_optimizer(optimizer), total)
        if self._release_clip is not None:
            self._release_clip()
        # The Trainer clips (or, with max_grad_norm 0, measures) through
        # Accelerator.clip_grad_norm_: its return value is the pre-clip norm.
        self._release_clip = capture_accelerate_clip_grad_norm(telemetry)
        if isinstance(model, torch.nn.Module):
            self._remove_forward_hook()
            self._forward_hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._active = True

    def _on_forward(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation and prediction passes
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None:
            # With `num_items_in_batch` the model divides by the whole accumulated batch: sum.
            self._adapter.add_loss(loss, already_divided="num_items_in_batch" in kwargs)

    def _remove_forward_hook(self) -> None:
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
