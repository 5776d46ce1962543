"""`Guard`: a registered detector's online score driving an action inside a training loop.

The guard is a telemetry `StepHook` plus a per-step row callback:

- pre-step (clock optimizer): apply an active LR cut; take the skip undo buffer (every step, on
  the device) and, for rollback, a CPU snapshot every `every` steps into a ring of `keep`.
- when the step's row is finished (`guard.after_step()`, which the loop calls right after its
  `tel.log(loss=...)`; else at the next step's pre-step): `detector.update(row)` gives the score,
  the detector's native rule says whether it is an alarm, and the action runs at once.
- post-step: the LR cut is lifted again (so an LR scheduler or a perturbation schedule that set
  the LR is left as it was), and a step whose gradient was computed on a state the guard has just
  thrown away is undone too.

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
from typing import Any

import numpy as np
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.config import GuardConfig, parse_guard
from stabilitybench.guard.snapshot import ProbeHistory, Snapshot, StepUndo
from stabilitybench.telemetry.core import Telemetry
from stabilitybench.types import StepContext

# A row the probes measured carries a gradient norm (`critic/grad_norm` with several
# optimizers); the guard scores only those rows.
_PROBED_COLUMNS = ("grad_norm", "grad_norm_raw")
# Columns that are the step's LR times something this step's LR does not change (torch's SGD,
# Adam and AdamW updates are lr × a function of the optimizer state): under the guard's own LR
# cut the detector is shown them divided by the cut, so it judges the training and not the
# guard's throttle (else a fitted monitor sees every cut as a deviation and alarms again).
LR_PROPORTIONAL = frozenset({"lr", "update_norm", "update_ratio", "update_ratio_layer_max"})


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
    action: str  # what was done: skip | lr_cut | rollback
    detector: str
    score: float
    configured: str  # the guard's action (escalate picks one of the three)
    rolled_back_to: int | None = None  # rollback: the step the restored snapshot was taken at
    note: str | None = None  # e.g. a rollback that found no snapshot old enough and skipped
    steps_lost: int = 0  # updates this intervention threw away (skip: 1; rollback: since then)

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
    snapshots: int = 0
    snapshot_bytes: int = 0  # of one rollback snapshot (CPU)
    undo_bytes: int = 0  # of the skip buffer (device)
    by_action: Counter[str] = field(default_factory=Counter)  # interventions by action


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


class Guard:
    """Watch a registered detector's online score and act on its alarms.

    `Guard(tel, detector="zclip", action="rollback", every=20, keep=4, min_age=20)`; the
    parameters are those of `GuardConfig`. In a plain loop::

        loss.backward(); opt.step(); tel.log(loss=loss); guard.after_step()

    After a rollback, `guard.rolled_back_to` is the step of the restored snapshot: the loop
    should go on with NEW data (not replay the batches since then — ours draw fresh batches);
    model, optimizer state and the global RNGs are already restored, and the LR is cut for
    `cooldown` steps. `guard.events()` lists every intervention for events.parquet.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        detector: str = "zclip",
        action: str = "skip",
        *,
        extra_optimizers: Sequence[torch.optim.Optimizer] = (),
        hold_after_rollback: bool = False,
        **params: Any,
    ) -> None:
        monitor = params.pop("monitor", None)
        self.config = parse_guard(
            {
                "detector": detector,
                "action": action,
                **params,
                **({"monitor": str(monitor)} if monitor else {}),
            },
            where="guard",
        )
        self.telemetry = telemetry
        self.detector = build_detector(self.config)
        # Snapshotted and undone with the instrumented ones, but neither scored nor LR-cut (SAC's
        # entropy-coefficient optimizer, say).
        self.optimizers = [*telemetry.optimizers.values(), *extra_optimizers]
        self._clock = next(iter(telemetry.optimizers))
        self.model = telemetry.model
        # After a rollback, undo every later update until `release()` (PPO: the rest of the
        # current rollout's epochs, collected by the policy the rollback threw away).
        self.hold_after_rollback = hold_after_rollback
        self._holding = False
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
        self.interventions: list[Intervention] = []
        self.stats = GuardStats()
        self.scores: list[tuple[int, float]] = []
        self.rolled_back_to: int | None = None
        self.last_action: str | None = None
        telemetry.add_hook(self)
        # The score must be known before the next update: one host sync per step.
        telemetry.on_row(self._on_row, every_step=True)

    # -- the loop's call -----------------------------------------------------------------------
    def after_step(self) -> str | None:
        """Finish this step's row now and act on it (call after `tel.log(...)`); returns the
        action taken for this step, or None."""
        self.last_action = None
        self._in_after_step = True
        try:
            self.telemetry.finish_step()
        finally:
            self._in_after_step = False
        return self.last_action

    def events(self) -> list[dict[str, Any]]:
        return [i.event() for i in self.interventions]

    # -- StepHook --------------------------------------------------------------------------------
    def on_pre_step(self, ctx: StepContext) -> None:
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
        if not any(key.rpartition("/")[2] in _PROBED_COLUMNS for key in row):
            return  # a step the telemetry's probes skipped (`every` > 1): nothing to score
        step = int(row["step"])
        factors = self._cut_factors.pop(step, None)
        for old in [s for s in self._cut_factors if s < step]:
            del self._cut_factors[old]
        # What the detector reads: the run on its restored timeline (after a rollback the state
        # is that of an earlier step, and a monitor that judges by training progress must see it
        # so: else a rolled-back run looks behind schedule, alarms, and is rolled back again),
        # and without the guard's own LR cut (else the cut looks like a deviation).
        shown = uncut_row(row, factors) if factors else dict(row)
        shown["step"], shown["run_step"] = self._updates - 1, step
        rewind = getattr(self.detector, "rewind_on_undo", False)
        before = self.detector.online_state() if rewind else None
        score = float(self.detector.update(shown))
        self.scores.append((step, score))
        if not bool(np.asarray(self.detector.native(np.array([score])))[0]):
            return
        self.stats.alarms += 1
        action = self._choose(step)
        # Called from the next step's pre-step (no `after_step()` in the loop): that step's
        # gradient is already computed on the state about to be replaced, so undo it too.
        late = not self._in_after_step and self.telemetry.step == step and self._undo.step == step
        self._act(action, step, score)
        if rewind and action in ("skip", "lr_cut"):
            # The step's update was undone: its row is not on the run's timeline either (else
            # the monitor's smoothing carries the alarm on, and every next step is skipped too).
            self.detector.set_online_state(before)
        if late and not self.telemetry._closed:
            self._discard_step = step + 1  # charged to this intervention at its post-step

    def _choose(self, step: int) -> str:
        if self.config.action != "escalate":
            return self.config.action
        self._alarm_steps.append(step)
        while self._alarm_steps and self._alarm_steps[0] <= step - self.config.window:
            self._alarm_steps.popleft()
        repeats = len(self._alarm_steps)
        if repeats >= 3:
            self._alarm_steps.clear()
            return "rollback"
        return "skip" if repeats == 1 else "lr_cut"

    def _act(self, action: str, step: int, score: float) -> None:
        note = None
        rolled_back_to = None
        updates_before = self._updates
        if action == "rollback":
            candidates = [s for s in self._ring if step - s.step >= self.config.min_age]
            if candidates:
                snapshot = candidates[-1]
                while self._ring and self._ring[-1].step > snapshot.step:
                    self._ring.pop()  # taken on the way into the trouble
                snapshot.restore(self.model, self.optimizers)
                detector, history, updates = snapshot.extra
                self.detector = copy.deepcopy(detector)
                history.restore(self._probes)
                rolled_back_to = snapshot.step
                self.rolled_back_to = snapshot.step
                self.stats.rolled_back_steps += self._updates - updates
                self._updates = updates
                self._holding = self.hold_after_rollback
            else:
                action, note = "skip", f"no snapshot at least {self.config.min_age} steps old"
        if action in ("skip", "lr_cut") and self._undo.step == step:
            self._undo.restore()  # undo this step's update (lr_cut under escalate too)
            self._updates -= 1
            self.stats.skipped_steps += 1
        if action in ("lr_cut", "rollback"):
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
            )
        )


def guard_for_run(guard: Mapping[str, Any] | None, telemetry: Telemetry) -> Guard | None:
    """The guard a run's spec asks for (`RunSpec.guard`), attached to its telemetry, or None."""
    if not guard:
        return None
    params = dict(guard)
    return Guard(telemetry, str(params.pop("detector")), str(params.pop("action")), **params)
