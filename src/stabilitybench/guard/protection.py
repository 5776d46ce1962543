"""`protect`: a guard on a training loop you already have, in one line.

    guard = stabilitybench.protect(model, optimizer)          # detector auto, action escalate
    for batch in data:
        loss = ...; optimizer.zero_grad(); loss.backward(); optimizer.step()
        guard.after_step(loss=loss)                            # score this step, act at once

It is a thin front door to `Telemetry` + `Guard`: the detector `auto` learns each signal's normal
range from the run itself, so nothing is fitted first; `escalate` goes skip → LR cut → moment
reset → rollback as alarms repeat. `with stabilitybench.protect(model, optimizer) as guard:`
stops the guard (and closes the telemetry it made) when the block ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.config import GuardConfig, parse_guard
from stabilitybench.guard.core import Guard
from stabilitybench.guard.device import DeviceGuard, device_possible
from stabilitybench.telemetry.core import Telemetry

if TYPE_CHECKING:
    from stabilitybench.detectors.base import Detector
    from stabilitybench.telemetry.probes import ProbeSpec


def _detector_name(detector: Any) -> Any:
    """The registered name a detector is given by: itself, or a detector object's `name`."""
    if isinstance(detector, str):
        return detector
    name = getattr(detector, "name", None)
    if not isinstance(name, str) or not callable(getattr(detector, "update", None)):
        raise StabilityBenchError(
            "protect.detector: must be a registered detector's name (such as 'auto') or a "
            f"detector object, got {detector!r}"
        )
    return name


def _check_inputs(model: Any, optimizer: Any, telemetry: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise StabilityBenchError(
            "protect.optimizer: must be a torch.optim.Optimizer (the guard acts through its "
            f"step hooks), got {type(optimizer).__name__}"
        )
    if model is not None and not isinstance(model, torch.nn.Module):
        raise StabilityBenchError(
            f"protect.model: must be a torch.nn.Module or None, got {type(model).__name__}"
        )
    if telemetry is None:
        return
    if not isinstance(telemetry, Telemetry):
        raise StabilityBenchError(
            f"protect.telemetry: must be a stabilitybench Telemetry, got {type(telemetry).__name__}"
        )
    if not any(opt is optimizer for opt in telemetry.optimizers.values()):
        raise StabilityBenchError(
            "protect.telemetry: it does not instrument this optimizer; make it with "
            "Telemetry(model, optimizer) or leave it out"
        )


def _on_device(optimizer: torch.optim.Optimizer, config: GuardConfig, on_device: Any) -> bool:
    """Whether `protect` makes a device guard: by default where nothing has to be copied (skip,
    lr_cut); rollback on the device (decisions read in batches, snapshots kept) when asked."""
    if on_device not in (None, True, False):
        raise StabilityBenchError(
            f"protect.on_device: must be True, False or None, got {on_device!r}"
        )
    why_not = device_possible(optimizer, config.detector, config.action)
    if on_device and why_not is not None:
        raise StabilityBenchError(f"protect.on_device: not on the device: {why_not}")
    return why_not is None and (
        on_device is True or (on_device is None and config.action in ("skip", "lr_cut"))
    )


def protect(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    action: str = "skip",
    detector: str | Detector = "auto",
    *,
    telemetry: Telemetry | None = None,
    probes: ProbeSpec = "cheap",
    on_device: bool | None = None,
    **options: Any,
) -> Guard | DeviceGuard:
    """Guard `optimizer`'s steps: a detector's online score drives an action; returns the `Guard`.

    `action`: skip (default) | lr_cut | reset_moments | rollback | escalate. `detector`: a
    registered detector that needs no fit (default `auto`, which calibrates on the run itself),
    or a detector object made with other settings. `options`: the guard's settings (`factor`,
    `cooldown`, `every`, `keep`, `min_age`, `window`, `spike_ratio`; see `GuardConfig`).

    Without `telemetry`, a `Telemetry(model, optimizer, probes)` is made that keeps no rows in
    memory (pass a `Telemetry` of your own to record them); `guard.close()`, or the end of a
    `with` block, closes it. Call `guard.after_step(loss=loss)` after each `optimizer.step()`;
    without it the guard acts when the next step starts and undoes that step too. Cost of a host
    guard (`escalate`, `rollback`, `reset_moments`, a detector with no device form): one
    host–device sync per optimizer step (the score must be known before the next update), plus
    the actions' own copies (see `Guard`); the default, on the device, has neither.

    `on_device`: for `skip` and `lr_cut` with `auto` or `olmo` on torch's SGD, Adam or AdamW,
    the decision is made on the device before the update (`guard.device.DeviceGuard`): no host
    sync, no copy of the parameters; pass the loss before the step to include it
    (`guard.before_step(loss=loss)`), and read the decisions with `guard.flush()` (they reach
    the host every `flush_every` steps). `rollback` can be decided there too (`on_device=True`):
    the host reads the alarms in those batches and rolls back up to `flush_every` steps late.
    None (default): skip and lr_cut on the device whenever they can be, the rest on the host;
    True: on the device or an error saying why not; False: the host guard.

    `skip` is the default because it is what saved runs from a build-up: on three LR ramps
    (`results/lm_buildup_guards`, `paper_lm_ramp_guards`, `quickstart_guards`), `auto` skipping
    on the device kept 9 of 9 runs from collapsing, `escalate` 6 of 9 (none on GPT-2 small's).
    `escalate` and `rollback` undo what a skip cannot: a state corrupted outside the update.

    Bad input raises `StabilityBenchError` naming the argument: an optimizer that is not a
    `torch.optim.Optimizer`, an unknown detector or action, a setting out of range.
    """
    _check_inputs(model, optimizer, telemetry)
    name = _detector_name(detector)
    settings = {"detector": name, "action": action, **options}
    # Every problem is named before anything is attached.
    config = parse_guard(settings, where="protect")
    device = _on_device(optimizer, config, on_device)
    made = telemetry is None
    tel = Telemetry(model, optimizer, probes=probes, keep_rows=False) if made else telemetry
    assert tel is not None
    try:
        if device:
            return DeviceGuard(tel, detector, action, close_telemetry=made, **options)
        return Guard(tel, detector, action, close_telemetry=made, **options)
    except BaseException:
        if made:
            tel.close(read_back=False)
        raise


def guard_for_run(guard: Mapping[str, Any] | None, telemetry: Telemetry) -> Guard | None:
    """The guard a run's spec asks for (`RunSpec.guard`), attached to its telemetry, or None
    (`on_device: true`: a `DeviceGuard`, which has the same surface)."""
    if not guard:
        return None
    params = dict(guard)
    detector, action = str(params.pop("detector")), str(params.pop("action"))
    if params.pop("on_device", False):
        return DeviceGuard(telemetry, detector, action, **params)  # type: ignore[return-value]
    return Guard(telemetry, detector, action, **params)
