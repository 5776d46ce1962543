"""Registry, building, validation and bad input."""

from __future__ import annotations

import pytest
from pert_helpers import run_loop

import stabilitybench.perturbations as perturbations
from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations import PerturbationSchedule, build


def test_available_lists_every_kind_by_dimension() -> None:
    names = perturbations.available()
    # the four dimensions of disturbance, and the sham: the control arm that disturbs nothing
    assert set(names) == {"optimization", "data", "parametric", "signal", "control"}
    expected = {
        "optimization": {"lr_spike", "momentum_shock", "optimizer_reset"},
        "data": {
            "obs_noise",
            "reward_noise",
            "reward_scale",
            "dynamics_shift",
            "label_noise",
            "data_shift",
        },
        "parametric": {"weight_noise", "layer_reset", "param_scale"},
        "signal": {"grad_noise", "grad_scale", "grad_drop", "reward_sign_flip", "loss_scale"},
        "control": {"sham"},
    }
    assert {k: set(v) for k, v in names.items()} == expected


def test_build_returns_configured_perturbation() -> None:
    p = build({"kind": "lr_spike", "at": 0.3, "factor": 10, "duration": 10})
    assert p.name == "lr_spike" and p.dimension == "optimization" and p.adapter is None
    assert p.config() == {"at": 0.3, "duration": 10, "factor": 10.0}


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"kind": "lr_boom", "at": 3}, ["kind", "lr_spike", "weight_noise"]),
        ({"kind": "lr_spike", "at": 3, "factor": 0}, ["factor", "(0, inf)"]),
        ({"kind": "lr_spike", "at": 3, "factor": -2}, ["factor", "(0, inf)"]),
        ({"kind": "lr_spike", "at": 3}, ["missing", "factor"]),
        ({"kind": "lr_spike", "at": 1.5, "factor": 2}, ["at", "(0, 1)"]),
        ({"kind": "lr_spike", "at": 0.0, "factor": 2}, ["at", "(0, 1)"]),
        ({"kind": "lr_spike", "at": -1, "factor": 2}, ["at", ">= 0"]),
        ({"kind": "lr_spike", "factor": 2}, ["missing", "at"]),
        ({"kind": "lr_spike", "at": 3, "factor": 2, "duration": -1}, ["duration", "[1, inf)"]),
        ({"kind": "grad_drop", "at": 3, "fraction": 1.5}, ["fraction", "(0, 1]"]),
        ({"kind": "label_noise", "at": 3, "fraction": 2}, ["fraction", "(0, 1]"]),
        ({"kind": "momentum_shock", "at": 3, "value": 1.0}, ["value", "[0, 1)"]),
        (
            {"kind": "dynamics_shift", "at": 3, "quantity": "wind", "factor": 2},
            ["quantity", "gravity"],
        ),
        ({"kind": "weight_noise", "at": 3, "scale": 0.1, "duration": 5}, ["duration", "must be 1"]),
        ({"kind": "lr_spike", "at": 3, "factor": 2, "sigma": 1}, ["sigma", "allowed fields"]),
        (
            {"kind": "lr_spike", "at": 3, "factor": 2, "duration_env_steps": 5},
            ["duration_env_steps"],
        ),
    ],
)
def test_bad_input_gives_one_clear_error(config: dict, words: list[str]) -> None:
    with pytest.raises(StabilityBenchError) as info:
        build(config)
    for word in words:
        assert word in str(info.value)


def test_layer_reset_unknown_module_lists_valid_names() -> None:
    with pytest.raises(StabilityBenchError) as info:
        run_loop([{"kind": "layer_reset", "at": 2, "module": "encoder"}], steps=3)
    message = str(info.value)
    assert "module='encoder'" in message and "0, 1, 2" in message


def test_param_scale_unknown_param_and_bad_index() -> None:
    with pytest.raises(StabilityBenchError, match=r"param='0\.nope'.*0\.weight"):
        run_loop([{"kind": "param_scale", "at": 2, "param": "0.nope", "factor": 0.5}], steps=3)
    with pytest.raises(StabilityBenchError, match=r"index=\[\[0, 99\]\].*\[8, 4\]"):
        run_loop(
            [
                {
                    "kind": "param_scale",
                    "at": 2,
                    "param": "0.weight",
                    "factor": 0.5,
                    "index": [[0, 99]],
                }
            ],
            steps=3,
        )


def test_validate_rejects_adapters_the_workload_lacks() -> None:
    schedule = PerturbationSchedule([{"kind": "reward_noise", "at": 5, "sigma": 0.5}])
    with pytest.raises(StabilityBenchError) as info:
        schedule.validate({"batch"}, "workload 'gpt2-tiny' (lm)")
    message = str(info.value)
    assert "reward_noise" in message and "'env'" in message and "gpt2-tiny" in message
    schedule.validate({"env"}, "ppo")
    shift = PerturbationSchedule(
        [{"kind": "dynamics_shift", "at": 5, "quantity": "gravity", "factor": 2}]
    )
    with pytest.raises(StabilityBenchError, match="mujoco"):
        shift.validate({"env"}, "workload 'ppo-cartpole' (rl)")
    PerturbationSchedule([{"kind": "lr_spike", "at": 5, "factor": 2}]).validate(set(), "your loop")


def test_fractional_at_needs_a_total() -> None:
    schedule = PerturbationSchedule([{"kind": "lr_spike", "at": 0.5, "factor": 2}])
    with pytest.raises(StabilityBenchError, match="total_steps"):
        schedule.validate(set(), "your loop")
    ok = PerturbationSchedule([{"kind": "lr_spike", "at": 0.3, "factor": 2}], total_steps=600)
    ok.validate(set(), "your loop")
    assert ok.perturbations[0]._onset_step == 180


def test_events_and_perturbed_flag() -> None:
    _, tel, schedule = run_loop(
        [
            {"kind": "lr_spike", "at": 3, "factor": 5, "duration": 4},
            {"kind": "weight_noise", "at": 0.5, "scale": 0.1, "label": "noise-mid"},
            {"kind": "grad_scale", "at": 10, "factor": 2, "duration": 5},  # runs past the end
        ],
        steps=12,
    )
    assert schedule is not None
    events = schedule.events()
    assert [(e["kind"], e["name"], e["start_step"], e["end_step"]) for e in events] == [
        ("lr_spike", "lr_spike", 3, 6),
        ("weight_noise", "noise-mid", 6, 6),
        ("grad_scale", "grad_scale", 10, 11),
    ]
    assert events[0]["params"] == {"at": 3, "duration": 4, "factor": 5.0}
    rows = tel.rows()
    expected = [s in {3, 4, 5, 6, 10, 11} for s in range(12)]
    assert rows["perturbed"].tolist() == expected
