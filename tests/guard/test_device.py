"""The device guard: `skip` and `lr_cut` decided before the update, with no host read per step and
no copy of the parameters or optimizer state (`guard.device`)."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

import stabilitybench
from host_reads import CountReads
from stabilitybench import StabilityBenchError
from stabilitybench.guard import Guard
from stabilitybench.guard.device import DeviceGuard, DeviceRule
from stabilitybench.guard.masked import masked_step, params_norm, update_estimate
from stabilitybench.perturbations import PerturbationSchedule

torch.set_num_threads(1)
SPIKE_AT = 150

OPTIMIZERS = [
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1}),
]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _backward(model: torch.nn.Module, x: torch.Tensor, factor: float = 1.0) -> None:
    model.zero_grad()
    (model(x).pow(2).mean() * factor).backward()


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS)
def test_a_kept_step_is_torchs_own_update(cls: Any, options: dict[str, Any]) -> None:
    ours, theirs = _net(), _net()
    opt_ours, opt_theirs = cls(ours.parameters(), **options), cls(theirs.parameters(), **options)
    keep, one = torch.tensor(True), torch.tensor(1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = torch.randn(16, 5, generator=gen)
        _backward(ours, x)
        _backward(theirs, x)
        opt_theirs.step()
        with torch.no_grad():
            masked_step(opt_ours, keep, one)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS)
def test_a_skipped_step_changes_nothing_even_with_an_infinite_gradient(
    cls: Any, options: dict[str, Any]
) -> None:
    model = _net()
    opt = cls(model.parameters(), **options)
    for _ in range(3):
        _backward(model, torch.randn(16, 5))
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    _backward(model, torch.randn(16, 5), factor=1e6)
    next(model.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
    with torch.no_grad():
        masked_step(opt, torch.tensor(False), torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state_dict()["state"]
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[index][key]))


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS[:3])
def test_the_update_estimate_at_a_new_lr_is_the_last_update_scaled_by_it(
    cls: Any, options: dict[str, Any]
) -> None:
    """The estimate reads the last kept update's direction: after a step at LR η that moved θ by
    ‖Δθ‖, the estimate at 1000 η is 1000 ‖Δθ‖ / ‖θ‖ — an LR spike in full, before it lands."""
    model = _net()
    opt = cls(model.parameters(), **{**options, "weight_decay": 0.0})
    keep, one = torch.tensor(True), torch.tensor(1.0)
    for _ in range(5):
        _backward(model, torch.randn(16, 5))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        directions = masked_step(opt, keep, one)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        for group in opt.param_groups:
            group["lr"] *= 1000
        estimate = float(update_estimate(opt, directions, params_norm(list(model.parameters()))))
        for group in opt.param_groups:
            group["lr"] /= 1000
        realized = float((after - before).norm() / after.norm())
        assert estimate == pytest.approx(1000 * realized, rel=1e-5)


def test_the_robust_rule_keeps_alarming_values_out_of_its_history() -> None:
    rule = DeviceRule("auto", 1, torch.device("cpu"), window=16, warmup=8, threshold=6.0)
    given = torch.tensor([True])
    rng = np.random.default_rng(0)
    alarms = [
        bool(rule.decide(torch.tensor([1.0 + 0.01 * rng.standard_normal()]), given)[0])
        for _ in range(20)
    ]
    assert not any(alarms)
    for _ in range(30):  # a value far above the range alarms every time: it never enters it
        alarm, score = rule.decide(torch.tensor([5.0]), given)
        assert bool(alarm) and float(score) > 6
    alarm, score = rule.decide(torch.tensor([math.nan]), given)
    assert bool(alarm) and math.isinf(float(score))  # a non-finite value always alarms
    assert not bool(rule.decide(torch.tensor([math.nan]), torch.tensor([False]))[0])  # not given


def test_a_loss_that_moved_is_learned_again_but_an_update_ratio_is_not() -> None:
    """Skipping leaves the weights as they are, so a loss that moved to a new level cannot come
    back: after `patience` alarms in a row the rule forgets that signal's range and learns it
    again (warm-up included) instead of skipping forever. The update ratio moves with the LR
    whatever is skipped: it keeps alarming while it is high."""
    kw: dict[str, Any] = {"window": 16, "warmup": 8, "threshold": 6.0, "patience": 5}
    rule = DeviceRule("auto", 2, torch.device("cpu"), relearn=(True, False), **kw)
    given = torch.tensor([True, True])
    rng = np.random.default_rng(0)

    def step(loss: float, ratio: float) -> bool:
        noise = 0.01 * rng.standard_normal(2)
        return bool(rule.decide(torch.tensor([loss + noise[0], ratio + noise[1]]), given)[0])

    assert not any(step(1.0, 1.0) for _ in range(20))
    moved = [step(3.0, 1.0) for _ in range(30)]  # the loss moves to 3 and stays there
    assert moved[:4] == [True] * 4  # alarms until its 5th alarm in a row...
    assert not any(moved[4:])  # ...then it is learned again: no more skips
    assert not bool(rule.streak.any())
    assert step(9.0, 1.0)  # once learned again (8 values), a spike above 3 alarms again
    high = [step(3.0, 4.0) for _ in range(30)]  # the ratio moves to 4 and stays there
    assert all(high)
    assert int(rule.streak[1]) == 30


def _loop(
    guard: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int
) -> list[torch.Tensor]:
    """`steps` training steps with the guard; the losses as tensors (nothing read)."""
    losses = []
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        guard.before_step(loss=loss)
        opt.step()
        guard.after_step()
        losses.append(loss.detach())
    return losses


def _floats(losses: list[torch.Tensor]) -> list[float]:
    return [float(v) for v in losses]


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_protect_skip_decides_on_the_device_and_skips_the_spike_before_it_lands(seed: int) -> None:
    model, opt = _model(seed)
    with stabilitybench.protect(model, opt, action="skip") as guard:
        assert isinstance(guard, DeviceGuard) and not guard.telemetry.sync_every_step
        healthy = _floats(_loop(guard, model, opt, 300))
    assert guard.interventions == [] and len(guard.scores) == 300

    model, opt = _model(seed)
    with stabilitybench.protect(model, opt, action="skip") as guard:
        spike = [{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000}]  # one ×1000 update
        PerturbationSchedule(spike).attach(guard.telemetry)
        spiked = _floats(_loop(guard, model, opt, 300))
    # The ×1000 update is seen in the update it proposes, before it is made: that very step is
    # skipped, and the run goes on as if it had not happened.
    assert [(i.step, i.action) for i in guard.interventions] == [(SPIKE_AT, "skip")]
    assert guard.stats.skipped_steps == 1 and guard.stats.undo_bytes == 0
    assert float(np.mean(spiked[-20:])) < 1.5 * float(np.mean(healthy[-20:])) + 0.05
    event = guard.events()[0]
    assert event["name"] == "skip" and event["params"]["guard"] == "skip"


def test_without_the_guard_the_same_spike_does_harm() -> None:
    model, opt = _model(0)
    with stabilitybench.protect(model, opt, action="skip", on_device=False) as host:
        healthy = _floats(_loop(host, model, opt, 300))
    model, opt = _model(0)
    tel = stabilitybench.Telemetry(model, opt)
    PerturbationSchedule([{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000}]).attach(tel)

    class NoGuard:
        def before_step(self, **_: Any) -> None: ...
        def after_step(self, **_: Any) -> None: ...

    spiked = _floats(_loop(NoGuard(), model, opt, 300))
    tel.close()
    assert max(spiked[SPIKE_AT + 1 : SPIKE_AT + 20]) > 10 * float(np.mean(healthy[-20:]))


def test_lr_cut_scales_the_updates_for_the_cooldown_and_keeps_the_moments() -> None:
    model, opt = _model(0)
    guard = stabilitybench.protect(model, opt, action="lr_cut", factor=0.25, cooldown=10)
    PerturbationSchedule([{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000}]).attach(
        guard.telemetry
    )
    tel = guard.telemetry
    rows: list[dict[str, Any]] = []
    tel.on_row(rows.append)
    _loop(guard, model, opt, 200)
    guard.close()
    scale = {int(r["step"]): r["guard_scale"] for r in rows}
    assert guard.interventions[0].step == SPIKE_AT
    assert all(scale[s] == 0.25 for s in range(SPIKE_AT, SPIKE_AT + 10))
    assert scale[SPIKE_AT - 1] == 1.0 and guard.stats.lr_cut_steps >= 10
    opt.step()  # torch's own step works again after the guard (its step counts are back on CPU)


def test_no_host_read_per_step_and_no_copy_of_the_training_state() -> None:
    model, opt = _model(0)
    tel = stabilitybench.Telemetry(model, opt, flush_every=1000, keep_rows=True)
    guard = stabilitybench.protect(model, opt, action="skip", telemetry=tel)
    _loop(guard, model, opt, 60)  # warm-up: buffers, Adam's state
    with CountReads() as counted:
        _loop(guard, model, opt, 100)
    assert counted.total == 0, counted.counts
    held = _tensor_elements(guard.__dict__, {id(p) for p in model.parameters()}, opt)
    # The history ring (3 signals x 128 steps) and a few scalars, whatever the model's size.
    assert held <= guard.rule.history.numel() + 16, held
    guard.close()
    assert len(guard.scores) == 160


def _tensor_elements(obj: Any, exclude: set[int], opt: Any, seen: set[int] | None = None) -> int:
    """Elements of every tensor reachable from `obj` (not the model's parameters, nor the
    optimizer and telemetry the guard was given: those exist without it)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or id(obj) in exclude or obj is opt:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, stabilitybench.Telemetry):
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_elements(v, exclude, opt, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_elements(v, exclude, opt, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type | torch.nn.Module):
        return _tensor_elements(vars(obj), exclude, opt, seen)
    return 0


def test_which_guard_protect_gives() -> None:
    model, opt = _model(0)
    assert isinstance(stabilitybench.protect(model, opt, "skip", "olmo"), DeviceGuard)
    model, opt = _model(0)
    assert isinstance(stabilitybench.protect(model, opt, "skip", on_device=False), Guard)
    model, opt = _model(0)
    assert isinstance(stabilitybench.protect(model, opt, "escalate"), Guard)  # host actions
    model, opt = _model(0)
    assert isinstance(stabilitybench.protect(model, opt, "skip", "zclip"), Guard)  # no device form
    rms = torch.optim.RMSprop(model.parameters())
    assert isinstance(stabilitybench.protect(model, rms, "skip"), Guard)  # no masked step


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"action": "escalate", "on_device": True}, ["protect.on_device", "escalate", "host"]),
        ({"detector": "zclip", "action": "skip", "on_device": True}, ["zclip", "device form"]),
        ({"action": "skip", "on_device": "yes"}, ["protect.on_device", "True, False or None"]),
        ({"action": "skip", "rms": True, "on_device": True}, ["RMSprop", "masked step"]),
    ],
)
def test_bad_input_is_one_error(kwargs: dict[str, Any], words: list[str]) -> None:
    model, opt = _model(0)
    if kwargs.pop("rms", False):
        opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(StabilityBenchError) as error:
        stabilitybench.protect(model, opt, **kwargs)
    assert all(w in str(error.value) for w in words), str(error.value)
    assert not opt._optimizer_step_pre_hooks  # nothing attached


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_on_cuda_the_guarded_steps_never_synchronize() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tel = stabilitybench.Telemetry(model, opt, flush_every=1000)
    guard = stabilitybench.protect(model, opt, action="skip", telemetry=tel)
    gen = torch.Generator(device="cuda").manual_seed(1)

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randn(32, 8, generator=gen, device="cuda")
            loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            guard.before_step(loss=loss)
            opt.step()
            guard.after_step()

    steps(60)  # past the warm-up, state allocated
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(50)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.close()
    assert len(guard.scores) == 110


def test_rollback_decided_on_the_device_is_read_in_batches_and_restores_a_snapshot() -> None:
    """Corrupted weights (no update to skip) alarm at the next step; the host reads the alarm at
    the next flush (every 10 steps here) and rolls back to the newest snapshot at least
    `min_age` steps older than the alarm, throwing away every update since."""

    def run(guarded: bool) -> tuple[list[float], list[Any]]:
        model, opt = _model(0)
        tel = stabilitybench.Telemetry(model, opt, flush_every=10)
        PerturbationSchedule([{"kind": "weight_noise", "at": SPIKE_AT, "scale": 3.0}]).attach(tel)
        guard = (
            stabilitybench.protect(model, opt, "rollback", telemetry=tel, on_device=True)
            if guarded
            else None
        )

        class NoGuard:
            def before_step(self, **_: Any) -> None: ...
            def after_step(self, **_: Any) -> None: ...

        losses = _floats(_loop(guard or NoGuard(), model, opt, 300))
        if guard is not None:
            assert isinstance(guard, DeviceGuard)
            guard.close()
        tel.close()
        return losses, [] if guard is None else guard.interventions

    plain, _ = run(False)
    guarded, interventions = run(True)
    rollbacks = [i for i in interventions if i.action == "rollback"]
    assert len(rollbacks) == 1
    (rollback,) = rollbacks
    alarm = min(i.step for i in interventions)
    assert SPIKE_AT < alarm <= SPIKE_AT + 2
    assert rollback.step == 160  # read back at the flush after the alarm: up to 10 steps late
    assert rollback.rolled_back_to == 120  # every 20, at least min_age 20 before the alarm
    assert rollback.steps_lost == 160 + 1 - 120
    assert float(np.mean(guarded[-20:])) < 0.25 * float(np.mean(plain[-20:]))


def test_a_rollback_loop_on_the_device_is_broken_and_the_alarmed_updates_stay_skipped() -> None:
    """A ×1000 LR held for 150 steps: every update alarms, each read-back rolls back to the same
    snapshot (step 120); the fifth time is a loop, so nothing is restored, and no rollback comes
    until the alarm has been off for `window` steps — the alarmed updates are skipped anyway."""
    model, opt = _model(0)
    tel = stabilitybench.Telemetry(model, opt, flush_every=10)
    spike = [{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000, "duration": 150}]
    PerturbationSchedule(spike).attach(tel)
    guard = stabilitybench.protect(model, opt, "rollback", telemetry=tel, on_device=True)
    assert isinstance(guard, DeviceGuard)
    losses = _floats(_loop(guard, model, opt, 400))
    guard.close()
    tel.close()
    rollbacks = [i for i in guard.interventions if i.action == "rollback"]
    assert [(i.step, i.rolled_back_to) for i in rollbacks] == [
        (160, 120),
        (170, 120),
        (180, 120),
        (190, 120),
        (200, None),
    ]
    assert rollbacks[-1].note is not None and rollbacks[-1].note.startswith("rollback loop")
    assert guard.stats.by_action["rollback"] == 4
    assert math.isfinite(losses[-1])
