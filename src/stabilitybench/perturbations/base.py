"""The Perturbation base class: the window (*when*), bookkeeping and events live here; a subclass
says *what* in a short `apply()` / `revert()` / `pre_step()`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.registry import Registry
from stabilitybench.types import StepContext

if TYPE_CHECKING:
    import torch

DIMENSIONS = ("optimization", "data", "parametric", "signal", "control")
ADAPTERS = ("env", "mujoco", "batch")
RAMPS = ("none", "linear", "geometric")
RAMP_MODES = ("multiplicative", "additive")
ADDITIVE_START = 1e-3  # a geometric ramp of an additive size starts from target × this
_REQUIRED = object()


F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """`torch.no_grad()` as a decorator that imports torch only when the method runs (validating
    a spec must not import torch)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return cast(F, wrapper)


def ramp_value(ramp: str, mode: str, target: float, progress: float) -> float:
    """The size of a ramped perturbation at `progress` u ∈ (0, 1] through its window.

    u = (s + 1) / D on window step s = 0 … D − 1, so the last step has the full `target`.
    - `none`: target.
    - `linear`: identity + (target − identity) · u, identity 1 for a multiplicative size (a
      factor), 0 for an additive one (a noise std, a fraction).
    - `geometric`, multiplicative: target ** u (the factor interpolates in log space from 1);
      additive: target · ADDITIVE_START ** (1 − u) (in log space from target · 1e-3, since an
      additive size has no logarithm at 0).
    """
    if ramp == "none":
        return target
    u = min(max(progress, 0.0), 1.0)
    identity = 1.0 if mode == "multiplicative" else 0.0
    if ramp == "linear":
        return identity + (target - identity) * u
    if mode == "multiplicative":
        return float(target**u)
    return float(target * ADDITIVE_START ** (1.0 - u))


@dataclass(frozen=True)
class Param:
    """One magnitude field of a perturbation: its type, default and allowed range."""

    type: type
    default: Any = _REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def allowed(self) -> str:
        """The allowed values in words, for error messages and the docs table."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return {float: "a number", int: "an integer", str: "a string"}.get(
                self.type, self.help or "a value"
            )
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        kind = "an integer" if self.type is int else "a number"
        return f"{kind} in {left}{lo}, {hi}{right}"

    def check(self, where: str, field: str, value: Any) -> Any:
        """The validated value, or a StabilityBenchError naming the field and the allowed values."""
        if value is None and not self.required and self.default is None:
            return None
        bad = StabilityBenchError(
            f"{where}: {field}={value!r} is not allowed; {field} must be {self.allowed()}"
        )
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            if self.type is int and not float(value).is_integer():
                raise bad
            value = self.type(value)
            if not math.isfinite(value):
                raise bad
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise bad
            if self.high is not None and (
                value > self.high or (self.high_open and value == self.high)
            ):
                raise bad
            return value
        if self.type is str:
            if not isinstance(value, str) or not value:
                raise bad
            if self.choices is not None and value not in self.choices:
                raise bad
            return value
        return value


class Perturbation:
    """A controlled disturbance of a run during a window of optimizer steps.

    The base class owns the window: it resolves `at` / `duration` into steps, opens and closes the
    window on the optimizer clock, records the event, and gives the perturbation its own
    `torch.Generator` so that training's random stream is untouched. Subclasses set `name`,
    `dimension`, `adapter`, `params` and write the hooks they need:

    - `apply(ctx)` once at the window's first step (per optimizer when `scope == "optimizer"`,
      once per clock step when `scope == "model"`), before `optimizer.step()`;
    - `pre_step(ctx)` / `post_step(ctx)` on every step of the window, around `optimizer.step()`;
    - `revert(ctx)` after the window's last step;
    - env perturbations (`adapter` "env"/"mujoco") write `perturb_obs`, `perturb_reward` or
      `shift_model` / `restore_model`; batch perturbations write `transform`.
    """

    name: ClassVar[str] = ""
    dimension: ClassVar[str] = ""
    adapter: ClassVar[str | None] = None
    scope: ClassVar[str] = "optimizer"  # optimizer | model | env | batch
    one_shot: ClassVar[bool] = False  # acts once at onset; `duration` must be 1
    params: ClassVar[dict[str, Param]] = {}
    magnitude_field: ClassVar[str | None] = None  # which of `params` is its size (dose-response x)
    models: ClassVar[str] = ""  # what it models in practice (docs table)
    # The magnitude field a `ramp` grows across the window (None: this kind cannot ramp), and
    # whether its "no effect" value is 1 (multiplicative: a factor) or 0 (additive: a std).
    ramp_field: ClassVar[str | None] = None
    ramp_mode: ClassVar[str] = "multiplicative"
    # Telemetry columns whose recorded value is this perturbation's own setting (lr_spike: `lr`),
    # not a response of the training: the monitor does not read them (it would see the answer).
    sets_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        at: int | float,
        duration: int = 1,
        duration_env_steps: int | None = None,
        label: str | None = None,
        ramp: str = "none",
        **magnitude: Any,
    ) -> None:
        where = f"perturbation {self.name!r}"
        self.at = _check_at(where, at)
        self.duration = int(Param(int, low=1).check(where, "duration", duration))
        if self.one_shot and self.duration != 1:
            raise StabilityBenchError(
                f"{where}: duration={duration!r} is not allowed; {self.name} acts once, so duration must be 1"
            )
        self.ramp = self._check_ramp(where, ramp)
        self.duration_env_steps = self._check_duration_env_steps(where, duration_env_steps)
        self.values: dict[str, Any] = self._check_magnitude(where, magnitude)
        self.label = label if label is not None else self.name
        self.bind(index=0, seed=0)
        self._init_window_state()

    def _check_ramp(self, where: str, ramp: str) -> str:
        """The checked `ramp`; anything but none needs a kind with a window and a size to grow."""
        checked = str(Param(str, choices=RAMPS).check(where, "ramp", ramp))
        if checked != "none" and (self.one_shot or self.ramp_field is None):
            why = (
                "acts once, so it has no window to ramp over"
                if self.one_shot
                else "has no size to grow"
            )
            raise StabilityBenchError(
                f"{where}: ramp={ramp!r} is not allowed; {self.name} {why}, so ramp must be none "
                f"(kinds that ramp: {', '.join(_ramp_names())})"
            )
        return checked

    def _check_duration_env_steps(self, where: str, duration_env_steps: int | None) -> int | None:
        """The checked `duration_env_steps` (environment perturbations only), or None."""
        if duration_env_steps is not None and self.scope != "env":
            raise StabilityBenchError(
                f"{where}: duration_env_steps is only allowed for environment perturbations "
                f"({', '.join(_env_names())})"
            )
        return (
            None
            if duration_env_steps is None
            else int(Param(int, low=1).check(where, "duration_env_steps", duration_env_steps))
        )

    def _check_magnitude(self, where: str, magnitude: Mapping[str, Any]) -> dict[str, Any]:
        """Every field of `params`, checked, with defaults for those not given."""
        unknown = sorted(set(magnitude) - set(self.params))
        if unknown:
            allowed = [
                "at",
                "duration",
                *(["duration_env_steps"] if self.scope == "env" else []),
                "label",
                *(["ramp"] if self.ramp_field is not None else []),
                *self.params,
            ]
            raise StabilityBenchError(
                f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}"
            )
        values: dict[str, Any] = {}
        for field, spec in self.params.items():
            if field not in magnitude:
                if spec.required:
                    raise StabilityBenchError(
                        f"{where}: missing field {field!r}; {field} must be {spec.allowed()}"
                    )
                values[field] = spec.default
            else:
                values[field] = spec.check(where, field, magnitude[field])
        return values

    def _init_window_state(self) -> None:
        """The window's state before the run: no onset yet unless `at` is a step, nothing applied."""
        self._onset_step: int | None = None
        self._onset_env: int | None = None
        if isinstance(self.at, int):
            self._onset_step = self.at
        # Window state on the optimizer clock.
        self.start_step: int | None = None
        self.end_step: int | None = None  # planned (hook/batch) or observed (env) last step
        self.start_env_step: int | None = None
        self.end_env_step: int | None = None
        self._last_step: int | None = None
        self._applied: set[int] = set()
        # Env window state (env scope only).
        self.env_state = "pending"  # pending | active | done
        self.env_active = False  # whether the current env step is perturbed
        self._env_count = 0
        self._steps_after_first_env = 0
        self._touched = False

    # ---- configuration ----------------------------------------------------------------------
    def bind(self, *, index: int, seed: int) -> None:
        """Seed this perturbation's own generator from (schedule seed, position in the schedule)."""
        import torch

        self.index = index
        self.schedule: Any = None  # the schedule it belongs to (set by PerturbationSchedule)
        state = np.random.SeedSequence([int(seed), int(index), 0x5EED]).generate_state(2, np.uint32)
        self.generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def resolve(self, total_steps: int | None, total_env_steps: int | None) -> None:
        """Turn a fractional `at` into an onset (optimizer step, or env step for RL runs)."""
        if isinstance(self.at, int):
            return
        if total_env_steps is not None:
            self._onset_env = round(self.at * total_env_steps)
            self._onset_step = None
        elif total_steps is not None:
            self._onset_step = min(round(self.at * total_steps), max(total_steps - 1, 0))
        else:
            raise StabilityBenchError(
                f"perturbation {self.label!r}: at={self.at} is a fraction of the run, but the run's "
                "total steps are unknown; pass total_steps (or total_env_steps for RL) to "
                "PerturbationSchedule, or give `at` as an int optimizer step"
            )

    @property
    def onset_env(self) -> int | None:
        """The env step its window opens at, where `at` is a fraction of an RL run's env steps
        (None where its onset is an optimizer step)."""
        return self._onset_env

    @property
    def resolved(self) -> bool:
        return self._onset_step is not None or self._onset_env is not None

    def config(self) -> dict[str, Any]:
        """The parameters as recorded in events: `at`, `duration` and every magnitude field."""
        out: dict[str, Any] = {"at": self.at, "duration": self.duration}
        if self.duration_env_steps is not None:
            out["duration_env_steps"] = self.duration_env_steps
        if self.ramp != "none":  # absent: no ramp (keeps the events of older audits identical)
            out["ramp"] = self.ramp
        out.update(self.values)
        return out

    # ---- the ramp: one place for every kind that grows across its window ----------------------
    def ramp_progress(self, step: int | None = None) -> float:
        """u ∈ (0, 1]: how far through the window `step` is, as (s + 1) / D on window step s.

        Hook and batch perturbations count optimizer steps from the window's first step (the
        onset, for a batch transformed before its step has begun). Env perturbations count on
        their own clock: perturbed env steps when `duration_env_steps` is set, else optimizer
        steps since the first perturbed env step.
        """
        if self.scope == "env":
            if self.duration_env_steps is not None:
                return min(max(self._env_count, 1) / self.duration_env_steps, 1.0)
            return min((self._steps_after_first_env + 1) / self.duration, 1.0)
        start = self.start_step if self.start_step is not None else self._onset_step
        if step is None or start is None:
            return 1.0
        return min(max(step - start + 1, 1) / self.duration, 1.0)

    def magnitude(self, step: int | None = None) -> float:
        """The ramped field's value on optimizer step `step` (env perturbations: now)."""
        if self.ramp_field is None:
            raise TypeError(f"{type(self).__name__} has no ramped magnitude")
        target = float(self.values[self.ramp_field])
        if self.ramp == "none":
            return target
        return ramp_value(self.ramp, self.ramp_mode, target, self.ramp_progress(step))

    def check_model(self, model: torch.nn.Module | None) -> None:
        """Raise StabilityBenchError if this perturbation names something the model lacks."""

    def on_attach(self, telemetry: Any) -> None:
        """Called when the schedule is attached to a Telemetry (before any step)."""

    # ---- subclass hooks ---------------------------------------------------------------------
    def apply(self, ctx: StepContext) -> None:
        """Once at the window's first step (per optimizer, or once for `scope == "model"`)."""

    def pre_step(self, ctx: StepContext) -> None:
        """Every step of the window, before `optimizer.step()` (after backward)."""

    def post_step(self, ctx: StepContext) -> None:
        """Every step of the window, after `optimizer.step()`."""

    def revert(self, ctx: StepContext) -> None:
        """After the window's last step."""

    def watch_post(self, ctx: StepContext) -> None:
        """Every post-step of the run, in or out of the window (for effects set up in advance)."""

    # ---- the window on the optimizer clock ----------------------------------------------------
    def would_cover(self, step: int) -> bool:
        """Whether optimizer step `step` is (or, when it comes, will be) in the window."""
        if self.start_step is not None:
            return self.end_step is not None and self.start_step <= step <= self.end_step
        return self._onset_step is not None and step >= self._onset_step

    def covers(self, step: int) -> bool:
        """Whether the telemetry row of `step` is marked perturbed."""
        if self.start_step is None or step < self.start_step:
            return False
        if self.scope == "env" and self.duration_env_steps is not None:
            return self.env_state == "active" or (
                self.end_step is not None and step <= self.end_step
            )
        return self.end_step is not None and step <= self.end_step

    def begin_step(self, step: int, env_step: int | None) -> None:
        """Called once per clock step, before any optimizer's pre-step hook acts."""
        self._last_step = step
        if self.scope == "env":
            self._begin_env_clock_step(step)
            return
        if self.start_step is None and self._onset_reached(step, env_step):
            self.start_step = step
            self.end_step = step + self.duration - 1
            self.start_env_step = env_step

    def on_pre(self, ctx: StepContext, first_of_step: bool) -> None:
        if self.scope in ("env", "batch") or not self._in_window(ctx.step):
            return
        key = id(ctx.optimizer) if self.scope == "optimizer" else 0
        if key not in self._applied and (self.scope == "optimizer" or first_of_step):
            self._applied.add(key)
            self.apply(ctx)
        if self.scope == "optimizer" or first_of_step:
            self.pre_step(ctx)

    def on_post(self, ctx: StepContext, first_of_step: bool) -> None:
        self.watch_post(ctx)
        if self.scope in ("env", "batch") or not self._in_window(ctx.step):
            return
        if self.scope == "optimizer" or first_of_step:
            self.post_step(ctx)
            if ctx.step == self.end_step:
                self.end_env_step = ctx.env_step
                self.revert(ctx)

    def _in_window(self, step: int) -> bool:
        return (
            self.start_step is not None
            and self.end_step is not None
            and self.start_step <= step <= self.end_step
        )

    def _onset_reached(self, step: int, env_step: int | None) -> bool:
        if self._onset_step is not None and step >= self._onset_step:
            return True
        return self._onset_env is not None and env_step is not None and env_step >= self._onset_env

    # ---- the window on the env clock (env scope) ---------------------------------------------
    def _begin_env_clock_step(self, step: int) -> None:
        if (
            self.env_state == "pending"
            and self._onset_step is not None
            and step >= self._onset_step
        ):
            self.env_state = "active"  # env steps from now on are perturbed
        if self.start_env_step is not None and self.env_state == "active":
            self._steps_after_first_env += 1
        if self._touched:
            self._touched = False
            if self.start_step is None:
                self.start_step = step
                if self.duration_env_steps is None:
                    self.end_step = step + self.duration - 1
            if self.duration_env_steps is not None:
                self.end_step = step

    def env_tick(self, env_step: int) -> None:
        """Called before each env step (index `env_step`); decides whether that step is perturbed."""
        if (
            self.env_state == "pending"
            and self._onset_env is not None
            and env_step >= self._onset_env
        ):
            self.env_state = "active"
        if self.env_state == "active":
            if self.duration_env_steps is not None:
                finished = self._env_count >= self.duration_env_steps
            else:
                finished = self._steps_after_first_env >= self.duration
            if finished:
                self.env_state = "done"
        self.env_active = self.env_state == "active"
        if self.env_active:
            self._env_count += 1
            if self.start_env_step is None:
                self.start_env_step = env_step
            self.end_env_step = env_step
            self._touched = True

    # ---- env / batch effects (overridden by env and batch perturbations) ----------------------
    def perturb_obs(self, obs: np.ndarray, obs_std: np.ndarray) -> np.ndarray:
        return obs

    def perturb_reward(self, reward: float, reward_rms: float) -> float:
        return reward

    def shift_model(self, model: Any) -> Any:
        """Change a MuJoCo model quantity; return what `restore_model` needs to undo it exactly."""
        return None

    def restore_model(self, model: Any, saved: Any) -> None:
        """Undo `shift_model` exactly."""

    def transform(
        self, x: torch.Tensor, y: torch.Tensor, schedule: Any, shifted_batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    # ---- record -------------------------------------------------------------------------------
    def event(self, last_step: int | None = None) -> dict[str, Any] | None:
        """The events.parquet row of this window, or None if it never started."""
        if self.start_step is None and self.start_env_step is None:
            return None
        end = self.end_step
        if end is not None and last_step is not None and self.start_step is not None:
            end = max(self.start_step, min(end, last_step))
        return {
            "kind": self.name,
            "name": self.label,
            "dimension": self.dimension,
            "params": self.config(),
            "start_step": self.start_step,
            "end_step": end,
            "start_env_step": self.start_env_step,
            "end_env_step": self.end_env_step,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def _check_at(where: str, at: Any) -> int | float:
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise StabilityBenchError(
            f"{where}: at={at!r} is not allowed; at must be an optimizer step (int >= 0) "
            "or a fraction of the run (float in (0, 1))"
        )
    if isinstance(at, int):
        if at < 0:
            raise StabilityBenchError(
                f"{where}: at={at} is not allowed; an int `at` is an optimizer step and must be >= 0"
            )
        return at
    if not (0.0 < at < 1.0):
        raise StabilityBenchError(
            f"{where}: at={at} is not allowed; a float `at` is a fraction of the run and must be in "
            "(0, 1) (use an int for an optimizer step)"
        )
    return float(at)


# ---- registry ---------------------------------------------------------------------------------
REGISTRY: Registry[type[Perturbation]] = Registry(
    "kind",
    [
        f"stabilitybench.perturbations.{m}"
        for m in ("optimization", "data", "parametric", "signal", "sham")
    ],
)


def register(cls: type[Perturbation]) -> type[Perturbation]:
    """Class decorator: make a perturbation available to `build()` and YAML specs by its name."""
    if cls.dimension not in DIMENSIONS:
        raise ValueError(f"{cls.__name__}: dimension must be one of {DIMENSIONS}")
    if cls.adapter is not None and cls.adapter not in ADAPTERS:
        raise ValueError(f"{cls.__name__}: adapter must be None or one of {ADAPTERS}")
    if cls.ramp_field is not None and cls.ramp_field not in cls.params:
        raise ValueError(f"{cls.__name__}: ramp_field must name one of its params")
    if cls.ramp_mode not in RAMP_MODES:
        raise ValueError(f"{cls.__name__}: ramp_mode must be one of {RAMP_MODES}")
    REGISTRY.register(cls.name, cls)
    return cls


def _env_names() -> list[str]:
    return sorted(n for n, c in REGISTRY.entries().items() if c.scope == "env")


def _ramp_names() -> list[str]:
    return sorted(
        n for n, c in REGISTRY.entries().items() if c.ramp_field is not None and not c.one_shot
    )


def registry() -> Mapping[str, type[Perturbation]]:
    """Every registered perturbation class by name."""
    return REGISTRY.entries()


def available() -> dict[str, list[str]]:
    """The registered perturbation names, by dimension."""
    out: dict[str, list[str]] = {d: [] for d in DIMENSIONS}
    for name, cls in REGISTRY.entries().items():
        out[cls.dimension].append(name)
    return out


def build(config: Mapping[str, Any] | Perturbation) -> Perturbation:
    """A Perturbation from a config such as {"kind": "lr_spike", "at": 0.3, "factor": 10}."""
    if isinstance(config, Perturbation):
        return config
    if not isinstance(config, Mapping):
        raise StabilityBenchError(
            f"perturbation: expected a mapping with a `kind` field, got {config!r}"
        )
    fields = dict(config)
    kind = fields.pop("kind", None)
    cls = REGISTRY.get(kind, where="perturbation")
    if "at" not in fields:
        raise StabilityBenchError(
            f"perturbation {kind!r}: missing field 'at'; at must be an optimizer step (int >= 0) "
            "or a fraction of the run (float in (0, 1))"
        )
    return cls(**fields)
