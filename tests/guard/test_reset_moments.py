"""`reset_moments` with a real torch AdamW: the step is undone, the moments of the tensor whose
gradient spiked are forgotten (Adam starts them again, step count 1, at the next step), the
other tensors keep theirs, the LR is cut, and the detector is shown the optimizer's own columns
at their level before the reset."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import AlarmAt
from stabilitybench.guard import Guard
from stabilitybench.guard.core import held_levels, is_optimizer_state
from stabilitybench.guard.moments import MIN_HISTORY, GradNormHistory, forget_moments
from stabilitybench.telemetry import Telemetry

torch.set_num_threads(1)
BETAS = (0.9, 0.999)


def _run(
    steps: int,
    guard_kw: dict[str, Any],
    spike_at: int | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, Guard, dict[int, Any], dict[int, list[torch.Tensor]]]:
    """A small regression under AdamW; at `spike_at` the first layer's weight gradient is ×100.
    Returns the optimizer state before each step and the gradients each step used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=BETAS)
    gen = torch.Generator().manual_seed(1)
    tel = Telemetry(model, opt)
    guard = Guard(tel, **guard_kw)
    before: dict[int, Any] = {}
    grads: dict[int, list[torch.Tensor]] = {}
    for step in range(steps):
        before[step] = {p: copy.deepcopy(opt.state.get(p)) for p in model.parameters()}
        x = torch.randn(16, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        if step == spike_at:
            model[0].weight.grad.mul_(100.0)
        grads[step] = [p.grad.clone() for p in model.parameters()]
        opt.step()
        guard.after_step(loss=loss)
    tel.close()
    return model, opt, guard, before, grads


def _same_state(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_spiked_tensor_restarts_its_moments_and_the_others_keep_theirs(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {20}
    kw = {"detector": "alarm_at", "action": "reset_moments", "cooldown": 3}
    model, opt, guard, before, grads = _run(22, kw, spike_at=20)
    (event,) = guard.events()
    assert event["name"] == "reset_moments" and event["start_step"] == 20
    assert event["params"]["reset_tensors"] == 1 and event["params"]["steps_lost"] == 1
    assert "note" not in event["params"]
    weight, *others = list(model.parameters())
    # Step 20 was undone, then the weight's moments forgotten: step 21 started them afresh.
    state = opt.state[weight]
    assert float(state["step"]) == 1.0
    g = grads[21][0]
    torch.testing.assert_close(state["exp_avg"], (1 - BETAS[0]) * g)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - BETAS[1]) * g * g)
    # The others went on from their state before step 20 (step 20's update undone): one more step.
    for i, p in enumerate(others, start=1):
        assert float(opt.state[p]["step"]) == float(before[20][p]["step"]) + 1
        expected = BETAS[0] * before[20][p]["exp_avg"] + (1 - BETAS[0]) * grads[21][i]
        torch.testing.assert_close(opt.state[p]["exp_avg"], expected)
    assert guard.stats.moment_resets == 1 and guard.stats.skipped_steps == 1
    assert guard.stats.lr_cut_steps == 1  # step 21 ran at half the LR (cooldown 3: to step 23)


def test_with_no_tensor_spiked_every_tensor_is_reset_and_the_note_says_so(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {20}
    model, opt, guard, _, _ = _run(21, {"detector": "alarm_at", "action": "reset_moments"})
    (event,) = guard.events()
    assert event["params"]["reset_tensors"] == 4
    note = event["params"]["note"]
    assert note == "no tensor's gradient norm above 3× its median: every tensor reset"
    assert all(not opt.state.get(p) for p in model.parameters())  # nothing stepped since


def test_before_enough_history_every_tensor_is_reset(alarm_at: type[AlarmAt]) -> None:
    alarm_at.steps = {3}
    _, _, guard, _, _ = _run(4, {"detector": "alarm_at", "action": "reset_moments"}, spike_at=3)
    (event,) = guard.events()
    assert event["params"]["reset_tensors"] == 4
    assert f"fewer than {MIN_HISTORY} steps" in event["params"]["note"]


def test_the_detector_sees_the_optimizer_columns_held_after_a_reset(
    alarm_at: type[AlarmAt],
) -> None:
    alarm_at.steps = {20}
    seen: list[dict[str, Any]] = []
    update = AlarmAt.update

    def recording(self: AlarmAt, row: Mapping[str, Any]) -> float:
        seen.append(dict(row))
        return update(self, row)

    alarm_at.update = recording  # type: ignore[method-assign]
    try:
        kw = {"detector": "alarm_at", "action": "reset_moments", "cooldown": 3}
        _run(26, kw, spike_at=20)
    finally:
        alarm_at.update = update  # type: ignore[method-assign]
    by_step = {int(r["run_step"]): r for r in seen}
    level = float(np.median([by_step[s]["update_ratio"] for s in range(12, 21)]))
    for step in (21, 22, 23):  # the cooldown: held at the median of the 9 rows up to the alarm
        assert by_step[step]["update_ratio"] == level
    assert by_step[21]["grad_norm"] != by_step[22]["grad_norm"]  # the gradient norm is not held
    assert by_step[24]["update_ratio"] != level


def test_forget_moments_and_the_norm_ring_by_hand() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.Adagrad([a, b])  # its state is a sum, not a moment: left as it is
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert forget_moments(opt, [a, b], [True, True]) == 0 and opt.state[a]
    adam = torch.optim.Adam([a, b])
    adam.step()
    assert forget_moments(adam, [a, b], [False, True]) == 1
    assert adam.state.get(a) and not adam.state.get(b)
    history = GradNormHistory(size=4)
    for norms in ([1.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 1.0], [1.0, 1.0]):
        history.record(adam, [a, b], torch.tensor(norms))
    assert history.spiked(3.0) is None  # fewer than MIN_HISTORY earlier steps
    for _ in range(MIN_HISTORY):
        history.record(adam, [a, b], torch.tensor([1.0, 1.0]))
    history.record(adam, [a, b], torch.tensor([3.5, float("nan")]))
    assert history.spiked(3.0) == [True, True]  # 3.5 > 3 × 1; a NaN norm counts as spiked
    assert history.count == 5 + MIN_HISTORY + 1 and history.ring is not None
    assert history.ring.shape == (4, 2)


def test_held_levels_and_which_columns_are_held() -> None:
    rows = [{"update_ratio": 1.0, "adam_rms_max": 2.0}, {"update_ratio": 3.0}, {"update_ratio": 9}]
    assert held_levels(rows) == {"update_ratio": 3.0, "adam_rms_max": 2.0}
    assert held_levels([{"update_ratio": float("nan")}]) == {}
    assert is_optimizer_state("actor/update_ratio") and is_optimizer_state("eos_ratio")
    assert not is_optimizer_state("grad_norm") and not is_optimizer_state("update_norm/fc.weight")


@pytest.mark.parametrize("action", ["skip", "lr_cut", "rollback"])
def test_other_actions_keep_no_gradient_norms(action: str, alarm_at: type[AlarmAt]) -> None:
    _, _, guard, _, _ = _run(3, {"detector": "alarm_at", "action": action})
    assert guard._norms == {}  # the ring exists only for reset_moments and escalate
