"""Guards in a plain PyTorch loop: what each action restores, checked against copies taken by
hand, and a huge LR spike that ruins an unguarded run but not a guarded one."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import AlarmAt
from stabilitybench.guard import Guard
from stabilitybench.telemetry import Telemetry
from stabilitybench.types import StepContext

torch.set_num_threads(1)


class LRSeen:
    """A hook added after the guard: the LR each step ran with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_step(self, ctx: StepContext) -> None:
        self.lrs.append(float(ctx.optimizer.param_groups[0]["lr"]))

    def on_post_step(self, ctx: StepContext) -> None:
        pass

    def row_fields(self, step: int) -> Mapping[str, Any]:
        return {}


def _setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=0.01), torch.Generator().manual_seed(1)


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[Any]]:
    params = [p.detach().clone() for p in model.parameters()]
    states = [copy.deepcopy(opt.state.get(p)) for p in model.parameters()]
    return params, states


def _same(a: tuple[list[torch.Tensor], list[Any]], b: tuple[list[torch.Tensor], list[Any]]) -> bool:
    if not all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)):
        return False
    for sa, sb in zip(a[1], b[1], strict=True):
        if (sa is None) != (sb is None):
            return False
        if sa is not None and any(not torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def _loop(
    steps: int,
    guard_kw: dict[str, Any] | None,
    *,
    spike: tuple[int, int, float] | None = None,
    after_step: bool = True,
    before: dict[int, Any] | None = None,
    after: dict[int, Any] | None = None,
    rng_at: dict[int, torch.Tensor] | None = None,
) -> tuple[list[float], Guard | None, LRSeen, nn.Module]:
    """Train a tiny regression; `before[s]`/`after[s]` get the state around step s."""
    model, opt, gen = _setup()
    target = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    tel = Telemetry(model, opt)
    guard = Guard(tel, **guard_kw) if guard_kw is not None else None
    seen = LRSeen()
    tel.add_hook(seen)
    losses = []
    for step in range(steps):
        if before is not None:
            before[step] = _state(model, opt)
        if rng_at is not None:
            rng_at[step] = torch.get_rng_state()
        x = torch.randn(16, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), torch.tanh(x @ target))
        opt.zero_grad()
        loss.backward()
        lr = 0.01
        if spike is not None and spike[0] <= step < spike[0] + spike[1]:
            lr *= spike[2]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        tel.log(loss=loss)
        if guard is not None and after_step:
            guard.after_step()
        if after is not None:
            after[step] = _state(model, opt)
        losses.append(float(loss.detach()))
    tel.close()
    return losses, guard, seen, model


def test_skip_restores_parameters_and_optimizer_state_of_before_the_step(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {0, 7}  # step 0: Adam's state did not exist before it
    before: dict[int, Any] = {}
    after: dict[int, Any] = {}
    _, guard, _, _ = _loop(
        10, {"detector": "alarm_at", "action": "skip"}, before=before, after=after
    )
    assert guard is not None
    assert _same(after[7], before[7]) and _same(after[0], before[0])
    assert not _same(after[6], before[6])  # an ordinary step changes the state
    assert all(s is None for s in after[0][1])  # the state created by step 0 is forgotten
    assert [(i.step, i.action) for i in guard.interventions] == [(0, "skip"), (7, "skip")]
    assert guard.stats.skipped_steps == 2


def test_without_after_step_the_guard_acts_at_the_next_step_and_undoes_it_too(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {5}
    before: dict[int, Any] = {}
    after: dict[int, Any] = {}
    _, guard, _, _ = _loop(
        9, {"detector": "alarm_at", "action": "skip"}, after_step=False, before=before, after=after
    )
    assert guard is not None
    # Step 6's gradient was computed on step 5's result, so both updates are undone.
    assert _same(after[6], before[5])
    assert not _same(after[7], before[5])
    assert guard.stats.skipped_steps == 2


def test_lr_cut_multiplies_the_lr_for_cooldown_steps_then_restores_it(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {3}
    kw = {"detector": "alarm_at", "action": "lr_cut", "factor": 0.25, "cooldown": 4}
    _, guard, seen, _ = _loop(12, kw)
    assert seen.lrs == pytest.approx([0.01] * 4 + [0.0025] * 4 + [0.01] * 4)
    assert guard is not None and guard.stats.lr_cut_steps == 4


def test_rollback_restores_the_newest_snapshot_old_enough_with_rng(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {12}
    before: dict[int, Any] = {}
    after: dict[int, Any] = {}
    rng_at: dict[int, torch.Tensor] = {}
    kw = {"detector": "alarm_at", "action": "rollback", "every": 5, "keep": 3, "min_age": 5}
    _, guard, seen, _ = _loop(20, kw, before=before, after=after, rng_at=rng_at)
    assert guard is not None
    # Snapshots at steps 0, 5, 10; 12 − 10 < 5, so step 5's (taken before step 5's update).
    assert guard.rolled_back_to == 5
    assert _same(after[12], before[5])
    assert guard.stats.rolled_back_steps == 8  # updates 5..12 thrown away
    # The LR is cut (0.5) for the 50 steps after the rollback.
    assert seen.lrs[12] == pytest.approx(0.01) and seen.lrs[13] == pytest.approx(0.005)
    event = guard.events()[0]
    assert event["kind"] == "guard" and event["name"] == "rollback"
    assert event["params"] == {
        "action": "rollback",
        "detector": "alarm_at",
        "score": 1.0,
        "guard": "rollback",
        "rolled_back_to": 5,
        "steps_lost": 8,
    }
    assert (event["start_step"], event["end_step"]) == (12, 12)


def test_an_alarm_back_after_four_restores_of_the_same_snapshot_is_a_loop_and_is_skipped(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {12, 13, 14, 15, 16, 40, 200}
    kw = {"detector": "alarm_at", "action": "rollback", "every": 5, "keep": 3, "min_age": 5}
    before: dict[int, Any] = {}
    after: dict[int, Any] = {}
    _, guard, _, _ = _loop(210, kw, before=before, after=after)
    assert guard is not None
    # 12 → snapshot 5 (updates 5..12 lost: 8); 13, 14, 15 → snapshot 5 again: only the update
    # since is lost (a disturbance may outlast one restore). 16: snapshot 5 a fifth time would
    # replay the trouble, so the step is skipped, and so is 40 (within `window` = 100 steps of
    # the last alarm). 200 is after a quiet window: it rolls back, to the newest snapshot.
    got = [(i.step, i.action, i.rolled_back_to, i.steps_lost) for i in guard.interventions]
    assert got == [
        (12, "rollback", 5, 8),
        (13, "rollback", 5, 1),
        (14, "rollback", 5, 1),
        (15, "rollback", 5, 1),
        (16, "skip", None, 1),
        (40, "skip", None, 1),
        (200, "rollback", 195, 6),
    ]
    assert guard.interventions[4].note is not None
    assert guard.interventions[4].note.startswith("rollback loop: the snapshot of step 5 was")
    assert guard.interventions[5].note == "after a rollback loop"
    assert _same(after[15], before[5]) and _same(after[16], before[16])
    assert guard.stats.rolled_back_steps == 8 + 3 + 6


def test_escalate_does_not_loop_on_rollbacks_to_the_same_snapshot(
    alarm_at: type[AlarmAt],
) -> None:
    # An alarm on every step from 30 to 60, as a ramp that the restored state meets again.
    alarm_at.steps = set(range(30, 61))
    kw = {"detector": "alarm_at", "action": "escalate", "every": 10, "keep": 3, "min_age": 10}
    _, guard, _, _ = _loop(200, kw)
    assert guard is not None
    actions = [(i.step, i.action, i.rolled_back_to) for i in guard.interventions]
    # skip, lr_cut, reset_moments, rollback to 20: four times (steps 30-45); the fifth rung
    # (49) would restore 20 again: a loop, skipped, and every alarm after it until 60.
    ladder = ["skip", "lr_cut", "reset_moments", "rollback"]
    assert [a for _, a, _ in actions[:16]] == ladder * 4
    assert {r for _, a, r in actions[:16] if a == "rollback"} == {20}
    assert [a for _, a, _ in actions[16:19]] == ladder[:3]
    assert actions[19][:2] == (49, "skip") and guard.interventions[19].note is not None
    assert guard.interventions[19].note.startswith("rollback loop")
    assert [a for _, a, _ in actions[20:]] == ["skip"] * (60 - 49)
    assert guard.stats.by_action["rollback"] == 4


def test_rollback_restores_the_torch_rng() -> None:
    model, opt, _ = _setup()
    tel = Telemetry(model, opt)
    from stabilitybench.guard.snapshot import Snapshot

    snap = Snapshot.take(0, model, [opt])
    expected = torch.rand(3)
    torch.rand(5)
    snap.restore(model, [opt])
    assert torch.equal(torch.rand(3), expected)
    tel.close()


def test_rollback_without_an_old_enough_snapshot_skips_and_says_so(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {2}
    kw = {"detector": "alarm_at", "action": "rollback", "every": 5, "keep": 3, "min_age": 5}
    _, guard, _, _ = _loop(4, kw)
    assert guard is not None
    (event,) = guard.events()
    assert event["name"] == "skip" and "no snapshot at least 5 steps old" in event["params"]["note"]


def test_escalate_goes_skip_then_lr_cut_then_reset_moments_then_rollback(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {30, 31, 33, 34, 200}
    kw = {"detector": "alarm_at", "action": "escalate", "every": 10, "keep": 3, "min_age": 10}
    _, guard, _, _ = _loop(210, kw)
    assert guard is not None
    got = [(i.step, i.action, i.rolled_back_to) for i in guard.interventions]
    # 200 is outside the 100-step window of the others: it starts over at skip.
    assert got == [
        (30, "skip", None),
        (31, "lr_cut", None),
        (33, "reset_moments", None),
        (34, "rollback", 20),
        (200, "skip", None),
    ]
    # the rollback to 20 loses updates 20..34 but the three already undone: 12
    assert [i.steps_lost for i in guard.interventions] == [1, 1, 1, 12, 1]


def test_a_huge_lr_spike_ruins_the_unguarded_run_but_not_the_rolled_back_one() -> None:
    spike = (60, 3, 300.0)
    unguarded, _, _, _ = _loop(140, None, spike=spike)
    guarded, guard, _, _ = _loop(
        140,
        {"detector": "zclip", "action": "rollback", "every": 10, "keep": 4, "min_age": 10},
        spike=spike,
    )
    healthy_level = float(np.mean(unguarded[40:60]))
    tail = slice(120, 140)
    assert not (np.mean(unguarded[tail]) < 10 * healthy_level)  # diverged or stuck far above
    assert np.mean(guarded[tail]) < 2 * healthy_level
    assert guard is not None and guard.stats.by_action["rollback"] >= 1
    assert all(i.detector == "zclip" for i in guard.interventions)
    assert math.isfinite(guarded[-1])


def test_per_step_read_back_still_writes_the_sink_in_batches(tmp_path: Any) -> None:
    from stabilitybench.streaming import ParquetSink

    model, opt, gen = _setup()
    sink = ParquetSink(tmp_path / "telemetry.parquet")
    tel = Telemetry(model, opt, sink=sink, flush_every=10)
    guard = Guard(tel, detector="zclip", action="skip")
    scored = []
    for _ in range(30):
        loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tel.log(loss=loss)
        guard.after_step()
        scored.append(len(guard.scores))
    assert scored == list(range(1, 31))  # each step scored before the next one
    assert len(list(sink.parts_dir.glob("part-*.parquet"))) == 3  # not one part file per step
    table = tel.close()
    assert list(table["step"]) == list(range(30)) and table["loss"].notna().all()


def test_steps_the_probes_skip_are_not_scored() -> None:
    model, opt, gen = _setup()
    tel = Telemetry(model, opt, every=3)
    guard = Guard(tel, detector="zclip", action="skip")
    for _ in range(90):
        loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tel.log(loss=loss)
        guard.after_step()
    tel.close()
    assert [s for s, _ in guard.scores] == list(range(0, 90, 3))
    assert all(math.isfinite(score) for _, score in guard.scores)


def test_the_detector_sees_lr_proportional_columns_without_the_guards_own_cut(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {3}
    seen_rows: list[dict[str, Any]] = []
    update = AlarmAt.update

    def recording(self: AlarmAt, row: Mapping[str, Any]) -> float:
        seen_rows.append(dict(row))
        return update(self, row)

    alarm_at.update = recording  # type: ignore[method-assign]
    try:
        model, opt, gen = _setup()
        tel = Telemetry(model, opt)
        guard = Guard(tel, detector="alarm_at", action="lr_cut", factor=0.25, cooldown=3)
        for _ in range(10):
            loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tel.log(loss=loss)
            guard.after_step()
        table = tel.close()
    finally:
        alarm_at.update = update  # type: ignore[method-assign]
    logged = table.set_index("step")
    # Steps 4..6 ran at lr 0.01 × 0.25; the detector is shown the LR and the update as they
    # would be without the cut (Adam's update is lr × a function of its state).
    assert list(logged["lr"]) == pytest.approx([0.01] * 4 + [0.0025] * 3 + [0.01] * 3)
    by_step = {int(r["step"]): r for r in seen_rows}
    for step in range(10):
        factor = 0.25 if 4 <= step <= 6 else 1.0
        assert by_step[step]["lr"] == pytest.approx(0.01)
        for column in ("update_norm", "update_ratio"):
            assert by_step[step][column] == pytest.approx(logged.loc[step, column] / factor)
        assert by_step[step]["grad_norm"] == pytest.approx(logged.loc[step, "grad_norm"])


def test_uncut_row_by_hand() -> None:
    from stabilitybench.guard.core import uncut_row

    row = {"step": 7, "lr": 0.005, "lr/group1": 0.001, "update_norm": 2.0, "loss": 3.0}
    assert uncut_row(row, {"": 0.5}) == {
        "step": 7,
        "lr": 0.01,
        "lr/group1": 0.002,
        "update_norm": 4.0,
        "loss": 3.0,
    }
    roles = {"actor/update_ratio": 0.1, "critic/update_ratio": 0.2, "actor/lr": 1e-3}
    assert uncut_row(roles, {"actor": 0.5}) == {
        "actor/update_ratio": 0.2,
        "critic/update_ratio": 0.2,
        "actor/lr": 2e-3,
    }


def test_a_rollback_restores_the_probes_history_too() -> None:
    """The gradient coherence compares each gradient with the previous one and an EMA: after a
    rollback those must be the restored timeline's, not the thrown-away steps'."""
    from stabilitybench.guard.snapshot import ProbeHistory
    from stabilitybench.telemetry.probes import GradCoherence

    model, opt, gen = _setup()
    tel = Telemetry(model, opt)
    (coherence,) = [p for p in tel.probes if isinstance(p, GradCoherence)]

    def step() -> None:
        loss = model(torch.randn(4, 8, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    history = ProbeHistory.take(tel.probes)
    assert coherence._state is not None
    saved = coherence._state.clone()
    for _ in range(3):
        step()
    assert not torch.equal(coherence._state, saved)
    for _ in range(2):  # restorable twice (the ring keeps the snapshot after a rollback)
        history.restore(tel.probes)
        assert torch.equal(coherence._state, saved)
        step()
    assert history.nbytes() == saved.numel() * saved.element_size() + 1  # (2, P) + a bool
    tel.close()


def test_after_a_loop_an_alarm_that_window_skips_do_not_end_stands_the_guard_down(
    alarm_at: type[AlarmAt],
) -> None:
    # An alarm on every step from 30 to 150: about the state, which skipping does not change
    # (a monitor that keeps judging a moved run off course).
    alarm_at.steps = set(range(30, 151))
    kw = {
        "detector": "alarm_at",
        "action": "escalate",
        "every": 10,
        "keep": 3,
        "min_age": 10,
        "window": 20,
    }
    _, guard, _, _ = _loop(250, kw)
    assert guard is not None
    got = [(i.step, i.action) for i in guard.interventions]
    # The ladder four times (30-45), three rungs (46-48), the loop broken at 49, then 20 skips
    # (50-69), the last of which stands the guard down: no action from 70 on.
    assert got[19] == (49, "skip") and got[-1] == (69, "skip")
    assert [a for _, a in got[20:]] == ["skip"] * 20
    last = guard.interventions[-1].note
    assert last is not None and "stands down" in last
    assert guard.stats.alarms == 151 - 30
    # After 20 quiet steps the loop is over: a new alarm starts the ladder again.
    alarm_at.steps = set(range(30, 151)) | {200}
    _, guard, _, _ = _loop(250, kw)
    assert guard is not None and (guard.interventions[-1].step, guard.interventions[-1].action) == (
        200,
        "skip",
    )
    assert guard.interventions[-1].note is None
