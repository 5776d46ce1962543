"""Per-step telemetry: probes on optimizer step hooks."""

from stabilitybench.telemetry.base import Probe
from stabilitybench.telemetry.core import Sink, StepHook, Telemetry
from stabilitybench.telemetry.probes import (
    PRESETS,
    PROBE_NAMES,
    GradCoherence,
    GradNoiseScale,
    GradNorm,
    LayerNorms,
    LearningRate,
    MCoherence,
    Sharpness,
    UpdateNorm,
)
from stabilitybench.telemetry.sinks import ParquetSink, TensorBoardSink

__all__ = [
    "PRESETS",
    "PROBE_NAMES",
    "GradCoherence",
    "GradNoiseScale",
    "GradNorm",
    "LayerNorms",
    "LearningRate",
    "MCoherence",
    "ParquetSink",
    "Probe",
    "Sharpness",
    "Sink",
    "StepHook",
    "Telemetry",
    "TensorBoardSink",
    "UpdateNorm",
]
