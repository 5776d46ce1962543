"""Bring your own run: TensorBoard / CSV / JSONL / MLflow logs → a new audit folder.

`import_logs(source, out)` finds every run in `source`, streams its logged points to disk,
maps its tags to store columns (`columns.py`), and writes one run of a new audit folder in the
store layout (`kind: imported`, perturbation `none`), so `status`, `query`, `summary`,
`monitor fit` and `report` read it like any audit. Everything is written into a temporary
folder beside `out` and renamed into place at the end: a failed import leaves nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabilitybench.errors import StabilityBenchError
from stabilitybench.importers.columns import SKIP, STEP, assign, parse_map
from stabilitybench.importers.points import PointWriter, SourceRun
from stabilitybench.settings import CollapseSettings
from stabilitybench.store import AuditRecord, RunStore

FORMATS = ("tensorboard", "csv", "jsonl", "mlflow")
LOOKED_FOR = {
    "tensorboard": "TensorBoard event files (*tfevents*)",
    "csv": "CSV files (*.csv)",
    "jsonl": "JSONL files (*.jsonl, *.ndjson, *.json)",
    "mlflow": "an MLflow tracking folder (<experiment>/meta.yaml)",
}


@dataclass
class ImportedRun:
    """One imported run, as the console reports it."""

    run_id: str
    label: str
    telemetry_rows: int
    eval_rows: int
    columns: dict[str, str]  # source tag → store column
    perf_source: str | None
    diverged: bool
    diverged_step: int | None
    notes: list[str] = field(default_factory=list)

    def source(self, path: str, fmt: str, writer: str) -> dict[str, Any]:
        """run.json's `source`: where the run came from and what was read of it."""
        return {
            "path": path,
            "run": self.label,
            "format": fmt,
            "writer": writer,
            "columns": self.columns,
            "perf_source": self.perf_source,
            "skipped": self.notes,
        }


@dataclass
class ImportResult:
    out: Path
    name: str
    fmt: str
    runs: list[ImportedRun]
    replaced: bool  # an earlier import of the same source was replaced
    wall_s: float


def detect_format(source: Path) -> str:
    """The format of `source` (a file or a folder); a folder with nothing known is a user error."""
    from stabilitybench.importers import mlflow_runs, tabular, tensorboard

    if source.is_file():
        if "tfevents" in source.name:
            return "tensorboard"
        for fmt, suffixes in tabular.SUFFIXES.items():
            if source.suffix.lower() in suffixes:
                return fmt
        raise StabilityBenchError(
            f"{source}: not a log file this import reads; give --format "
            f"({', '.join(FORMATS)}) or a folder"
        )
    if tensorboard.event_files(source):
        return "tensorboard"
    if mlflow_runs.looks_like_mlruns(source):
        return "mlflow"
    for fmt in ("csv", "jsonl"):
        if tabular.find_files(source, fmt):
            return fmt
    raise StabilityBenchError(
        f"{source} holds no logs this import reads (looked for "
        + "; ".join(LOOKED_FOR.values())
        + ")"
    )


def discover(source: Path, fmt: str, overrides: dict[str, str]) -> list[SourceRun]:
    from stabilitybench.importers import mlflow_runs, tabular, tensorboard

    runs: Sequence[SourceRun]
    if fmt == "tensorboard":
        runs = tensorboard.discover(source)
    elif fmt in ("csv", "jsonl"):
        runs = tabular.discover(source, fmt, overrides)
    elif mlflow_runs.looks_like_mlruns(source):
        runs = mlflow_runs.discover(source)
    else:
        runs = []
    if not runs:
        raise StabilityBenchError(f"{source} holds no {fmt} logs (looked for {LOOKED_FOR[fmt]})")
    return list(runs)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_out(out: Path, spec_hash: str) -> bool:
    """Validate `--out`; True when it holds an earlier import of the same source (replaced)."""
    if out.exists() and not out.is_dir():
        raise StabilityBenchError(f"--out: {out} is a file; give a folder for the audit")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    audit_file = out / "audit.json"
    if not audit_file.is_file():
        raise StabilityBenchError(
            f"--out: {out} is a non-empty folder that is not a StabilityBench audit "
            "(no audit.json); give a new or empty folder"
        )
    try:
        existing = RunStore(out).audit()
    except (OSError, ValueError):  # (a pydantic ValidationError is a ValueError)
        existing = AuditRecord()
    if existing.spec_hash != spec_hash:
        raise StabilityBenchError(
            f"--out: {out} already holds a different audit ({existing.name or None!r}); "
            "an import never mixes with other runs, so give a new or empty folder"
        )
    return True


def import_logs(
    source: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    mapping: Sequence[str] = (),
    name: str | None = None,
    console: Any = None,
) -> ImportResult:
    """Import every run of `source` into a new audit folder `out` (see the module doc)."""
    from rich.console import Console

    console = console or Console()
    started = time.time()
    source_path = Path(source).expanduser().absolute()
    out_path = Path(out).expanduser().absolute()
    if not source_path.exists():
        raise StabilityBenchError(f"SOURCE: {source_path}: no such file or folder")
    if fmt is not None and fmt not in FORMATS:
        raise StabilityBenchError(
            f"--format: {fmt!r} is not a format; allowed: {', '.join(FORMATS)}"
        )
    overrides = parse_map(mapping)
    fmt = fmt or detect_format(source_path)
    name = name or source_path.name or "imported"
    spec = {
        "name": name,
        "kind": "imported",
        "import": {
            "source": str(source_path),
            "format": fmt,
            "map": dict(sorted(overrides.items())),
        },
        "workloads": [{"name": name, "kind": "imported", "format": fmt}],
        "collapse": CollapseSettings().recorded(),
    }
    spec_hash = _digest(spec)
    replaced = check_out(out_path, spec_hash)
    runs = discover(source_path, fmt, overrides)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.parent / f".{out_path.name}.import-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        imported = _import_runs(runs, temp, spec, overrides, source_path, console)
        _write_audit(temp, spec, spec_hash, imported)
        _move_into_place(temp, out_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ImportResult(
        out=out_path,
        name=name,
        fmt=fmt,
        runs=imported,
        replaced=replaced,
        wall_s=time.time() - started,
    )


def _progress(fmt: str, console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amount = (
        (MofNCompleteColumn(), TextColumn("metrics"))
        if fmt == "mlflow"
        else (DownloadColumn(), TransferSpeedColumn())
    )
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *amount,
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _import_runs(
    runs: list[SourceRun],
    temp: Path,
    spec: dict[str, Any],
    overrides: dict[str, str],
    source: Path,
    console: Any,
) -> list[ImportedRun]:
    scratch = temp / ".scratch"
    scratch.mkdir()
    imported: list[ImportedRun] = []
    seen_tags: set[str] = set()
    with _progress(str(spec["import"]["format"]), console) as progress:
        for index, run in enumerate(runs):
            task = progress.add_task(run.label, total=max(run.size, 1))
            points_path = scratch / f"{index}.parquet"
            points = PointWriter(points_path)
            try:
                notes = run.read(points, functools.partial(progress.advance, task))
            finally:
                points.close()
            progress.update(task, completed=max(run.size, 1))
            seen_tags.update(points.tag_names())
            imported.append(
                _import_one(run, index, points, notes, temp, scratch, spec, overrides, source)
            )
            points_path.unlink()
    missing = sorted(t for t, target in overrides.items() if t not in seen_tags and target != STEP)
    if missing:
        raise StabilityBenchError(
            f"--map: no tag {missing[0]!r} in {source}; tags found: "
            + ", ".join(sorted(seen_tags)[:20])
            + (" …" if len(seen_tags) > 20 else "")
        )
    if not any(r.run_id for r in imported):
        raise StabilityBenchError(f"{source}: no scalar values in any run; nothing to import")
    shutil.rmtree(scratch, ignore_errors=True)
    return imported


def _import_one(
    run: SourceRun,
    index: int,
    points: PointWriter,
    notes: list[str],
    temp: Path,
    scratch: Path,
    spec: dict[str, Any],
    overrides: dict[str, str],
    source: Path,
) -> ImportedRun:
    """One source run's points as a run folder with its run.json (or a note if it has none)."""
    from stabilitybench.importers.build import build_run

    if points.n_points == 0:
        notes = [*notes, "no scalar values; not imported"]
        return ImportedRun("", run.label, 0, 0, {}, None, False, None, notes=notes)
    assignment = assign(points.tag_names(), overrides)
    run_id = _digest({"source": str(source), "run": run.label, "format": spec["import"]["format"]})
    started = time.time()
    built = build_run(points.path, points.tags, assignment, temp / "runs" / run_id, scratch)
    record = ImportedRun(
        run_id=run_id,
        label=run.label,
        telemetry_rows=built.telemetry_rows,
        eval_rows=built.eval_rows,
        columns={t: c for t, c in assignment.described().items() if c != SKIP},
        perf_source=built.perf_source,
        diverged=built.diverged,
        diverged_step=built.diverged_step,
        notes=[*notes, *built.notes],
    )
    _write_run_json(temp / "runs" / run_id, record, spec, index, assignment.dialect, built, started)
    return record


def _write_run_json(
    run_dir: Path,
    record: ImportedRun,
    spec: dict[str, Any],
    index: int,
    dialect: str,
    built: Any,
    started: float,
) -> None:
    from stabilitybench.store import PerturbationInfo, RunInfo, RunOutcome, RunWriter
    from stabilitybench.types import RunSpec, RunStatus

    name = str(spec["name"])
    fmt = str(spec["import"]["format"])
    finished = time.time()
    run_spec = RunSpec(
        workload={
            "name": name,
            "kind": "imported",
            "format": fmt,
            "source": record.label,
            "total_steps": built.last_step,
            "knobs": {},
        },
        seed=index,
        audit=name,
        collapse=dict(spec["collapse"]),
    ).to_dict()
    info = RunInfo(
        run_id=record.run_id,
        label=record.label,
        audit=name,
        workload=name,
        kind="imported",
        knobs={},
        perturbation=PerturbationInfo(kind="none", label="none", params={}),
        # Each imported run is its own "seed", so leave-one-seed-out fits hold it out.
        seed=index,
        spec=run_spec,
        status=RunStatus.DONE,
        started=started,
        finished=finished,
        wall_s=finished - started,
        attempts=1,
        outcome=RunOutcome(
            final_perf=None if math.isnan(built.final_perf) else built.final_perf,
            diverged=built.diverged,
            diverged_step=built.diverged_step,
            steps=built.last_step,
            env_steps=built.last_env_step,
        ),
        error=None,
        source=record.source(str(spec["import"]["source"]), fmt, dialect),
    )
    RunWriter(run_dir).write_info(info)


def _write_audit(temp: Path, spec: dict[str, Any], spec_hash: str, runs: list[ImportedRun]) -> None:
    from stabilitybench import __version__
    from stabilitybench.io import write_json

    write_json(
        temp / "audit.json",
        {
            "name": spec["name"],
            "kind": "imported",
            "spec": spec,
            "spec_hash": spec_hash,
            "version": __version__,
            "created": time.time(),
            "run_ids": [r.run_id for r in runs if r.run_id],
        },
    )


def _move_into_place(temp: Path, out: Path) -> None:
    """Rename the finished folder to `out` (an empty `out`, or an earlier import, is replaced)."""
    if out.is_dir():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(temp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temp, out)


__all__ = ["FORMATS", "ImportResult", "ImportedRun", "detect_format", "import_logs"]
