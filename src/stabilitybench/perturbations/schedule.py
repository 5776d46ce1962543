"""PerturbationSchedule: the perturbations of one run, driven by Telemetry's step hooks and by the
workload's adapters (a Gymnasium wrapper for RL, a batch transform for LM)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations.base import Perturbation, build
from stabilitybench.types import StepContext

if TYPE_CHECKING:
    import torch

    ShiftedBatch = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class PerturbationSchedule:
    """The perturbations of one run. Attach it to a Telemetry; wrap the RL training env or pass
    LM batches through `transform_batch`; read `events()` at the end.

    `at` floats are fractions of `total_steps` (optimizer steps) or, when `total_env_steps` is
    given (RL), of env steps. Each perturbation's randomness comes from its own generator, seeded
    from (`seed`, its position in the list).
    """

    # The row flag it writes (`row_fields`): the answer to "is this step perturbed", which the
    # monitor must not read.
    flag_column: ClassVar[str] = "perturbed"

    def __init__(
        self,
        perturbations: Iterable[Perturbation | Mapping[str, Any]] = (),
        *,
        total_steps: int | None = None,
        total_env_steps: int | None = None,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        self.perturbations = [build(p) for p in perturbations]
        # the env-scoped ones, which the RL wrapper reads on every env step (kept by `adopt`)
        self.env_perts = [p for p in self.perturbations if p.scope == "env"]
        self.total_steps = total_steps
        self.total_env_steps = total_env_steps
        self.seed = seed
        self.vocab_size = vocab_size
        for index, p in enumerate(self.perturbations):
            p.bind(index=index, seed=seed)
            p.schedule = self
        self._reseeders: list[Callable[[int], object]] = []
        self.telemetry: Any = None
        self.env_step = 0  # env steps taken through every wrapped env together
        self._step: int | None = None
        self._post_step: int | None = None
        self._resolve(strict=False)

    def __len__(self) -> int:
        return len(self.perturbations)

    def adopt(self, perturbations: Iterable[Perturbation | Mapping[str, Any]]) -> None:
        """Take `perturbations` on mid-run, as if they had been this (empty) schedule's from the
        start: a run that shares its prefix with others (`share_prefix`) is given its own
        perturbations where it forks, which must be before any of them begins."""
        if self.perturbations:
            raise StabilityBenchError("PerturbationSchedule.adopt: the schedule is not empty")
        adopted = [build(p) for p in perturbations]
        for index, p in enumerate(adopted):
            p.bind(index=index, seed=self.seed)
            p.schedule = self
            p.resolve(self.total_steps, self.total_env_steps)
            if p.start_step is not None or (
                p.onset_env is not None and p.onset_env < self.env_step
            ):
                raise StabilityBenchError(
                    f"PerturbationSchedule.adopt: {p.label!r} would have begun before the fork "
                    f"(env step {self.env_step})"
                )
        self.perturbations = adopted
        self.env_perts = [p for p in adopted if p.scope == "env"]
        if self.telemetry is not None:
            for p in adopted:
                p.check_model(self.telemetry.model)
                p.on_attach(self.telemetry)

    def add_reseed(self, reseed: Callable[[int], object]) -> None:
        """Register a function that restarts one of the workload's own random streams from a
        seed (an LM's batch generator, an environment's generator); a `sham` calls it."""
        self._reseeders.append(reseed)

    def reseed(self, seed: int) -> None:
        """Restart every registered random stream from `seed` (each from its own derived seed)."""
        for index, reseed in enumerate(self._reseeders):
            reseed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))

    # ---- set-up -----------------------------------------------------------------------------
    def _resolve(self, strict: bool) -> None:
        for p in self.perturbations:
            try:
                p.resolve(self.total_steps, self.total_env_steps)
            except StabilityBenchError:
                if strict:
                    raise

    def validate(self, adapters: set[str], where: str) -> None:
        """Raise StabilityBenchError if a perturbation needs an adapter `where` cannot host, or
        if a fractional `at` cannot be resolved."""
        for p in self.perturbations:
            if p.adapter is not None and p.adapter not in adapters:
                provided = ", ".join(sorted(adapters)) or "none"
                raise StabilityBenchError(
                    f"perturbation {p.label!r} ({p.name}) needs the {p.adapter!r} adapter, which "
                    f"{where} does not provide (it provides: {provided})"
                )
        self._resolve(strict=True)

    def attach(self, telemetry: Any) -> PerturbationSchedule:
        """Act on every optimizer step of `telemetry` (it calls this object's hooks)."""
        if self.total_steps is None:
            self.total_steps = telemetry.total_steps
        self._resolve(strict=True)
        for p in self.perturbations:
            p.check_model(telemetry.model)
        self.telemetry = telemetry
        for p in self.perturbations:
            p.on_attach(telemetry)
        telemetry.add_hook(self)
        return self

    # ---- Telemetry StepHook protocol ----------------------------------------------------------
    def on_pre_step(self, ctx: StepContext) -> None:
        first = ctx.step != self._step
        if first:
            self._step = ctx.step
            for p in self.perturbations:
                p.begin_step(ctx.step, ctx.env_step)
        for p in self.perturbations:
            p.on_pre(ctx, first)

    def on_post_step(self, ctx: StepContext) -> None:
        first = ctx.step != self._post_step
        self._post_step = ctx.step
        for p in self.perturbations:
            p.on_post(ctx, first)

    def row_fields(self, step: int) -> Mapping[str, Any]:
        return {self.flag_column: any(p.covers(step) for p in self.perturbations)}

    def perturbed(self, step: int) -> bool:
        """Whether optimizer step `step` is inside any window."""
        return any(p.covers(step) for p in self.perturbations)

    # ---- LM adapter ---------------------------------------------------------------------------
    def transform_batch(
        self, x: torch.Tensor, y: torch.Tensor, *, shifted_batch: ShiftedBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch for the next optimizer step (`tel.step + 1`), perturbed if that step
        is in a `data_shift` / `label_noise` window (data_shift first)."""
        batch_perts = [p for p in self.perturbations if p.scope == "batch"]
        if not batch_perts:
            return x, y
        if self.telemetry is None:
            raise StabilityBenchError(
                "PerturbationSchedule.transform_batch: attach the schedule to a Telemetry first "
                "(schedule.attach(tel)); it reads the step from it"
            )
        if self.vocab_size is None:
            config = getattr(self.telemetry.model, "config", None)
            self.vocab_size = getattr(config, "vocab_size", None)
        step = self.telemetry.step + 1
        for p in sorted(batch_perts, key=lambda q: q.name != "data_shift"):
            if p.would_cover(step):
                x, y = p.transform(x, y, self, shifted_batch)
        return x, y

    # ---- RL adapter ---------------------------------------------------------------------------
    def wrap_env(self, env: Any) -> Any:
        """A Gymnasium wrapper around the training env that applies the env perturbations."""
        return _wrapper_class()(env, self)

    def env_tick(self) -> int:
        """Advance the env clock by one step; returns the index of the step about to be taken."""
        index = self.env_step
        self.env_step += 1
        for p in self.perturbations:
            if p.scope == "env":
                p.env_tick(index)
        return index

    # ---- record -------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """One dict per window that started, with the events.parquet columns."""
        out = []
        for p in self.perturbations:
            event = p.event(self._step)
            if event is not None:
                out.append(event)
        return out


class _RunningStats:
    """Running mean / std (Welford) of clean observations or rewards."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | float = 0.0
        self.m2: np.ndarray | float = 0.0

    def update(self, value: Any) -> None:
        x = np.asarray(value, dtype=np.float64)
        self.count += 1
        delta = x - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (x - self.mean)

    @property
    def rms(self) -> float:
        if self.count == 0:
            return 0.0
        return float(np.sqrt(np.mean(np.asarray(self.m2) / self.count + np.square(self.mean))))

    @property
    def std(self) -> Any:
        if self.count == 0:
            return np.zeros_like(np.asarray(self.mean))
        return np.sqrt(np.asarray(self.m2) / self.count)


@functools.cache  # one class per process, so isinstance checks on wrapped envs hold
def _wrapper_class() -> type:
    import gymnasium

    class PerturbedEnv(gymnasium.Wrapper):  # type: ignore[misc]
        """Applies a schedule's env perturbations to the observations, rewards and dynamics."""

        def __init__(self, env: Any, schedule: PerturbationSchedule) -> None:
            super().__init__(env)
            self.schedule = schedule
            self.obs_stats = _RunningStats()
            self.reward_stats = _RunningStats()
            self._shifted: dict[int, Any] = {}  # perturbation index → saved model array
            if any(p.adapter == "mujoco" for p in self.env_perts):
                _mujoco_model(env)

        @property
        def env_perts(self) -> list[Perturbation]:
            # the schedule's list, not a copy: a schedule may adopt its perturbations mid-run
            return self.schedule.env_perts  # type: ignore[no-any-return]

        def _perturb_obs(self, obs: Any) -> Any:
            for p in self.env_perts:
                if p.env_active:
                    obs = p.perturb_obs(obs, self.obs_stats.std)
            return obs

        def reset(self, **kwargs: Any) -> Any:
            obs, info = self.env.reset(**kwargs)
            self.obs_stats.update(obs)
            return self._perturb_obs(obs), info

        def step(self, action: Any) -> Any:
            self.schedule.env_tick()
            for p in self.env_perts:
                if p.adapter != "mujoco":
                    continue
                if p.env_active and p.index not in self._shifted:
                    self._shifted[p.index] = p.shift_model(_mujoco_model(self.env))
                elif not p.env_active and p.index in self._shifted:
                    p.restore_model(_mujoco_model(self.env), self._shifted.pop(p.index))
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.obs_stats.update(obs)
            self.reward_stats.update(float(reward))
            reward_rms = self.reward_stats.rms
            for p in self.env_perts:
                if p.env_active:
                    reward = p.perturb_reward(float(reward), reward_rms)
            return self._perturb_obs(obs), reward, terminated, truncated, info

    return PerturbedEnv


def _mujoco_model(env: Any) -> Any:
    model = getattr(env.unwrapped, "model", None)
    if model is None or not hasattr(model, "opt"):
        raise StabilityBenchError(
            f"dynamics_shift needs a MuJoCo env (env.unwrapped.model is a mujoco.MjModel); "
            f"{env.unwrapped!r} has none"
        )
    return model
