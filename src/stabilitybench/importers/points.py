"""What every reader hands on: logged points `(step, tag, value)`, streamed to Parquet.

A reader never holds a run in memory: it appends points to a `PointWriter`, which writes them
to a long-format Parquet file in row groups (`step` int64, `tag` int32 index into `tags`,
`value` float64, `seq` int64 in the order read, so that a value logged twice at one step keeps
the last one). The store's wide tables are built from that file by DuckDB (`build.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ROW_GROUP = 1 << 18  # points per Parquet row group (~6 MB in memory)


class PointWriter:
    """Buffers points and writes them to `path` one row group at a time."""

    def __init__(self, path: Path, row_group: int = ROW_GROUP) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.row_group = row_group
        self.schema = pa.schema(
            [
                ("step", pa.int64()),
                ("tag", pa.int32()),
                ("value", pa.float64()),
                ("seq", pa.int64()),
            ]
        )
        self._writer = pq.ParquetWriter(str(self.path), self.schema, compression="snappy")
        self.tags: dict[str, int] = {}
        self.counts: list[int] = []  # points per tag id
        self.n_points = 0
        self._steps: list[int] = []
        self._tag_ids: list[int] = []
        self._values: list[float] = []
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0

    def tag_id(self, tag: str) -> int:
        index = self.tags.get(tag)
        if index is None:
            index = self.tags[tag] = len(self.tags)
            self.counts.append(0)
        return index

    def add(self, step: int, tag: str, value: float) -> None:
        """One point (the per-event path of the TensorBoard reader)."""
        index = self.tag_id(tag)
        self.counts[index] += 1
        self._steps.append(step)
        self._tag_ids.append(index)
        self._values.append(value)
        self._buffered += 1
        if self._buffered >= self.row_group:
            self.flush()

    def add_column(self, steps: np.ndarray, tag: str, values: np.ndarray) -> None:
        """Many points of one tag (steps: (n,) int64, values: (n,) float64)."""
        if len(steps) == 0:
            return
        index = self.tag_id(tag)
        self.counts[index] += len(steps)
        self._chunks.append(
            (
                np.asarray(steps, dtype=np.int64),
                np.full(len(steps), index, dtype=np.int32),
                np.asarray(values, dtype=np.float64),
            )
        )
        self._buffered += len(steps)
        if self._buffered >= self.row_group:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        parts = list(self._chunks)
        if self._steps:
            parts.append(
                (
                    np.asarray(self._steps, dtype=np.int64),
                    np.asarray(self._tag_ids, dtype=np.int32),
                    np.asarray(self._values, dtype=np.float64),
                )
            )
        self._steps, self._tag_ids, self._values, self._chunks = [], [], [], []
        self._buffered = 0
        if not parts:
            return
        steps = np.concatenate([p[0] for p in parts])
        seq = np.arange(self.n_points, self.n_points + len(steps), dtype=np.int64)
        self.n_points += len(steps)
        table = pa.table(
            [
                pa.array(steps),
                pa.array(np.concatenate([p[1] for p in parts])),
                pa.array(np.concatenate([p[2] for p in parts])),
                pa.array(seq),
            ],
            schema=self.schema,
        )
        self._writer.write_table(table)

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def tag_names(self) -> list[str]:
        return sorted(self.tags, key=self.tags.__getitem__)


Advance = Callable[[int], None]


class SourceRun(Protocol):
    """One run found in a source: a label, how much there is to read, and a reader."""

    @property
    def label(self) -> str:
        """Unique within the source: a relative path, or an MLflow experiment/run name."""
        ...

    @property
    def size(self) -> int:
        """Units of `read`'s progress (bytes, or metrics for MLflow)."""
        ...

    def read(self, points: PointWriter, advance: Advance) -> list[str]:
        """Append every point; return notes on what was skipped (one line each)."""
        ...


@dataclass
class ReadNotes:
    """What a reader skipped, said once per kind."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)


def describe(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
