"""Telemetry: attach to a model and its optimizer(s) through step hooks; one row per optimizer step.

Probe values stay on the device: each finished row's tensors are stacked into one small vector,
and every `flush_every` steps all of them are read back to the host in ONE transfer. Rows reach
`on_row` callbacks and sinks then, in step order. Nothing on the per-step path reads a value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, overload

import pandas as pd
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.streaming import rows_frame
from stabilitybench.telemetry.base import Probe
from stabilitybench.telemetry.probes import (
    LossClosure,
    MicroBatches,
    ProbeOptions,
    ProbeSpec,
    resolve_probes,
)
from stabilitybench.types import Phase, Schedule, StepContext

DEFAULT_FLUSH_EVERY = 100
"""Rows read back from the device per transfer unless `Telemetry(flush_every=...)` says otherwise."""


class StepHook(Protocol):
    """Something that acts around each optimizer step (a perturbation schedule, say)."""

    def on_pre_step(self, ctx: StepContext) -> None: ...

    def on_post_step(self, ctx: StepContext) -> None: ...

    def row_fields(self, step: int) -> Mapping[str, Any]: ...


# A hook may also define `on_pre_update(ctx)`, called after the probes' pre-step work (they have
# seen the state before the update), and `on_post_update(ctx)`, called before the post-step
# probes: a guard that performs the update itself (`guard.device.DeviceGuard`) uses them.


class Sink(Protocol):
    """Where finished rows go besides memory (Parquet via the run store, TensorBoard).

    `write_row(row)` is called for each row at each flush, in step order (a sink may instead
    define `write_rows(rows)` to take a flush's rows at once); `close(table)` once at the end,
    with every row when the telemetry keeps them (`keep_rows`), else an empty table.
    """

    def write_row(self, row: Mapping[str, Any]) -> None: ...

    def close(self, table: pd.DataFrame) -> None: ...


RowCallback = Callable[[dict[str, Any]], None]


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
        self.before_step: dict[str, Any] = {}  # values logged for this optimizer's next step
        self.nonfinite_key = self.prefix + "nonfinite_grads"


class _DoneRow:
    """A finished row waiting for read-back: host values, and its tensors stacked per device."""

    __slots__ = ("host", "packed")

    def __init__(self, host: dict[str, Any], packed: list[tuple[list[str], torch.Tensor]]) -> None:
        self.host = host
        self.packed = packed  # [(keys, (len(keys),) float32 tensor on one device)]


class Telemetry:
    """Records stability signals from any PyTorch training loop, one row per optimizer step.

    `optimizer` is one optimizer, or a mapping role → optimizer (e.g. {"critic": c, "actor": a});
    with a mapping, columns are prefixed `role/` and the first optimizer's steps are the clock.
    Values given to `log()` go to the row of the most recent optimizer step (call it after
    `optimizer.step()`); a value logged before the first step goes to step 0.

    Host syncs: none per step. Rows are read back every `flush_every` steps (default 100) in
    one transfer, then handed to `on_row` callbacks and sinks. `sync_every_step=True` (or
    `on_row(cb, every_step=True)`) reads each row back as it finishes: one host–device sync per
    optimizer step, which stalls a GPU's stream; use it only for something that must act on the
    current step (an online guard). `keep_rows` keeps every row in memory for `rows()`; by default
    it is False when a sink can read its rows back (`ParquetSink`, `RunWriter`: then memory stays
    bounded and `rows()` reads them from that sink), True otherwise.
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
        flush_every: int = DEFAULT_FLUSH_EVERY,
        sync_every_step: bool = False,
        keep_rows: bool | None = None,
    ) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise StabilityBenchError(
                f"Telemetry: flush_every must be an integer >= 1, got {flush_every!r}"
            )
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
        self.flush_every = flush_every
        self.sync_every_step = sync_every_step
        self._sinks: list[Sink] = _as_sinks(sink)
        readable = any(hasattr(s, "read") for s in self._sinks)
        self.keep_rows = (not readable) if keep_rows is None else bool(keep_rows)
        self._rows: list[dict[str, Any]] = []  # delivered rows (only with keep_rows)
        self._done: list[_DoneRow] = []  # finished rows not yet read back
        self._unsunk: list[dict[str, Any]] = []  # read back, not yet handed to the sinks
        self._open: dict[str, Any] | None = None
        self._pending: dict[str, Any] = {}
        self._hooks: list[StepHook] = []
        self._row_callbacks: list[RowCallback] = []
        self._closed = False
        self.transfers = 0  # read-backs so far (each one host–device sync per device)
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
        """Add user scalars (loss, return, …) to the current step's row; tensors are not read."""
        values = {k: _host_or_device(v) for k, v in scalars.items()}
        if self._open is None:
            self._pending.update(values)
        else:
            self._open.update(values)

    def log_before_step(
        self, optimizer: torch.optim.Optimizer | None = None, **scalars: float | int | torch.Tensor
    ) -> None:
        """Values for the optimizer step about to happen (measured after backward, before
        `step()`: the pre-clip gradient norm, say); they land in that step's row, with the
        optimizer's `role/` prefix. `optimizer` defaults to the clock optimizer."""
        inst = self._opts[0] if optimizer is None else self._instrumented(optimizer)
        inst.before_step.update({k: _host_or_device(v) for k, v in scalars.items()})

    def current(self, key: str) -> Any:
        """What the step under way has logged as `key` so far (a tensor stays on its device),
        or None: a hook that acts before the update reads the loss the loop gave before it."""
        return None if self._open is None else self._open.get(key)

    def add_hook(self, hook: StepHook) -> None:
        """Run `hook` around every optimizer step (perturbation schedules use this)."""
        self._hooks.append(hook)

    def on_row(self, callback: RowCallback, *, every_step: bool = False) -> None:
        """Call `callback(row)` with each finished row, in step order, at each flush (a monitor
        that records a score in the row, say). `every_step=True` calls it as soon as the row is
        finished instead, at the cost of one host–device sync per step (an online guard)."""
        self._row_callbacks.append(callback)
        if every_step:
            self.sync_every_step = True

    def rows(self) -> pd.DataFrame:
        """Every recorded step as a DataFrame, one row per optimizer step (reads back any rows
        still on the device: one transfer)."""
        self._read_back()
        rows = list(self._rows) if self.keep_rows else []
        if self._open is not None:
            rows.append(_materialize_one(self._open, self._opts))
        frame = rows_frame(rows)
        if self.keep_rows:
            return frame
        stored = self._sink_table()
        if stored is None:
            raise StabilityBenchError(
                "Telemetry.rows(): rows are streamed to the sink and not kept in memory, and no "
                "sink can read them back; pass keep_rows=True to keep them"
            )
        if frame.empty or len(frame.columns) <= 1:
            return stored
        return pd.concat([stored, frame], ignore_index=True)

    def finish_step(self) -> None:
        """Finish the open row now and read it back (one host sync), handing it to `on_row`
        callbacks; sinks still get rows every `flush_every` steps (an online guard calls this
        right after the loop's `log()`, so it can act before the next forward pass)."""
        self._finish_open()
        self._read_back(to_sinks=False)

    def flush(self) -> None:
        """Finish the open row and read every finished row back (one transfer), handing them to
        `on_row` callbacks and sinks (the open row is otherwise finished when the next step
        starts, and rows are read back every `flush_every` steps)."""
        self._finish_open()
        self._read_back()

    @overload
    def close(self) -> pd.DataFrame: ...
    @overload
    def close(self, *, read_back: Literal[True]) -> pd.DataFrame: ...
    @overload
    def close(self, *, read_back: Literal[False]) -> None: ...

    def close(self, *, read_back: bool = True) -> pd.DataFrame | None:
        """Remove every hook this object installed, flush, finish sinks, and return the table.

        `read_back=False` returns None instead of the table: with rows streamed to a sink
        (`keep_rows=False`), reading the finished table back would hold the whole run in memory
        once (≈230 MiB for a million-step run), which a long run that only needs its file does
        not want. The workloads close this way."""
        if not self._closed:
            self.flush()
            for inst in self._opts:
                for handle in inst.handles:
                    handle.remove()
                inst.handles.clear()
            table = self.rows() if self.keep_rows else rows_frame([])
            for sink in self._sinks:
                sink.close(table)
            self._closed = True
        if not read_back:
            return None
        if self.keep_rows:
            return self.rows()
        stored = self._sink_table()
        return stored if stored is not None else rows_frame([])

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

    def _instrumented(self, optimizer: torch.optim.Optimizer) -> _Instrumented:
        for inst in self._opts:
            if inst.optimizer is optimizer:
                return inst
        raise StabilityBenchError(
            "Telemetry.log_before_step: that optimizer is not instrumented by this telemetry"
        )

    def _open_row(self) -> None:
        self._finish_open()
        self.step += 1
        row: dict[str, Any] = {"step": self.step}
        if self.env_step is not None:
            row["env_step"] = self.env_step
        if self._hooks:
            row["perturbed"] = False
        row.update(self._pending)
        self._pending = {}
        self._open = row

    def _finish_open(self) -> None:
        """Move the open row to the read-back buffer: its tensors stacked into one vector."""
        if self._open is None:
            return
        row, self._open = self._open, None
        self._done.append(_pack(row))
        if len(self._done) >= self.flush_every:
            self._read_back()
        elif self.sync_every_step:
            self._read_back(to_sinks=False)

    def _read_back(self, *, to_sinks: bool = True) -> None:
        """One transfer per device for every finished row; then callbacks, memory, and the
        sinks — with `to_sinks=False` (per-step read-back) only once `flush_every` rows wait,
        so a per-step sync does not also mean a Parquet part file per step."""
        if not self._done:
            if to_sinks:
                self._write_sinks()
            return
        done, self._done = self._done, []
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for item in done:
            for _, vector in item.packed:
                by_device.setdefault(vector.device, []).append(vector)
        host: dict[torch.device, list[float]] = {}
        for device, vectors in by_device.items():
            # The one host–device sync of this flush (per device).
            flat = vectors[0] if len(vectors) == 1 else torch.cat(vectors)
            host[device] = flat.tolist()
            self.transfers += 1
        offsets = dict.fromkeys(host, 0)
        nonfinite_keys = {inst.nonfinite_key for inst in self._opts}
        rows: list[dict[str, Any]] = []
        for item in done:
            row = item.host
            for keys, vector in item.packed:
                device, start = vector.device, offsets[vector.device]
                values = host[device][start : start + len(keys)]
                offsets[device] = start + len(keys)
                row.update(zip(keys, values, strict=True))
            for key in nonfinite_keys:
                value = row.get(key)
                if isinstance(value, float) and math.isfinite(value):
                    row[key] = int(value)
            rows.append(row)
        for row in rows:
            for callback in self._row_callbacks:
                callback(row)
        if self.keep_rows:
            self._rows.extend(rows)
        self._unsunk.extend(rows)
        if to_sinks or len(self._unsunk) >= self.flush_every:
            self._write_sinks()

    def _write_sinks(self) -> None:
        rows, self._unsunk = self._unsunk, []
        if not rows:
            return
        for sink in self._sinks:
            write_rows = getattr(sink, "write_rows", None)
            if write_rows is not None:
                write_rows(rows)
            else:
                for row in rows:
                    sink.write_row(row)

    def _sink_table(self) -> pd.DataFrame | None:
        for sink in self._sinks:
            read = getattr(sink, "read", None)
            if read is not None:
                table: pd.DataFrame = read()
                return table
        return None

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
        if inst.before_step:
            self._store(inst, inst.before_step)
            inst.before_step = {}
        for probe in inst.probes:
            if probe.tracks(step):
                probe.before_step(ctx)
                if probe.phase is Phase.PRE_STEP:
                    self._store(inst, probe.observe(ctx))
        for hook in self._hooks:  # after the probes saw the state before the update
            pre_update = getattr(hook, "on_pre_update", None)
            if pre_update is not None:
                pre_update(ctx)

    @torch.no_grad()
    def _post_step(self, inst: _Instrumented) -> None:
        ctx = self._context(inst, Phase.POST_STEP)
        step = ctx.step
        for hook in self._hooks:  # before the probes look at the state after the update
            post_update = getattr(hook, "on_post_update", None)
            if post_update is not None:
                post_update(ctx)
        for probe in inst.probes:
            if probe.phase is Phase.POST_STEP and probe.tracks(step):
                self._store(inst, probe.observe(ctx))
        for hook in self._hooks:
            hook.on_post_step(ctx)
            if self._open is not None:
                for key, value in hook.row_fields(step).items():
                    if key == "perturbed":
                        value = _either(self._open.get(key, False), value)
                    self._open[key] = value

    def _store(self, inst: _Instrumented, values: Mapping[str, Any]) -> None:
        """Put values in the open row as they are: tensors stay on the device until read-back."""
        row = self._open
        if not values or row is None:
            return
        prefix = inst.prefix
        if prefix:
            for key, value in values.items():
                row[prefix + key] = value
        else:
            row.update(values)


def _pack(row: dict[str, Any]) -> _DoneRow:
    """Split a row into host values and its tensors stacked per device (one small op)."""
    keys: list[str] = []
    tensors: list[torch.Tensor] = []
    host: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, torch.Tensor):
            keys.append(key)
            tensors.append(value)
            host[key] = None  # keeps the column order; filled at read-back
        else:
            host[key] = value
    if not tensors:
        return _DoneRow(host, [])
    device = tensors[0].device
    if all(t.device == device for t in tensors):
        return _DoneRow(host, [(keys, _stack(tensors))])
    groups: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for key, t in zip(keys, tensors, strict=True):
        group = groups.setdefault(t.device, ([], []))
        group[0].append(key)
        group[1].append(t)
    return _DoneRow(host, [(ks, _stack(ts)) for ks, ts in groups.values()])


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n,) float32 vector of n scalar tensors (a copy: the row no longer holds the originals)."""
    try:  # 0-d tensors of any dtypes: one op (stack promotes the dtypes)
        return torch.stack(tensors).float()
    except RuntimeError:  # shapes differ: (1,)-shaped values, say
        return torch.stack([t.float().reshape(()) for t in tensors])


def _materialize_one(row: dict[str, Any], opts: list[_Instrumented]) -> dict[str, Any]:
    """A host copy of a row that is still open (one transfer; for `rows()` only)."""
    item = _pack(dict(row))
    out = item.host
    for keys, vector in item.packed:
        out.update(zip(keys, vector.tolist(), strict=True))
    for inst in opts:
        value = out.get(inst.nonfinite_key)
        if isinstance(value, float) and math.isfinite(value):
            out[inst.nonfinite_key] = int(value)
    return out


def _either(old: Any, new: Any) -> Any:
    """`old or new` for the `perturbed` flag, without reading a tensor flag back."""
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return torch.logical_or(torch.as_tensor(old), torch.as_tensor(new))
    return bool(old or new)


def _as_sinks(sink: Sink | Iterable[Sink] | None) -> list[Sink]:
    if sink is None:
        return []
    if hasattr(sink, "write_row") or hasattr(sink, "write_rows"):
        return [sink]  # type: ignore[list-item]
    return list(sink)  # type: ignore[arg-type]


def _host_or_device(value: float | int | torch.Tensor) -> Any:
    """A tensor stays on its device (detached) until read-back; a number is kept as given."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    return float(value)
