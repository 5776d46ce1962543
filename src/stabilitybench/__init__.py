"""StabilityBench: audit the stability of deep-learning training."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import RunData, RunStore, RunWriter
from stabilitybench.telemetry import Probe, Telemetry

try:
    __version__ = version("stabilitybench")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "Probe",
    "RunData",
    "RunStore",
    "RunWriter",
    "StabilityBenchError",
    "Telemetry",
    "__version__",
]
