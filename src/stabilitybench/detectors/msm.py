"""The Meta-State Monitor as a detector: a fitted model of healthy training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.detectors.base import (
    BaseDetector,
    Detector,
    DetectorSettings,
    Healthy,
    register_detector,
)
from stabilitybench.monitor.features import FeatureExtractor
from stabilitybench.monitor.ssm import MetaStateMonitor


@register_detector
class MSMDetector(BaseDetector):
    """The Meta-State Monitor as a detector: score `msd`, latents `z_1..z_k` in scores.parquet.

    Its native rule is the threshold the monitor calibrated at fit time on held-out healthy runs.
    """

    name = "msm"
    title = "Meta-State Monitor"
    citation = "StabilityBench (GRU state-space meta-state, arXiv 2601.13160)"
    fitted = True
    column = "msd"
    rewind_on_undo = True  # a guard's undone step leaves the GRU state and smoothing as before

    def __init__(self, monitor: MetaStateMonitor) -> None:
        self.monitor = monitor

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector:
        options = {"include_controls": settings.include_controls, **settings.monitor_options}
        return cls(MetaStateMonitor(latent_dim=settings.latent_dim, seed=settings.seed, **options))

    def fit(self, healthy: Healthy) -> Detector:
        self.monitor.fit(list(healthy))  # RunData keep their seeds: the monitor's hold-out
        return self

    @classmethod
    def load(cls, folder: Path) -> Detector | None:
        from stabilitybench.monitor.ssm import CONFIG_FILE, MODEL_FILE

        if not ((folder / CONFIG_FILE).is_file() and (folder / MODEL_FILE).is_file()):
            return None
        return cls(MetaStateMonitor.load(folder))

    @property
    def feature_map(self) -> FeatureExtractor | None:
        return self.monitor.features

    @property
    def fit_info(self) -> dict[str, Any]:
        return self.monitor.fit_info

    def save(self, folder: Path) -> bool:
        self.monitor.save(folder)
        return True

    def describe(self) -> str:
        epochs = self.monitor.fit_info.get("epochs")
        return f"full monitor (threshold {self.monitor.threshold:.3g}, {epochs} epochs)"

    def score(self, table: pd.DataFrame) -> np.ndarray:
        return self.monitor.score(table)["msd"].to_numpy(dtype=float)

    def native(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.monitor.threshold

    def attribution(
        self,
        table: pd.DataFrame,
        index: int,
        index_names: Mapping[str, Sequence[str]] | None = None,
    ) -> str | None:
        """The features (and layers) that moved the deviation most at row `index`, as
        `feature @ layer (+8.1σ, 62%), …` (see `MetaStateMonitor.explain`)."""
        explained = self.monitor.explain(table, index, index_names)
        return explained.text() or None

    def reset(self) -> None:
        self.monitor.reset()

    def update(self, row: Mapping[str, Any]) -> float:
        return self.monitor.step(row)

    def online_state(self) -> Any:
        return self.monitor.online_state()

    def set_online_state(self, state: Any) -> None:
        self.monitor.set_online_state(state)

    def recalibrate(self, scores: Sequence[np.ndarray], source: str) -> None:
        """The native threshold from out-of-sample scores of healthy runs."""
        self.monitor.recalibrate(scores, source)

    def score_columns(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        scored = self.monitor.score(table)
        msd = scored["msd"].to_numpy(dtype=float)
        latents = {c: scored[c].to_numpy() for c in scored.columns if c.startswith("z_")}
        return {"msd": msd, **latents, "msd_native": self.native(msd)}

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        latents = {f"z_{i + 1}": np.full(n, np.nan) for i in range(self.monitor.config.latent_dim)}
        return {"msd": np.full(n, np.nan), **latents, "msd_native": np.zeros(n, bool)}
