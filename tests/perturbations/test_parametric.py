"""Parametric perturbations: weight noise norm, layer reset, parameter scaling, once per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pert_helpers import Recorder, tiny_mlp

from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry


def params_around(
    perturbation: dict[str, Any], at: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters just before and just after the schedule's pre-step hook on step `at`."""
    model = tiny_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, probes=[])
    snapshots: dict[str, list[torch.Tensor]] = {}
    tel.add_hook(
        Recorder(
            pre=lambda ctx: (
                snapshots.setdefault("before", [p.detach().clone() for p in model.parameters()])
                if ctx.step == at
                else None
            )
        )
    )
    PerturbationSchedule([perturbation], seed=5).attach(tel)
    tel.add_hook(
        Recorder(
            pre=lambda ctx: (
                snapshots.setdefault("after", [p.detach().clone() for p in model.parameters()])
                if ctx.step == at
                else None
            )
        )
    )
    for _ in range(at + 2):
        opt.zero_grad()
        model(torch.ones(3, 4)).pow(2).sum().backward()
        opt.step()
    tel.close()
    return snapshots["before"], snapshots["after"]


def test_weight_noise_has_the_requested_relative_norm_per_tensor() -> None:
    before, after = params_around({"kind": "weight_noise", "at": 2, "scale": 0.3}, at=2)
    for b, a in zip(before, after, strict=True):
        ratio = float((a - b).norm() / b.norm())
        assert abs(ratio - 0.3) < 1e-5


def test_weight_noise_on_one_module_leaves_the_rest() -> None:
    before, after = params_around(
        {"kind": "weight_noise", "at": 1, "scale": 0.2, "module": "2"}, at=1
    )
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert abs(float((after[2] - before[2]).norm() / before[2].norm()) - 0.2) < 1e-5


def test_layer_reset_reinitialises_the_module_without_touching_the_global_rng() -> None:
    before, after = params_around({"kind": "layer_reset", "at": 1, "module": "0"}, at=1)
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert float(after[0].abs().max()) <= 1 / 4**0.5  # nn.Linear's init bound for 4 inputs
    _, again = params_around({"kind": "layer_reset", "at": 1, "module": "0"}, at=1)
    assert torch.equal(again[0], after[0])  # the perturbation's own generator: reproducible

    model = tiny_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, probes=[])
    PerturbationSchedule([{"kind": "layer_reset", "at": 0, "module": "0"}]).attach(tel)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    tel.close()
    assert torch.equal(torch.rand(3), expected_next)  # training's random stream is untouched


def test_param_scale_scales_only_the_selected_slice() -> None:
    before, after = params_around(
        {"kind": "param_scale", "at": 2, "param": "0.weight", "factor": 0.0, "index": [[2, 5]]},
        at=2,
    )
    assert torch.equal(after[0][2:5], torch.zeros(3, 4))
    assert torch.equal(after[0][:2], before[0][:2]) and torch.equal(after[0][5:], before[0][5:])
    before, after = params_around(
        {"kind": "param_scale", "at": 0, "param": "2.bias", "factor": 3.0}, at=0
    )
    torch.testing.assert_close(after[3], 3 * before[3], rtol=0, atol=0)


def test_model_edit_happens_once_per_step_with_two_optimizers() -> None:
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    model = torch.nn.ModuleDict({"actor": actor, "critic": critic})
    opts = {
        "critic": torch.optim.SGD(critic.parameters(), lr=0.0),
        "actor": torch.optim.SGD(actor.parameters(), lr=0.0),
    }
    tel = Telemetry(model, opts, probes=[])
    PerturbationSchedule(
        [{"kind": "param_scale", "at": 1, "param": "actor.bias", "factor": 2.0}]
    ).attach(tel)
    start = actor.bias.detach().clone()
    for _ in range(3):
        for role in ("critic", "actor"):
            opts[role].zero_grad()
            (critic(actor(torch.ones(1, 2)))).sum().backward()
            opts[role].step()
    tel.close()
    torch.testing.assert_close(actor.bias.detach(), 2 * start, rtol=0, atol=0)  # ×2, not ×4


def test_lr_spike_acts_on_every_optimizer() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opts = {
        "critic": torch.optim.SGD(a.parameters(), lr=0.1),
        "actor": torch.optim.Adam(b.parameters(), lr=0.01),
    }
    tel = Telemetry(None, opts, probes=["lr"])
    PerturbationSchedule([{"kind": "lr_spike", "at": 1, "factor": 10}]).attach(tel)
    for _ in range(3):
        for net, opt in ((a, opts["critic"]), (b, opts["actor"])):
            opt.zero_grad()
            net(torch.ones(1, 2)).sum().backward()
            opt.step()
    rows = tel.close()
    assert rows["critic/lr"].tolist() == [0.1, 0.1 * 10, 0.1]
    assert rows["actor/lr"].tolist() == [0.01, 0.01 * 10, 0.01]
    assert rows["perturbed"].tolist() == [False, True, False]


@pytest.mark.parametrize(
    "perturbation",
    [
        {"kind": "weight_noise", "at": 1, "scale": 0.3},
        {"kind": "layer_reset", "at": 1, "module": "2"},
        {"kind": "param_scale", "at": 1, "param": "2.weight", "factor": 0.0},
    ],
    ids=lambda p: p["kind"],
)
def test_an_edit_leaves_a_pending_backward_usable(perturbation: dict[str, Any]) -> None:
    # SB3's SAC runs the actor's forward pass, then the critic's update (the clock, where the
    # edit happens), then the actor's backward: editing the actor must not break that backward.
    actor, critic = tiny_mlp(0), tiny_mlp(1)
    actor_opt = torch.optim.SGD(actor.parameters(), lr=0.1)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    tel = Telemetry(actor, {"critic": critic_opt, "actor": actor_opt}, probes=[])
    PerturbationSchedule([perturbation], seed=5).attach(tel)
    x = torch.ones(3, 4)
    for step in range(3):
        before = [p.detach().clone() for p in actor.parameters()]
        pending = actor(x).pow(2).sum()  # the actor's graph, alive across the clock step
        critic_opt.zero_grad()
        critic(x).pow(2).sum().backward()
        critic_opt.step()
        edited = any(not torch.equal(b, p) for b, p in zip(before, actor.parameters(), strict=True))
        assert edited == (step == 1)
        actor_opt.zero_grad()
        pending.backward()  # raised "modified by an inplace operation" before
        actor_opt.step()
    tel.close()
