"""Sinks for telemetry rows: Parquet (streamed in parts, readable after a crash), TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitybench.streaming import ParquetSink

__all__ = ["ParquetSink", "TensorBoardSink"]


class TensorBoardSink:
    """Writes every numeric column as a TensorBoard scalar under `prefix`, x-axis = step."""

    def __init__(
        self, writer: Any = None, log_dir: str | Path | None = None, prefix: str = "stability/"
    ) -> None:
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer, self.prefix = writer, prefix

    def write_row(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(self.prefix + key, value, step)

    def close(self, table: pd.DataFrame) -> None:
        self.writer.flush()
