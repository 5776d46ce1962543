"""CSV (Lightning's CSVLogger, a W&B history export) and JSONL (one object per step) logs.

Each file is one run. A row (an object) is one logging call: its step column (see
`columns.STEP_COLUMNS`, or the tag given `--map TAG=step`; else the row number) and any number
of metric columns; an empty cell is "not logged at this step", while `nan`/`inf` are logged
values. Files are read in chunks, so their size does not bound memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.importers.columns import STEP, STEP_COLUMNS
from stabilitybench.importers.points import Advance, PointWriter, ReadNotes

CHUNK_ROWS = 50_000
SUFFIXES = {"csv": (".csv",), "jsonl": (".jsonl", ".ndjson", ".json")}
NAN_TEXT = {"nan", "-nan", "+nan"}


def find_files(root: Path, fmt: str) -> list[Path]:
    suffixes = SUFFIXES[fmt]
    if root.is_file():
        return [root] if root.suffix.lower() in suffixes else []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def step_column(columns: Sequence[str], overrides: Mapping[str, str]) -> str | None:
    chosen = [c for c, target in overrides.items() if target == STEP]
    if chosen:
        return chosen[0]
    for name in STEP_COLUMNS:
        if name in columns:
            return name
    return None


def _steps(values: pd.Series, column: str, where: str) -> np.ndarray:
    """Integer steps of the rows that have one (NaN for a row without)."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    finite = numbers[np.isfinite(numbers)]
    if finite.size and not np.all(finite == np.round(finite)):
        raise StabilityBenchError(
            f"{where}: the step column {column!r} holds non-integer values; "
            "name the step column with --map TAG=step"
        )
    return numbers


@dataclass
class TabularRun:
    """One CSV or JSONL file."""

    label: str
    path: Path
    fmt: str  # csv | jsonl
    overrides: Mapping[str, str]

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, points: PointWriter, advance: Advance) -> list[str]:
        notes = ReadNotes()
        chunks = self._csv_chunks(notes) if self.fmt == "csv" else self._jsonl_chunks(notes)
        row0 = 0
        step_name: str | None = None
        for frame, nbytes in chunks:
            if step_name is None:
                step_name = step_column(list(frame.columns), self.overrides) or ""
                if step_name and step_name not in frame.columns:
                    raise StabilityBenchError(
                        f"--map {step_name}=step: {self.path.name} has no column "
                        f"{step_name!r}; columns: {', '.join(map(str, frame.columns))}"
                    )
                if not step_name:
                    notes.add(f"{self.path.name}: no step column; the row number is the step")
            if step_name and step_name in frame.columns:
                steps = _steps(frame[step_name], step_name, self.path.name)
            else:
                steps = np.arange(row0, row0 + len(frame), dtype=float)
            row0 += len(frame)
            has_step = np.isfinite(steps)
            if not has_step.all():
                notes.add(f"{self.path.name}: rows without a step value were skipped")
            for column in frame.columns:
                if column == step_name:
                    continue
                values, present, bad = _numbers(frame[column])
                if bad:
                    notes.add(f"{self.path.name}: column {column!r} holds non-numbers; skipped")
                    continue
                keep = present & has_step
                points.add_column(steps[keep].astype(np.int64), str(column), values[keep])
            advance(nbytes)
        return notes.lines

    def _csv_chunks(self, notes: ReadNotes) -> Iterator[tuple[pd.DataFrame, int]]:
        with open(self.path, encoding="utf-8", newline="") as handle:
            position = 0
            try:
                reader = pd.read_csv(handle, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
                for frame in reader:
                    now = handle.tell()
                    yield frame, now - position
                    position = now
            except (pd.errors.ParserError, UnicodeDecodeError) as exc:
                notes.add(
                    f"{self.path.name}: stopped at a malformed line ({str(exc).splitlines()[0]}); "
                    "the rest was skipped"
                )
            except pd.errors.EmptyDataError:
                notes.add(f"{self.path.name}: empty file")

    def _jsonl_chunks(self, notes: ReadNotes) -> Iterator[tuple[pd.DataFrame, int]]:
        rows: list[dict[str, Any]] = []
        nbytes = 0
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                nbytes += len(raw)
                line = raw.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    notes.add(f"{self.path.name}: line {number} is not a JSON object; skipped")
                    continue
                if not isinstance(obj, dict):
                    notes.add(f"{self.path.name}: line {number} is not a JSON object; skipped")
                    continue
                rows.append(_flat_numbers(obj))
                if len(rows) >= CHUNK_ROWS:
                    yield pd.DataFrame.from_records(rows), nbytes
                    rows, nbytes = [], 0
        if rows or nbytes:
            yield pd.DataFrame.from_records(rows), nbytes


def _flat_numbers(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers of a JSON object, nested keys joined with `/` (W&B media objects are dropped)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            # a logged NaN must stay apart from "not logged" (which a DataFrame also shows as NaN)
            out[name] = "nan" if math.isnan(value) else float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                out[name] = value
            else:
                out[name] = number
        elif isinstance(value, Mapping) and "_type" not in value:
            out.update(_flat_numbers(value, f"{name}/"))
    return out


def _numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray, bool]:
    """(values, present, has_non_numbers) of one chunk's column (text or floats)."""
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype=float, na_value=np.nan)
        return values, ~np.isnan(values), False
    text = column.astype("string")
    present = (text.notna() & (text.str.strip() != "")).to_numpy(dtype=bool)
    values = pd.to_numeric(text.where(text.str.strip() != ""), errors="coerce").to_numpy(
        dtype=float
    )
    unparsed = present & np.isnan(values)
    if unparsed.any():
        lowered = text[unparsed].str.strip().str.lower()
        if not lowered.isin(NAN_TEXT).all():
            return values, present, True
    return values, present, False


def discover(root: Path, fmt: str, overrides: Mapping[str, str]) -> list[TabularRun]:
    base = root if root.is_dir() else root.parent
    return [
        TabularRun(
            label=os.path.relpath(path, base).replace(os.sep, "/"),
            path=path,
            fmt=fmt,
            overrides=overrides,
        )
        for path in find_files(root, fmt)
    ]
