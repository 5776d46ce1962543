"""lr_spike, momentum_shock and optimizer_reset: the effect inside the window and the exact restore."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from pert_helpers import Recorder, run_loop

from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any] | None] = {
    "none": None,
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_lr_spike_multiplies_for_exactly_duration_steps(scheduler: str) -> None:
    make = SCHEDULERS[scheduler]
    _, base_tel, _ = run_loop(None, steps=14, scheduler=make)
    _, tel, _ = run_loop(
        [{"kind": "lr_spike", "at": 4, "factor": 10, "duration": 3}], steps=14, scheduler=make
    )
    base_lr = base_tel.rows()["lr"].tolist()
    lr = tel.rows()["lr"].tolist()
    for step in range(14):
        expected = base_lr[step] * 10 if 4 <= step <= 6 else base_lr[step]
        assert lr[step] == expected, (scheduler, step, lr[step], expected)
    # The first step after the window uses what the scheduler would have given, not a stale copy.
    assert lr[7] == base_lr[7]


def test_lr_spike_leaves_the_final_lr_as_without_it() -> None:
    _, tel, _ = run_loop(
        [{"kind": "lr_spike", "at": 2, "factor": 3, "duration": 2}],
        steps=5,
        scheduler=SCHEDULERS["step"],
    )
    _, base_tel, _ = run_loop(None, steps=5, scheduler=SCHEDULERS["step"])
    final = next(iter(tel.optimizers.values())).param_groups[0]["lr"]
    assert final == next(iter(base_tel.optimizers.values())).param_groups[0]["lr"] == 0.005


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_momentum_shock_sets_beta1_or_sgd_momentum_in_the_window(kind: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = (
        torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
        if kind == "adam"
        else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    )
    tel = Telemetry(net, opt, probes=[])
    PerturbationSchedule([{"kind": "momentum_shock", "at": 2, "value": 0.0, "duration": 2}]).attach(
        tel
    )
    observed: list[float] = []

    def record(ctx: Any) -> None:
        group = ctx.optimizer.param_groups[0]
        observed.append(group["betas"][0] if "betas" in group else group["momentum"])

    tel.add_hook(Recorder(pre=record))
    for _ in range(6):
        opt.zero_grad()
        net(torch.ones(2, 3)).sum().backward()
        opt.step()
    tel.close()
    assert observed == [0.9, 0.9, 0.0, 0.0, 0.9, 0.9]
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) if kind == "adam" else group["momentum"] == 0.9


def test_optimizer_reset_clears_state_once() -> None:
    _, tel, _ = run_loop([{"kind": "optimizer_reset", "at": 5}], steps=8)
    opt = next(iter(tel.optimizers.values()))
    # Adam counts 8 steps without the reset; after a reset just before step 5 it counts 5, 6, 7.
    assert float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 3.0
    _, base_tel, _ = run_loop(None, steps=8)
    base_opt = next(iter(base_tel.optimizers.values()))
    assert float(base_opt.state[base_opt.param_groups[0]["params"][0]]["step"]) == 8.0
