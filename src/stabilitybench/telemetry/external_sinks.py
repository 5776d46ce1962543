"""Live telemetry where users already look: Weights & Biases and MLflow, beside TensorBoard.

Both follow the Sink protocol (`write_row(row)` per completed row, `close(table)` at the end),
log every numeric column under `prefix` against the row's `step`, and import their client only
when constructed (extras `wandb` and `mlflow`). What they write reads back with
`stabilitybench import` (the `stability/` prefix maps to the exact column names).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pandas as pd

from stabilitybench.errors import StabilityBenchError

MLFLOW_BATCH_LIMIT = 1000  # metrics per log_batch call that MLflow's tracking API accepts


def _numbers(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {
        prefix + str(key): float(value)
        for key, value in row.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


class WandbSink:
    """Logs each row with `run.log({...}, step=row["step"])`.

    Pass a `run` you made with `wandb.init(...)` (it is left open at close), or keyword
    arguments for `wandb.init` (the sink finishes that run at close). Offline use:
    `WANDB_MODE=offline`, or `mode="offline"`.
    """

    def __init__(self, run: Any = None, prefix: str = "stability/", **init: Any) -> None:
        if run is None:
            try:
                import wandb
            except ImportError:
                raise StabilityBenchError(
                    "WandbSink needs wandb; install it with pip install 'stabilitybench[wandb]'"
                ) from None
            run = wandb.init(**init)
            self._owns_run = True
        else:
            self._owns_run = False
        self.run, self.prefix = run, prefix

    def write_row(self, row: Mapping[str, Any]) -> None:
        values = _numbers(row, self.prefix)
        if values:
            self.run.log(values, step=int(row["step"]))

    def close(self, table: pd.DataFrame) -> None:
        if self._owns_run:
            self.run.finish()


class MLflowSink:
    """Logs rows as MLflow metrics, in batches (`MlflowClient.log_batch`) of `batch` values.

    Pass `run_id` of an active run (e.g. `mlflow.active_run().info.run_id`), or let the sink
    start one in `experiment` (ended at close). `tracking_uri`: e.g. `file:///path/mlruns`;
    default: MLflow's own (the `MLFLOW_TRACKING_URI` environment variable).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = "stabilitybench",
        run_name: str | None = None,
        prefix: str = "stability/",
        batch: int = 1000,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise StabilityBenchError(
                "MLflowSink needs mlflow; install it with pip install 'stabilitybench[mlflow]'"
            ) from None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._owns_run = run_id is None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id, self.prefix, self.batch = run_id, prefix, batch
        self._pending: list[Any] = []

    def write_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(row["step"])
        stamp = int(time.time() * 1000)
        for key, value in _numbers(row, self.prefix).items():
            # MLflow stores NaN and ±inf as they are: that is how a divergence shows in its log.
            self._pending.append(Metric(key, value, stamp, step))
        if len(self._pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), MLFLOW_BATCH_LIMIT):
            self.client.log_batch(
                self.run_id, metrics=self._pending[start : start + MLFLOW_BATCH_LIMIT]
            )
        self._pending = []

    def close(self, table: pd.DataFrame) -> None:
        self.flush()
        if self._owns_run:
            self.client.set_terminated(self.run_id)
