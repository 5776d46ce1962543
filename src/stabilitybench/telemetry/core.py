"""Telemetry: attach to a model and its optimizer(s) through step hooks; one row per optimizer step."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import pandas as pd
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.telemetry.base import Probe
from stabilitybench.telemetry.probes import (
    LossClosure,
    MicroBatches,
    ProbeOptions,
    ProbeSpec,
    resolve_probes,
)
from stabilitybench.types import Phase, Schedule, StepContext


class StepHook(Protocol):
    """Something that acts around each optimizer step (a perturbation schedule, say)."""

    def on_pre_step(self, ctx: StepContext) -> None: ...

    def on_post_step(self, ctx: StepContext) -> None: ...

    def row_fields(self, step: int) -> Mapping[str, Any]: ...


class Sink(Protocol):
    """Where finished rows go besides memory (Parquet via the run store, TensorBoard)."""

    def write_row(self, row: Mapping[str, Any]) -> None: ...

    def close(self, table: pd.DataFrame) -> None: ...


RowCallback = Callable[[dict[str, Any]], None]

_FIRST_COLUMNS = ("step", "env_step", "perturbed", "loss")


class _Instrumented:
    """One optimizer with its probes and hook handles."""

    def __init__(
        self,
        role: str,
        optimizer: torch.optim.Optimizer,
        names_by_id: Mapping[int, str],
        probes: list[Probe],
    ) -> None:
        self.role = role
        self.prefix = f"{role}/" if role else ""
        self.optimizer = optimizer
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.params = params
        self.param_names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
        self.probes = probes
        self.handles: list[Any] = []
        self.pre_ctx: StepContext | None = None


class Telemetry:
    """Records stability signals from any PyTorch training loop, one row per optimizer step.

    `optimizer` is one optimizer, or a mapping role → optimizer (e.g. {"critic": c, "actor": a});
    with a mapping, columns are prefixed `role/` and the first optimizer's steps are the clock.
    Values given to `log()` go to the row of the most recent optimizer step (call it after
    `optimizer.step()`); a value logged before the first step goes to step 0.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
        probes: ProbeSpec = "cheap",
        every: int | Schedule = 1,
        sink: Sink | Iterable[Sink] | None = None,
        *,
        closure: LossClosure | None = None,
        micro_batches: MicroBatches | None = None,
        micro_batch_size: int | None = None,
        scheduled_every: int | Schedule = 50,
        total_steps: int | None = None,
    ) -> None:
        optimizers = dict(optimizer) if isinstance(optimizer, Mapping) else {"": optimizer}
        if not optimizers:
            raise StabilityBenchError("Telemetry needs at least one optimizer")
        names_by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        options = ProbeOptions(every, closure, micro_batches, micro_batch_size, scheduled_every)
        base_probes = resolve_probes(probes, options)
        self._opts: list[_Instrumented] = []
        for i, (role, opt) in enumerate(optimizers.items()):
            role_probes = base_probes if i == 0 else [copy.deepcopy(p) for p in base_probes]
            inst = _Instrumented(role, opt, names_by_id, role_probes)
            if not inst.params:
                label = f"optimizer {role!r}" if role else "the optimizer"
                raise StabilityBenchError(
                    f"Telemetry: {label} has no trainable parameters "
                    "(every parameter has requires_grad=False or the param groups are empty)"
                )
            self._opts.append(inst)
        self.model = model
        self.total_steps = total_steps
        self.env_step: int | None = None
        self.step = -1  # index of the latest clock step (-1: none yet)
        self._rows: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._pending: dict[str, Any] = {}
        self._hooks: list[StepHook] = []
        self._row_callbacks: list[RowCallback] = []
        self._sinks: list[Sink] = _as_sinks(sink)
        self._closed = False
        for inst in self._opts:
            self._attach(inst, clock=inst is self._opts[0])

    # ---- public API -------------------------------------------------------------------------
    @property
    def probes(self) -> list[Probe]:
        return list(self._opts[0].probes)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {inst.role: inst.optimizer for inst in self._opts}

    def log(self, **scalars: float | int | torch.Tensor) -> None:
        """Add user scalars (loss, return, …) to the current step's row."""
        values = {k: _to_float(v) for k, v in scalars.items()}
        if self._open is None:
            self._pending.update(values)
        else:
            self._open.update(values)

    def add_hook(self, hook: StepHook) -> None:
        """Run `hook` around every optimizer step (perturbation schedules use this)."""
        self._hooks.append(hook)

    def on_row(self, callback: RowCallback) -> None:
        """Call `callback(row)` each time a step's row is complete (an online monitor, say)."""
        self._row_callbacks.append(callback)

    def rows(self) -> pd.DataFrame:
        """Every recorded step as a DataFrame, one row per optimizer step."""
        rows = self._rows + ([self._open] if self._open is not None else [])
        if not rows:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        df = pd.DataFrame.from_records(rows)
        first = [c for c in _FIRST_COLUMNS if c in df.columns]
        df = df[first + [c for c in df.columns if c not in first]]
        if "env_step" in df.columns and df["env_step"].notna().all():
            df["env_step"] = df["env_step"].astype("int64")
        return df

    def flush(self) -> None:
        """Complete the open row (it is otherwise completed when the next step starts)."""
        if self._open is not None:
            row, self._open = self._open, None
            self._rows.append(row)
            for sink in self._sinks:
                sink.write_row(row)
            for callback in self._row_callbacks:
                callback(row)

    def close(self) -> pd.DataFrame:
        """Remove every hook this object installed, finish sinks, and return the table."""
        if not self._closed:
            self.flush()
            for inst in self._opts:
                for handle in inst.handles:
                    handle.remove()
                inst.handles.clear()
            table = self.rows()
            for sink in self._sinks:
                sink.close(table)
            self._closed = True
        return self.rows()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- hooks ------------------------------------------------------------------------------
    def _attach(self, inst: _Instrumented, clock: bool) -> None:
        def pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if clock:
                self._open_row()
            self._pre_step(inst)

        def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._post_step(inst)

        inst.handles.append(inst.optimizer.register_step_pre_hook(pre))
        inst.handles.append(inst.optimizer.register_step_post_hook(post))

    def _open_row(self) -> None:
        self.flush()
        self.step += 1
        row: dict[str, Any] = {"step": self.step}
        if self.env_step is not None:
            row["env_step"] = self.env_step
        if self._hooks:
            row["perturbed"] = False
        row.update(self._pending)
        self._pending = {}
        self._open = row

    def _context(self, inst: _Instrumented, phase: Phase) -> StepContext:
        return StepContext(
            step=max(self.step, 0),
            phase=phase,
            model=self.model,
            optimizer=inst.optimizer,
            params=inst.params,
            param_names=inst.param_names,
            env_step=self.env_step,
            total_steps=self.total_steps,
            role=inst.role,
        )

    @torch.no_grad()
    def _pre_step(self, inst: _Instrumented) -> None:
        if self._open is None:  # a non-clock optimizer stepped before the clock's first step
            self._open_row()
        ctx = self._context(inst, Phase.PRE_STEP)
        for hook in self._hooks:
            hook.on_pre_step(ctx)
        step = ctx.step
        values: dict[str, Any] = {}
        for probe in inst.probes:
            if probe.tracks(step):
                probe.before_step(ctx)
                if probe.phase is Phase.PRE_STEP:
                    values.update(probe.observe(ctx))
        inst.pre_ctx = ctx
        self._store(inst, values)

    @torch.no_grad()
    def _post_step(self, inst: _Instrumented) -> None:
        ctx = self._context(inst, Phase.POST_STEP)
        step = ctx.step
        values: dict[str, Any] = {}
        for probe in inst.probes:
            if probe.phase is Phase.POST_STEP and probe.tracks(step):
                values.update(probe.observe(ctx))
        self._store(inst, values)
        for hook in self._hooks:
            hook.on_post_step(ctx)
            if self._open is not None:
                for key, value in hook.row_fields(step).items():
                    if key == "perturbed":
                        value = bool(self._open.get(key, False) or value)
                    self._open[key] = value
        inst.pre_ctx = None

    def _store(self, inst: _Instrumented, values: Mapping[str, Any]) -> None:
        if not values or self._open is None:
            return
        tensor_keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        # One host-device sync for all of this phase's tensor values; plain numbers stay exact.
        host = (
            torch.stack([_as_scalar(values[k]) for k in tensor_keys]).tolist()
            if tensor_keys
            else []
        )
        merged = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        merged.update(zip(tensor_keys, host, strict=True))
        for key, value in merged.items():
            if key == "nonfinite_grads" and math.isfinite(value):
                value = int(value)
            self._open[inst.prefix + key] = value


def _as_scalar(value: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor (most probe values already are: then no op is spent)."""
    if value.dim() == 0 and value.dtype == torch.float32:
        return value
    return value.float().reshape(())


def _as_sinks(sink: Sink | Iterable[Sink] | None) -> list[Sink]:
    if sink is None:
        return []
    if hasattr(sink, "write_row"):
        return [sink]  # type: ignore[list-item]
    return list(sink)  # type: ignore[arg-type]


def _to_float(value: float | int | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)
