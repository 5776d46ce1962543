"""A linear meta-state: PCA of healthy telemetry, the Meta-State Monitor's simplest rival."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import (
    BaseDetector,
    Detector,
    DetectorSettings,
    Healthy,
    register_detector,
    telemetry_tables,
)
from stabilitybench.monitor.features import FeatureExtractor
from stabilitybench.store import RunData


@register_detector
class PCADetector(BaseDetector):
    """A linear meta-state: PCA of the monitor's features to k dims + Mahalanobis distance.

    Fitted on healthy runs (`fit`); it isolates what the recurrent model adds over a linear
    projection. Its native rule is the chi-square 99.9% quantile of the squared distance.
    """

    name = "pca"
    title = "linear meta-state (PCA + Mahalanobis)"
    citation = "linear meta-state (PCA + Mahalanobis)"
    fitted = True

    def __init__(self, latent_dim: int = 4, include_controls: bool = False) -> None:
        self.latent_dim = latent_dim
        self.include_controls = include_controls
        self.features: FeatureExtractor | None = None
        self.mean = np.zeros(0)
        self.components = np.zeros((0, 0))
        self.variances = np.zeros(0)

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector:
        return cls(settings.latent_dim, settings.include_controls)

    def fit(self, healthy: Healthy) -> PCADetector:
        tables = telemetry_tables(healthy)
        knobs = {k for r in healthy if isinstance(r, RunData) for k in r.info.knobs}
        self.features = FeatureExtractor.fit(
            tables, include_controls=self.include_controls, knobs=knobs
        )
        x = np.concatenate([self.features.transform(t) for t in tables])
        self.mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        k = min(self.latent_dim, vt.shape[0])
        self.components = vt[:k]  # (k, d)
        self.variances = np.maximum((s[:k] ** 2) / max(len(x) - 1, 1), 1e-6)
        return self

    @property
    def feature_map(self) -> FeatureExtractor | None:
        return self.features

    @property
    def fit_info(self) -> dict[str, Any]:
        if self.features is None:
            return {}
        return {
            "features": self.features.names,
            "excluded_features": dict(self.features.excluded),
            "include_controls": self.features.include_controls,
        }

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, d) normalised features → (n, k) principal scores."""
        return (features - self.mean) @ self.components.T

    def _distance(self, features: np.ndarray) -> np.ndarray:
        z = self.project(features)
        return np.sqrt(((z**2) / self.variances).sum(axis=-1))

    def score(self, table: pd.DataFrame) -> np.ndarray:
        if self.features is None:
            raise RuntimeError("PCADetector.fit must be called before scoring")
        return self._distance(self.features.transform(table))

    def native(self, scores: np.ndarray) -> np.ndarray:
        from scipy.stats import chi2

        return np.asarray(scores) ** 2 > chi2.ppf(0.999, df=len(self.variances))

    def reset(self) -> None:
        if self.features is not None:
            self.features.reset()

    def update(self, row: Mapping[str, Any]) -> float:
        if self.features is None:
            raise RuntimeError("PCADetector.fit must be called before scoring")
        return float(self._distance(self.features.transform_row(row)))
