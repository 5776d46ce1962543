"""The detector registry: every early-warning detector behind one protocol.

A detector turns a run's telemetry into a per-step score (higher is more alarming) and has its
own native alarm rule. Fitted detectors (the Meta-State Monitor, the PCA baseline) learn from
healthy runs in `fit`; the reactive guards need no fit (`fit` returns them unchanged). Every
detector that can runs online too: `reset()` at the start of a run, then `update(row)` per
telemetry row returns the same value `score` gives for that step (a guard inside a training
loop, or `monitor score` on imported runs, drive detectors this way).

Adding a detector is one class and one `@register_detector`: `monitor fit` writes its columns
to `scores.parquet`, `monitor evaluate` scores it, and the CLI table and the report list it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from stabilitybench.registry import Registry
from stabilitybench.store import RunData

if TYPE_CHECKING:
    from stabilitybench.monitor.features import FeatureExtractor

# What `fit` learns from: stored runs, or bare telemetry tables.
Healthy = Sequence[RunData] | Sequence[pd.DataFrame]


def telemetry_tables(healthy: Healthy) -> list[pd.DataFrame]:
    """The telemetry tables of healthy runs given as RunData or as tables."""
    return [r if isinstance(r, pd.DataFrame) else r.telemetry for r in healthy]


@dataclass(frozen=True)
class DetectorSettings:
    """What `monitor fit` passes to every detector it makes (fitted ones use them)."""

    latent_dim: int = 4
    seed: int = 0
    monitor_options: Mapping[str, Any] = field(default_factory=dict)
    include_controls: bool = False  # ablation: fitted detectors read the audit's controls too


@runtime_checkable
class Detector(Protocol):
    """The protocol every registered detector follows."""

    name: ClassVar[str]  # the key in evaluation.json and the CLI table
    title: ClassVar[str]  # what the report calls it
    citation: ClassVar[str]
    fitted: ClassVar[bool]  # learns from healthy runs (scored leave-one-seed-out)
    control: ClassVar[bool]  # a control (reads no training signal): a yardstick, not a warning
    online: ClassVar[bool]  # supports reset()/update(row)
    column: ClassVar[str]  # its score column in scores.parquet

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector: ...

    def fit(self, healthy: Healthy) -> Detector: ...

    def score(self, table: pd.DataFrame) -> np.ndarray: ...

    def native(self, scores: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def update(self, row: Mapping[str, Any]) -> float: ...


class BaseDetector:
    """Defaults for the protocol: no fit, a score column named after the detector."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    fitted: ClassVar[bool] = False
    # A control scores without reading how training goes (the clock since the perturbation's
    # onset, a random number): what any warning must beat. Tables and claims tell them apart.
    control: ClassVar[bool] = False
    online: ClassVar[bool] = True
    column: ClassVar[str] = ""
    # A guard whose native rule is "score above one of its parameters" names it here.
    native_threshold: ClassVar[str] = ""
    native_inclusive: ClassVar[bool] = False  # >= rather than >
    # The telemetry signals a guard reads: per signal, its candidate columns (first found).
    reads: ClassVar[tuple[tuple[str, ...], ...]] = ()

    # Whether a guard that undoes a step (skip, LR cut) also takes the step's row back out of
    # the detector's online state. True for a score against a fixed healthy reference (the
    # monitor: its state is only smoothing and a recurrent state, and an undone step is not on
    # the run's timeline); False for the reactive guards, whose running statistics must learn a
    # new regime (rewound, a skip guard behind a lasting shift would skip every step forever).
    rewind_on_undo: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Dataclass detectors start with a fresh online state."""
        self.reset()

    def online_state(self) -> Any:
        """A copy of the online state `update` carries (for `set_online_state`)."""
        return None

    def set_online_state(self, state: Any) -> None:
        """Go back to a state `online_state()` returned."""

    def rolled_back(self, current: Any) -> Any:
        """This detector, a copy a guard kept with a rollback snapshot, as the guard restores it
        while `current` is the detector's state now (to be discarded): itself by default, as
        the snapshot's training state is restored. A detector whose state also holds what does
        not replay (a warm-up finished since) takes that part from `current`."""
        return self

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not cls.__dict__.get("column"):
            cls.column = cls.name

    @classmethod
    def create(cls, settings: DetectorSettings) -> Detector:
        """A detector with its defaults (fitted detectors read `settings`)."""
        detector: Detector = cls()  # type: ignore[assignment]
        return detector

    def fit(self, healthy: Healthy) -> Detector:
        """Guards learn nothing from healthy runs: the detector itself."""
        return self  # type: ignore[return-value]

    @property
    def fit_info(self) -> dict[str, Any]:
        """What fitting recorded (epochs, hold-out…), for fit.json; empty for guards."""
        return {}

    def save(self, folder: Path) -> bool:
        """Write the fitted model into `folder` if this detector keeps one (returns whether)."""
        return False

    def describe(self) -> str | None:
        """One line for `monitor fit`'s console about the fitted model, or None."""
        return None

    @classmethod
    def load(cls, folder: Path) -> Detector | None:
        """The detector saved in `folder` by `save` (a fitted monitor folder), or None when this
        detector keeps no saved model there."""
        return None

    @property
    def feature_map(self) -> FeatureExtractor | None:
        """A fitted detector's features (names and healthy centre/scale); None for guards."""
        return None

    def inputs(self) -> list[str]:
        """The telemetry columns a fitted model was fitted on (empty for guards)."""
        features = self.feature_map
        return [] if features is None else list(features.columns)

    def signals(self, table: pd.DataFrame) -> list[str]:
        """The columns of `table` this detector reads: its fitted inputs present in the table,
        or for a guard the first present column of each signal in `reads`."""
        if self.feature_map is not None:
            return [c for c in self.inputs() if _has_values(table, c)]
        found = (next((c for c in group if _has_values(table, c)), None) for group in self.reads)
        return [c for c in found if c is not None]

    def attribution(
        self,
        table: pd.DataFrame,
        index: int,
        index_names: Mapping[str, Sequence[str]] | None = None,
    ) -> str | None:
        """Which signal deviated most at row `index` (the first alarm), as `name (+4.2σ)`.

        A non-finite value wins. Otherwise, per signal read, its standardised deviation: for a
        fitted detector from the healthy reference it was fitted on (its features' centre and
        scale), for a guard from the run's own earlier values (median, IQR / 1.349).
        `index_names` (run.json's `telemetry_index`) lets a detector name the layer behind a
        per-layer maximum; the Meta-State Monitor overrides this with its own decomposition.
        """
        from stabilitybench.monitor.attribution import deviations, strongest

        columns = self.signals(table)
        return strongest(deviations(table, columns, index, self.feature_map))

    def score(self, table: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def native(self, scores: np.ndarray) -> np.ndarray:
        """The detector's own alarm rule per step (n,) bool; by default `native_threshold`."""
        if not self.native_threshold:
            raise NotImplementedError(f"{self.name} declares no native rule")
        limit = float(getattr(self, self.native_threshold))
        values = np.asarray(scores)
        return values >= limit if self.native_inclusive else values > limit

    def alarms(self, table: pd.DataFrame) -> np.ndarray:
        """The native rule applied to the offline scores, per step (n,) bool."""
        return self.native(self.score(table))

    def reset(self) -> None:
        """Forget the online state (the start of a new run)."""

    def update(self, row: Mapping[str, Any]) -> float:
        raise NotImplementedError(f"{self.name} has no online update")

    def score_columns(self, table: pd.DataFrame) -> dict[str, np.ndarray]:
        """This detector's columns of scores.parquet: its score and `<column>_native`."""
        scores = self.score(table)
        return {self.column: scores, f"{self.column}_native": self.native(scores)}

    def empty_columns(self, n: int) -> dict[str, np.ndarray]:
        """The same columns for a run nothing could score (no fitted model for its seed)."""
        return {self.column: np.full(n, np.nan), f"{self.column}_native": np.zeros(n, bool)}


def _has_values(table: pd.DataFrame, column: str) -> bool:
    if column not in table.columns:
        return False
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
    return bool((~np.isnan(values)).any())


REGISTRY: Registry[type[BaseDetector]] = Registry(
    "detector",
    # The controls last: they list after the detectors that read the run.
    [
        f"stabilitybench.detectors.{m}"
        for m in ("msm", "builtin", "coherence", "auto", "pca", "controls")
    ],
)


def register_detector(cls: type[BaseDetector]) -> type[BaseDetector]:
    """Class decorator: make a detector part of fit, evaluation, the CLI table and the report."""
    if not cls.name or not cls.title:
        raise ValueError(f"{cls.__name__}: a detector needs a `name` and a `title`")
    REGISTRY.register(cls.name, cls)
    return cls


def unregister_detector(name: str) -> None:
    """Remove a detector (tests that register a toy one clean up with this)."""
    REGISTRY.unregister(name)


def detector_classes() -> dict[str, type[BaseDetector]]:
    """Every registered detector class by name, the built-ins first (in their listed order)."""
    return REGISTRY.entries()


def detector_class(name: str) -> type[BaseDetector]:
    return REGISTRY.get(name)
