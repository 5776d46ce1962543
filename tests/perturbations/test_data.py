"""Data / environment perturbations: LM batch transform and the Gymnasium wrapper (RL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.telemetry import Telemetry


def lm_loop(
    perturbations: list[dict[str, Any]], steps: int = 6
) -> tuple[list[Any], PerturbationSchedule]:
    """A tiny 'LM' loop: returns the (x, y) batches that each optimizer step trained on."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(50, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(model, opt, probes=[])
    schedule = PerturbationSchedule(perturbations, total_steps=steps, vocab_size=50)
    schedule.validate({"batch"}, "test lm")
    schedule.attach(tel)
    used = []
    for _ in range(steps):
        x = torch.arange(32).reshape(4, 8) % 50
        y = (x + 1) % 50
        y[0, :2] = -100  # ignore_index targets are never replaced
        x, y = schedule.transform_batch(
            x, y, shifted_batch=lambda: (torch.full((4, 8), 7), torch.full((4, 8), 8))
        )
        used.append((x.clone(), y.clone()))
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    tel.close()
    return used, schedule


def test_label_noise_replaces_the_fraction_of_targets_only_in_the_window() -> None:
    used, schedule = lm_loop([{"kind": "label_noise", "at": 2, "fraction": 0.25, "duration": 2}])
    clean_y = (torch.arange(32).reshape(4, 8) + 1) % 50
    clean_y[0, :2] = -100
    for step, (_, y) in enumerate(used):
        changed = y != clean_y
        if step in (2, 3):
            eligible = 30
            # Exactly round(0.25 × 30) = 8 targets were redrawn (a redraw may hit the same token).
            assert int(changed.sum()) <= 8 and int(changed.sum()) >= 6
            assert bool((y[0, :2] == -100).all())
            assert int(y.max()) < 50 and int(y[y >= 0].min()) >= 0
            assert eligible == int((clean_y >= 0).sum())
        else:
            assert not bool(changed.any())
    assert schedule.events()[0]["start_step"] == 2 and schedule.events()[0]["end_step"] == 3


def test_data_shift_uses_the_other_batches_in_the_window() -> None:
    used, schedule = lm_loop([{"kind": "data_shift", "at": 0.5, "duration": 2, "source": "tail"}])
    shifted = [bool((x == 7).all()) for x, _ in used]
    assert shifted == [False, False, False, True, True, False]
    assert schedule.events()[0]["params"]["source"] == "tail"


def step_env(env: Any, steps: int, seed: int = 0) -> tuple[list[float], list[np.ndarray]]:
    rewards, observations = [], []
    env.reset(seed=seed)
    for i in range(steps):
        obs, reward, terminated, truncated, _ = env.step(np.array([np.sin(i)], dtype=np.float32))
        rewards.append(float(reward))
        observations.append(np.asarray(obs).copy())
        if terminated or truncated:
            env.reset()
    return rewards, observations


def test_reward_wrapper_changes_rewards_only_in_the_window() -> None:
    import gymnasium as gym

    clean_r, clean_o = step_env(gym.make("Pendulum-v1"), 40)
    for config, check in [
        ({"kind": "reward_scale", "factor": 3.0}, lambda r, c: np.isclose(r, 3 * c)),
        ({"kind": "reward_sign_flip"}, lambda r, c: r == -c),
        ({"kind": "reward_noise", "sigma": 0.5}, lambda r, c: r != c),
    ]:
        schedule = PerturbationSchedule(
            [{**config, "at": 0.25, "duration_env_steps": 10}], total_env_steps=40
        )
        schedule.validate({"env"}, "test rl")
        rewards, observations = step_env(schedule.wrap_env(gym.make("Pendulum-v1")), 40)
        for i in range(40):
            if 10 <= i < 20:
                assert check(rewards[i], clean_r[i]), (config["kind"], i)
            else:
                assert rewards[i] == clean_r[i], (config["kind"], i)
            assert np.array_equal(observations[i], clean_o[i])  # the env itself is unchanged
        event = schedule.events()[0]
        assert (event["start_env_step"], event["end_env_step"]) == (10, 19)


def test_obs_noise_is_relative_to_the_running_std() -> None:
    import gymnasium as gym

    clean_r, clean_o = step_env(gym.make("Pendulum-v1"), 60)
    schedule = PerturbationSchedule(
        [{"kind": "obs_noise", "at": 0.5, "sigma": 0.2, "duration_env_steps": 30}],
        total_env_steps=60,
    )
    _, observations = step_env(schedule.wrap_env(gym.make("Pendulum-v1")), 60)
    for i in range(30):
        assert np.array_equal(observations[i], clean_o[i])
    noise = np.stack([observations[i] - clean_o[i] for i in range(30, 60)])
    std = np.stack(clean_o[:30]).std(axis=0)  # about the running std at onset
    ratio = noise.std(axis=0) / std
    assert np.all((ratio > 0.1) & (ratio < 0.35)), ratio
    assert clean_r == step_env(gym.make("Pendulum-v1"), 60)[0]


def test_env_window_in_optimizer_steps_follows_the_telemetry_clock() -> None:
    """SAC-like: one optimizer step after each env step; `at`/`duration` in optimizer steps."""
    import gymnasium as gym

    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    tel = Telemetry(net, opt, probes=[])
    schedule = PerturbationSchedule(
        [{"kind": "reward_scale", "at": 5, "factor": 2.0, "duration": 3}]
    )
    schedule.attach(tel)
    env = schedule.wrap_env(gym.make("Pendulum-v1"))
    clean_r, _ = step_env(gym.make("Pendulum-v1"), 12)
    env.reset(seed=0)
    scaled = []
    for i in range(12):
        _, reward, *_ = env.step(np.array([np.sin(i)], dtype=np.float32))
        tel.env_step = i + 1
        scaled.append(bool(np.isclose(reward, 2 * clean_r[i]) and reward != clean_r[i]))
        opt.zero_grad()
        net(torch.ones(1, 1)).sum().backward()
        opt.step()
    rows = tel.close()
    # Active from optimizer step 5: env steps taken after steps 5, 6, 7 are scaled (3 = duration).
    assert scaled == [i in (6, 7, 8) for i in range(12)]
    event = schedule.events()[0]
    assert (event["start_env_step"], event["end_env_step"]) == (6, 8)
    assert (event["start_step"], event["end_step"]) == (6, 8)  # steps that first see the data
    assert rows["perturbed"].tolist() == [s in (6, 7, 8) for s in range(12)]


def test_dynamics_shift_changes_and_restores_the_mujoco_model() -> None:
    import gymnasium as gym

    schedule = PerturbationSchedule(
        [
            {
                "kind": "dynamics_shift",
                "at": 0.25,
                "quantity": "gravity",
                "factor": 2.0,
                "duration_env_steps": 5,
            },
            {
                "kind": "dynamics_shift",
                "at": 0.25,
                "quantity": "body_mass",
                "factor": 1.5,
                "duration_env_steps": 5,
            },
        ],
        total_env_steps=20,
    )
    schedule.validate({"env", "mujoco"}, "test rl")
    env = schedule.wrap_env(gym.make("InvertedPendulum-v5"))
    model = env.unwrapped.model
    gravity, mass = model.opt.gravity.copy(), model.body_mass.copy()
    env.reset(seed=0)
    seen = []
    for i in range(20):
        env.step(np.zeros(1, dtype=np.float32))
        seen.append((model.opt.gravity.copy(), model.body_mass.copy()))
        if 5 <= i < 10:
            assert np.array_equal(model.opt.gravity, gravity * 2.0), i
            assert np.array_equal(model.body_mass, mass * 1.5), i
        else:
            assert np.array_equal(model.opt.gravity, gravity), i
            assert np.array_equal(model.body_mass, mass), i
    assert [e["start_env_step"] for e in schedule.events()] == [5, 5]


def test_wrapper_works_inside_sb3_dummy_vec_env() -> None:
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    schedule = PerturbationSchedule(
        [{"kind": "reward_sign_flip", "at": 0.5, "duration_env_steps": 4}], total_env_steps=8
    )
    vec = DummyVecEnv([lambda: schedule.wrap_env(gym.make("Pendulum-v1"))])
    vec.seed(0)
    vec.reset()
    rewards = [float(vec.step(np.zeros((1, 1), dtype=np.float32))[1][0]) for _ in range(8)]
    assert all(r <= 0 for r in rewards[:4]) and all(r >= 0 for r in rewards[4:])
    assert schedule.env_step == 8
