"""The RL workload: Stable-Baselines3 PPO, SAC or TD3 on a Gymnasium (MuJoCo or classic) env.

Config (the `workload` dict of a RunSpec)::

    name: ppo-halfcheetah
    kind: rl
    algo: ppo                         # ppo | sac | td3
    env: HalfCheetah-v5
    total_steps: 100000               # environment steps
    eval: {every: 5000, episodes: 5}  # every N env steps, M deterministic episodes
    knobs: {ent_coef: 0.01}           # one value each; see KNOBS

Telemetry records every optimizer (SAC/TD3: `critic/…` and `actor/…` columns, the critic is the
clock), SB3's own training signals (entropy, approx_kl, clip_fraction, value_loss,
explained_variance, ent_coef, actor_loss, critic_loss) and `env_step` on every row. Evaluation
runs on a separate env, also once before training (perf_0). The SB3 modules are imported only
when a run is validated or started, so `import stabilitybench` does not need the `rl` extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

from pydantic import Field, ValidationInfo, field_validator

from stabilitybench.errors import StabilityBenchError
from stabilitybench.lifetime import die_with_parent
from stabilitybench.store import RunWriter
from stabilitybench.types import RunSpec
from stabilitybench.workloads.base import RunOutcome, finish_run, register_workload
from stabilitybench.workloads.config import (
    EvalConfig,
    ProbeSet,
    WorkloadConfig,
    earlier_fields,
    probes_validator,
    total_steps_validator,
)

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv

    from stabilitybench.integrations.sb3 import StabilityCallback


@dataclass(frozen=True)
class EnvInfo:
    """What the workload needs to know about a supported environment before creating it."""

    continuous: bool  # Box actions (SAC/TD3 need this); else Discrete
    mujoco: bool  # dynamics perturbations (adapter "mujoco") can edit its physics


ENVS: dict[str, EnvInfo] = {
    "HalfCheetah-v5": EnvInfo(continuous=True, mujoco=True),
    "Hopper-v5": EnvInfo(continuous=True, mujoco=True),
    "Walker2d-v5": EnvInfo(continuous=True, mujoco=True),
    "InvertedPendulum-v5": EnvInfo(continuous=True, mujoco=True),
    "InvertedDoublePendulum-v5": EnvInfo(continuous=True, mujoco=True),
    "Ant-v5": EnvInfo(continuous=True, mujoco=True),
    "Swimmer-v5": EnvInfo(continuous=True, mujoco=True),
    "Reacher-v5": EnvInfo(continuous=True, mujoco=True),
    "CartPole-v1": EnvInfo(continuous=False, mujoco=False),
    "Acrobot-v1": EnvInfo(continuous=False, mujoco=False),
    "Pendulum-v1": EnvInfo(continuous=True, mujoco=False),
    "MountainCarContinuous-v0": EnvInfo(continuous=True, mujoco=False),
}
ALGOS: tuple[str, ...] = ("ppo", "sac", "td3")
CONFIG_FIELDS: tuple[str, ...] = (
    "name",
    "kind",
    "algo",
    "env",
    "total_steps",
    "eval",
    "knobs",
    "probes",
)
PROBE_SETS: dict[str, tuple[str, ...]] = {
    "cheap": ("cheap",),
    "stability": ("cheap", "adam_rms", "eos", "layer_max"),  # no attention in an MLP policy
}
EVAL_SEED_OFFSET = 1_000_003  # the evaluation env's seed is the run's seed plus this

_INF = math.inf


@dataclass(frozen=True)
class Knob:
    """One hyper-parameter a spec may set: its type, its allowed range [low, high], its default."""

    kind: str  # "int" | "float" | "bool" | "ent_coef" (a float or "auto"/"auto_<initial value>")
    low: float = 0.0
    high: float = _INF
    low_open: bool = False  # low itself is not allowed
    nullable: bool = False  # null is allowed (max_grad_norm: null = no clipping)


_COMMON: dict[str, Knob] = {
    "normalize": Knob("bool"),
    "learning_rate": Knob("float", 0.0, low_open=True),
    "batch_size": Knob("int", 1),
    "gamma": Knob("float", 0.0, 1.0, low_open=True),
}
_OFF_POLICY: dict[str, Knob] = {
    "learning_starts": Knob("int", 0),
    "buffer_size": Knob("int", 1),
    "tau": Knob("float", 0.0, 1.0, low_open=True),
    "train_freq": Knob("int", 1),
    "gradient_steps": Knob("int", 1),
}
KNOBS: dict[str, dict[str, Knob]] = {
    "ppo": {
        "ent_coef": Knob("float", 0.0),
        "n_steps": Knob("int", 2),
        "n_epochs": Knob("int", 1),
        "clip_range": Knob("float", 0.0, low_open=True),
        "gae_lambda": Knob("float", 0.0, 1.0),
        "vf_coef": Knob("float", 0.0),
        "max_grad_norm": Knob("float", 0.0, low_open=True, nullable=True),
        **_COMMON,
    },
    "sac": {"ent_coef": Knob("ent_coef", 0.0), **_OFF_POLICY, **_COMMON},
    "td3": {
        "action_noise": Knob("float", 0.0),
        "policy_delay": Knob("int", 1),
        "target_policy_noise": Knob("float", 0.0),
        "target_noise_clip": Knob("float", 0.0),
        **_OFF_POLICY,
        **_COMMON,
    },
}
"""Knobs each algorithm accepts. `ent_coef` (PPO: entropy bonus; SAC: a fixed temperature, or
"auto" to learn it) and TD3's `action_noise` (std of Gaussian exploration noise in units of half
the action range) are the stochasticity knobs. `normalize: true` wraps the training env in SB3's
`VecNormalize` (running mean/std of observations, returns scaled by a running std, as the SB3
zoo trains PPO on MuJoCo); evaluation then sees observations normalised with the training env's
statistics at that moment, and its returns are the env's own. The rest are SB3's
hyper-parameters of that name.
PPO's `max_grad_norm: null` turns gradient clipping off: SB3 always calls `clip_grad_norm_`, so the
workload passes `inf`, which makes the clip coefficient clamp(inf / (norm + 1e-6), max=1) = 1 — the
gradients are multiplied by exactly 1.0 and so are unchanged (the norm is still computed)."""


class RLEval(EvalConfig):
    """When and how much an RL run evaluates: every `every` env steps (left out: a tenth of the
    budget), `episodes` deterministic episodes."""

    unknown_word: ClassVar[str | None] = "field"
    shape: ClassVar[str] = "{every: N, episodes: M}"

    every: int | None = None
    episodes: int = 5


class RLConfig(WorkloadConfig):
    """A checked RL workload config with every default filled in; its fields in the order they
    are checked."""

    default_name: ClassVar[str] = "rl"
    config_keys: ClassVar[tuple[str, ...] | None] = CONFIG_FIELDS
    unknown_word: ClassVar[str] = "field"

    algo: str = Field(default=None, validate_default=True)
    env: str = Field(default=None, validate_default=True)
    total_steps: int = Field(default=None, validate_default=True)  # environment steps
    eval: RLEval = Field(default_factory=RLEval)
    # SB3 constructor arguments plus `action_noise` for TD3, with the defaults of `_defaults`
    knobs: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    probes: ProbeSet = "cheap"

    _total_steps = total_steps_validator(" (environment steps)")
    _probes = probes_validator()

    @field_validator("algo", mode="before")
    @classmethod
    def _known_algo(cls, algo: Any) -> Any:
        if algo not in ALGOS:
            raise ValueError(f"unknown algo {algo!r}; allowed: {', '.join(ALGOS)}")
        return algo

    @field_validator("env", mode="before")
    @classmethod
    def _known_env(cls, env: Any, info: ValidationInfo) -> Any:
        if env not in ENVS:
            raise ValueError(f"unknown env {env!r}; allowed: {', '.join(ENVS)}")
        (algo,) = earlier_fields(info, "algo") or (None,)
        if algo in ("sac", "td3") and not ENVS[env].continuous:
            continuous = [name for name, known in ENVS.items() if known.continuous]
            raise ValueError(
                f"algo {algo!r} needs continuous (Box) actions but env {env!r} has discrete "
                f"actions; use algo 'ppo', or one of: {', '.join(continuous)}"
            )
        return env

    @field_validator("knobs", mode="before")
    @classmethod
    def _checked_knobs(cls, knobs: Any, info: ValidationInfo) -> Any:
        earlier = earlier_fields(info, "algo", "total_steps")
        if earlier is None:
            return knobs
        algo, total_steps = earlier
        return _defaults(algo, total_steps, _check_knobs(algo, dict(knobs or {})))

    @property
    def eval_every(self) -> int:
        """Env steps between evaluations."""
        return self.eval.every if self.eval.every is not None else max(self.total_steps // 10, 1)

    @property
    def eval_episodes(self) -> int:
        return self.eval.episodes

    @property
    def env_info(self) -> EnvInfo:
        return ENVS[self.env]

    def expected_updates(self) -> int:
        """About how many clock optimizer steps `total_steps` env steps give (for fractions)."""
        k = self.knobs
        if self.algo == "ppo":
            iterations = math.ceil(self.total_steps / k["n_steps"])
            return iterations * k["n_epochs"] * math.ceil(k["n_steps"] / k["batch_size"])
        trained = max(self.total_steps - k["learning_starts"], 0)
        return max(trained // k["train_freq"] * k["gradient_steps"], 1)


def parse_config(config: dict[str, Any]) -> RLConfig:
    """Check an RL workload config and fill defaults; any problem is one StabilityBenchError."""
    return RLConfig.read(config)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_knobs(algo: str, knobs: dict[str, Any]) -> dict[str, Any]:
    allowed = KNOBS[algo]
    for key, value in knobs.items():
        if key not in allowed:
            raise ValueError(
                f"unknown knob knobs.{key} for algo {algo!r}; allowed: {', '.join(sorted(allowed))}"
            )
        knob = allowed[key]
        if value is None and knob.nullable:
            continue
        if knob.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"knobs.{key} must be true or false, got {value!r}")
            continue
        if knob.kind == "ent_coef" and isinstance(value, str):
            if value == "auto" or (value.startswith("auto_") and _positive_float(value[5:])):
                continue
            raise ValueError(
                f"knobs.ent_coef must be a number >= 0, 'auto' or 'auto_<initial value>' "
                f"(e.g. 'auto_0.1'), got {value!r}"
            )
        is_number = (
            _is_int(value)
            if knob.kind == "int"
            else (isinstance(value, int | float) and not isinstance(value, bool))
        )
        in_range = is_number and (
            (value > knob.low if knob.low_open else value >= knob.low) and value <= knob.high
        )
        if not in_range:
            kind = "an integer" if knob.kind == "int" else "a number"
            left = "(" if knob.low_open else "["
            right = "]" if math.isfinite(knob.high) else ")"
            extra = (
                ", or 'auto'"
                if knob.kind == "ent_coef"
                else (", or null (off)" if knob.nullable else "")
            )
            raise ValueError(
                f"knobs.{key} must be {kind} in {left}{knob.low}, {knob.high}{right}"
                f"{extra}, got {value!r}"
            )
    return knobs


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _defaults(algo: str, total_steps: int, knobs: dict[str, Any]) -> dict[str, Any]:
    """SB3's defaults, adjusted so that a short run still trains several times."""
    if algo == "ppo":
        # 2048 env steps per update, unless that leaves fewer than 4 updates in the budget.
        n_steps = 2048
        while n_steps > 64 and n_steps * 4 > total_steps:
            n_steps //= 2
        return {"ent_coef": 0.0, "n_steps": n_steps, "n_epochs": 10, "batch_size": 64, **knobs}
    out: dict[str, Any] = {
        "learning_starts": min(100, total_steps // 2),
        "buffer_size": min(1_000_000, total_steps),
        "batch_size": 256,
        "train_freq": 1,
        "gradient_steps": 1,
    }
    if algo == "sac":
        out["ent_coef"] = "auto"
    else:
        out["action_noise"] = 0.1
    out.update(knobs)
    return out


def build_model(
    settings: RLConfig,
    seed: int,
    wrap_env: Callable[[Any], Any] | None = None,
) -> BaseAlgorithm:
    """Seed everything and build the SB3 model (CPU) on a fresh, seeded training env."""
    import numpy as np
    from stable_baselines3 import PPO, SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise
    from stable_baselines3.common.utils import set_random_seed

    set_random_seed(seed)
    kwargs = dict(settings.knobs)
    train_env = make_env(settings.env, seed, wrap_env)
    if kwargs.pop("normalize", False):
        from stable_baselines3.common.vec_env import VecNormalize

        train_env = VecNormalize(train_env, gamma=float(kwargs.get("gamma", 0.99)))
    if settings.algo == "td3":
        sigma = float(kwargs.pop("action_noise"))
        n_actions = int(np.prod(train_env.action_space.shape or (1,)))
        kwargs["action_noise"] = (
            NormalActionNoise(np.zeros(n_actions), sigma * np.ones(n_actions))
            if sigma > 0
            else None
        )
    if "max_grad_norm" in kwargs and kwargs["max_grad_norm"] is None:
        kwargs["max_grad_norm"] = math.inf  # no clipping: see KNOBS
    algo_class = {"ppo": PPO, "sac": SAC, "td3": TD3}[settings.algo]
    model: BaseAlgorithm = algo_class(
        "MlpPolicy", train_env, seed=seed, device="cpu", verbose=0, **kwargs
    )
    return model


def make_env(env_id: str, seed: int, wrap_env: Callable[[Any], Any] | None = None) -> VecEnv:
    """A one-env, monitored, seeded VecEnv; `wrap_env` wraps the Gymnasium env (perturbations)."""
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(env_id, n_envs=1, seed=seed, wrapper_class=wrap_env)


def _sb3_available() -> None:
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ModuleNotFoundError as exc:
        raise StabilityBenchError(
            f"the rl workload needs {exc.name}; install it with `pip install stabilitybench[rl]`"
        ) from None


class RLWorkload:
    """SB3 PPO/SAC/TD3 on a Gymnasium env; perf = mean deterministic evaluation return."""

    kind = "rl"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.settings = parse_config(config)
        self.name = self.settings.name

    def adapters(self) -> set[str]:
        """What perturbations may act on: the training env, and MuJoCo physics for MuJoCo envs."""
        return {"env", "mujoco"} if self.settings.env_info.mujoco else {"env"}

    def _schedule(self, spec: RunSpec, settings: RLConfig) -> Any:
        """The perturbation schedule (validated against this workload), or None for a baseline."""
        if not spec.perturbations:
            return None
        from stabilitybench.perturbations import PerturbationSchedule, build

        schedule = PerturbationSchedule(
            [build(dict(p)) for p in spec.perturbations],
            total_steps=settings.expected_updates(),
            total_env_steps=settings.total_steps,
            seed=spec.seed,
        )
        schedule.validate(
            self.adapters(), where=f"workload {settings.name!r} (kind rl, env {settings.env})"
        )
        return schedule

    def validate(self, spec: RunSpec) -> None:
        """Check algo, env, action space, knobs and perturbation adapters before any training."""
        settings = parse_config(spec.workload)
        _sb3_available()
        self._schedule(spec, settings)

    def run(self, spec: RunSpec, writer: RunWriter) -> RunOutcome:
        """Train for `total_steps` env steps, evaluating periodically; write the run's tables."""
        _sb3_available()
        settings = parse_config(spec.workload)
        schedule = self._schedule(spec, settings)
        model, evaluation = _start(settings, spec.seed, schedule)
        telemetry_callback = _telemetry_callback(spec, settings, schedule, writer)
        evaluation.run(0, 0)
        try:
            diverged, env_step = _learn(model, settings, telemetry_callback, evaluation)
        finally:
            _close(model, evaluation, telemetry_callback, writer)
        return finish_run(
            writer,
            evaluation.rows,
            [
                *(schedule.events() if schedule is not None else []),
                *telemetry_callback.guard_events(),
            ],
            extra_eval_column="return_std",
            diverged=diverged,
            steps=telemetry_callback.telemetry.step + 1,
            env_steps=env_step,
        )

    def run_shared(
        self, specs: Sequence[RunSpec], writers: Sequence[RunWriter], prefix: Path
    ) -> None:
        """Train the runs `specs` (which differ only in their perturbations: `shared_fork_step`)
        as one up to where they part, writing into the folder `prefix`, then fork one child per
        run (`_Branches`); returns in the parent once every child has recorded its run. The runs
        are those they would be one by one (tested); a run without perturbations carries an
        empty schedule, and so a `perturbed` column (all false)."""
        import time

        from stabilitybench.perturbations import PerturbationSchedule

        _sb3_available()
        settings = parse_config(specs[0].workload)
        fork_at = shared_fork_step(specs)
        if fork_at is None:
            raise StabilityBenchError(
                "run_shared: these runs cannot share a prefix (see shared_fork_step)"
            )
        for spec in specs:
            self._schedule(spec, settings)  # validated before any training
        started = time.time()
        schedule = PerturbationSchedule(
            [],
            total_steps=settings.expected_updates(),
            total_env_steps=settings.total_steps,
            seed=specs[0].seed,
        )
        model, evaluation = _start(settings, specs[0].seed, schedule)
        writer = RunWriter(prefix)
        telemetry_callback = _telemetry_callback(specs[0], settings, schedule, writer)
        branches = _Branches(specs, writers, writer, schedule, fork_at, started)
        evaluation.run(0, 0)
        try:
            diverged, env_step = _learn(
                model, settings, telemetry_callback, evaluation, _fork_at(fork_at, branches.fork)
            )
            if branches.branch is None:  # the prefix ended (diverged) before the fork
                branches.fork()
            outcome = finish_run(
                writer,
                evaluation.rows,
                [*schedule.events(), *telemetry_callback.guard_events()],
                extra_eval_column="return_std",
                diverged=diverged,
                steps=telemetry_callback.telemetry.step + 1,
                env_steps=env_step,
            )
        except _PrefixDone:  # the parent: every branch has ended
            _close(model, evaluation, telemetry_callback, None)
            return
        except BaseException:
            if branches.branch is None:
                raise
            branches.end(failed=True)
        else:
            assert branches.branch is not None  # a child: the parent leaves by _PrefixDone
            _close(model, evaluation, telemetry_callback, writer)
            writer.finish(outcome)
            branches.end(failed=False)


def _start(settings: RLConfig, seed: int, schedule: Any) -> tuple[BaseAlgorithm, _Evaluation]:
    """The seeded model on its training env (wrapped by `schedule`, if any) and the evaluation."""
    model = build_model(settings, seed, schedule.wrap_env if schedule is not None else None)
    env = model.get_env()
    if schedule is not None and env is not None:  # a sham re-seeds the training env
        schedule.add_reseed(env.seed)  # (SB3 applies the seed at the env's next reset)
    evaluation = _Evaluation(
        model, _eval_env(settings, seed + EVAL_SEED_OFFSET), settings.eval_episodes
    )
    return model, evaluation


def shared_fork_step(specs: Sequence[RunSpec]) -> int | None:
    """The env step at which runs that share a prefix fork (one before the first onset among
    them), or None where they cannot share one: fewer than two runs, runs that differ in more
    than their perturbations, a guard (it acts on the prefix with the LR the schedule sets),
    or a perturbation whose onset is an optimizer step (`at` an int) rather than a fraction of
    the env steps."""
    from stabilitybench.perturbations import build

    if len(specs) < 2:
        return None
    first = specs[0]
    if any(s.workload != first.workload or s.seed != first.seed for s in specs):
        return None
    if any(s.guard is not None for s in specs):
        return None
    total = parse_config(first.workload).total_steps
    onsets: list[int] = []
    for spec in specs:
        for config in spec.perturbations:
            perturbation = build(dict(config))
            if isinstance(perturbation.at, int):
                return None
            perturbation.resolve(None, total)
            if perturbation.onset_env is None:
                return None
            onsets.append(perturbation.onset_env)
    if not onsets or min(onsets) < 2:
        return None
    return min(onsets) - 1


def _fork_at(env_step: int, fork: Callable[[], None]) -> Any:
    """An SB3 callback that calls `fork()` once, at the first env step >= `env_step`."""
    from stable_baselines3.common.callbacks import BaseCallback

    class ForkAt(BaseCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fired = False

        def _on_step(self) -> bool:
            if not self.fired and self.model.num_timesteps >= env_step:
                self.fired = True
                fork()
            return True

    return ForkAt()


class _PrefixDone(Exception):
    """Raised in the parent of a shared prefix once every branch has ended."""


class _Branches:
    """The runs forked from one shared prefix, and which of them this process is.

    One env step before the first onset the process forks (`os.fork`), one child per run, one
    after the other (the parent waits for each): the child takes its run's perturbations on
    (`PerturbationSchedule.adopt`), moves the prefix's files into its run's folder (its writer,
    started), trains to the end, records the run (done or failed) and exits (`end`). The same
    process state at the fork and the same code after it make each run the run it would be
    alone."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        writers: Sequence[RunWriter],
        writer: RunWriter,
        schedule: Any,
        fork_at: int,
        started: float,
    ) -> None:
        self.specs, self.writers, self.writer = specs, writers, writer
        self.schedule, self.fork_at, self.started = schedule, fork_at, started
        self.branch: int | None = None  # in a child: the index of its run

    def fork(self) -> None:
        """Fork one child per run, each waited for before the next; the child returns (and
        goes on training as its run), the parent raises _PrefixDone."""
        import os
        import time
        import traceback

        prefix_s = time.time() - self.started
        shared = {
            "env_step": self.fork_at,
            "wall_s": prefix_s,
            "runs": [s.run_id for s in self.specs],
        }
        for index, spec in enumerate(self.specs):
            pid = os.fork()
            if pid == 0:
                die_with_parent()  # ends with the worker that forked it (`lifetime`)
                self.branch = index
                try:
                    target = self.writers[index]
                    target.update_info(started=time.time() - prefix_s, shared_prefix=shared)
                    self.writer.relocate(target.run_dir)
                    self.schedule.adopt(spec.perturbations)
                except BaseException:
                    target.fail(traceback.format_exc())
                    os._exit(1)
                return
            _, status = os.waitpid(pid, 0)
            target = self.writers[index]
            if target.read_info().status.value == "running":  # the child died without a word
                target.fail(f"the forked process of this run died (wait status {status})")
        raise _PrefixDone

    def end(self, *, failed: bool) -> None:
        """A child's last act: record a failure (inside an except block) and exit."""
        import os
        import traceback

        if failed:
            try:
                self.writer.fail(traceback.format_exc())
            finally:
                os._exit(1)
        os._exit(0)


def _eval_env(settings: RLConfig, seed: int) -> VecEnv:
    """The evaluation env: like the training env, normalised (not updating its statistics, raw
    rewards) where the training env is."""
    env = make_env(settings.env, seed)
    if settings.knobs.get("normalize"):
        from stable_baselines3.common.vec_env import VecNormalize

        env = VecNormalize(env, training=False, norm_reward=False)
    return env


class _Evaluation:
    """Deterministic evaluation episodes on a separate env, and the `evals` rows they gave."""

    def __init__(self, model: BaseAlgorithm, env: VecEnv, episodes: int) -> None:
        self.model, self.env, self.episodes = model, env, episodes
        self.rows: list[dict[str, Any]] = []

    def run(self, step: int, env_step: int) -> None:
        """Evaluate the current policy; one row with the mean and std of the episode returns."""
        import copy

        import numpy as np
        from stable_baselines3.common.evaluation import evaluate_policy
        from stable_baselines3.common.vec_env import VecNormalize

        train_env = self.model.get_env()
        if isinstance(self.env, VecNormalize) and isinstance(train_env, VecNormalize):
            self.env.obs_rms = copy.deepcopy(train_env.obs_rms)  # the policy's view, now

        returns, _ = evaluate_policy(
            self.model,
            self.env,
            n_eval_episodes=self.episodes,
            deterministic=True,
            return_episode_rewards=True,
            warn=False,
        )
        values = np.asarray(returns, dtype=np.float64)  # (episodes,)
        self.rows.append(
            {
                "step": step,
                "env_step": env_step,
                "perf": float(values.mean()),
                "return_std": float(values.std()),
            }
        )


def _telemetry_callback(
    spec: RunSpec, settings: RLConfig, schedule: Any, writer: RunWriter
) -> StabilityCallback:
    """The SB3 callback that records telemetry, drives the perturbations and hosts the guard."""
    from stabilitybench.integrations.sb3 import StabilityCallback

    return StabilityCallback(
        every=1,  # audits measure every optimizer step (the callback's default is 4)
        probes=list(PROBE_SETS[settings.probes]),
        sink=writer,
        schedule=schedule,
        total_steps=settings.expected_updates(),
        stop_on_divergence=True,
        guard=spec.guard,
    )


def _learn(
    model: BaseAlgorithm,
    settings: RLConfig,
    telemetry_callback: StabilityCallback,
    evaluation: _Evaluation,
    *extra: Any,
) -> tuple[bool, int]:
    """Train for `total_steps` env steps, evaluating every `eval_every`; (diverged, env steps).

    A diverged run gets an evaluation row with perf −inf where it stopped; otherwise the policy
    is evaluated at the end unless the last periodic evaluation already saw it.
    """
    from stable_baselines3.common.callbacks import CallbackList

    from stabilitybench.integrations.sb3 import EveryEnvSteps, TrainingDiverged

    def periodic_eval(env_step: int) -> None:
        if not telemetry_callback.diverged:  # a NaN policy cannot act; run() records -inf
            evaluation.run(max(telemetry_callback.telemetry.step, 0), env_step)

    callback = CallbackList(
        [telemetry_callback, EveryEnvSteps(settings.eval_every, periodic_eval), *extra]
    )
    try:
        model.learn(settings.total_steps, callback=callback)
    except TrainingDiverged:
        pass
    except ValueError:
        # torch.distributions rejects NaN parameters in the policy's next forward pass.
        if not telemetry_callback.diverged:
            raise
    diverged = telemetry_callback.diverged
    step = max(telemetry_callback.telemetry.step, 0)
    env_step = int(model.num_timesteps)
    if diverged:
        evaluation.rows.append(
            {"step": step, "env_step": env_step, "perf": -_INF, "return_std": math.nan}
        )
    elif evaluation.rows[-1]["env_step"] < env_step:
        evaluation.run(step, env_step)
    return diverged, env_step


def _close(
    model: BaseAlgorithm,
    evaluation: _Evaluation,
    telemetry_callback: StabilityCallback,
    writer: RunWriter | None,
) -> None:
    """Flush the telemetry (and name its argmax indices in run.json); close both envs. Without
    a `writer` (the parent of a shared prefix), only close the envs."""
    from stabilitybench.telemetry.stability_probes import index_names

    if writer is not None and telemetry_callback.attached:
        telemetry_callback.close(read_back=False)
        index = index_names(telemetry_callback.telemetry.probes)
        if index:  # what the *_argmax columns' tensor indices name (clock optimizer)
            writer.update_info(telemetry_index=index)
    evaluation.env.close()
    model.get_env().close()  # type: ignore[union-attr]


register_workload("rl", RLWorkload)
