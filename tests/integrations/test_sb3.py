"""StabilityCallback with the real framework: SB3 `learn()` on CartPole and Pendulum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO, SAC, TD3

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations.sb3 import EveryEnvSteps, StabilityCallback, TrainingDiverged
from stabilitybench.perturbations import PerturbationSchedule
from stabilitybench.store import RunStore


def _ppo(seed: int = 0, **kwargs: Any) -> PPO:
    return PPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=256,
        batch_size=64,
        n_epochs=4,
        seed=seed,
        device="cpu",
        **kwargs,
    )


class _CountSteps:
    """Counts optimizer.step() calls independently of Telemetry."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        optimizer.register_step_post_hook(lambda *_: setattr(self, "count", self.count + 1))


def test_default_callback_on_cartpole_learn() -> None:
    model = _ppo()
    counter = _CountSteps(model.policy.optimizer)
    callback = StabilityCallback()
    model.learn(2048, callback=callback)
    rows = callback.telemetry.rows()
    assert len(rows) == counter.count == 8 * 4 * 4  # 8 updates × 4 epochs × 4 minibatches
    for column in (
        "step",
        "env_step",
        "grad_norm",
        "grad_cos_ema",
        "update_ratio",
        "lr",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "value_loss",
        "explained_variance",
    ):
        assert column in rows.columns, column
    assert rows["env_step"].is_monotonic_increasing and rows["env_step"].iloc[-1] == 2048
    assert rows["entropy"].notna().sum() == 8
    # By default the probes measure every 4th step; the pre-clip norm is there on every step.
    assert rows["grad_norm"].notna().tolist() == [s % 4 == 0 for s in range(128)]
    assert rows["grad_norm_raw"].notna().all() and (rows["grad_norm_raw"] > 0.5).all()
    # SB3 clips gradients to max_grad_norm=0.5 before the step; the probe sees what Adam sees.
    assert (rows["grad_norm"].dropna() <= 0.5 + 1e-4).all()
    assert not callback.diverged
    # SB3's logger is back to normal after learn().
    assert "record" not in vars(model.logger)


def test_telemetry_before_learn_is_a_clear_error() -> None:
    with pytest.raises(StabilityBenchError, match=r"pass the callback to model.learn"):
        _ = StabilityCallback().telemetry


def test_continued_learning_keeps_one_table() -> None:
    model = _ppo()
    callback = StabilityCallback()
    model.learn(512, callback=callback)
    first = len(callback.telemetry.rows())
    model.learn(512, callback=callback, reset_num_timesteps=False)
    rows = callback.telemetry.rows()
    assert len(rows) == 2 * first
    assert rows["step"].tolist() == list(range(2 * first))
    assert rows["env_step"].iloc[-1] == 1024


class _ScaledGradNorm:
    """A stand-in online monitor: a deviation score computed from the row it is given."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def step(self, row: dict[str, Any]) -> float:
        self.seen.append(int(row["step"]))
        return 2.0 * float(row["grad_norm"])


def test_monitor_scores_each_row_as_msd() -> None:
    monitor = _ScaledGradNorm()
    callback = StabilityCallback(every=1, monitor=monitor)
    _ppo().learn(512, callback=callback)
    rows = callback.telemetry.rows()
    assert monitor.seen == rows["step"].tolist()  # every row, in order (the last at training end)
    assert np.allclose(rows["msd"], 2.0 * rows["grad_norm"])


def test_actor_critic_algorithms_get_prefixed_columns() -> None:
    callback = StabilityCallback()
    SAC("MlpPolicy", "Pendulum-v1", learning_starts=50, batch_size=32, seed=0, device="cpu").learn(
        100, callback=callback
    )
    rows = callback.telemetry.rows()
    assert len(rows) == 50
    assert {"critic/grad_norm", "actor/grad_norm", "ent_coef", "actor_loss", "critic_loss"} <= set(
        rows.columns
    )
    assert "grad_norm" not in rows.columns
    assert rows["env_step"].tolist() == list(range(51, 101))


def test_td3_actor_rows_follow_policy_delay() -> None:
    callback = StabilityCallback(every=1)
    TD3(
        "MlpPolicy",
        "Pendulum-v1",
        learning_starts=50,
        batch_size=32,
        policy_delay=3,
        seed=0,
        device="cpu",
    ).learn(80, callback=callback)
    rows = callback.telemetry.rows()
    assert len(rows) == 30
    assert rows["actor/update_norm"].notna().tolist() == [i % 3 == 2 for i in range(30)]


def test_stop_on_divergence_raises_training_diverged() -> None:
    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        learning_starts=20,
        batch_size=16,
        learning_rate=1e12,
        seed=0,
        device="cpu",
    )
    callback = StabilityCallback(stop_on_divergence=True)
    with pytest.raises(TrainingDiverged, match="diverged at env step"):
        model.learn(200, callback=callback)
    assert callback.diverged
    assert model.num_timesteps < 200
    rows = callback.close()
    assert not np.isfinite(rows.filter(like="param_norm").to_numpy()).all()
    assert "record" not in vars(model.logger)


def test_schedule_and_sink(tmp_path: Path) -> None:
    schedule = PerturbationSchedule([{"kind": "lr_spike", "at": 10, "factor": 5, "duration": 3}])
    writer = RunStore(tmp_path).writer("run")
    callback = StabilityCallback(every=1, sink=writer, schedule=schedule)
    _ppo().learn(512, callback=callback)
    table = callback.close()
    stored = RunStore(tmp_path).table("run", "telemetry")
    assert len(stored) == len(table) == 32
    assert stored["perturbed"].tolist() == [10 <= s <= 12 for s in range(32)]
    assert np.allclose(stored.loc[10:12, "lr"], 5 * 3e-4)
    assert np.allclose(stored.loc[13:, "lr"], 3e-4)
    assert [e["start_step"] for e in schedule.events()] == [10]


def test_every_env_steps_fires_between_updates() -> None:
    fired: list[int] = []
    model = _ppo()
    model.learn(1024, callback=EveryEnvSteps(300, fired.append))
    # Rollouts end at 256, 512, 768, 1024: the first boundary at or after each multiple of 300.
    assert fired == [512, 768, 1024]


def test_grad_norm_raw_is_the_pre_clip_norm_sb3_returns() -> None:
    original = torch.nn.utils.clip_grad_norm_
    model = _ppo(max_grad_norm=20.0)  # CartPole's raw norms here lie around 15-25
    callback = StabilityCallback(every=1)
    model.learn(512, callback=callback)
    assert torch.nn.utils.clip_grad_norm_ is original  # unwrapped when training ends
    rows = callback.close()
    raw, clipped = rows["grad_norm_raw"].to_numpy(), rows["grad_norm"].to_numpy()
    assert len(rows) == 32 and np.isfinite(raw).all()
    # Clipping to 20 leaves norms below 20 alone and scales the others down to 20.
    assert np.allclose(clipped, np.minimum(raw, 20.0), rtol=1e-4)
    assert (raw > 20.0).any() and (raw < 20.0).any()


def test_training_episode_returns_are_logged_per_rollout() -> None:
    # The dense RL performance signal: each rollout's finished training episodes, from SB3's
    # Monitor info, as their mean return and count on the next optimizer step's row.
    model = _ppo()
    seen: list[float] = []

    class _Spy(EveryEnvSteps):
        def _on_step(self) -> bool:
            seen.extend(float(i["episode"]["r"]) for i in self.locals["infos"] if "episode" in i)
            return True

    callback = StabilityCallback()
    model.learn(1024, callback=[callback, _Spy(10**9, lambda _: None)])
    rows = callback.telemetry.rows().dropna(subset=["episode_return"])
    assert len(rows) == 4  # one entry per rollout of 256 env steps
    assert int(rows["episodes"].sum()) == len(seen)
    weighted = float((rows["episode_return"] * rows["episodes"]).sum())
    assert weighted == pytest.approx(sum(seen))


# ---- guards through the callback ------------------------------------------------------------------
from guard_detector import AlarmAtStep, alarm_at_step_fixture  # noqa: E402, F401

from stabilitybench.types import StepContext  # noqa: E402


class _StateAt:
    """A telemetry hook (added after the guard) that copies `tensors()` at the clock's pre-step
    of the given steps, i.e. the state a snapshot taken then holds."""

    def __init__(self, steps: set[int], tensors: Any) -> None:
        self.steps, self.tensors = steps, tensors
        self.at: dict[int, list[torch.Tensor]] = {}

    def on_pre_step(self, ctx: StepContext) -> None:
        if ctx.step in self.steps and ctx.step not in self.at and ctx.role in ("", "critic"):
            self.at[ctx.step] = [t.detach().clone() for t in self.tensors()]

    def on_post_step(self, ctx: StepContext) -> None:
        pass

    def row_fields(self, step: int) -> dict[str, Any]:
        return {}


class _AtRolloutStart(EveryEnvSteps):
    """Runs after the StabilityCallback: attaches `hook` and copies `tensors()` per rollout."""

    def __init__(self, stability: StabilityCallback, hook: _StateAt, tensors: Any) -> None:
        super().__init__(10**9, lambda _: None)
        self.stability, self.hook, self.tensors = stability, hook, tensors
        self.states: list[list[torch.Tensor]] = []

    def _on_training_start(self) -> None:
        self.stability.telemetry.add_hook(self.hook)

    def _on_rollout_start(self) -> None:
        self.states.append([t.detach().clone() for t in self.tensors()])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ppo_rollback_restores_the_policy_and_drops_the_rest_of_the_rollout(
    alarm_at_step: type[AlarmAtStep],
) -> None:
    # 256-step rollouts, 4 epochs × 4 minibatches: optimizer steps 0–15, 16–31, 32–47, ...
    alarm_at_step.steps = {20}
    model = _ppo()
    policy = model.policy

    def tensors() -> list[torch.Tensor]:
        return [*policy.state_dict().values()]

    guard = {"detector": "alarm_at_step", "action": "rollback", "every": 8, "min_age": 8}
    callback = StabilityCallback(every=1, guard=guard)
    hook = _StateAt({8}, tensors)
    spy = _AtRolloutStart(callback, hook, tensors)
    model.learn(1024, callback=[callback, spy])
    (event,) = callback.guard_events()
    # Acted at step 21's pre-step (SB3 has no hook between optimizer steps): back to step 8's
    # snapshot; 8..20 thrown away (13), then 21..31 undone (the rest of that rollout: 11).
    assert event["name"] == "rollback" and event["params"]["rolled_back_to"] == 8
    assert event["params"]["steps_lost"] == 13 + 11
    # The third rollout is collected by the restored policy (step 8's), not by a later one.
    assert _same(spy.states[2], hook.at[8])
    assert not _same(spy.states[3], hook.at[8])  # training went on after the rollout
    adam = model.policy.optimizer.state[next(iter(model.policy.parameters()))]
    assert int(adam["step"]) == 1024 // 256 * 16 - 24  # the steps that were not thrown away


def test_sac_rollback_restores_actor_critics_targets_and_entropy_coefficient(
    alarm_at_step: type[AlarmAtStep],
) -> None:
    alarm_at_step.steps = {30}
    model = SAC("MlpPolicy", "Pendulum-v1", learning_starts=50, batch_size=32, seed=0, device="cpu")

    def tensors() -> list[torch.Tensor]:
        assert model.log_ent_coef is not None
        return [*model.policy.state_dict().values(), model.log_ent_coef]

    guard = {"detector": "alarm_at_step", "action": "rollback", "every": 10, "min_age": 10}
    callback = StabilityCallback(every=1, guard=guard)
    hook = _StateAt({20}, tensors)
    spy = _AtRolloutStart(callback, hook, tensors)
    model.learn(100, callback=[callback, spy])
    (event,) = callback.guard_events()
    assert event["params"]["rolled_back_to"] == 20 and event["params"]["steps_lost"] == 11
    # One gradient step per rollout (train_freq 1): the guard acts at the next rollout's start,
    # before anything else trains. Rollout k starts after gradient step k − 51.
    names = list(model.policy.state_dict())
    assert any(n.startswith("critic_target.") for n in names)
    assert any(n.startswith("actor.") for n in names) and any(
        n.startswith("critic.") for n in names
    )
    assert _same(spy.states[30 + 51], hook.at[20])
    # The replay buffer is not rolled back: it holds every transition collected.
    assert model.replay_buffer.size() == 100
