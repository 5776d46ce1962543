"""Sinks for telemetry rows: a Parquet file, TensorBoard."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitybench.io import write_parquet


class ParquetSink:
    """Writes the whole table to one Parquet file when telemetry closes (atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write_row(self, row: Mapping[str, Any]) -> None:
        pass  # rows are kept in memory by Telemetry; the file is written once, at close

    def close(self, table: pd.DataFrame) -> None:
        write_parquet(self.path, table)


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
