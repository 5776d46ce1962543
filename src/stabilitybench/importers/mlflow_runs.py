"""An MLflow local tracking folder (`mlruns/`), read with MLflow's own client (`MlflowClient`).

Needs the `import-mlflow` extra (`mlflow-skinny`). Each MLflow run is one run; its label is
`<experiment name>/<run name>`. MLflow's client returns one metric's whole history at a time
(it has no streaming read), so memory grows with the longest single metric, not the run.
MLflow 3 keeps its file store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`; the reader
sets it while it reads (only reading, never writing, the user's folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.importers.points import Advance, PointWriter

INSTALL_HINT = "pip install 'stabilitybench[import-mlflow]'"


def looks_like_mlruns(root: Path) -> bool:
    """An MLflow file store: `<experiment id>/meta.yaml` folders (and `.trash`)."""
    if not root.is_dir():
        return False
    return any(p.is_file() for p in root.glob("*/meta.yaml"))


@contextmanager
def file_store_allowed() -> Iterator[None]:
    """Let MLflow 3 open a file store for the duration of a read."""
    key = "MLFLOW_ALLOW_FILE_STORE"
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _client(root: Path) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise StabilityBenchError(
            f"reading MLflow logs needs the mlflow client; install it with {INSTALL_HINT}"
        ) from None
    return MlflowClient(tracking_uri=root.absolute().as_uri())


@dataclass
class MlflowRun:
    """One MLflow run of a tracking folder."""

    label: str
    root: Path
    run_id: str
    metric_keys: list[str]

    @property
    def size(self) -> int:
        return len(self.metric_keys)

    def read(self, points: PointWriter, advance: Advance) -> list[str]:
        with file_store_allowed():
            self._read(points, advance)
        return []

    def _read(self, points: PointWriter, advance: Advance) -> None:
        client = _client(self.root)
        for key in self.metric_keys:
            history = client.get_metric_history(self.run_id, key)
            steps = np.fromiter((m.step for m in history), dtype=np.int64, count=len(history))
            values = np.fromiter((m.value for m in history), dtype=np.float64, count=len(history))
            # MLflow keeps the order of logging within a step; a stable sort keeps it.
            order = np.argsort(steps, kind="stable")
            points.add_column(steps[order], key, values[order])
            advance(1)


def discover(root: Path) -> list[MlflowRun]:
    with file_store_allowed():
        return _discover(root)


def _discover(root: Path) -> list[MlflowRun]:
    client = _client(root)
    from mlflow.entities import ViewType

    runs: list[MlflowRun] = []
    experiments = _all_pages(
        lambda token: client.search_experiments(ViewType.ACTIVE_ONLY, page_token=token)
    )
    names: dict[str, int] = {}
    for experiment in sorted(experiments, key=lambda e: str(e.experiment_id)):
        found = _all_pages(
            lambda token, eid=experiment.experiment_id: client.search_runs(
                [eid], order_by=["attributes.start_time ASC"], page_token=token
            )
        )
        for run in found:
            name = f"{experiment.name}/{run.info.run_name or run.info.run_id}"
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:  # MLflow run names need not be unique
                name = f"{name} ({run.info.run_id[:8]})"
            runs.append(
                MlflowRun(
                    label=name,
                    root=root,
                    run_id=run.info.run_id,
                    metric_keys=sorted(run.data.metrics),
                )
            )
    return runs


def _all_pages(fetch: Any) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items
