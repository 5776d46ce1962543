"""Guards: act on a detector's alarm inside the training loop (skip, LR cut, moment reset,
rollback, escalate).

`stabilitybench.protect(model, optimizer)` puts one on a loop you already have (see
`guard.protection`); `Guard(telemetry, detector="zclip", action="rollback")` on a `Telemetry` of
your own — see `guard.core`. `GuardConfig` and `parse_guard` (light: no torch) check a guard's
settings for the audit spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stabilitybench.guard.config import ACTIONS, GUARDED_KINDS, GuardConfig, parse_guard

if TYPE_CHECKING:
    from stabilitybench.guard.core import Guard, Intervention
    from stabilitybench.guard.protection import protect

__all__ = [
    "ACTIONS",
    "GUARDED_KINDS",
    "Guard",
    "GuardConfig",
    "Intervention",
    "parse_guard",
    "protect",
]


def __getattr__(name: str) -> Any:
    if name in ("Guard", "Intervention"):
        from stabilitybench.guard import core

        return getattr(core, name)
    if name == "protect":
        from stabilitybench.guard.protection import protect

        return protect
    raise AttributeError(name)
