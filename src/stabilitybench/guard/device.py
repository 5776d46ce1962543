"""Decisions before the update, on the device: `skip` and `lr_cut` with no host sync and no copy.

The host guard (`guard.core.Guard`) reads each step's row back to score it (one host–device sync
per optimizer step) and, to undo a skipped update, copies the parameters and optimizer state on
every step. `DeviceGuard` does neither, as OLMo-core's `SkipStepOptimizer` does:

- after backward and the telemetry's own pre-step probes, it scores this step's gradient norm
  (and the loss, when the loop passes it with `guard.before_step(loss=loss)`) against the run's
  own recent history kept in a small device tensor, and decides — a 0-d device tensor;
- it then performs the optimizer's update itself, with the decision folded in as two factors
  (`masked_step`): `keep` (0 skips the update: moments, step count and parameters stay as they
  were) and `scale` (the update's multiplier: the LR cut). Nothing is read; nothing is copied.
  The optimizer's own `step()` then finds no gradients (they are set aside and put back right
  after it) and does nothing;
- the decisions and scores go into the step's row (`guard_alarm`, `guard_scale`, `guard_score`)
  and reach the host with the telemetry's batched read-back (every `flush_every` steps, or at
  once with `guard.flush()`): the host learns of an intervention that late, but it was made
  on time.

Detectors with a device form: `auto` (robust rise of the gradient norm / loss over the median of
the last `window` accepted values, in MAD·1.4826, at least `scale_floor`·|median|, after
`warmup` values; a value that alarms does not enter the history; a gradient norm or loss that
alarms on RELEARN_AFTER steps in a row has moved to a new level, which skipping cannot undo, so
its history is forgotten and learned again, warm-up included) and `olmo` (OLMo-core's rule:
mean + `threshold_std`·std of the last `window` values, population std, once the window is full;
every value enters it). Neither needs persistence here: a skipped update costs one step, and the
decision must be made before the update it would have to take back. A non-finite gradient norm
or loss always skips the update, whatever the action.

`rollback` (asked for with `on_device=True`) is decided on the device as well; the host reads
the alarms in the telemetry's batches and restores a CPU snapshot then (see `DeviceGuard`).

Optimizers with a masked step: torch's `SGD` (momentum, dampening, Nesterov, weight decay),
`Adam` and `AdamW` (not amsgrad, maximize or differentiable). Any other optimizer keeps the host
guard (`unsupported_reason` says why).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stabilitybench.detectors.scores import MAD_TO_STD
from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.config import DEVICE_ACTIONS, DEVICE_DETECTORS, parse_guard
from stabilitybench.guard.core import (
    GuardStats,
    GuardSurface,
    Intervention,
    RollbackLoop,
    build_detector,
)
from stabilitybench.guard.masked import (
    masked_step,
    params_norm,
    unsupported_reason,
    update_estimate,
)
from stabilitybench.guard.snapshot import Snapshot
from stabilitybench.telemetry.core import Telemetry
from stabilitybench.types import PARAM_NORM

if TYPE_CHECKING:
    from stabilitybench.detectors.base import Detector
    from stabilitybench.types import StepContext

# What the device rule reads before the update: the gradient norm, the loss (when the loop gives
# it before the step) and the ratio ‖Δθ‖/‖θ‖ of the update about to be made, estimated at this
# step's LR from the last kept update (an LR spike shows there before it is applied; in the
# gradient only after).
SIGNALS: tuple[str, ...] = ("grad_norm", "loss", "update_ratio")
# `auto`: the signals that learn their range again after RELEARN_AFTER alarms in a row (not the
# update ratio: it moves with the LR, whatever is skipped)
RELEARNS: tuple[bool, ...] = tuple(signal != "update_ratio" for signal in SIGNALS)
RELEARN_AFTER = 16
_EPS = 1e-12


# -- the rule ------------------------------------------------------------------------------------
class DeviceRule:
    """`auto`'s (robust) or `olmo`'s (mean/std) spike rule over a device ring of past values.

    `decide(values, given)` takes this step's values ((k,) device tensor; a signal not given this
    step is NaN) and returns (alarm 0-d bool, score 0-d float: the largest rise in σ, +inf for a
    non-finite value). The ring position and the count of steps seen are host integers (they do
    not depend on any value), so nothing is read.
    """

    def __init__(
        self,
        kind: str,
        signals: int,
        device: torch.device,
        *,
        window: int,
        warmup: int,
        threshold: float,
        scale_floor: float = 0.0,
        relearn: tuple[bool, ...] | None = None,
        patience: int = RELEARN_AFTER,
    ) -> None:
        self.kind, self.window, self.warmup = kind, window, warmup
        self.threshold, self.scale_floor, self.patience = threshold, scale_floor, patience
        self.history = torch.full((signals, window), math.nan, dtype=torch.float32, device=device)
        self.seen = 0  # steps decided so far
        self._robust = kind == "auto"
        # auto: the signals that learn their range again after `patience` alarms in a row, and
        # each signal's current run of alarms (a device tensor: nothing is read)
        flags = relearn if relearn is not None else (False,) * signals
        self.relearn = torch.tensor(flags, dtype=torch.bool, device=device) & self._robust
        self.streak = torch.zeros(signals, dtype=torch.int32, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.history, self.streak))

    def state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What a snapshot keeps of the rule (copies)."""
        return self.history.clone(), self.streak.clone(), self.seen

    def restore(self, state: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        history, streak, self.seen = state
        self.history.copy_(history)
        self.streak.copy_(streak)

    def decide(
        self, values: torch.Tensor, given: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.float()
        nonfinite = (given & ~torch.isfinite(values)).any()
        clean = torch.where(given & torch.isfinite(values), values, math.nan)
        slot = self.history[:, self.seen % self.window]
        if self._robust:
            # each signal scores once it has `warmup` values in its history (a signal that
            # learns again after a level shift waits for its own warm-up)
            ready = (~torch.isnan(self.history)).sum(dim=1) >= self.warmup
            rises = torch.where(ready, self._rises(values), 0.0)
            over = rises > self.threshold
            streak = torch.where(over, self.streak + 1, 0)
            # A signal that stays over for `patience` steps in a row has moved to a new level:
            # a skipped update leaves the weights as they were, so a loss or gradient norm that
            # moved cannot come back by skipping; its history is forgotten and learned again.
            # The update ratio does not learn again: it moves with the LR, whatever is skipped.
            forget = over & self.relearn & (streak >= self.patience)
            self.history.masked_fill_(forget[:, None], math.nan)
            self.streak.copy_(streak.masked_fill_(forget, 0))
            acting = over & ~forget
            alarm = nonfinite | acting.any()
            rise = rises.max()
            # a value that alarmed stays out of the history (as auto's own +inf values do)
            slot.copy_(torch.where(acting, slot, clean))
        elif self.seen >= self.warmup:  # olmo: once the window is full
            rise = self._rises(values).max()
            alarm = nonfinite | (rise > self.threshold)
            slot.copy_(clean)  # every finite value enters it (OLMo-core appends every one)
        else:
            rise = torch.zeros((), dtype=values.dtype, device=values.device)
            alarm = nonfinite
            slot.copy_(clean)
        score = torch.where(nonfinite, torch.full_like(rise, math.inf), rise)
        self.seen += 1
        return alarm, score

    def _rises(self, values: torch.Tensor) -> torch.Tensor:
        """Each signal's rise in σ ((k,); NaN-free: a missing signal rises 0)."""
        history = self.history
        if self._robust:
            location = history.nanmedian(dim=1).values
            mad = (history - location[:, None]).abs().nanmedian(dim=1).values
            scale = torch.maximum(MAD_TO_STD * mad, self.scale_floor * location.abs())
        else:
            valid = ~torch.isnan(history)
            count = valid.sum(dim=1).clamp_min(1)
            filled = torch.where(valid, history, 0.0)
            location = filled.sum(dim=1) / count
            spread = torch.where(valid, history - location[:, None], 0.0)
            scale = (spread.square().sum(dim=1) / count).sqrt()
        rise = (values - location) / scale.clamp_min(_EPS)
        if not self._robust:  # OLMo's rule: no score from a flat window
            rise = torch.where(scale >= 1e-10, rise, 0.0)
        return torch.nan_to_num(rise.clamp_min(0), nan=0.0)


def device_rule(detector: Detector, signals: int, device: torch.device) -> DeviceRule:
    """The device form of a registered detector made with its settings (`auto` or `olmo`)."""
    name = getattr(detector, "name", None)
    if name == "auto":
        d: Any = detector
        return DeviceRule(
            "auto",
            signals,
            device,
            window=d.window,
            warmup=d.warmup,
            threshold=d.z_thresh,
            scale_floor=d.scale_floor,
            relearn=RELEARNS,
        )
    if name == "olmo":
        o: Any = detector
        return DeviceRule(
            "olmo", signals, device, window=o.window, warmup=o.window, threshold=o.threshold_std
        )
    raise StabilityBenchError(
        f"guard.detector: {name!r} has no device form; allowed: {', '.join(DEVICE_DETECTORS)}"
    )


# -- the guard ------------------------------------------------------------------------------------
class DeviceGuard(GuardSurface):
    """A guard whose `skip` / `lr_cut` decisions are made on the device, before the update.

    `rollback` is decided there too, and skips each alarmed update at once; the host reads the
    alarms in batches (every `flush_every` steps) and then restores the newest CPU snapshot
    (taken every `every` steps, a ring of `keep`) at least `min_age` steps older than the first
    alarm — up to `flush_every` steps after it, every update since being thrown away — and cuts
    the LR for `cooldown` steps.

    The same surface as `Guard` where it can be: `after_step(**scalars)`, `before_step(loss=…)`,
    `close()`, `with`, `events()`, `interventions`, `stats`, `scores`. `after_step` returns None:
    the decision is not read back each step; `flush()` reads every decision so far (one sync).
    """

    def __init__(
        self,
        telemetry: Telemetry,
        detector: str | Detector = "auto",
        action: str = "skip",
        *,
        close_telemetry: bool = False,
        **params: Any,
    ) -> None:

        name = detector if isinstance(detector, str) else getattr(detector, "name", detector)
        self.config = parse_guard({"detector": name, "action": action, **params}, where="guard")
        if len(telemetry.optimizers) != 1:
            raise StabilityBenchError(
                "guard: the device guard steps one optimizer; this telemetry instruments "
                f"{len(telemetry.optimizers)}"
            )
        self.optimizer = next(iter(telemetry.optimizers.values()))
        why_not = device_possible(self.optimizer, self.config.detector, self.config.action)
        if why_not is not None:
            raise StabilityBenchError(f"guard: {why_not}")
        self.telemetry = telemetry
        self.detector = build_detector(self.config) if isinstance(detector, str) else detector
        params_ = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.device = params_[0].device if params_ else torch.device("cpu")
        # gradient norm, loss, proposed update ratio
        self.rule = device_rule(self.detector, len(SIGNALS), self.device)
        self.close_telemetry = close_telemetry
        self._init_state()
        telemetry.add_hook(self)
        telemetry.on_row(self._on_row)  # batched: at each flush, no per-step sync

    def _init_state(self) -> None:
        self.interventions: list[Intervention] = []
        self.stats: GuardStats = GuardStats()
        self.stats.undo_bytes = 0  # nothing copied: the decision is made before the update
        self.scores: list[tuple[int, float]] = []
        self.last_action: str | None = None  # never known without a read-back (see `flush`)
        self._set_aside: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._row: dict[str, torch.Tensor] = {}
        self._cut_left = torch.zeros((), dtype=torch.int64, device=self.device)
        # Made once: a tensor built from host values each step would be a host-to-device copy.
        self._given = {
            loss: torch.tensor([True, loss, True], device=self.device) for loss in (False, True)
        }
        self._nan = torch.full((), math.nan, device=self.device)
        # Per parameter group, the norm of the last kept update's direction (update_estimate).
        self._directions = [
            torch.zeros((), dtype=torch.float64, device=self.device)
            for _ in self.optimizer.param_groups
        ]
        # rollback: the snapshot ring, the alarm the host has read and not yet acted on, and
        # the step of the last rollback (alarms before it were of the timeline thrown away).
        self._ring: deque[Snapshot] = deque(maxlen=self.config.keep)
        self._due: tuple[int, float] | None = None
        self._restored = -1
        self._loop = RollbackLoop(self.config.window)  # as `Guard`'s
        self._detached = False

    # -- the loop's calls ------------------------------------------------------------------------
    def after_step(self, **scalars: float | int | torch.Tensor) -> None:
        """Log this step's values (`loss=…`) to its row; the action was already taken."""
        if scalars:
            self.telemetry.log(**scalars)

    def close(self) -> None:
        if self._detached:
            return
        self._detached = True
        self._restore_grads()
        if self.close_telemetry:
            self.telemetry.close(read_back=False)
        else:
            self.telemetry.flush()
        _steps_to_host(self.optimizer)

    # -- StepHook ----------------------------------------------------------------------------------
    def on_pre_step(self, ctx: StepContext) -> None:
        """rollback: a CPU snapshot every `every` steps (a device-to-host copy: on a GPU, a sync
        every `every` steps), with the rule's ring as it was."""
        if self._detached or self.config.action != "rollback" or ctx.step % self.config.every:
            return
        extra = self.rule.state()
        self._ring.append(Snapshot.take(ctx.step, self.telemetry.model, [self.optimizer], extra))
        self.stats.snapshots += 1

    def on_pre_update(self, ctx: StepContext) -> None:
        """After the probes' pre-step work: decide, update, and set the gradients aside."""
        if self._detached:
            return
        with torch.no_grad():
            rolled_back = self._due is not None and self._roll_back(ctx.step)
            alarm, score = self._decide(ctx)
            cut = self.config.action == "lr_cut"
            # lr_cut keeps every update but a non-finite one; skip and rollback keep none that
            # alarmed (nor, after a rollback, this step's: its gradient is of the state undone).
            keep = ~torch.isinf(score) if cut else ~alarm
            if rolled_back:
                keep = torch.zeros_like(keep)
            if self.config.action != "skip":
                start = torch.full_like(self._cut_left, self.config.cooldown)
                cut_now = alarm if cut else torch.full_like(alarm, rolled_back)
                left = torch.where(cut_now, start, (self._cut_left - 1).clamp_min(0))
                self._cut_left = left
                scale = torch.where(left > 0, self.config.factor, 1.0).to(torch.float32)
                scale = torch.where(keep, scale, 0.0)
            else:
                scale = keep.to(torch.float32)
            directions = masked_step(self.optimizer, keep, scale)
            self._directions = [
                torch.where(keep, new.to(old.device), old)
                for new, old in zip(directions, self._directions, strict=True)
            ]
        self._row = {"guard_alarm": alarm, "guard_scale": scale, "guard_score": score}
        self._set_aside = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"]]
        for p, _ in self._set_aside:
            p.grad = None  # the optimizer's own step finds nothing to do

    def on_post_update(self, ctx: StepContext) -> None:
        self._restore_grads()  # before the post-step probes (and the loop) look at them

    def on_post_step(self, ctx: StepContext) -> None:
        return None

    def row_fields(self, step: int) -> Mapping[str, Any]:
        row, self._row = self._row, {}
        return row

    # -- inside ------------------------------------------------------------------------------------
    def _decide(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        # Logged before the step (`before_step`, `log_before_step`): the loss, and the gradient
        # norm before clipping where the loop clips (else the norm the optimizer sees).
        raw = self.telemetry.current("grad_norm_raw")
        grad_norm = (ctx.grad_norm() if raw is None else _device_value(raw, self.device)).to(
            torch.float32
        )
        logged = self.telemetry.current("loss")
        loss = self._nan if logged is None else _device_value(logged, self.device)
        given = self._given[logged is not None]
        # ‖θ‖ before the update: the update_norm probe's, when it measured this step
        norm = ctx.cached(PARAM_NORM, lambda: params_norm(ctx.params))
        ratio = update_estimate(self.optimizer, self._directions, norm)
        ratio = ratio.to(torch.float32)
        return self.rule.decide(torch.stack([grad_norm, loss, ratio]), given)

    def _roll_back(self, step: int) -> bool:
        """Restore the newest snapshot at least `min_age` steps older than the alarm (else the
        oldest one taken before it); the alarm reached the host up to `flush_every` steps late,
        and every update since it is thrown away. Returns whether it restored one."""
        assert self._due is not None
        (alarm_step, score), self._due = self._due, None
        old_enough = [s for s in self._ring if alarm_step - s.step >= self.config.min_age]
        before = [s for s in self._ring if s.step <= alarm_step]
        snapshot = old_enough[-1] if old_enough else (before[0] if before else None)
        note = None
        if snapshot is None:
            note = f"no snapshot taken before step {alarm_step}: nothing restored"
        elif self._loop.is_loop(snapshot.step):
            self._loop.looping = True
            note = (
                f"rollback loop: the snapshot of step {snapshot.step} was restored "
                f"{self._loop.restores} times and the alarm came back each time; nothing restored, "
                "the alarmed updates are skipped on the device, and no rollback is made until "
                f"{self.config.window} steps pass without an alarm"
            )
        if snapshot is None or note is not None:
            self.interventions.append(
                Intervention(step, "rollback", self.config.detector, score, "rollback", note=note)
            )
            return False
        self._loop.restored(snapshot.step)
        while self._ring and self._ring[-1].step > snapshot.step:
            self._ring.pop()
        snapshot.restore(self.telemetry.model, [self.optimizer])
        self.rule.restore(snapshot.extra)
        self._restored = step
        lost = step + 1 - snapshot.step  # the updates since the snapshot, and this step's
        self.stats.rolled_back_steps += lost
        self.stats.by_action["rollback"] += 1
        self.interventions.append(
            Intervention(
                step,
                "rollback",
                self.config.detector,
                score,
                "rollback",
                rolled_back_to=snapshot.step,
                note=f"alarm at step {alarm_step}, read back at step {step}",
                steps_lost=lost,
            )
        )
        return True

    def _restore_grads(self) -> None:
        for p, grad in self._set_aside:
            p.grad = grad
        self._set_aside = []

    def _on_row(self, row: dict[str, Any]) -> None:
        """At each read-back: the decisions made on the device become interventions (and, for
        rollback, the first alarm since the last rollback is rolled back at the next update)."""
        alarm, scale = row.get("guard_alarm"), row.get("guard_scale")
        if alarm is None or scale is None:
            return
        step, score = int(row["step"]), float(row.get("guard_score", math.nan))
        self.scores.append((step, score))
        if 0 < float(scale) < 1:
            self.stats.lr_cut_steps += 1
        if not float(alarm) > 0:
            return
        looping = self._loop.alarm(step)
        if (
            self.config.action == "rollback"
            and self._due is None
            and step > self._restored
            and not looping
        ):
            self._due = (step, score)
        action = "skip" if float(scale) == 0 else "lr_cut"
        self.stats.alarms += 1
        self.stats.by_action[action] += 1
        self.stats.skipped_steps += action == "skip"
        self.interventions.append(
            Intervention(
                step,
                action,
                self.config.detector,
                score,
                self.config.action,
                note="decided on the device before the update",
                steps_lost=int(action == "skip"),
            )
        )


def _device_value(value: Any, device: torch.device) -> torch.Tensor:
    """A logged value as a 0-d float32 tensor on `device` (a host number is copied over once:
    the loop has already read it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device, torch.float32)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _steps_to_host(optimizer: torch.optim.Optimizer) -> None:
    """Give torch's Adam its step counts back where its own step expects them (on the CPU,
    unless capturable or fused): the masked step kept them on the parameters' device."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].cpu()


def device_possible(optimizer: torch.optim.Optimizer, detector: str, action: str) -> str | None:
    """Why a device guard cannot take (detector, action) on `optimizer`; None when it can."""
    if action not in DEVICE_ACTIONS:
        return (
            f"action {action} is decided on the host (on the device: {', '.join(DEVICE_ACTIONS)})"
        )
    if detector not in DEVICE_DETECTORS:
        return f"detector {detector} has no device form ({', '.join(DEVICE_DETECTORS)} have)"
    return unsupported_reason(optimizer)


__all__ = [
    "DEVICE_ACTIONS",
    "DEVICE_DETECTORS",
    "DeviceGuard",
    "DeviceRule",
    "device_possible",
]
