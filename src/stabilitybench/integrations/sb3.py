"""Stable-Baselines3 callback: stability telemetry for PPO, SAC, TD3 (and other SB3 algorithms).

Usage::

    from stable_baselines3 import PPO
    from stabilitybench.integrations.sb3 import StabilityCallback

    callback = StabilityCallback()
    PPO("MlpPolicy", "CartPole-v1").learn(5_000, callback=callback)
    table = callback.telemetry.rows()  # one row per optimizer step, with env_step

Every optimizer the algorithm uses is instrumented: a single-optimizer algorithm (PPO, A2C, DQN)
gives unprefixed columns; an actor-critic one (SAC, TD3, DDPG) gives `critic/…` and `actor/…`
columns, with the critic's steps as the clock. The algorithm's own training signals, which SB3
records in its logger after each update, are added to the row of the update's last optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from stable_baselines3.common.callbacks import BaseCallback

from stabilitybench.errors import StabilityBenchError
from stabilitybench.integrations._adapter import (
    OnlineMonitor,
    PerturbationHook,
    capture_clip_grad_norm,
)
from stabilitybench.telemetry import Sink, Telemetry
from stabilitybench.telemetry.probes import ProbeSpec
from stabilitybench.types import Schedule

if TYPE_CHECKING:
    import pandas as pd
    from stable_baselines3.common.base_class import BaseAlgorithm

    from stabilitybench.guard.core import Guard


class TrainingDiverged(Exception):
    """Raised from inside `learn()` when `stop_on_divergence=True` and the parameters or a loss
    went non-finite (SB3 cannot otherwise be stopped before its next forward pass fails)."""


SB3_SIGNALS: dict[str, str] = {
    "train/entropy_loss": "entropy",  # stored negated: entropy = -entropy_loss
    "train/approx_kl": "approx_kl",
    "train/clip_fraction": "clip_fraction",
    "train/value_loss": "value_loss",
    "train/policy_gradient_loss": "policy_loss",
    "train/explained_variance": "explained_variance",
    "train/loss": "loss",
    "train/std": "action_std",
    "train/ent_coef": "ent_coef",
    "train/ent_coef_loss": "ent_coef_loss",
    "train/actor_loss": "actor_loss",
    "train/critic_loss": "critic_loss",
}
"""SB3 logger key → telemetry column for the algorithm's own signals."""

_LOSS_SIGNALS = frozenset(
    {"loss", "value_loss", "policy_loss", "actor_loss", "critic_loss", "ent_coef_loss"}
)


def sb3_optimizers(model: BaseAlgorithm) -> dict[str, torch.optim.Optimizer]:
    """The optimizers an SB3 algorithm trains with: {"critic": …, "actor": …} or {"": policy's}."""
    actor, critic = getattr(model, "actor", None), getattr(model, "critic", None)
    actor_opt = getattr(actor, "optimizer", None)
    critic_opt = getattr(critic, "optimizer", None)
    if isinstance(actor_opt, torch.optim.Optimizer) and isinstance(
        critic_opt, torch.optim.Optimizer
    ):
        # The critic steps on every gradient step (TD3's actor only every `policy_delay`): clock.
        return {"critic": critic_opt, "actor": actor_opt}
    policy_opt = getattr(model.policy, "optimizer", None)
    if isinstance(policy_opt, torch.optim.Optimizer):
        return {"": policy_opt}
    raise StabilityBenchError(
        f"StabilityCallback: cannot find the optimizer of {type(model).__name__}; supported: "
        "algorithms with `policy.optimizer` (PPO, A2C, DQN) or `actor.optimizer` and "
        "`critic.optimizer` (SAC, TD3, DDPG)"
    )


DEFAULT_EVERY = 4
"""The callback's probes measure every 4th optimizer step by default: SB3's small default networks
take ~1 ms per step on a CPU, so measuring each one would cost ~10 % of PPO's wall time (README,
"Overhead"). Every step still gets a row (step, env_step, the algorithm's own signals);
`every=1` measures each step."""


class StabilityCallback(BaseCallback):
    """Records stability telemetry while an SB3 algorithm learns; a thin adapter over Telemetry.

        `probes`, `every` (default `DEFAULT_EVERY` = 4: the probes measure every 4th optimizer step),
        `sink` and `total_steps` are passed to `Telemetry`. The pre-clip gradient norm that SB3's own
        `clip_grad_norm_` call returns (PPO, A2C, DQN) is logged on every step as `grad_norm_raw`; the
    mean return of the training episodes that ended in a rollout (SB3's Monitor info) as
    `episode_return`, with their count as `episodes`, on the next optimizer step's row. `schedule` (a
        `PerturbationSchedule`) is attached to the telemetry; perturbations that act on the
        environment also need `schedule.wrap_env(env)` on the training env. `monitor` (any object
        with `.step(row) -> float`) scores each finished row; the score is stored in the row as `msd`.
        The telemetry is created at the first `learn()` and kept across later `learn()` calls on the
        same model; call `close()` (or `telemetry.close()`) to remove its hooks and finish sinks.
        `guard` (a mapping such as {"detector": "zclip", "action": "rollback"}, see `GuardConfig`)
        acts on the detector's alarms: its snapshots hold the whole policy (actor, critics and
        target networks), every optimizer's state (SAC's entropy coefficient and its optimizer
        too) and the RNGs. A rollback in PPO/A2C also undoes the rest of the current rollout's
        updates (that rollout was collected by the policy thrown away); the next rollout is
        collected by the restored policy. SAC/TD3 keep their replay buffer as it is: the
        transitions the thrown-away policy collected stay in it. `guard_events()` lists the
        interventions.
    """

    def __init__(
        self,
        probes: ProbeSpec = "cheap",
        every: int | Schedule = DEFAULT_EVERY,
        sink: Sink | Iterable[Sink] | None = None,
        *,
        schedule: PerturbationHook | None = None,
        monitor: OnlineMonitor | None = None,
        total_steps: int | None = None,
        stop_on_divergence: bool = False,
        guard: Mapping[str, Any] | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        from stabilitybench.guard.config import parse_guard

        self.guard_config = parse_guard(guard, where="guard") if guard is not None else None
        self.guard: Guard | None = None
        self._streamed = 0  # the guard's interventions already handed to a streaming sink
        self.probes, self.every, self.sink = probes, every, sink
        self.schedule, self.monitor = schedule, monitor
        self.total_steps = total_steps
        self.stop_on_divergence = stop_on_divergence
        self._telemetry: Telemetry | None = None
        self._model_id: int | None = None
        self._loss_diverged = False
        self._restore_record: Callable[[], None] | None = None
        self._release_clip: Callable[[], None] | None = None
        self._episode_returns: list[float] = []

    # ---- public -------------------------------------------------------------------------------
    @property
    def telemetry(self) -> Telemetry:
        """The Telemetry this callback drives (exists once `learn()` has started)."""
        if self._telemetry is None:
            raise StabilityBenchError(
                "StabilityCallback.telemetry: not attached yet; pass the callback to "
                "model.learn(..., callback=callback) first"
            )
        return self._telemetry

    @property
    def attached(self) -> bool:
        """True once `learn()` has created the telemetry."""
        return self._telemetry is not None

    @property
    def diverged(self) -> bool:
        """True once a logged loss or a trained parameter is non-finite (NaN or inf)."""
        return self._loss_diverged or not self._params_finite()

    @overload
    def close(self) -> pd.DataFrame: ...
    @overload
    def close(self, *, read_back: Literal[False]) -> None: ...

    def close(self, *, read_back: bool = True) -> pd.DataFrame | None:
        """Remove the telemetry's hooks, finish its sinks, and return its table (None with
        `read_back=False`: see `Telemetry.close`)."""
        self._unwrap_logger()
        if not read_back:
            return self.telemetry.close(read_back=False)
        return self.telemetry.close()

    # ---- SB3 hooks ----------------------------------------------------------------------------
    def _init_callback(self) -> None:
        if self._telemetry is not None and self._model_id == id(self.model):
            return
        if self._telemetry is not None:
            self._telemetry.close()
        self._telemetry = Telemetry(
            self.model.policy,
            sb3_optimizers(self.model),
            probes=self.probes,
            every=self.every,
            sink=self.sink,
            total_steps=self.total_steps,
        )
        self._model_id = id(self.model)
        if self.schedule is not None:
            self.schedule.attach(self._telemetry)
        if self.guard_config is not None:  # after the schedule: the guard sees its LR
            self.guard = self._make_guard(self._telemetry)
        if self.monitor is not None:
            self._telemetry.on_row(self._score_row)

    def _on_training_start(self) -> None:
        self.telemetry.env_step = int(self.model.num_timesteps)
        self._wrap_logger()
        if self._release_clip is None:
            self._release_clip = capture_clip_grad_norm(self.telemetry)

    def _on_rollout_start(self) -> None:
        self.telemetry.env_step = int(self.model.num_timesteps)
        if self.guard is not None:
            # Score the last update of the previous training phase now (its row has SB3's
            # logged losses) and act before the next rollout is collected.
            rollbacks = self.guard.stats.by_action["rollback"]
            self.guard.after_step()
            self.guard.release()
            if self.guard.stats.by_action["rollback"] > rollbacks and self._params_finite():
                self._loss_diverged = False  # the state that logged a non-finite loss is gone
            self._stream_guard_events()
        if self.stop_on_divergence and self.diverged:
            raise TrainingDiverged(
                f"training diverged at env step {self.model.num_timesteps} "
                f"(optimizer step {self.telemetry.step})"
            )

    def _on_step(self) -> bool:
        self.telemetry.env_step = int(self.num_timesteps)
        for info in self.locals.get("infos") or ():
            episode = info.get("episode") if isinstance(info, dict) else None
            if isinstance(episode, dict) and "r" in episode:
                self._episode_returns.append(float(episode["r"]))
        return not (self.stop_on_divergence and self._loss_diverged)

    def _on_rollout_end(self) -> None:
        self.telemetry.env_step = int(self.model.num_timesteps)
        if self._episode_returns:
            # The training episodes that ended in this rollout (SB3's Monitor `episode` info):
            # their mean return and count go to the next optimizer step's row — the dense
            # performance signal that times an RL collapse to the step.
            returns = self._episode_returns
            self.telemetry.log(episode_return=sum(returns) / len(returns), episodes=len(returns))
            self._episode_returns = []

    def _on_training_end(self) -> None:
        self._unwrap_logger()
        if self.guard is not None:
            self.guard.after_step()
        self.telemetry.flush()

    def _stream_guard_events(self) -> None:
        """Hand the guard's new interventions to a sink that streams events (a run's
        `RunWriter`: `watch` shows them while the run goes on)."""
        assert self.guard is not None
        new = self.guard.interventions[self._streamed :]
        sinks = self.sink if isinstance(self.sink, list | tuple) else [self.sink]
        for sink in sinks:
            stream = getattr(sink, "stream_events", None)
            if new and stream is not None:
                stream([i.event() for i in new])
        self._streamed += len(new)

    def guard_events(self) -> list[dict[str, Any]]:
        """The guard's interventions so far (events.parquet rows, `kind: guard`)."""
        return self.guard.events() if self.guard is not None else []

    def _make_guard(self, telemetry: Telemetry) -> Guard:
        from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

        from stabilitybench.guard.core import Guard

        assert self.guard_config is not None
        params = self.guard_config.to_dict()
        extra = [
            opt
            for opt in (getattr(self.model, "ent_coef_optimizer", None),)
            if isinstance(opt, torch.optim.Optimizer)
        ]
        return Guard(
            telemetry,
            str(params.pop("detector")),
            str(params.pop("action")),
            extra_optimizers=extra,
            hold_after_rollback=isinstance(self.model, OnPolicyAlgorithm),
            **params,
        )

    # ---- internals ----------------------------------------------------------------------------
    def _wrap_logger(self) -> None:
        """Forward SB3's `train/…` records to the telemetry row of the latest optimizer step."""
        self._unwrap_logger()
        logger = self.model.logger
        original = logger.record

        def record(key: str, value: Any, exclude: Any = None) -> None:
            original(key, value, exclude)
            name = SB3_SIGNALS.get(key)
            if name is None:
                return
            number = float(value)
            if name == "entropy":
                number = -number
            self.telemetry.log(**{name: number})
            if name in _LOSS_SIGNALS and not math.isfinite(number):
                self._loss_diverged = True

        logger.record = record  # type: ignore[method-assign]

        def restore() -> None:
            if logger.record is record:
                del logger.record  # the class's method shows through again

        self._restore_record = restore

    def _unwrap_logger(self) -> None:
        if self._restore_record is not None:
            self._restore_record()
            self._restore_record = None
        if self._release_clip is not None:
            self._release_clip()
            self._release_clip = None

    def _params_finite(self) -> bool:
        if self._telemetry is None:
            return True
        params = [
            p
            for opt in self._telemetry.optimizers.values()
            for g in opt.param_groups
            for p in g["params"]
        ]
        with torch.no_grad():
            total = torch.stack(torch._foreach_norm(params)).sum()  # one host sync
        return bool(torch.isfinite(total))

    def _score_row(self, row: dict[str, Any]) -> None:
        assert self.monitor is not None
        row["msd"] = float(self.monitor.step(row))


class EveryEnvSteps(BaseCallback):
    """Calls `fn(env_step)` between updates once another `every` environment steps have passed.

    It fires at the start of a rollout (after the previous update) and when training ends, so the
    policy it sees has been trained on all data up to `env_step`; with PPO the granularity is one
    rollout (`n_steps` env steps).
    """

    def __init__(self, every: int, fn: Callable[[int], None]) -> None:
        super().__init__()
        if every < 1:
            raise StabilityBenchError(f"EveryEnvSteps: every must be >= 1, got {every}")
        self.every, self.fn = every, fn
        self.next_at = every

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self._maybe_fire()

    def _on_training_end(self) -> None:
        self._maybe_fire()

    def _maybe_fire(self) -> None:
        env_step = int(self.model.num_timesteps)
        if env_step >= self.next_at:
            self.fn(env_step)
            while self.next_at <= env_step:
                self.next_at += self.every
