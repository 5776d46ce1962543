"""A guard's configuration: which detector, which action, and the action's parameters.

`parse_guard(item, where)` turns one entry of an audit spec's `guards:` list (or the keyword
arguments of `Guard`) into a checked `GuardConfig`; every problem is one `StabilityBenchError`
naming the field and the allowed values. This module imports neither torch nor the detectors'
heavy dependencies, so spec validation stays light.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from stabilitybench.errors import StabilityBenchError

ACTIONS = ("skip", "lr_cut", "rollback", "escalate")
# Actions that restore a snapshot of the training state (every one of them: skip restores the
# pre-step state, rollback an older one, escalate may do either).
SNAPSHOT_ACTIONS = frozenset(ACTIONS) - {"lr_cut"}
# Workload kinds whose loop hosts a guard (they can snapshot and restore their whole state).
GUARDED_KINDS = ("lm", "rl", "toy")


@dataclass(frozen=True)
class GuardConfig:
    """What a guard watches and what it does on an alarm (defaults in the field comments)."""

    detector: str
    action: str
    factor: float = 0.5  # lr_cut / after a rollback: LR multiplier, in (0, 1)
    cooldown: int = 50  # steps the LR stays cut after an alarm (>= 1)
    every: int = 20  # rollback: a CPU snapshot every `every` steps (>= 1)
    keep: int = 4  # rollback: snapshots kept, a ring (>= 1)
    min_age: int = 20  # rollback: restore the newest snapshot at least this many steps old
    window: int = 100  # escalate: alarms within this many steps count as repeats (>= 1)
    monitor: str | None = None  # msm: the folder of a fitted monitor (`<audit>/monitor/...`)

    def label(self) -> str:
        """`detector:action`, plus the parameters the user set away from their defaults."""
        defaults = GuardConfig(self.detector, self.action)
        extra = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in ("detector", "action", "monitor")
            and getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return f"{self.detector}:{self.action}" + (f"({','.join(extra)})" if extra else "")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_FIELDS = {f.name for f in fields(GuardConfig)}
_INTEGER_MIN = {"cooldown": 1, "every": 1, "keep": 1, "min_age": 0, "window": 1}


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_guard(item: Mapping[str, Any], where: str = "guard") -> GuardConfig:
    """A checked guard config from a mapping such as {detector: zclip, action: rollback}."""
    if not isinstance(item, Mapping):
        raise StabilityBenchError(
            f"{where}: must be `none` or a mapping such as {{detector: zclip, action: rollback}}; "
            f"got {item!r}"
        )
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise StabilityBenchError(
            f"{where}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(_FIELDS))}"
        )
    for key in ("detector", "action"):
        if key not in item:
            raise StabilityBenchError(f"{where}.{key}: is required")
    detector, action = item["detector"], item["action"]
    if action not in ACTIONS:
        raise StabilityBenchError(
            f"{where}.action: unknown action {action!r}; allowed: {', '.join(ACTIONS)}"
        )
    from stabilitybench.detectors.base import detector_classes

    classes = detector_classes()
    if not isinstance(detector, str) or detector not in classes:
        raise StabilityBenchError(
            f"{where}.detector: unknown detector {detector!r}; allowed: {', '.join(classes)}"
        )
    cls = classes[detector]
    if not cls.online:
        online = [n for n, c in classes.items() if c.online]
        raise StabilityBenchError(
            f"{where}.detector: {detector!r} has no online score; allowed: {', '.join(online)}"
        )
    monitor = item.get("monitor")
    if detector == "msm":
        if not isinstance(monitor, str) or not monitor.strip():
            raise StabilityBenchError(
                f"{where}.monitor: detector msm needs the folder of a fitted monitor "
                "(e.g. monitor: audits/lm-buildup/monitor, written by `stabilitybench monitor fit`)"
            )
    elif cls.fitted:
        fitted = [n for n, c in classes.items() if c.online and not c.fitted] + ["msm"]
        raise StabilityBenchError(
            f"{where}.detector: {detector!r} must be fitted and no guard can fit it; "
            f"allowed: {', '.join(fitted)}"
        )
    elif monitor is not None:
        raise StabilityBenchError(f"{where}.monitor: only detector msm takes a monitor folder")
    values: dict[str, Any] = {"detector": detector, "action": action, "monitor": monitor}
    if "factor" in item:
        factor = item["factor"]
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not math.isfinite(factor)
            or not 0 < factor < 1
        ):
            raise StabilityBenchError(
                f"{where}.factor: must be a number in (0, 1) (the LR multiplier), got {factor!r}"
            )
        values["factor"] = float(factor)
    for key, low in _INTEGER_MIN.items():
        if key in item:
            value = item[key]
            if not _integer(value) or value < low:
                raise StabilityBenchError(
                    f"{where}.{key}: must be an integer >= {low}, got {value!r}"
                )
            values[key] = value
    config = GuardConfig(**values)
    if (
        config.action in ("rollback", "escalate")
        and config.min_age > (config.keep - 1) * config.every
    ):
        raise StabilityBenchError(
            f"{where}.min_age: must be <= (keep - 1) * every = {(config.keep - 1) * config.every} "
            f"so that a snapshot that old is always kept, got {config.min_age}"
        )
    return config


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
