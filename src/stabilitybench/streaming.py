"""Parquet tables streamed in part files: readable up to the last flush after a crash.

No torch here: the run store (and the CLI's `status`/`query`) read these files without it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

PARTIAL_SUFFIX = ".partial"
"""`telemetry.parquet.partial/` holds the part files of a table that is still being written."""
PART_GLOB = "part-*.parquet"
ROW_GROUP_ROWS = 16_384
"""Rows per row group of a finished table (parts are gathered into groups of about this size)."""

_FIRST_COLUMNS = ("step", "env_step", "perturbed", "loss")


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Telemetry rows as a DataFrame: `step`, `env_step`, `perturbed`, `loss` first."""
    if not rows:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    df = pd.DataFrame.from_records(rows)
    first = [c for c in _FIRST_COLUMNS if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    if "env_step" in df.columns and df["env_step"].notna().all():
        df["env_step"] = df["env_step"].astype("int64")
    return df


def partial_dir(path: Path) -> Path:
    """The folder of finished part files beside `path` while it is being written."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def read_parts(folder: Path) -> pd.DataFrame:
    """Every finished part file in `folder` as one table (columns united; ints widen to floats
    where a later part has gaps). A part being written has a temporary name and is ignored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    tables = [pq.read_table(p) for p in parts]
    schema = _united_schema(parts)
    frame: pd.DataFrame = pa.concat_tables(
        [_conform(t, schema) for t in tables], promote_options="permissive"
    ).to_pandas()
    return frame


class ParquetSink:
    """Streams telemetry to one Parquet file, readable up to the last flush even after a SIGKILL.

    At each flush the flush's rows are written as one small, complete Parquet file
    `<path>.partial/part-NNNNNN.parquet` (written under a temporary name, then renamed, so a
    killed process never leaves a truncated part under a part's name). At `close()` the parts
    are copied into `<path>` (row groups of `ROW_GROUP_ROWS` rows) through a temporary file that
    is renamed into place, and the `.partial` folder is removed: `<path>` exists only once it is
    complete.
    A crashed run keeps its `.partial` folder; `read_parts()` (and the run store) reads it.
    Memory: one flush's rows at a time.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts_dir = partial_dir(self.path)
        self._parts = 0
        self._closed = False

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write one flush's rows as the next part file."""
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parts == 0:
            if self.parts_dir.exists():  # left by an earlier, crashed attempt
                shutil.rmtree(self.parts_dir)
            self.parts_dir.mkdir(parents=True)
        table = pa.Table.from_pandas(rows_frame([dict(r) for r in rows]), preserve_index=False)
        name = f"part-{self._parts:06d}.parquet"
        tmp = self.parts_dir / f".{name}.tmp"
        pq.write_table(table, tmp)  # plain open(): the user's umask applies
        os.replace(tmp, self.parts_dir / name)
        self._parts += 1

    def write_row(self, row: Mapping[str, Any]) -> None:
        self.write_rows([row])

    def close(self, table: pd.DataFrame) -> None:
        """Make `<path>` from the parts (or from `table` when no rows were streamed)."""
        if self._closed:
            return
        self._closed = True
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            parts = sorted(self.parts_dir.glob(PART_GLOB)) if self._parts else []
            if not parts:
                pa_table = pa.Table.from_pandas(table, preserve_index=False)
                pq.write_table(pa_table, tmp)
            else:
                schema = _united_schema(parts)
                with pq.ParquetWriter(tmp, schema) as writer:
                    # Parts are gathered into row groups of ROW_GROUP_ROWS rows: memory holds
                    # one row group, and the footer stays small however long the run was.
                    batch: list[Any] = []
                    rows = 0
                    for part in parts:
                        batch.append(_conform(pq.read_table(part, use_threads=False), schema))
                        rows += batch[-1].num_rows
                        if rows >= ROW_GROUP_ROWS:
                            writer.write_table(pa.concat_tables(batch))
                            batch, rows = [], 0
                    if batch:
                        writer.write_table(pa.concat_tables(batch))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)

    def read(self) -> pd.DataFrame:
        """The rows written so far: the finished file, else the parts."""
        if self.path.exists() and (self._closed or not self.parts_dir.exists()):
            return pd.read_parquet(self.path)
        return read_parts(self.parts_dir)


def _united_schema(parts: list[Path]) -> Any:
    """One schema for every part: columns in first-seen order (row keys first), types widened.
    Read one part's footer at a time, so memory does not grow with the number of parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    united = pq.read_schema(parts[0])
    for part in parts[1:]:
        schema = pq.read_schema(part)
        if not schema.equals(united):
            united = pa.unify_schemas([united, schema], promote_options="permissive")
    names = list(united.names)
    order = [c for c in _FIRST_COLUMNS if c in names] + [
        c for c in names if c not in _FIRST_COLUMNS
    ]
    fields = []
    for name in order:
        field = united.field(name)
        if pa.types.is_null(field.type):
            field = field.with_type(pa.float64())
        fields.append(field)
    return pa.schema(fields)


def _conform(table: Any, schema: Any) -> Any:
    """`table` with every column of `schema` (missing ones null), in its order and types."""
    import pyarrow as pa

    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)
