"""Early-warning detectors behind one protocol: the registry (`base`), the reactive guards people
use today (`builtin`), a gradient-coherence guard (`coherence`), a detector that calibrates on the
run itself (`auto`), the Meta-State Monitor (`msm`), a PCA meta-state (`pca`) and the controls a
warning must beat (`controls`: a clock, chance)."""

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
