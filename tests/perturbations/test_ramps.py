"""Ramps: a perturbation's size grows from no effect to its target across the window.

Hand-worked numbers: on window step s of D, u = (s + 1) / D; linear = identity + (target −
identity)·u; geometric = target**u (a factor) or target·1e-3**(1 − u) (an additive size).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pert_helpers import Recorder, run_loop, tiny_mlp
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations import PerturbationSchedule, build
from stabilitybench.perturbations.base import ramp_value
from stabilitybench.telemetry import Telemetry


@pytest.mark.parametrize(
    ("ramp", "mode", "target", "expected"),
    [
        ("linear", "multiplicative", 30.0, [8.25, 15.5, 22.75, 30.0]),  # 1 + 29·u
        ("geometric", "multiplicative", 16.0, [2.0, 4.0, 8.0, 16.0]),  # 16**u
        ("linear", "additive", 0.4, [0.1, 0.2, 0.3, 0.4]),  # 0.4·u
        # 2·1e-3**(1 − u) = 2·10**(−2.25), 2·10**(−1.5), 2·10**(−0.75), 2
        ("geometric", "additive", 2.0, [0.0112468265, 0.0632455532, 0.3556558820, 2.0]),
        ("none", "multiplicative", 30.0, [30.0, 30.0, 30.0, 30.0]),
    ],
)
def test_ramp_value_on_each_step_of_a_four_step_window(
    ramp: str, mode: str, target: float, expected: list[float]
) -> None:
    values = [ramp_value(ramp, mode, target, (s + 1) / 4) for s in range(4)]
    assert values == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("ramp", "factor", "expected"),
    [
        ("geometric", 16.0, [0.02, 0.04, 0.08, 0.16]),  # lr 0.01 × 16**((s+1)/4)
        ("linear", 5.0, [0.02, 0.03, 0.04, 0.05]),  # lr 0.01 × (1 + 4·(s+1)/4)
    ],
)
def test_lr_spike_ramp_multiplies_the_lr_step_by_step(
    ramp: str, factor: float, expected: list[float]
) -> None:
    spike = {"kind": "lr_spike", "at": 2, "factor": factor, "duration": 4, "ramp": ramp}
    _, tel, schedule = run_loop([spike], steps=8, probes=("lr",))
    lrs = tel.rows()["lr"].tolist()
    assert lrs[:2] == pytest.approx([0.01, 0.01])
    assert lrs[2:6] == pytest.approx(expected, rel=1e-6)
    assert lrs[6:] == pytest.approx([0.01, 0.01])  # the exact LR is put back after the window
    assert schedule is not None
    event = schedule.events()[0]
    assert event["params"]["ramp"] == ramp
    assert (event["start_step"], event["end_step"]) == (2, 5)


def frozen_run(perturbation: dict[str, Any], steps: int = 5) -> tuple[list[Any], list[Any]]:
    """SGD with lr 0 on one fixed batch (the weights never move, so the clean gradient is the
    same every step): that clean gradient, and the gradient each step's update used."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    reference = tiny_mlp(0)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    clean = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    model = tiny_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tel = Telemetry(model, opt, probes=[])
    PerturbationSchedule([perturbation], seed=1).attach(tel)
    used: list[torch.Tensor] = []
    tel.add_hook(
        Recorder(pre=lambda ctx: used.append(torch.cat([p.grad.reshape(-1) for p in ctx.params])))
    )
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    tel.close()
    return [clean] * steps, used


def test_grad_scale_linear_ramp() -> None:
    clean, used = frozen_run(
        {"kind": "grad_scale", "at": 1, "factor": 3.0, "duration": 2, "ramp": "linear"}
    )
    ratios = [float(u.norm() / c.norm()) for u, c in zip(used, clean, strict=True)]
    assert ratios == pytest.approx([1.0, 2.0, 3.0, 1.0, 1.0], rel=1e-6)  # 1 + 2·u, u = 1/2, 1


def test_loss_scale_geometric_ramp_scales_in_backward() -> None:
    clean, used = frozen_run(
        {"kind": "loss_scale", "at": 1, "factor": 9.0, "duration": 2, "ramp": "geometric"}
    )
    ratios = [float(u.norm() / c.norm()) for u, c in zip(used, clean, strict=True)]
    assert ratios == pytest.approx([1.0, 3.0, 9.0, 1.0, 1.0], rel=1e-6)  # 9**(1/2), 9**1


def test_grad_noise_linear_ramp_sets_the_noise_norm_each_step() -> None:
    clean, used = frozen_run(
        {"kind": "grad_noise", "at": 1, "scale": 0.5, "duration": 4, "ramp": "linear"}, steps=6
    )
    ratios = [float((u - c).norm() / c.norm()) for u, c in zip(used, clean, strict=True)]
    assert ratios == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.0], abs=1e-6)


def test_grad_drop_ramp_grows_the_fraction() -> None:
    p = build({"kind": "grad_drop", "at": 0, "fraction": 0.8, "duration": 4, "ramp": "linear"})
    p.begin_step(0, None)
    assert [p.magnitude(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_label_noise_geometric_ramp_replaces_a_growing_count() -> None:
    torch.manual_seed(0)
    model = torch.nn.Embedding(50, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, probes=[])
    noise = {
        "kind": "label_noise",
        "at": 1,
        "fraction": 0.9,
        "duration": 3,
        "ramp": "geometric",
        "vocab_size": 50,
    }
    schedule = PerturbationSchedule([noise], seed=0).attach(tel)
    changed = []
    for _ in range(5):
        x = torch.arange(400).reshape(4, 100) % 50
        y = (x + 1) % 50
        _, noisy = schedule.transform_batch(x, y)
        changed.append(int((noisy != y).sum()))
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    tel.close()
    # fraction 0.9·1e-3**(1 − u), u = 1/3, 2/3, 1 → 0.0090, 0.0900 (0.9·10**−1), 0.9 of 400
    # targets: round() = 4, 36, 360 redrawn; a redraw hits the same token 1 time in 50.
    counts = [round(0.9 * 1e-3 ** (1 - u) * 400) for u in (1 / 3, 2 / 3, 1.0)]
    assert counts == [4, 36, 360]
    assert changed[0] == 0 and changed[4] == 0
    for got, count in zip(changed[1:4], counts, strict=True):
        assert count * 0.85 <= got <= count
    assert schedule.events()[0]["params"]["ramp"] == "geometric"


def test_env_ramps_grow_on_the_env_clock() -> None:
    import gymnasium as gym

    for config, expected in [
        # reward_scale linear over 4 env steps: 1 + 2·u = 1.5, 2, 2.5, 3
        ({"kind": "reward_scale", "factor": 3.0, "ramp": "linear"}, [1.5, 2.0, 2.5, 3.0]),
        # reward_noise geometric: 0.5·1e-3**(1 − u)
        (
            {"kind": "reward_noise", "sigma": 0.5, "ramp": "geometric"},
            [0.5 * 1e-3 ** (1 - u) for u in (0.25, 0.5, 0.75, 1.0)],
        ),
        # obs_noise linear: 0.2·u
        ({"kind": "obs_noise", "sigma": 0.2, "ramp": "linear"}, [0.05, 0.1, 0.15, 0.2]),
    ]:
        schedule = PerturbationSchedule(
            [{**config, "at": 0.5, "duration_env_steps": 4}], total_env_steps=8
        )
        env = schedule.wrap_env(gym.make("Pendulum-v1"))
        clean_env = gym.make("Pendulum-v1")
        env.reset(seed=0)
        clean_env.reset(seed=0)
        pert = schedule.perturbations[0]
        sizes, ratios = [], []
        for i in range(8):
            action = np.array([np.sin(i)], dtype=np.float32)
            _, reward, *_ = env.step(action)
            _, clean_reward, *_ = clean_env.step(action)
            if pert.env_active:
                sizes.append(pert.magnitude())
                ratios.append(reward / clean_reward)
            else:
                assert reward == clean_reward
        assert sizes == pytest.approx(expected, rel=1e-9), config["kind"]
        if config["kind"] == "reward_scale":
            assert ratios == pytest.approx(expected, rel=1e-6)
        assert schedule.events()[0]["params"]["ramp"] == config["ramp"]


def test_env_ramp_in_optimizer_steps_counts_clock_steps_after_first_env_step() -> None:
    p = build({"kind": "reward_scale", "at": 0, "factor": 5.0, "duration": 4, "ramp": "linear"})
    p.resolve(total_steps=10, total_env_steps=None)
    p.begin_step(0, 0)
    p.env_tick(0)
    assert p.magnitude() == pytest.approx(2.0)  # u = 1/4: 1 + 4/4
    p.begin_step(1, 1)
    p.env_tick(1)
    assert p.magnitude() == pytest.approx(3.0)  # u = 2/4


def test_no_ramp_leaves_the_event_params_as_before() -> None:
    p = build({"kind": "lr_spike", "at": 3, "factor": 2.0, "duration": 2})
    assert p.ramp == "none" and "ramp" not in p.config()
    assert p.magnitude(3) == 2.0 and p.magnitude(4) == 2.0


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (
            {"kind": "weight_noise", "at": 3, "scale": 0.1, "ramp": "linear"},
            ["ramp='linear'", "weight_noise acts once", "ramp must be none", "lr_spike"],
        ),
        (
            {"kind": "optimizer_reset", "at": 3, "ramp": "geometric"},
            ["ramp='geometric'", "acts once"],
        ),
        (
            {"kind": "data_shift", "at": 3, "duration": 5, "ramp": "linear"},
            ["ramp='linear'", "data_shift has no size to grow"],
        ),
        (
            {"kind": "lr_spike", "at": 3, "factor": 2, "duration": 5, "ramp": "cubic"},
            ["ramp='cubic'", "one of none, linear, geometric"],
        ),
    ],
)
def test_bad_ramp_names_the_field(config: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(StabilityBenchError) as info:
        build(config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_ramp_on_a_one_shot_kind_in_a_spec_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    spec = {
        "name": "ramp-bad",
        "workloads": [{"name": "toy", "kind": "toy", "total_steps": 20, "knobs": {"lr": 0.01}}],
        "perturbations": ["none", {"kind": "weight_noise", "at": 5, "scale": 1, "ramp": "linear"}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:") and "perturbations[1]" in message and "ramp" in message
    assert not out.exists()


def test_geometric_ramp_has_no_jump_at_onset() -> None:
    p = build({"kind": "lr_spike", "at": 0, "factor": 30.0, "duration": 300, "ramp": "geometric"})
    p.begin_step(0, None)
    first = p.magnitude(0)
    assert first == pytest.approx(30 ** (1 / 300)) and first < 1.02
    assert p.magnitude(299) == pytest.approx(30.0) and math.isclose(p.magnitude(500), 30.0)
