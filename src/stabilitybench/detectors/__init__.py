"""Early-warning detectors behind one protocol: the registry (`base`), the reactive guards people
use today (`builtin`), the Meta-State Monitor (`msm`) and a PCA meta-state (`pca`)."""

from __future__ import annotations

from stabilitybench.detectors.base import (
    BaseDetector,
    Detector,
    DetectorSettings,
    detector_class,
    detector_classes,
    register_detector,
    unregister_detector,
)

__all__ = [
    "BaseDetector",
    "Detector",
    "DetectorSettings",
    "detector_class",
    "detector_classes",
    "register_detector",
    "unregister_detector",
]
