"""A guard's configuration: which detector, which action, and the action's parameters.

`parse_guard(item, where)` turns one entry of an audit spec's `guards:` list (or the keyword
arguments of `Guard`) into a checked `GuardConfig` (a pydantic dataclass: its field types and
validators are the checks); every problem is one `StabilityBenchError` naming the field and the
allowed values. This module imports neither torch nor the detectors'
heavy dependencies, so spec validation stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails, PydanticCustomError

from stabilitybench.errors import StabilityBenchError

Action = Literal["skip", "lr_cut", "reset_moments", "rollback", "escalate"]
ACTIONS: tuple[str, ...] = get_args(Action)
# Actions that restore a snapshot of the training state (every one but lr_cut: skip and
# reset_moments restore the pre-step state, rollback an older one, escalate may do any).
SNAPSHOT_ACTIONS = frozenset(ACTIONS) - {"lr_cut"}
# What a guard decides on the device, before the update (`guard.device`; no torch here).
DEVICE_ACTIONS: tuple[str, ...] = ("skip", "lr_cut", "rollback")
DEVICE_DETECTORS: tuple[str, ...] = ("auto", "olmo")
DEVICE_KINDS: tuple[str, ...] = ("lm",)  # workload loops that host a device guard
# Workload kinds whose loop hosts a guard (they can snapshot and restore their whole state).
GUARDED_KINDS = ("lm", "rl", "toy")


def _integer_at_least(low: int) -> Any:
    """Settings of an integer field >= `low` (a bool or a float such as 2.0 is not an integer);
    the description is what an error message says the value must be."""
    return Field(strict=True, ge=low, description=f"an integer >= {low}")


LRFactor = Annotated[
    float, Field(strict=True, gt=0, lt=1, description="a number in (0, 1) (the LR multiplier)")
]
SpikeRatio = Annotated[
    float, Field(strict=True, gt=1, description="a number > 1 (a multiple of the median)")
]
AtLeastOne = Annotated[int, _integer_at_least(1)]
OnDevice = Annotated[bool, Field(strict=True, description="true or false")]
AtLeastZero = Annotated[int, _integer_at_least(0)]


# Defaults are validated too: `min_age`'s default must fit the `keep` and `every` given.
@dataclass(frozen=True, config=ConfigDict(extra="forbid", validate_default=True))
class GuardConfig:
    """What a guard watches and what it does on an alarm (defaults in the field comments).

    Constructing one checks it; `parse_guard` turns a problem into a user's error message.
    """

    detector: str
    action: Action
    factor: LRFactor = 0.5  # lr_cut / after a rollback or reset: LR multiplier, in (0, 1)
    cooldown: AtLeastOne = 50  # steps the LR stays cut after an alarm (>= 1)
    every: AtLeastOne = 20  # rollback: a CPU snapshot every `every` steps (>= 1)
    keep: AtLeastOne = 4  # rollback: snapshots kept, a ring (>= 1)
    min_age: AtLeastZero = 20  # rollback: restore the newest snapshot at least this many steps old
    # escalate: alarms within this many steps count as repeats; after a rollback loop, alarms are
    # skipped until this many steps pass without one (>= 1)
    window: AtLeastOne = 100
    spike_ratio: SpikeRatio = 3.0  # reset_moments: tensors whose grad norm > this × its median
    monitor: str | None = None  # msm: the folder of a fitted monitor (`<audit>/monitor/...`)
    # skip / lr_cut with auto or olmo: decide on the device before the update (guard.device)
    on_device: OnDevice = False

    @field_validator("detector", mode="before")
    @classmethod
    def _online_detector(cls, detector: Any) -> Any:
        """A registered detector with an online score that a guard can use as it is (msm is
        fitted by `monitor fit`; no other fitted detector can be)."""
        from stabilitybench.detectors.base import detector_classes

        classes = detector_classes()
        if not isinstance(detector, str) or detector not in classes:
            raise ValueError(f"unknown detector {detector!r}; allowed: {', '.join(classes)}")
        if not classes[detector].online:
            online = [n for n, c in classes.items() if c.online]
            raise ValueError(f"{detector!r} has no online score; allowed: {', '.join(online)}")
        if classes[detector].fitted and detector != "msm":
            fitted = [n for n, c in classes.items() if c.online and not c.fitted] + ["msm"]
            raise ValueError(
                f"{detector!r} must be fitted and no guard can fit it; allowed: {', '.join(fitted)}"
            )
        return detector

    @field_validator("monitor", mode="before")
    @classmethod
    def _monitor_for_msm(cls, monitor: Any, info: ValidationInfo) -> Any:
        """msm needs the folder of a fitted monitor; no other detector takes one."""
        detector = info.data.get("detector")
        if detector == "msm" and (not isinstance(monitor, str) or not monitor.strip()):
            raise ValueError(
                "detector msm needs the folder of a fitted monitor (e.g. monitor: "
                "audits/lm-buildup/monitor, written by `stabilitybench monitor fit`)"
            )
        if detector is not None and detector != "msm" and monitor is not None:
            raise ValueError("only detector msm takes a monitor folder")
        return monitor

    @field_validator("on_device", mode="after")
    @classmethod
    def _device_form(cls, on_device: bool, info: ValidationInfo) -> bool:
        """On the device: an action decided before the update, by a detector with a device form."""
        if not on_device:
            return on_device
        action, detector = info.data.get("action"), info.data.get("detector")
        if action is not None and action not in DEVICE_ACTIONS:
            raise ValueError(
                f"action {action} is decided on the host; on the device: {', '.join(DEVICE_ACTIONS)}"
            )
        if detector is not None and detector not in DEVICE_DETECTORS:
            raise ValueError(
                f"detector {detector} has no device form; allowed: {', '.join(DEVICE_DETECTORS)}"
            )
        return on_device

    @field_validator("min_age", mode="after")
    @classmethod
    def _snapshot_kept(cls, min_age: int, info: ValidationInfo) -> int:
        """A rollback needs a snapshot at least `min_age` steps old still in the ring."""
        action, keep, every = (info.data.get(k) for k in ("action", "keep", "every"))
        if action not in ("rollback", "escalate") or keep is None or every is None:
            return min_age  # no snapshots, or `keep` / `every` has its own error
        if min_age > (keep - 1) * every:
            raise PydanticCustomError(
                "snapshot_not_kept",
                "must be <= (keep - 1) * every = {oldest} so that a snapshot that old is always "
                "kept, got {min_age}",
                {"oldest": (keep - 1) * every, "min_age": min_age},
            )
        return min_age

    def label(self) -> str:
        """`detector:action`, plus the parameters the user set away from their defaults."""
        extra = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in ("detector", "action", "monitor")
            and getattr(self, f.name) != f.default
        ]
        return f"{self.detector}:{self.action}" + (f"({','.join(extra)})" if extra else "")

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (`on_device` only when true: run ids of guards from before it
        existed stay what they were)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if not out.get("on_device"):
            out.pop("on_device", None)
        return out


_FIELDS = [f.name for f in fields(GuardConfig)]
_VALIDATOR = TypeAdapter(GuardConfig)
# Which problem an entry with several is reported by: unknown keys (by name), then missing ones,
# then each field's own value in this order, then `min_age` against `keep` and `every`.
_FIELD_ORDER = (
    "action",
    "detector",
    "monitor",
    "factor",
    "cooldown",
    "every",
    "keep",
    "min_age",
    "window",
    "spike_ratio",
    "on_device",
)
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_MISSING = ("missing", "missing_argument")


def parse_guard(item: Mapping[str, Any], where: str = "guard") -> GuardConfig:
    """A checked guard config from a mapping such as {detector: zclip, action: rollback}."""
    if not isinstance(item, Mapping):
        raise StabilityBenchError(
            f"{where}: must be `none` or a mapping such as {{detector: zclip, action: rollback}}; "
            f"got {item!r}"
        )
    try:
        return _VALIDATOR.validate_python(dict(item))
    except ValidationError as exc:
        first = min(exc.errors(include_url=False), key=_report_order)
        raise StabilityBenchError(f"{where}.{first['loc'][0]}: {_message(first)}") from None


def _report_order(error: ErrorDetails) -> tuple[int, int | str]:
    """Sort key of a validation error: the first one is the one a user is told about."""
    if error["type"] in _UNKNOWN_KEY:
        return (0, str(error["loc"][0]))
    field = str(error["loc"][0])
    if error["type"] in _MISSING:
        return (1, _FIELDS.index(field))
    if error["type"] == "snapshot_not_kept":
        return (3, 0)
    return (2, _FIELD_ORDER.index(field))


def _message(error: ErrorDetails) -> str:
    """What is wrong with one field, in the user's words (no pydantic phrasing)."""
    kind, value = error["type"], error["input"]
    if kind in _UNKNOWN_KEY:
        return f"unknown key; allowed: {', '.join(sorted(_FIELDS))}"
    if kind in _MISSING:
        return "is required"
    if kind == "literal_error":
        return f"unknown action {value!r}; allowed: {', '.join(ACTIONS)}"
    if kind in ("value_error", "snapshot_not_kept"):
        return str(error["msg"]).removeprefix("Value error, ")
    must_be = _VALIDATOR.json_schema()["properties"][error["loc"][0]]["description"]
    return f"must be {must_be}, got {value!r}"


def guard_configs(items: list[Any], where: str = "guards") -> list[GuardConfig | None]:
    """Each entry of a spec's `guards:` list checked (None for `none`); repeats are errors."""
    result: list[GuardConfig | None] = []
    for index, item in enumerate(items):
        here = f"{where}[{index}]"
        config = None if item == "none" or item is None else parse_guard(item, here)
        if config in result:
            raise StabilityBenchError(f"{here}: repeats {where}[{result.index(config)}]")
        result.append(config)
    return result


def check_workload(config: GuardConfig, kind: str, where: str) -> None:
    """A guard on a workload whose loop cannot snapshot and restore its state is an error."""
    if config.on_device and kind not in DEVICE_KINDS:
        raise StabilityBenchError(
            f"{where}.on_device: workloads of kinds {', '.join(DEVICE_KINDS)} give the loss "
            f"before the update; kind {kind!r} does not (leave on_device out there)"
        )
    if kind in GUARDED_KINDS:
        return
    if config.action == "lr_cut":
        raise StabilityBenchError(
            f"{where}.action: guards run in workloads of kinds {', '.join(GUARDED_KINDS)}; "
            f"kind {kind!r} does not host one yet"
        )
    raise StabilityBenchError(
        f"{where}.action: {config.action} needs a workload that can snapshot and restore its "
        f"training state; kinds that can: {', '.join(GUARDED_KINDS)} (kind {kind!r} cannot yet)"
    )


def check_monitor_folder(config: GuardConfig, where: str) -> None:
    """An msm guard's `monitor` must be a folder `monitor fit` wrote (monitor.json + weights)."""
    if config.monitor is None:
        return
    from pathlib import Path

    folder = Path(config.monitor)
    missing = [n for n in ("monitor.json", "model.safetensors") if not (folder / n).is_file()]
    if missing:
        raise StabilityBenchError(
            f"{where}.monitor: {config.monitor!r} is not a fitted monitor folder (no "
            f"{' or '.join(missing)}); give the folder `stabilitybench monitor fit DIR` wrote, "
            "e.g. DIR/monitor"
        )


def monitor_kinds(folder: str) -> dict[str, str] | None:
    """Workload name → kind that the monitor in `folder` was fitted on, from the `fit.json` and
    `audit.json` that `monitor fit` and `audit` wrote beside it; None when they are not there.

    `folder` is `<audit>/monitor` (a single-workload fit) or `<audit>/monitor/workload-…`.
    """
    import json
    from pathlib import Path

    path = Path(folder)
    fit = next((f for f in (path / "fit.json", path.parent / "fit.json") if f.is_file()), None)
    if fit is None:
        return None
    audit_root = fit.parent.parent  # <audit>/monitor/fit.json
    try:
        fitted = json.loads(fit.read_text()).get("workloads") or {}
        spec = json.loads((audit_root / "audit.json").read_text()).get("spec") or {}
    except (OSError, ValueError):
        return None
    kinds = {str(w.get("name")): str(w.get("kind")) for w in spec.get("workloads") or []}
    names = [
        name
        for name, entry in fitted.items()
        if fit.parent == path or str(entry.get("model", "")).endswith(path.name)
    ]
    return {name: kinds.get(name, "?") for name in names} or None


def check_monitor_kind(config: GuardConfig, kind: str, workload: str, where: str) -> None:
    """An msm guard's monitor must have been fitted on workloads of the guarded one's kind."""
    if config.monitor is None:
        return
    fitted = monitor_kinds(config.monitor)
    if fitted is None or kind in fitted.values():
        return
    names = ", ".join(f"{n!r} (kind {k})" for n, k in sorted(fitted.items()))
    raise StabilityBenchError(
        f"{where}.monitor: {config.monitor!r} was fitted on workload {names}, but workload "
        f"{workload!r} is kind {kind!r}; fit a monitor on healthy runs of kind {kind!r} "
        "(`stabilitybench monitor fit DIR` on an audit of that workload)"
    )
