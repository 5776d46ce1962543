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
    from stabilitybench.store import RunData, RunStore, RunWriter
    from stabilitybench.telemetry import Probe, Telemetry

# public name → the module that defines it (imported on first attribute access)
_LAZY = {
    "Probe": "stabilitybench.telemetry",
    "RunData": "stabilitybench.store",
    "RunStore": "stabilitybench.store",
    "RunWriter": "stabilitybench.store",
    "Telemetry": "stabilitybench.telemetry",
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
    "Probe",
    "RunData",
    "RunStore",
    "RunWriter",
    "StabilityBenchError",
    "Telemetry",
    "__version__",
]
