"""Workload configs as typed records (pydantic only: no torch, SB3 or transformers here).

Two readers of the same mapping:
- the audit spec's per-kind models (`RLWorkloadSpec`, `LMWorkloadSpec`, `ToyWorkloadSpec`): what
  a user may write under `workloads:`, checked before anything runs; they fill in no workload
  defaults, so a run's `workload` dict (hashed into its id) stays what the spec says;
- `WorkloadConfig`, the base of each built-in workload's own config model (`LMConfig`,
  `RLConfig`, `ToyConfig` beside the workload): a resolved config read once, with the
  workload's defaults filled in and its own messages (`workload 'name': …`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stabilitybench.errors import StabilityBenchError, validation_message
from stabilitybench.settings import WarningSettings

MAX_LABEL_CHARS = 200
# Bidirectional overrides and isolates reorder what a terminal or a browser shows ("Trojan Source").
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

ProbeSet = Literal["cheap", "stability"]
PROBE_SET_NAMES: tuple[str, ...] = get_args(ProbeSet)


def label_problem(value: str) -> str | None:
    """Why `value` cannot be a name (audit, workload, perturbation label), or None if it can.

    Names are labels shown to people, never identifiers: spaces, quotes, unicode and markup are
    fine (every view escapes them; no file or folder name is built from them). What is refused
    is what no view can show honestly: control characters (newlines, escapes, bidi overrides)
    and names too long to read.
    """
    if not value.strip():
        return "must not be empty or only spaces"
    if len(value) > MAX_LABEL_CHARS:
        return f"is {len(value)} characters long; a name has at most {MAX_LABEL_CHARS}"
    for position, char in enumerate(value):
        if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI_CONTROLS:
            return (
                f"contains the control character U+{ord(char):04X} at position {position}; "
                "a name is one line of printable text"
            )
    return None


def check_label(value: str) -> str:
    """A pydantic validator: `value` if it can be a name, else a ValueError saying why not."""
    problem = label_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# ---- the audit spec's workload models ---------------------------------------------------------


class SpecModel(BaseModel):
    """Base for every spec model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class EvalSpec(SpecModel):
    """How often and how much to evaluate (RL: `every` env steps, `episodes`; LM/toy: `every`
    optimizer steps, `batches`)."""

    every: int | None = Field(default=None, ge=1)
    episodes: int | None = Field(default=None, ge=1)
    batches: int | None = Field(default=None, ge=1)


class WorkloadSpec(SpecModel):
    """Fields every workload has; `knobs` values that are lists are sweep axes; `reference`
    names the healthy level of swept knobs (default: the first value of each)."""

    name: str = Field(min_length=1)
    total_steps: int = Field(ge=1)
    eval: EvalSpec | None = None
    knobs: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] | None = None
    warning: WarningSettings | None = None  # this workload's warning protocol (over the audit's)
    # This workload's own grid axes, in place of the audit's `perturbations:` / `guards:` (the
    # entries are checked, expanded and stored by the audit spec; a run's id does not say where
    # its perturbation or guard was listed).
    perturbations: list[Any] | None = Field(default=None, min_length=1)
    guards: list[Any] | None = Field(default=None, min_length=1)
    kind: str  # last: each kind's own `kind` (a Literal) keeps its place in the field order

    _name_is_label = field_validator("name")(check_label)

    @field_validator("knobs")
    @classmethod
    def _knob_values(cls, knobs: dict[str, Any]) -> dict[str, Any]:
        for key, value in knobs.items():
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ValueError(
                    f"knob {key!r}: an empty list sweeps nothing; give at least one value"
                )
            for item in values:
                if not isinstance(item, int | float | str | bool) and item is not None:
                    raise ValueError(
                        f"knob {key!r}: values must be numbers, strings, booleans or null "
                        f"(a list of them is a sweep axis), got {type(item).__name__}"
                    )
        return knobs

    @model_validator(mode="after")
    def _sph_within_the_run(self) -> WorkloadSpec:
        """A least useful lead as long as the run leaves no room for a warning (optimizer
        steps: an RL workload's `total_steps` counts env steps, checked at evaluation)."""
        sph = self.warning.sph if self.warning is not None else 0
        if self.kind != "rl" and sph >= self.total_steps:
            raise ValueError(
                f"warning.sph ({sph}) must be less than total_steps ({self.total_steps}): no "
                "warning could come in time"
            )
        return self


class RLWorkloadSpec(WorkloadSpec):
    """A Stable-Baselines3 agent on a Gymnasium environment (`total_steps` = env steps)."""

    kind: Literal["rl"]
    algo: Literal["ppo", "sac", "td3"]
    env: str = Field(min_length=1)
    probes: ProbeSet | None = None


class LMWorkloadSpec(WorkloadSpec):
    """A GPT-2-style language model on a corpus (`total_steps` = optimizer steps)."""

    kind: Literal["lm"]
    size: str | dict[str, int]  # tiny | small | gpt2-124m | {n_layer, n_embd, n_head}
    corpus: str = Field(default="shakespeare", min_length=1)
    tokenizer: str | dict[str, Any] | None = None  # byte | bpe | {kind: bpe, vocab_size: N}
    device: str | None = None
    probes: ProbeSet | None = None  # stability: the build-up probes too


class ToyWorkloadSpec(WorkloadSpec):
    """The teacher-student MLP used by tests and demos (`total_steps` = optimizer steps)."""

    kind: Literal["toy"]


class CustomWorkloadSpec(WorkloadSpec):
    """A workload kind registered with `register_workload`; its own `validate` checks extra keys."""

    model_config = ConfigDict(extra="allow")
    kind: str


BUILTIN_SPECS: dict[str, type[WorkloadSpec]] = {
    "rl": RLWorkloadSpec,
    "lm": LMWorkloadSpec,
    "toy": ToyWorkloadSpec,
}
EVAL_KEYS: dict[str, tuple[str, ...]] = {"rl": ("every", "episodes")}


def workload_spec(config: Mapping[str, Any]) -> WorkloadSpec:
    """A resolved workload config (a RunSpec's `workload`, checked when its audit was) read as
    its kind's spec model; a kind added with `register_workload` reads as `CustomWorkloadSpec`."""
    return BUILTIN_SPECS.get(config["kind"], CustomWorkloadSpec).model_validate(config)


# ---- how a built-in workload reads its config -------------------------------------------------


def workload_name(config: Mapping[str, Any], default: str) -> str:
    """The name a workload's messages use: its config's `name` as text, else `default`."""
    return str(config.get("name", default))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def earlier_fields(info: ValidationInfo, *names: str) -> tuple[Any, ...] | None:
    """The values of fields validated before this one, or None when one of them failed (its
    own error is then the one reported, so a check that needs it has nothing to add)."""
    if not all(name in info.data for name in names):
        return None
    return tuple(info.data[name] for name in names)


def _first_problem(exc: ValidationError) -> str:
    """The first problem of a workload config: the workload's own message where a validator
    raised one, else pydantic's, with its field."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "value_error":
        return str(first["msg"]).removeprefix("Value error, ")
    return validation_message(exc)


class WorkloadConfig(BaseModel):
    """Base of a built-in workload's config model: what the workload runs with, read once.

    A subclass declares its fields in the order they are checked (the first problem is the one
    reported) with validators that raise the workload's messages, and `config_keys`: the keys
    it reads, any other being an error (None: other keys are ignored).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    default_name: ClassVar[str]
    config_keys: ClassVar[tuple[str, ...] | None] = None
    unknown_word: ClassVar[str] = "key"  # how a message calls a config entry: key or field

    name: str

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if cls.config_keys is not None:
            unknown = sorted(set(data) - set(cls.config_keys))
            if unknown:
                raise ValueError(
                    f"unknown {cls.unknown_word} {unknown[0]!r}; "
                    f"allowed: {', '.join(cls.config_keys)}"
                )
        return data

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> Self:
        """`config` checked, with every default filled in; its first problem is one
        StabilityBenchError that names the workload."""
        name = workload_name(config, cls.default_name)
        try:
            return cls.model_validate({**config, "name": name})
        except ValidationError as exc:
            raise StabilityBenchError(f"workload {name!r}: {_first_problem(exc)}") from None


def total_steps_validator(unit: str = "") -> Any:
    """A `total_steps` validator: an integer >= 1 (`unit` says what a step is, in messages)."""

    def check(value: Any) -> int:
        if not _is_int(value) or value < 1:
            raise ValueError(f"total_steps{unit} must be an integer >= 1, got {value!r}")
        return int(value)

    return field_validator("total_steps", mode="before")(check)


def _probe_set(value: Any) -> Any:
    if value not in PROBE_SET_NAMES:
        raise ValueError(f"probes must be one of {', '.join(PROBE_SET_NAMES)}; got {value!r}")
    return value


def probes_validator() -> Any:
    """A `probes` validator: one of the probe sets a workload records (`cheap`, `stability`)."""
    return field_validator("probes", mode="before")(_probe_set)


class EvalConfig(BaseModel):
    """Base of a workload's `eval` as it reads it: `every` steps, and how much each time.

    Null or left out is all defaults; every value given is an integer >= 1. `unknown_word`
    names other keys in the error (None: they are ignored); `shape` is the mapping's form.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    unknown_word: ClassVar[str | None] = "key"
    shape: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if not data:  # null, or left empty
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"eval must be a mapping {cls.shape}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown and cls.unknown_word is not None:
            raise ValueError(
                f"unknown {cls.unknown_word} eval.{unknown[0]}; "
                f"allowed: {', '.join(cls.model_fields)}"
            )
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _at_least_one(cls, value: Any, info: ValidationInfo) -> Any:
        if not _is_int(value) or value < 1:
            raise ValueError(f"eval.{info.field_name} must be an integer >= 1, got {value!r}")
        return value
