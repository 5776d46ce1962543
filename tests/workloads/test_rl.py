"""The RL workload: real SB3 training on tiny budgets, written through a real RunStore."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import RunData, RunStore
from stabilitybench.types import RunSpec
from stabilitybench.workloads.base import build_workload, workload_kinds
from stabilitybench.workloads.rl import RLWorkload, build_model, parse_config

PPO_CARTPOLE: dict[str, Any] = {
    "name": "ppo-cartpole",
    "kind": "rl",
    "algo": "ppo",
    "env": "CartPole-v1",
    "total_steps": 2048,
    "eval": {"every": 512, "episodes": 2},
    "knobs": {"n_steps": 256, "n_epochs": 2, "batch_size": 64},
}
SAC_PENDULUM: dict[str, Any] = {
    "name": "sac-pendulum",
    "kind": "rl",
    "algo": "sac",
    "env": "Pendulum-v1",
    "total_steps": 200,
    "eval": {"every": 100, "episodes": 1},
    "knobs": {"learning_starts": 100, "batch_size": 32},
}


def _run(
    tmp_path: Path, config: dict[str, Any], seed: int = 0, perturbations: tuple = ()
) -> tuple[dict, RunData]:
    spec = RunSpec(workload=config, perturbations=perturbations, seed=seed)
    workload = build_workload(config)
    workload.validate(spec)
    store = RunStore(tmp_path / f"audit-{spec.run_id}")
    writer = store.writer(spec.run_id)
    writer.start({"run_id": spec.run_id})
    outcome = workload.run(spec, writer)
    writer.finish(outcome)
    return outcome, store.load(spec.run_id)


def test_rl_is_registered() -> None:
    assert "rl" in workload_kinds()
    assert isinstance(build_workload(PPO_CARTPOLE), RLWorkload)


def test_ppo_cartpole_writes_telemetry_evals_and_sb3_signals(tmp_path: Path) -> None:
    outcome, run = _run(tmp_path, PPO_CARTPOLE)
    tel, evals = run.telemetry, run.evals
    # 8 rollouts of 256 env steps; each update = 2 epochs × 4 minibatches of 64.
    assert len(tel) == 8 * 2 * 4 == outcome["steps"]
    assert outcome["env_steps"] == 2048 and outcome["diverged"] is False
    assert tel["step"].tolist() == list(range(64))
    assert tel["env_step"].dtype == np.int64
    assert tel["env_step"].tolist() == [256 * (1 + i // 8) for i in range(64)]
    for column in (
        "grad_norm",
        "update_norm",
        "lr",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "value_loss",
        "explained_variance",
        "loss",
    ):
        assert column in tel.columns, column
    # SB3 records its signals once per update, after all epochs: on the update's last step.
    signal_rows = tel.dropna(subset=["approx_kl"])
    assert signal_rows["step"].tolist() == [8 * k + 7 for k in range(8)]
    assert ((signal_rows["entropy"] > 0) & (signal_rows["entropy"] <= math.log(2) + 1e-6)).all()
    assert (signal_rows["approx_kl"] >= 0).all()
    assert signal_rows["clip_fraction"].between(0, 1).all()
    assert (signal_rows["value_loss"] > 0).all()
    # Evaluations: once before training, then between updates every 512 env steps.
    assert evals["env_step"].tolist() == [0, 512, 1024, 1536, 2048]
    assert evals["step"].tolist() == [0, 15, 31, 47, 63]
    assert (evals["perf"] >= 8).all()  # a CartPole episode lasts at least 8 steps
    assert outcome["final_perf"] == pytest.approx(evals["perf"].iloc[-3:].mean())
    assert run.events.empty


def test_same_seed_gives_identical_telemetry(tmp_path: Path) -> None:
    config = {**PPO_CARTPOLE, "total_steps": 512, "eval": {"every": 256, "episodes": 1}}
    _, first = _run(tmp_path / "a", config, seed=3)
    _, second = _run(tmp_path / "b", config, seed=3)
    _, other = _run(tmp_path / "c", config, seed=4)
    pd.testing.assert_frame_equal(first.telemetry, second.telemetry)
    pd.testing.assert_frame_equal(first.evals, second.evals)
    assert not np.allclose(
        first.telemetry["grad_norm_max_layer"], other.telemetry["grad_norm_max_layer"]
    )


def test_sac_records_actor_and_critic_optimizers(tmp_path: Path) -> None:
    outcome, run = _run(tmp_path, SAC_PENDULUM)
    tel = run.telemetry
    # SB3 trains once per env step after `learning_starts`; the critic is the clock.
    assert len(tel) == 200 - 100 == outcome["steps"]
    for role in ("actor", "critic"):
        for probe in ("grad_norm", "update_norm", "param_norm", "lr"):
            assert tel[f"{role}/{probe}"].notna().sum() == len(tel), (role, probe)
    assert tel["env_step"].tolist() == list(range(101, 201))
    assert (tel["ent_coef"] > 0).all() and tel["ent_coef_loss"].notna().all()
    assert tel["critic_loss"].notna().all() and tel["actor_loss"].notna().all()
    assert run.evals["env_step"].tolist() == [0, 100, 200]


def test_sac_fixed_entropy_coefficient(tmp_path: Path) -> None:
    config = {
        **SAC_PENDULUM,
        "total_steps": 150,
        "knobs": {"learning_starts": 100, "batch_size": 32, "ent_coef": 0.05},
    }
    _, run = _run(tmp_path, config)
    assert np.allclose(run.telemetry["ent_coef"], 0.05)
    assert "ent_coef_loss" not in run.telemetry.columns


def test_td3_actor_steps_every_policy_delay(tmp_path: Path) -> None:
    config = {
        **SAC_PENDULUM,
        "name": "td3",
        "algo": "td3",
        "total_steps": 160,
        "knobs": {"learning_starts": 100, "batch_size": 32, "action_noise": 0.3},
    }
    outcome, run = _run(tmp_path, config)
    tel = run.telemetry
    assert len(tel) == 60 == outcome["steps"]
    assert tel["critic/grad_norm"].notna().all()
    # TD3 updates the actor on every second critic update (policy_delay=2).
    assert tel["actor/grad_norm"].notna().tolist() == [i % 2 == 1 for i in range(60)]
    assert tel.dropna(subset=["actor_loss"])["step"].max() == 59


def test_td3_action_noise_knob() -> None:
    base = {**SAC_PENDULUM, "algo": "td3"}
    model = build_model(parse_config({**base, "knobs": {"action_noise": 0.3}}), seed=0)
    assert np.allclose(model.action_noise._sigma, [0.3])  # type: ignore[union-attr]
    assert (
        build_model(parse_config({**base, "knobs": {"action_noise": 0.0}}), seed=0).action_noise
        is None
    )


def test_normalize_wraps_training_and_evaluation_envs(tmp_path: Path) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    config = {**PPO_CARTPOLE, "knobs": {**PPO_CARTPOLE["knobs"], "normalize": True}}
    model = build_model(parse_config(config), seed=0)
    assert isinstance(model.get_env(), VecNormalize)
    assert "normalize" not in parse_config(PPO_CARTPOLE).knobs  # off unless asked for
    assert not isinstance(build_model(parse_config(PPO_CARTPOLE), seed=0).get_env(), VecNormalize)
    _, run = _run(tmp_path, config)
    # evaluation returns are the env's own (CartPole: 1 per step, at most 500 an episode; the
    # mean of 2 episodes is a multiple of 0.5), not the normalised rewards
    perf = run.evals["perf"]
    assert len(perf) == 5 and ((perf >= 8) & (perf <= 500)).all()
    assert ((perf * 2) % 1 == 0).all()
    with pytest.raises(StabilityBenchError, match=r"knobs\.normalize must be true or false"):
        build_workload({**PPO_CARTPOLE, "knobs": {"normalize": 1}})


def test_defaults_suit_short_budgets() -> None:
    assert parse_config({**PPO_CARTPOLE, "knobs": {}, "total_steps": 1000}).knobs["n_steps"] == 128
    assert (
        parse_config({**PPO_CARTPOLE, "knobs": {}, "total_steps": 100_000}).knobs["n_steps"] == 2048
    )
    sac = parse_config({**SAC_PENDULUM, "knobs": {}, "total_steps": 120}).knobs
    assert sac["learning_starts"] == 60 and sac["buffer_size"] == 120 and sac["ent_coef"] == "auto"
    assert parse_config({**SAC_PENDULUM, "eval": {}}).eval_every == 20  # a tenth of 200


def test_nonfinite_training_is_recorded_as_divergence(tmp_path: Path) -> None:
    config = {
        **SAC_PENDULUM,
        "knobs": {"learning_starts": 50, "batch_size": 32, "learning_rate": 1e12},
    }
    outcome, run = _run(tmp_path, config)
    assert outcome["diverged"] is True
    assert outcome["final_perf"] == -math.inf
    assert outcome["env_steps"] < 200  # training stopped early
    assert run.evals["perf"].iloc[-1] == -math.inf
    assert np.isfinite(run.evals["perf"].iloc[0])
    assert run.info.status == "done"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"algo": "dqn"}, "unknown algo 'dqn'; allowed: ppo, sac, td3"),
        ({"env": "Pong-v5"}, "unknown env 'Pong-v5'; allowed: HalfCheetah-v5, Hopper-v5"),
        ({"algo": "sac"}, "algo 'sac' needs continuous (Box) actions but env 'CartPole-v1'"),
        ({"algo": "td3"}, "algo 'td3' needs continuous"),
        (
            {"knobs": {"dropout": 0.1}},
            "unknown knob knobs.dropout for algo 'ppo'; allowed: batch_size",
        ),
        ({"knobs": {"ent_coef": "auto"}}, "knobs.ent_coef must be a number in [0.0, inf)"),
        ({"knobs": {"ent_coef": -0.1}}, "knobs.ent_coef must be a number"),
        ({"knobs": {"n_steps": 1.5}}, "knobs.n_steps must be an integer"),
        ({"total_steps": 0}, "total_steps (environment steps) must be an integer >= 1"),
        ({"eval": {"every": 0}}, "eval.every must be an integer >= 1"),
        ({"eval": {"batches": 2}}, "unknown field eval.batches; allowed: every, episodes"),
        ({"size": "tiny"}, "unknown field 'size'"),
    ],
)
def test_bad_config_is_one_clear_error(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(StabilityBenchError) as info:
        build_workload({**PPO_CARTPOLE, **change})
    assert needle in str(info.value)


def test_sac_entropy_coefficient_values() -> None:
    for value in ("auto", "auto_0.5", 0.2):
        assert (
            parse_config({**SAC_PENDULUM, "knobs": {"ent_coef": value}}).knobs["ent_coef"] == value
        )
    with pytest.raises(StabilityBenchError, match="'auto' or 'auto_<initial value>'"):
        parse_config({**SAC_PENDULUM, "knobs": {"ent_coef": "automatic"}})


def test_perturbations_are_checked_before_training() -> None:
    workload = build_workload(PPO_CARTPOLE)
    # CartPole is not MuJoCo: a dynamics shift cannot act on it.
    spec = RunSpec(
        PPO_CARTPOLE, ({"kind": "dynamics_shift", "at": 0.5, "quantity": "gravity", "factor": 2.0},)
    )
    with pytest.raises(StabilityBenchError, match="'mujoco' adapter"):
        workload.validate(spec)
    spec = RunSpec(PPO_CARTPOLE, ({"kind": "label_noise", "at": 0.5, "fraction": 0.5},))
    with pytest.raises(StabilityBenchError, match="'batch' adapter"):
        workload.validate(spec)


def test_perturbed_run_records_events_and_windows(tmp_path: Path) -> None:
    config = {**PPO_CARTPOLE, "total_steps": 1024}
    perturbations = (
        {"kind": "lr_spike", "at": 0.5, "factor": 10, "duration": 5},
        {"kind": "reward_noise", "at": 0.25, "sigma": 1.0, "duration": 4},
    )
    _, run = _run(tmp_path, config, perturbations=perturbations)
    events = run.events.set_index("kind")
    assert sorted(events.index) == ["lr_spike", "reward_noise"]
    spike = events.loc["lr_spike"]
    # The onset is the first optimizer step whose env_step >= 0.5 × 1024.
    tel = run.telemetry.set_index("step")
    onset = int(tel.index[tel["env_step"] >= 512][0])
    assert int(spike["start_step"]) == onset and int(spike["end_step"]) == onset + 4
    window = tel.loc[onset : onset + 4]
    assert np.allclose(window["lr"], 10 * 3e-4) and window["perturbed"].all()
    assert np.allclose(tel.loc[: onset - 1, "lr"], 3e-4)
    assert tel["perturbed"].dtype == bool


def test_halfcheetah_ppo_smoke(tmp_path: Path) -> None:
    config = {
        "name": "ppo-halfcheetah",
        "kind": "rl",
        "algo": "ppo",
        "env": "HalfCheetah-v5",
        "total_steps": 256,
        "eval": {"every": 128, "episodes": 1},
        "knobs": {"n_steps": 128, "n_epochs": 1},
    }
    perturbations = (
        {"kind": "dynamics_shift", "at": 0.5, "quantity": "gravity", "factor": 2.0, "duration": 1},
    )
    outcome, run = _run(tmp_path, config, perturbations=perturbations)
    assert outcome["env_steps"] == 256 and outcome["steps"] == 4
    assert run.evals["env_step"].tolist() == [0, 128, 256]
    assert np.isfinite(run.evals["perf"]).all()
    assert run.telemetry["action_std"].notna().sum() == 2  # continuous PPO logs its action std
    assert run.events["kind"].tolist() == ["dynamics_shift"]
