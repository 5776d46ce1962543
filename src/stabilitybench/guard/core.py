"""`Guard`: a registered detector's online score driving an action inside a training loop.

The guard is a telemetry `StepHook` plus a per-step row callback:

- pre-step (clock optimizer): apply an active LR cut; take the skip undo buffer (every step, on
  the device) and, for rollback, a CPU snapshot every `every` steps into a ring of `keep`.
- when the step's row is finished (`guard.after_step()`, which the loop calls right after its
  `tel.log(loss=...)`; else at the next step's pre-step): `detector.update(row)` gives the score,
  the detector's native rule says whether it is an alarm, and the action runs at once.
- post-step: the LR cut is lifted again (so an LR scheduler or a perturbation schedule that set
  the LR is left as it was), and a step whose gradient was computed on a state the guard has just
  thrown away is undone too; for `reset_moments` (and `escalate`), each tensor's gradient norm
  goes into a ring on the device (`guard.moments.GradNormHistory`): one more pass over the
  gradients per step, no host sync.

Cost: the score needs the current step's values, so the guard turns on the telemetry's per-step
read-back (one host–device sync per optimizer step); the skip buffer is one device copy of the
parameters and optimizer state per step; rollback snapshots are CPU copies every `every` steps
(see benchmarks/guard_snapshot.py and the README's "Guards").
"""

from __future__ import annotations

import copy
import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.config import GuardConfig, parse_guard
from stabilitybench.guard.moments import GradNormHistory
from stabilitybench.guard.snapshot import ProbeHistory, Snapshot, StepUndo
from stabilitybench.telemetry.core import Telemetry
from stabilitybench.types import StepContext

if TYPE_CHECKING:
    from stabilitybench.detectors.base import Detector

# A row the probes measured carries a gradient norm (`critic/grad_norm` with several
# optimizers); the guard scores only those rows.
_PROBED_COLUMNS = ("grad_norm", "grad_norm_raw")
# Columns that are the step's LR times something this step's LR does not change (torch's SGD,
# Adam and AdamW updates are lr × a function of the optimizer state): under the guard's own LR
# cut the detector is shown them divided by the cut, so it judges the training and not the
# guard's throttle (else a fitted monitor sees every cut as a deviation and alarms again).
LR_PROPORTIONAL = frozenset({"lr", "update_norm", "update_ratio", "update_ratio_layer_max"})
# Columns that describe the optimizer's own update and state. After a moment reset they are those
# of a fresh start for a while (larger updates, a second-moment estimate of one gradient), which
# is the guard's doing: for `cooldown` steps the detector is shown them at their median over the
# `HELD_ROWS` rows before the reset (enough that the rows of the alarm's persistence do not set it).
OPTIMIZER_STATE = frozenset(
    {
        "update_norm",
        "update_ratio",
        "update_ratio_layer_max",
        "adam_rms_max",
        "adam_rms_mean",
        "eos_ratio",
        "eos_curvature",
    }
)
HELD_ROWS = 9
# What `escalate` does at the 1st, 2nd, … alarm within `window` steps: the cheapest repair first
# and each next one for deeper damage — one bad gradient (skip the update), a step size too large
# for the state (cut the LR), a spike already folded into Adam's moments (reset them; a skip
# cannot take back the steps of the alarm's persistence), the parameters themselves (roll back).
ESCALATION = ("skip", "lr_cut", "reset_moments", "rollback")


def is_optimizer_state(column: str) -> bool:
    """Whether `column` ([role/]name) is one of `OPTIMIZER_STATE`."""
    return column in OPTIMIZER_STATE or column.partition("/")[2] in OPTIMIZER_STATE


def held_levels(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per column, the median of its finite values over `rows` (columns with none are left out)."""
    out: dict[str, float] = {}
    for column in {c for row in rows for c in row}:
        values = [row[column] for row in rows if math.isfinite(row.get(column, math.nan))]
        if values:
            out[column] = float(np.median(values))
    return out


def uncut_row(row: Mapping[str, Any], factors: Mapping[str, float]) -> dict[str, Any]:
    """`row` with the LR-proportional columns of each cut optimizer role divided by its cut.

    `factors`: role ("" for a single unnamed optimizer) → the LR multiplier applied this step.
    Columns are `[role/]name[/group<i>]`; per-group LR columns (`lr/group1`) count as `lr`.
    """
    out = dict(row)
    for column, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        head, _, rest = column.partition("/")
        role, base = (
            (head, rest.partition("/")[0]) if head and rest and head in factors else ("", head)
        )
        factor = factors.get(role)
        if factor is not None and base in LR_PROPORTIONAL:
            out[column] = value / factor
    return out


@dataclass(frozen=True)
class Intervention:
    """One action the guard took; `event()` is its row of events.parquet."""

    step: int  # the optimizer step whose row alarmed
    action: str  # what was done: skip | lr_cut | reset_moments | rollback
    detector: str
    score: float
    configured: str  # the guard's action (escalate picks one of the four)
    rolled_back_to: int | None = None  # rollback: the step the restored snapshot was taken at
    note: str | None = None  # e.g. a rollback that found no snapshot old enough and skipped
    steps_lost: int = 0  # updates this intervention threw away (skip: 1; rollback: since then)
    reset_tensors: int | None = None  # reset_moments: tensors whose moments were reset

    def event(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "action": self.action,
            "detector": self.detector,
            "score": self.score if math.isfinite(self.score) else str(self.score),
            "guard": self.configured,
        }
        if self.rolled_back_to is not None:
            params["rolled_back_to"] = self.rolled_back_to
        if self.note:
            params["note"] = self.note
        if self.reset_tensors is not None:
            params["reset_tensors"] = self.reset_tensors
        params["steps_lost"] = self.steps_lost
        return {
            "kind": "guard",
            "name": self.action,
            "dimension": "guard",
            "params": params,
            "start_step": self.step,
            "end_step": self.step,
            "start_env_step": None,
            "end_env_step": None,
        }


@dataclass
class GuardStats:
    """What the guard did to the run's compute (for the summary and the README)."""

    alarms: int = 0
    skipped_steps: int = 0  # updates undone
    # Updates thrown away by rollbacks: those the restored state had not had yet (a second
    # rollback to the same snapshot throws away only what was trained since the first).
    rolled_back_steps: int = 0
    lr_cut_steps: int = 0  # steps run under a cut LR
    moment_resets: int = 0  # tensors whose optimizer moments were reset
    snapshots: int = 0
    snapshot_bytes: int = 0  # of one rollback snapshot (CPU)
    undo_bytes: int = 0  # of the skip buffer (device)
    by_action: Counter[str] = field(default_factory=Counter)  # interventions by action


# A rollback loop: a snapshot restored this many times, and the alarm back again before a newer
# snapshot was old enough. Fewer is not yet a loop: a disturbance that outlasts one restore (an
# LR spike of a few steps, each update of it alarming) needs one restore per step of it.
LOOP_RESTORES = 4


@dataclass
class RollbackLoop:
    """A guard's bookkeeping of rollback loops (`Guard` and `DeviceGuard` alike): the snapshot
    restored last and how many times in a row, and whether a loop was broken and not yet
    followed by `window` steps without an alarm."""

    window: int
    restored_step: int | None = None
    restores: int = 0
    looping: bool = False
    last_alarm: float = -math.inf

    def alarm(self, step: int) -> bool:
        """Record an alarm at `step`; whether a broken loop still holds (no quiet window yet)."""
        quiet = step - self.last_alarm >= self.window
        self.last_alarm = step
        self.looping = self.looping and not quiet
        return self.looping

    def is_loop(self, snapshot_step: int) -> bool:
        """Whether restoring the snapshot of `snapshot_step` again would make a loop."""
        return snapshot_step == self.restored_step and self.restores >= LOOP_RESTORES

    def restored(self, snapshot_step: int) -> None:
        same = snapshot_step == self.restored_step
        self.restores = self.restores + 1 if same else 1
        self.restored_step = snapshot_step


def build_detector(config: GuardConfig) -> Any:
    """The registered detector a guard drives, fresh (msm: loaded from `config.monitor`)."""
    from stabilitybench.detectors.base import DetectorSettings, detector_class

    cls = detector_class(config.detector)
    if config.detector == "msm":
        from stabilitybench.detectors.msm import MSMDetector
        from stabilitybench.monitor.ssm import MetaStateMonitor

        assert config.monitor is not None
        try:
            monitor = MetaStateMonitor.load(Path(config.monitor))
        except StabilityBenchError as exc:
            raise StabilityBenchError(f"guard.monitor: {exc}") from None
        return MSMDetector(monitor)
    detector = cls.create(DetectorSettings())
    detector.reset()
    return detector


class GuardSurface:
    """What a training loop calls on either guard (`Guard`, `guard.device.DeviceGuard`), beside
    `after_step` and `close`, which each defines."""

    telemetry: Telemetry
    interventions: list[Intervention]

    def close(self) -> None:
        raise NotImplementedError

    def before_step(self, **scalars: float | int | torch.Tensor) -> None:
        """Values known before `optimizer.step()` (`loss=…`, `grad_norm_raw=…`): they land in
        this step's row (the device guard decides on them; the host guard scores the finished
        row either way)."""
        self.telemetry.log_before_step(None, **scalars)

    def flush(self) -> None:
        """Read every finished row back now: the device guard's decisions so far (one sync);
        the host guard already reads each row as it ends."""
        self.telemetry.flush()

    def events(self) -> list[dict[str, Any]]:
        """Every intervention as an events.parquet row."""
        return [i.event() for i in self.interventions]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Guard(GuardSurface):
    """Watch a registered detector's online score and act on its alarms.

    `Guard(tel, detector="zclip", action="rollback", every=20, keep=4, min_age=20)`; the
    parameters are those of `GuardConfig`. In a plain loop::

        loss.backward(); opt.step(); tel.log(loss=loss); guard.after_step()

    After a rollback, `guard.rolled_back_to` is the step of the restored snapshot: the loop
    should go on with NEW data (not replay the batches since then — ours draw fresh batches);
    model, optimizer state and the global RNGs are already restored, and the LR is cut for
    `cooldown` steps. `reset_moments` undoes the step, forgets the optimizer moments of the
    tensors whose gradient spiked (`guard.moments`) and cuts the LR for `cooldown` steps (SPAM
    warms the LR up again after a reset: a fresh Adam state takes full-size steps). `escalate`
    goes skip → lr_cut → reset_moments → rollback over repeated alarms within `window` steps.
    A rollback loop — the same snapshot restored four times, the alarm back each time before a
    newer snapshot was old enough (a perturbation that outlasts the restores, a rise the
    restored detector meets again at the same offset) — is broken: the snapshot is not restored
    a fifth time; that alarm and every alarm until `window` steps pass without one are skipped
    (event note "rollback loop: …", then "after a rollback loop"), but after `window` such
    skips with the alarm still on, the guard stands down (no action) until that quiet window.
    `guard.events()` lists every intervention for events.parquet; `detector` may also be a
    registered detector made with other settings (`AutoDetector(z_thresh=8)`); `close()` (or
    leaving a `with guard:` block) stops the guard.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        detector: str | Detector = "zclip",
        action: str = "skip",
        *,
        extra_optimizers: Sequence[torch.optim.Optimizer] = (),
        hold_after_rollback: bool = False,
        close_telemetry: bool = False,
        **params: Any,
    ) -> None:
        monitor = params.pop("monitor", None)
        name = detector if isinstance(detector, str) else getattr(detector, "name", detector)
        self.config = parse_guard(
            {
                "detector": name,
                "action": action,
                **params,
                **({"monitor": str(monitor)} if monitor else {}),
            },
            where="guard",
        )
        self.telemetry = telemetry
        if isinstance(detector, str):
            self.detector = build_detector(self.config)
        else:  # a detector made with other settings than its defaults
            self.detector = detector
            detector.reset()
        # Snapshotted and undone with the instrumented ones, but neither scored nor LR-cut (SAC's
        # entropy-coefficient optimizer, say).
        self.optimizers = [*telemetry.optimizers.values(), *extra_optimizers]
        self._clock = next(iter(telemetry.optimizers))
        self.model = telemetry.model
        # After a rollback, undo every later update until `release()` (PPO: the rest of the
        # current rollout's epochs, collected by the policy the rollback threw away).
        self.hold_after_rollback = hold_after_rollback
        # `close()` closes the telemetry too (`protect` made it).
        self.close_telemetry = close_telemetry
        self._init_state()
        self._sync_before = telemetry.sync_every_step
        telemetry.add_hook(self)
        # The score must be known before the next update: one host sync per step.
        telemetry.on_row(self._on_row, every_step=True)

    def _init_state(self) -> None:
        telemetry = self.telemetry
        self._holding = False
        self._detached = False
        # Every optimizer's probes (the telemetry keeps one set per optimizer role).
        self._probes = [p for inst in telemetry._opts for p in inst.probes]
        self._undo = StepUndo(self.optimizers, self.model)
        self._ring: deque[Snapshot] = deque(maxlen=self.config.keep)
        self._alarm_steps: deque[int] = deque()
        self._cut_until = -1  # the LR is cut for steps <= this
        # Per optimizer role, during a cut step: (the LRs the cut set, the LRs before it).
        self._lr_cut: dict[str, tuple[list[float], list[float]]] = {}
        self._cut_factors: dict[int, dict[str, float]] = {}  # step → role → LR multiplier
        self._discard_step: int | None = None  # a step to undo at its post-step
        # Updates in the current state's history (skips and rollbacks take them back): the step
        # of the run's restored timeline, which the detector is shown (see `_on_row`).
        self._updates = telemetry.step + 1
        self._in_after_step = False
        # reset_moments: per role, the ring of gradient norms; the optimizer-state columns of the
        # last rows, and those shown until `_hold_until`.
        self._resets = self.config.action in ("reset_moments", "escalate")
        self._norms: dict[str, GradNormHistory] = {}
        self._recent: deque[dict[str, float]] = deque(maxlen=HELD_ROWS)
        self._held: dict[str, float] = {}
        self._hold_until = -1
        self.interventions: list[Intervention] = []
        self.stats = GuardStats()
        self.scores: list[tuple[int, float]] = []
        self.rolled_back_to: int | None = None
        self.last_action: str | None = None
        # Rollback loops; after one, the alarms skipped since, and whether skipping did not end
        # it (no action until a quiet window).
        self._loop = RollbackLoop(self.config.window)
        self._loop_skips = 0
        self._standing_down = False

    # -- the loop's call -----------------------------------------------------------------------
    def after_step(self, **scalars: float | int | torch.Tensor) -> str | None:
        """Finish this step's row now and act on it (call after `tel.log(...)`, or pass the
        scalars here: `guard.after_step(loss=loss)`); returns the action taken for this step,
        or None."""
        if scalars:
            self.telemetry.log(**scalars)
        self.last_action = None
        self._in_after_step = True
        try:
            self.telemetry.finish_step()
        finally:
            self._in_after_step = False
        return self.last_action

    def close(self) -> None:
        """Stop acting: from now on the guard does nothing at a step, the telemetry's per-step
        read-back is off again (unless it was on before the guard), and a telemetry the guard
        was given to close (`protect` made it) is closed."""
        if self._detached:
            return
        self._detached = True
        self.telemetry.sync_every_step = self._sync_before
        if self.close_telemetry:
            self.telemetry.close(read_back=False)

    # -- StepHook --------------------------------------------------------------------------------
    def on_pre_step(self, ctx: StepContext) -> None:
        if self._detached:
            return
        step = ctx.step
        if step <= self._cut_until:
            # Every optimizer's LR is cut (SAC's actor, critic and entropy coefficient alike).
            groups = ctx.optimizer.param_groups
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = g["lr"] * self.config.factor
            self._lr_cut[ctx.role] = ([g["lr"] for g in groups], saved)
            self._cut_factors.setdefault(step, {})[ctx.role] = self.config.factor
            if ctx.role == self._clock:
                self.stats.lr_cut_steps += 1
        if ctx.role != self._clock:
            return
        if self.config.action in ("rollback", "escalate") and step % self.config.every == 0:
            # The detector's online state, the probes' history, and how many updates the
            # snapshot's state has had.
            extra = (copy.deepcopy(self.detector), ProbeHistory.take(self._probes), self._updates)
            snapshot = Snapshot.take(step, self.model, self.optimizers, extra=extra)
            self._ring.append(snapshot)
            self.stats.snapshots += 1
            self.stats.snapshot_bytes = snapshot.nbytes() + extra[1].nbytes()
        if self.config.action != "lr_cut":
            self._undo.capture(step)
            self.stats.undo_bytes = self._undo.nbytes()

    def on_post_step(self, ctx: StepContext) -> None:
        cut = self._lr_cut.pop(ctx.role, None)
        if cut is not None:
            # Lift the cut unless someone (a perturbation's own restore) already reset the LR.
            for g, was_set, saved in zip(ctx.optimizer.param_groups, *cut, strict=True):
                if g["lr"] == was_set:
                    g["lr"] = saved
        if self._detached:
            return
        if self._resets:
            # The gradients this update used, as every pre-step hook left them (a perturbation
            # that scales them included): one more pass over them (a norm per tensor), no sync.
            norms = self._norms.setdefault(ctx.role, GradNormHistory())
            norms.record(ctx.optimizer, ctx.params, ctx.grad_norms())
        if ctx.role != self._clock:
            return
        self._updates += 1
        if self._discard_step == ctx.step or self._holding:
            # This step's gradient was computed on a state the guard has just replaced (or on
            # data the rolled-back policy collected): undo it, and charge it to the intervention.
            self._undo.restore()
            self._updates -= 1
            self.stats.skipped_steps += 1
            self._discard_step = None
            if self.interventions:
                last = self.interventions[-1]
                self.interventions[-1] = replace(last, steps_lost=last.steps_lost + 1)

    def release(self) -> None:
        """End the hold after a rollback (`hold_after_rollback`): updates count again."""
        self._holding = False

    def row_fields(self, step: int) -> Mapping[str, Any]:
        return {}

    # -- the decision ------------------------------------------------------------------------------
    def _on_row(self, row: dict[str, Any]) -> None:
        if self._detached:
            return
        if not any(key.rpartition("/")[2] in _PROBED_COLUMNS for key in row):
            return  # a step the telemetry's probes skipped (`every` > 1): nothing to score
        step = int(row["step"])
        shown = self._shown(row, step)
        rewind = getattr(self.detector, "rewind_on_undo", False)
        before = self.detector.online_state() if rewind else None
        score = float(self.detector.update(shown))
        self.scores.append((step, score))
        if not bool(np.asarray(self.detector.native(np.array([score])))[0]):
            return
        self.stats.alarms += 1
        action = self._choose(step)
        if action == "none":
            return  # standing down after a rollback loop that skipping did not end
        # Called from the next step's pre-step (no `after_step()` in the loop): that step's
        # gradient is already computed on the state about to be replaced, so undo it too.
        late = not self._in_after_step and self.telemetry.step == step and self._undo.step == step
        self._act(action, step, score)
        if rewind and action in ("skip", "lr_cut", "reset_moments"):
            # The step's update was undone: its row is not on the run's timeline either (else
            # the monitor's smoothing carries the alarm on, and every next step is skipped too).
            self.detector.set_online_state(before)
        if late and not self.telemetry._closed:
            self._discard_step = step + 1  # charged to this intervention at its post-step

    def _shown(self, row: Mapping[str, Any], step: int) -> dict[str, Any]:
        """What the detector reads: the run on its restored timeline (after a rollback the state
        is that of an earlier step, and a monitor that judges by training progress must see it
        so: else a rolled-back run looks behind schedule, alarms, and is rolled back again),
        without the guard's own LR cut (else the cut looks like a deviation) and, after a moment
        reset, with the optimizer-state columns held at their level before it."""
        factors = self._cut_factors.pop(step, None)
        for old in [s for s in self._cut_factors if s < step]:
            del self._cut_factors[old]
        shown = uncut_row(row, factors) if factors else dict(row)
        if self._resets:
            if step <= self._hold_until:
                shown.update({k: v for k, v in self._held.items() if k in shown})
            else:
                self._recent.append(
                    {
                        k: float(v)
                        for k, v in shown.items()
                        if is_optimizer_state(k)
                        and isinstance(v, int | float)
                        and not isinstance(v, bool)
                    }
                )
        shown["step"], shown["run_step"] = self._updates - 1, step
        return shown

    def _choose(self, step: int) -> str:
        """The action for an alarm at `step`: the configured one, or escalate's next rung; skip
        after a rollback loop until `window` steps have passed without an alarm."""
        if self._loop.alarm(step):
            if self._standing_down:
                return "none"
            self._loop_skips += 1
            return "skip"
        self._standing_down = False
        if self.config.action != "escalate":
            return self.config.action
        self._alarm_steps.append(step)
        while self._alarm_steps and self._alarm_steps[0] <= step - self.config.window:
            self._alarm_steps.popleft()
        repeats = len(self._alarm_steps)
        if repeats >= len(ESCALATION):
            self._alarm_steps.clear()
            return ESCALATION[-1]
        return ESCALATION[repeats - 1]

    def _act(self, action: str, step: int, score: float) -> None:
        note = None
        rolled_back_to = None
        reset_tensors = None
        updates_before = self._updates
        if action == "rollback":
            snapshot = self._rollback_target(step)
            if snapshot is None:
                action, note = "skip", f"no snapshot at least {self.config.min_age} steps old"
            elif self._loop.is_loop(snapshot.step):
                # Restoring it again would replay what brought the alarm back (a rise the
                # detector's restored state sees again at the same offset, a perturbation that
                # has not ended): a loop that would freeze the run at that snapshot.
                action, note = (
                    "skip",
                    (
                        f"rollback loop: the snapshot of step {snapshot.step} was restored "
                        f"{self._loop.restores} times and the alarm came back each time before a newer "
                        f"one was old enough; alarms are skipped until {self.config.window} steps "
                        "pass without one"
                    ),
                )
                self._loop.looping, self._loop_skips = True, 0
            else:
                rolled_back_to = self._rollback(snapshot)
        elif action == "skip" and self._loop.looping:
            note = "after a rollback loop"
            if self._loop_skips >= self.config.window:
                # Skipping leaves the state as it is: an alarm that lasts through `window` skips
                # is about the state (a run the disturbance already moved, which a monitor
                # keeps judging off its course), not about the update. Skipping on would freeze
                # the run to its end.
                self._standing_down = True
                note += (
                    f"; {self._loop_skips} alarms skipped and it is still on: the guard stands "
                    f"down (no action) until {self.config.window} steps pass without an alarm"
                )
        if action in ("skip", "lr_cut", "reset_moments") and self._undo.step == step:
            self._undo.restore()  # undo this step's update (lr_cut under escalate too)
            self._updates -= 1
            self.stats.skipped_steps += 1
        if action == "reset_moments":
            reset_tensors, note = self._reset_moments(step)
        if action in ("lr_cut", "reset_moments", "rollback"):
            self._cut_until = max(self._cut_until, step + self.config.cooldown)
        self.stats.by_action[action] += 1
        self.last_action = action
        self.interventions.append(
            Intervention(
                step,
                action,
                self.config.detector,
                score,
                self.config.action,
                rolled_back_to,
                note,
                steps_lost=updates_before - self._updates,
                reset_tensors=reset_tensors,
            )
        )

    def _rollback_target(self, step: int) -> Snapshot | None:
        """The newest snapshot at least `min_age` steps old, or None."""
        candidates = [s for s in self._ring if step - s.step >= self.config.min_age]
        return candidates[-1] if candidates else None

    def _rollback(self, snapshot: Snapshot) -> int:
        """Restore `snapshot` (model, optimizers, RNGs, the detector, the probes' history);
        its step."""
        while self._ring and self._ring[-1].step > snapshot.step:
            self._ring.pop()  # taken on the way into the trouble
        snapshot.restore(self.model, self.optimizers)
        detector, history, updates = snapshot.extra
        restored = copy.deepcopy(detector)
        rolled_back = getattr(restored, "rolled_back", None)
        self.detector = rolled_back(self.detector) if rolled_back is not None else restored
        history.restore(self._probes)
        self._loop.restored(snapshot.step)
        self.rolled_back_to = snapshot.step
        self.stats.rolled_back_steps += self._updates - updates
        self._updates = updates
        self._holding = self.hold_after_rollback
        return int(snapshot.step)

    def _reset_moments(self, step: int) -> tuple[int, str | None]:
        """Reset the moments of the tensors whose gradient spiked, in every instrumented
        optimizer (after this step's update was undone), and hold the optimizer-state columns
        the detector is shown for `cooldown` steps. Returns the tensors reset and a note."""
        reset, notes = 0, []
        for role, history in self._norms.items():
            count, note = history.reset(self.config.spike_ratio)
            reset += count
            if note:
                notes.append(f"{role}: {note}" if role else note)
        if not self._norms:
            notes.append("no gradient norms recorded: nothing reset")
        self.stats.moment_resets += reset
        self._held = held_levels(list(self._recent))
        self._hold_until = step + self.config.cooldown
        return reset, "; ".join(notes) or None
