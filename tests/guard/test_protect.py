"""`stabilitybench.protect`: one line puts a guard on a loop you already have — the self-calibrating
detector, skipping on the device by default — as a context manager too; bad input is one clear
error."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import stabilitybench
from stabilitybench import StabilityBenchError
from stabilitybench.detectors.auto import AutoDetector
from stabilitybench.guard import Guard
from stabilitybench.guard.device import DeviceGuard
from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry

torch.set_num_threads(1)
SPIKE_AT = 150


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(guard: Guard, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list:
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 8)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.after_step(loss=loss)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("seed", [0, 1])
def test_by_default_it_skips_on_the_device_and_a_healthy_run_is_left_alone(seed: int) -> None:
    model, opt = _model(seed)
    with stabilitybench.protect(model, opt) as guard:
        assert isinstance(guard, DeviceGuard) and not guard.telemetry.sync_every_step
        healthy = _train(guard, model, opt, 300)
    assert guard.config.detector == "auto" and guard.config.action == "skip"
    assert guard.events() == []

    model, opt = _model(seed)
    with stabilitybench.protect(model, opt) as guard:
        spike = [{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000}]  # one ×1000 update
        PerturbationSchedule(spike).attach(guard.telemetry)
        spiked = _train(guard, model, opt, 300)
    # The update about to be made is estimated before it is: the spiked one is skipped itself.
    assert [(e["name"], e["start_step"]) for e in guard.events()] == [("skip", SPIKE_AT)]
    level = float(np.mean(healthy[-20:]))
    assert float(np.mean(spiked[-20:])) < 3 * level + 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_escalate_leaves_a_healthy_run_alone_and_climbs_to_a_rollback_on_a_spike(
    seed: int,
) -> None:
    model, opt = _model(seed)
    with stabilitybench.protect(model, opt, action="escalate") as guard:
        healthy = _train(guard, model, opt, 300)
    assert guard.config.detector == "auto" and guard.config.action == "escalate"
    assert guard.interventions == [] and len(guard.scores) == 300

    model, opt = _model(seed)
    with stabilitybench.protect(model, opt, action="escalate") as guard:
        spike = [{"kind": "lr_spike", "at": SPIKE_AT, "factor": 1000}]  # one ×1000 update
        PerturbationSchedule(spike).attach(guard.telemetry)
        spiked = _train(guard, model, opt, 300)
    steps = [i.step for i in guard.interventions]
    actions = [i.action for i in guard.interventions]
    # The bad update shows in the update ratio at once and in the gradient norm after it: the
    # alarm holds for 3 rows, then escalate climbs to a rollback before the spike.
    assert SPIKE_AT <= steps[0] <= SPIKE_AT + 5 and all(s <= SPIKE_AT + 10 for s in steps)
    assert actions == ["skip", "lr_cut", "reset_moments", "rollback"]
    assert guard.interventions[-1].rolled_back_to is not None
    assert guard.interventions[-1].rolled_back_to < SPIKE_AT
    level = float(np.mean(healthy[-20:]))
    assert float(np.mean(spiked[-20:])) < 3 * level + 0.05


def test_as_a_context_manager_it_closes_the_telemetry_it_made() -> None:
    model, opt = _model(0)
    with stabilitybench.protect(model, opt, action="skip", detector="zclip") as guard:
        _train(guard, model, opt, 5)
        assert guard.telemetry.sync_every_step
    scored = len(guard.scores)
    _train(guard, model, opt, 3)  # after the block: neither scored nor recorded
    assert len(guard.scores) == scored == 5 and guard.telemetry.step == 4
    guard.close()  # a second close does nothing


def test_with_a_telemetry_of_your_own_it_only_stops_the_guard() -> None:
    model, opt = _model(0)
    tel = Telemetry(model, opt)
    with stabilitybench.protect(model, opt, "escalate", telemetry=tel) as guard:
        assert guard.telemetry is tel and tel.sync_every_step
        _train(guard, model, opt, 4)
    assert not tel.sync_every_step  # the per-step read-back is off again
    _train(guard, model, opt, 3)
    assert len(guard.scores) == 4 and tel.step == 6  # the telemetry still records
    assert len(tel.close()) == 7


def test_a_detector_with_other_settings_and_the_guard_settings() -> None:
    model, opt = _model(0)
    detector = AutoDetector(z_thresh=8.0, persist=2)
    guard = stabilitybench.protect(model, opt, "rollback", detector, every=5, keep=3, min_age=5)
    assert guard.detector is detector and guard.config.label() == (
        "auto:rollback(every=5,keep=3,min_age=5)"
    )
    _train(guard, model, opt, 3)
    assert all(math.isfinite(s) for _, s in guard.scores)
    guard.close()


def test_the_public_names() -> None:
    from stabilitybench.guard.protection import protect
    from stabilitybench.monitor import MetaStateMonitor

    assert stabilitybench.protect is protect and stabilitybench.Guard is Guard
    assert stabilitybench.MetaStateMonitor is MetaStateMonitor
    assert {"protect", "Guard", "MetaStateMonitor"} <= set(stabilitybench.__all__)
    from stabilitybench.guard import protect as again

    assert again is protect  # not the module of the same family name


class NotAnOptimizer:
    """Has param groups, but no step hooks a guard could use."""

    def __init__(self) -> None:
        self.param_groups: list[Any] = []


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda m, o: ((m, NotAnOptimizer()), {}), ["protect.optimizer", "torch.optim.Optimizer"]),
        (lambda m, o: (("model", o), {}), ["protect.model", "torch.nn.Module"]),
        (lambda m, o: ((m, o), {"detector": "nope"}), ["protect.detector", "'nope'", "auto"]),
        (lambda m, o: ((m, o), {"detector": 3}), ["protect.detector", "registered"]),
        (lambda m, o: ((m, o), {"detector": "pca"}), ["protect.detector", "must be fitted"]),
        (lambda m, o: ((m, o), {"action": "undo"}), ["protect.action", "reset_moments"]),
        (lambda m, o: ((m, o), {"factor": 2.0}), ["protect.factor", "(0, 1)"]),
        (lambda m, o: ((m, o), {"speed": 3}), ["protect.speed", "unknown key"]),
        (lambda m, o: ((m, o), {"telemetry": "tel"}), ["protect.telemetry", "Telemetry"]),
    ],
)
def test_bad_input_is_one_error_naming_the_argument(call: Any, words: list[str]) -> None:
    model, opt = _model(0)
    args, kwargs = call(model, opt)
    with pytest.raises(StabilityBenchError) as error:
        stabilitybench.protect(*args, **kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert not opt._optimizer_step_pre_hooks  # nothing was attached


def test_a_telemetry_of_another_optimizer_is_an_error() -> None:
    model, opt = _model(0)
    _, other = _model(1)
    tel = Telemetry(model, other)
    with pytest.raises(StabilityBenchError, match=r"protect\.telemetry: it does not instrument"):
        stabilitybench.protect(model, opt, telemetry=tel)
    tel.close()
