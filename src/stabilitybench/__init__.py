"""StabilityBench: audit the stability of deep-learning training.

`import stabilitybench` is light (no torch, pandas or frameworks): the public names below are
imported on first use, so the CLI's quick verbs answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stabilitybench.errors import StabilityBenchError

if TYPE_CHECKING:
    __version__: str
    from stabilitybench.analysis import Analysis, analyse
    from stabilitybench.detectors import BaseDetector, register_detector
    from stabilitybench.guard import Guard, protect
    from stabilitybench.monitor import MetaStateMonitor
    from stabilitybench.perturbations import Perturbation
    from stabilitybench.settings import CollapseSettings, WarningSettings
    from stabilitybench.store import AuditRecord, RunData, RunInfo, RunStore, RunWriter
    from stabilitybench.telemetry import Probe, Telemetry
    from stabilitybench.workloads.base import register_workload

# public name → the module that defines it (imported on first attribute access)
_LAZY = {
    "Analysis": "stabilitybench.analysis",
    "AuditRecord": "stabilitybench.store",
    "BaseDetector": "stabilitybench.detectors",
    "CollapseSettings": "stabilitybench.settings",
    "Guard": "stabilitybench.guard",
    "MetaStateMonitor": "stabilitybench.monitor",
    "Perturbation": "stabilitybench.perturbations",
    "Probe": "stabilitybench.telemetry",
    "RunData": "stabilitybench.store",
    "RunInfo": "stabilitybench.store",
    "RunStore": "stabilitybench.store",
    "RunWriter": "stabilitybench.store",
    "Telemetry": "stabilitybench.telemetry",
    "WarningSettings": "stabilitybench.settings",
    "analyse": "stabilitybench.analysis",
    "protect": "stabilitybench.guard",
    "register_detector": "stabilitybench.detectors",
    "register_workload": "stabilitybench.workloads.base",
}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stabilitybench")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed metadata on first use
        value: Any = _package_version()
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stabilitybench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})


__all__ = [
    "Analysis",
    "AuditRecord",
    "BaseDetector",
    "CollapseSettings",
    "Guard",
    "MetaStateMonitor",
    "Perturbation",
    "Probe",
    "RunData",
    "RunInfo",
    "RunStore",
    "RunWriter",
    "StabilityBenchError",
    "Telemetry",
    "WarningSettings",
    "__version__",
    "analyse",
    "protect",
    "register_detector",
    "register_workload",
]
