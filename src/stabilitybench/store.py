"""RunStore: one folder per audit, one sub-folder per run; Parquet tables queried with DuckDB.

Layout::

    <audit>/audit.json                  the resolved spec, its hash, the package version
    <audit>/runs/<run_id>/run.json      spec, status, seed, timings, outcome, error text
    <audit>/runs/<run_id>/telemetry.parquet   one row per optimizer step
    <audit>/runs/<run_id>/telemetry.parquet.partial/part-*.parquet   the same, while the run
                                        is going (or after it crashed): one part per flush
    <audit>/runs/<run_id>/evals.parquet       one row per evaluation (step, env_step, perf, …)
    <audit>/runs/<run_id>/events.parquet      one row per perturbation window
    <audit>/runs/<run_id>/scores.parquet      detector scores per step (written by the monitor)

Every file is written to a temporary name and renamed into place; telemetry streams into
part files while a run trains (`telemetry.ParquetSink`) and becomes `telemetry.parquet` at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from stabilitybench.errors import StabilityBenchError
from stabilitybench.host import host_info
from stabilitybench.io import read_json, write_json, write_parquet
from stabilitybench.streaming import (
    PART_GLOB,
    PARTIAL_SUFFIX,
    ParquetSink,
    partial_dir,
    read_parts,
)
from stabilitybench.types import RunStatus

if TYPE_CHECKING:  # pandas is imported where a table is read or built: `status` stays light
    import pandas as pd

TABLES = ("telemetry", "evals", "events")
EVENT_COLUMNS = (
    "kind",
    "name",
    "dimension",
    "params",
    "start_step",
    "end_step",
    "start_env_step",
    "end_env_step",
)
AUDIT_FILE = "audit.json"
RUNS_DIR = "runs"
PREFIX_DIR = ".prefix"
"""The audit folder's `.prefix/<run id>/`: a shared prefix's files while it trains (`share_prefix`),
named after the first of its runs, with `members.json` listing them all."""
PREFIX_MEMBERS = "members.json"
FINDINGS_FILE = "summary.json"  # what `export` writes in a findings folder, never in an audit's


class PerturbationInfo(BaseModel):
    """What was done to a run: `none`, or the perturbations' kinds joined by `+`, their label
    and parameters."""

    model_config = ConfigDict(extra="allow")

    kind: str = "none"
    label: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def shown(self) -> str:
        """The label a table shows: `none` for a baseline, else the label (or the kind)."""
        return "none" if self.kind == "none" else (self.label or self.kind)


class RunOutcome(BaseModel):
    """What a finished run reports: final performance (mean of the last 3 evaluations; −inf for
    a diverged run), whether a non-finite loss was seen, optimizer and environment steps."""

    model_config = ConfigDict(extra="allow")

    final_perf: float | None = None
    diverged: bool = False
    diverged_step: int | None = None
    steps: int | None = None
    env_steps: int | None = None


class RunInfo(BaseModel):
    """run.json: a run's identity, spec, status, timings, outcome and error text.

    Written by the runner and the importers, read by every analysis; the one place its fields
    are named. Keys this version does not know (a newer writer's) are kept as they are.
    """

    model_config = ConfigDict(extra="allow")

    run_id: str = ""
    label: str = ""
    audit: str = ""
    workload: str = ""
    kind: str = ""  # the workload kind: rl | lm | toy | imported | …
    knobs: dict[str, Any] = Field(default_factory=dict)
    perturbation: PerturbationInfo = Field(default_factory=PerturbationInfo)
    guard: dict[str, Any] | None = None  # the guard's config with its `label`; None: unguarded
    seed: int | None = None
    spec: dict[str, Any] = Field(default_factory=dict)  # RunSpec.to_dict()
    healthy: bool | None = None  # perturbation none and the reference knobs (None: not recorded)
    status: RunStatus = RunStatus.PENDING
    started: float | None = None
    finished: float | None = None
    wall_s: float | None = None
    attempts: int = 0
    error: str | None = None
    outcome: RunOutcome | None = None
    # per-layer probes: the names behind each indexed column family
    telemetry_index: dict[str, list[str]] | None = None
    source: dict[str, Any] | None = None  # an imported run: where it came from, what was read
    # a run forked from a prefix it shared with others (`share_prefix`): where, with whom, cost
    shared_prefix: dict[str, Any] | None = None
    # the machine it trained on, as the attempt that wrote it started (`host.host_info`)
    host: dict[str, Any] | None = None

    @classmethod
    def of(cls, info: RunInfo | Mapping[str, Any]) -> RunInfo:
        """A RunInfo from a run.json document (or itself)."""
        return info if isinstance(info, RunInfo) else cls.model_validate(dict(info))

    def document(self) -> dict[str, Any]:
        """The JSON document written as run.json."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def is_baseline(self) -> bool:
        """Unperturbed and unguarded (what monitors learn from)."""
        return self.perturbation.kind == "none" and not self.guard

    @property
    def is_healthy(self) -> bool:
        """A run the detectors learn from: perturbation none, unguarded and the workload's
        reference knobs (`healthy`; a run written before it existed: unperturbed, unguarded)."""
        return self.is_baseline and (self.healthy is None or self.healthy)

    @property
    def final_perf(self) -> float | None:
        return None if self.outcome is None else self.outcome.final_perf


class AuditRecord(BaseModel):
    """audit.json: the audit's name, its resolved spec and hash, the package version that made
    it and its run ids (an import records its source instead of a hash of a spec)."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    kind: str | None = None  # "imported" for an audit made by `stabilitybench import`
    spec: dict[str, Any] = Field(default_factory=dict)  # resolved: every default filled in
    spec_hash: str | None = None
    version: str | None = None
    created: float | None = None
    run_ids: list[str] = Field(default_factory=list)
    references: dict[str, Any] | None = None  # per workload: the healthy knob levels

    def document(self) -> dict[str, Any]:
        """The JSON document written as audit.json."""
        return self.model_dump(mode="json", exclude_unset=True)


@dataclass
class RunData:
    """Everything stored for one run, loaded into memory."""

    run_id: str
    info: RunInfo  # run.json
    telemetry: pd.DataFrame
    evals: pd.DataFrame
    events: pd.DataFrame
    scores: pd.DataFrame | None = None
    telemetry_partial: bool = False  # rows up to the last flush of a run that did not finish

    def __post_init__(self) -> None:
        self.info = RunInfo.of(self.info)

    @property
    def status(self) -> str:
        return self.info.status.value

    @property
    def seed(self) -> int | None:
        return self.info.seed

    @property
    def is_baseline(self) -> bool:
        return self.info.is_baseline


def empty_events() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series([], dtype="object") for c in EVENT_COLUMNS})


class RunWriter:
    """Writes one run's folder; also a telemetry sink that streams rows into part files at each
    flush and makes `telemetry.parquet` at `close()` (see `telemetry.ParquetSink`)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_json = self.run_dir / "run.json"
        self._telemetry = ParquetSink(self.run_dir / "telemetry.parquet")
        self._events: ParquetSink | None = None  # streamed events (`stream_events`)
        # the attempt this writer started (`start`) or took over (`relocate`): a newer attempt
        # of the same run (an audit resumed while this one's process lived on) owns run.json
        self._attempt: int | None = None

    # -- run.json ----------------------------------------------------------------------------
    def read_info(self) -> RunInfo:
        if self.run_json.exists():
            return RunInfo.of(read_json(self.run_json))
        return RunInfo()

    def write_info(self, info: RunInfo) -> None:
        write_json(self.run_json, info.document())

    def update_info(self, **fields: Any) -> RunInfo:
        info = RunInfo.of({**self.read_info().document(), **fields})
        self.write_info(info)
        return info

    def start(self, info: RunInfo | Mapping[str, Any]) -> None:
        """Mark the run as running, clearing any half-finished output of an earlier attempt."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for item in self.run_dir.iterdir():
            if item.name != "run.json":
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        attempts = self.read_info().attempts + 1
        self._attempt = attempts
        self.write_info(
            RunInfo.of(info).model_copy(
                update={
                    "status": RunStatus.RUNNING,
                    "started": time.time(),
                    "attempts": attempts,
                    "error": None,
                    "host": host_info(),
                }
            )
        )

    def _end(self, status: RunStatus, **fields: Any) -> None:
        info = self.read_info()
        if self._attempt is not None and info.attempts != self._attempt:
            return  # superseded: a later attempt started this run and records its end
        now = time.time()
        started = now if info.started is None else info.started
        self.write_info(
            info.model_copy(
                update={"status": status, "finished": now, "wall_s": now - started, **fields}
            )
        )

    def finish(self, outcome: Mapping[str, Any] | None = None) -> None:
        recorded = RunOutcome.model_validate(dict(outcome or {}))
        self._end(RunStatus.DONE, outcome=recorded, error=None)

    def fail(self, error: str) -> None:
        self._end(RunStatus.FAILED, error=error)

    def relocate(self, run_dir: Path) -> None:
        """Go on writing into `run_dir` (a started run's folder), with a copy of what this
        writer has written so far: a forked run takes over the prefix it shared with others."""
        run_dir = Path(run_dir)
        for item in self.run_dir.iterdir():
            if item.name in ("run.json", PREFIX_MEMBERS):
                continue
            target = run_dir / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
        self.run_dir = run_dir
        self.run_json = run_dir / "run.json"
        self._telemetry.path = run_dir / self._telemetry.path.name
        self._telemetry.parts_dir = partial_dir(self._telemetry.path)
        if self._events is not None:
            self._events.path = run_dir / self._events.path.name
            self._events.parts_dir = partial_dir(self._events.path)
        self._attempt = self.read_info().attempts  # the attempt that started run_dir

    # -- tables ------------------------------------------------------------------------------
    def write_table(self, name: str, table: pd.DataFrame) -> None:
        write_parquet(self.run_dir / f"{name}.parquet", table)

    def stream_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Events as they happen (a guard's interventions): one part file under
        `events.parquet.partial/`, which `watch` reads while the run goes on. `write_events`
        replaces them with the run's whole events table at the end."""
        if not events:
            return
        if self._events is None:
            self._events = ParquetSink(self.run_dir / "events.parquet")
        self._events.write_rows([_event_row(e) for e in events])

    def write_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        parts = partial_dir(self.run_dir / "events.parquet")
        if parts.is_dir():  # the streamed events are in `events` too
            shutil.rmtree(parts)
        self._events = None
        if not events:
            self.write_table("events", empty_events())
            return
        import pandas as pd

        rows = [_event_row(e) for e in events]
        self.write_table("events", pd.DataFrame(rows, columns=list(EVENT_COLUMNS)))

    # -- Sink protocol -----------------------------------------------------------------------
    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._telemetry.write_rows(rows)

    def write_row(self, row: Mapping[str, Any]) -> None:
        self._telemetry.write_rows([row])

    def close(self, table: pd.DataFrame) -> None:
        """Finish `telemetry.parquet` from the streamed parts (or write `table` if none)."""
        self._telemetry.close(table)

    def read(self) -> pd.DataFrame:
        """The telemetry rows written so far."""
        return self._telemetry.read()


def _event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """One events-table row: the event's columns, its params as sorted JSON text."""
    row = {c: event.get(c) for c in EVENT_COLUMNS}
    if not isinstance(row["params"], str):
        row["params"] = json.dumps(row["params"] or {}, sort_keys=True)
    return row


class RunStore:
    """An audit folder: its spec, its runs, and SQL over their tables."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- audit level -------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def audit_file(self) -> Path:
        return self.root / AUDIT_FILE

    def exists(self) -> bool:
        return self.audit_file.exists()

    @property
    def is_findings_folder(self) -> bool:
        """A findings folder (`export`): its runs keep only the telemetry columns the analysis
        reads, and their scores come from the audit's full telemetry (never fit on these)."""
        return (self.root / FINDINGS_FILE).is_file()

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """Open an existing audit folder; a folder that is not an audit is a user error."""
        store = cls(root)
        if not store.root.is_dir():
            raise StabilityBenchError(f"{store.root}: no such folder")
        if not store.exists():
            raise StabilityBenchError(
                f"{store.root} is not a StabilityBench audit (no {AUDIT_FILE}); "
                "create one with `stabilitybench audit SPEC --out DIR`"
            )
        return store

    def audit(self) -> AuditRecord:
        return AuditRecord.model_validate(read_json(self.audit_file))

    def write_audit(self, audit: AuditRecord | Mapping[str, Any]) -> None:
        record = audit if isinstance(audit, AuditRecord) else AuditRecord.model_validate(audit)
        write_json(self.audit_file, record.document())

    # -- runs --------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def writer(self, run_id: str) -> RunWriter:
        return RunWriter(self.run_dir(run_id))

    def run_ids(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if (p / "run.json").exists())

    def info(self, run_id: str) -> RunInfo:
        return RunInfo.of(read_json(self.run_dir(run_id) / "run.json"))

    def infos(self) -> list[RunInfo]:
        return [self.info(r) for r in self.run_ids()]

    def table(self, run_id: str, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One stored table; a run's telemetry that never finished is read from its part files
        (every row up to the last flush) with `frame.attrs["partial"] = True`. `columns`: read
        only these (the ones the table has; the others are left out)."""
        import pandas as pd

        path = self.run_dir(run_id) / f"{name}.parquet"
        if not path.exists():
            parts = partial_dir(path)
            if parts.is_dir():
                frame = read_parts(parts)
                if columns is not None:
                    frame = frame[[c for c in columns if c in frame.columns]]
                frame.attrs["partial"] = True
                return frame
            empty = empty_events() if name == "events" else pd.DataFrame()
            return empty if columns is None else empty[[c for c in columns if c in empty]]
        if columns is None:
            return pd.read_parquet(path)
        import pyarrow.parquet as pq

        present = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in columns if c in present])

    def load(self, run_id: str) -> RunData:
        import pandas as pd

        scores_path = self.run_dir(run_id) / "scores.parquet"
        telemetry = self.table(run_id, "telemetry")
        return RunData(
            run_id=run_id,
            info=self.info(run_id),
            telemetry=telemetry,
            evals=self.table(run_id, "evals"),
            events=self.table(run_id, "events"),
            scores=pd.read_parquet(scores_path) if scores_path.exists() else None,
            telemetry_partial=bool(telemetry.attrs.get("partial", False)),
        )

    def iter_runs(self, status: str | None = RunStatus.DONE.value) -> Iterator[RunData]:
        """Load runs one by one; by default only finished ones."""
        for run_id in self.run_ids():
            if status is None or self.info(run_id).status == status:
                yield self.load(run_id)

    def status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in RunStatus}
        for info in self.infos():
            counts[info.status.value] += 1
        return counts

    # -- SQL ---------------------------------------------------------------------------------
    def runs_frame(self) -> pd.DataFrame:
        """One row per run: the flat fields of run.json (knobs and outcome as JSON text)."""
        import pandas as pd

        rows = []
        for info in self.infos():
            outcome = {} if info.outcome is None else info.outcome.model_dump(exclude_unset=True)
            rows.append(
                {
                    "run_id": info.run_id,
                    "status": info.status.value,
                    "workload": info.workload,
                    "kind": info.kind,
                    "perturbation": info.perturbation.label,
                    "seed": info.seed,
                    "knobs": json.dumps(info.knobs, sort_keys=True),
                    "wall_s": info.wall_s,
                    "attempts": info.attempts,
                    "error": info.error,
                    "outcome": json.dumps(outcome, sort_keys=True),
                }
            )
        columns = [
            "run_id",
            "status",
            "workload",
            "kind",
            "perturbation",
            "seed",
            "knobs",
            "wall_s",
            "attempts",
            "error",
            "outcome",
        ]
        return pd.DataFrame(rows, columns=columns)

    def connect(self) -> Any:
        """A DuckDB connection with views `runs`, `telemetry`, `evals`, `events` (and `scores`)."""
        import duckdb

        con = duckdb.connect()
        con.register("runs_df", self.runs_frame())
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_df")
        for name in (*TABLES, "scores"):
            files = (
                sorted(self.runs_dir.glob(f"*/{name}.parquet")) if self.runs_dir.is_dir() else []
            )
            # Telemetry of a run that has not finished (or crashed): its part files, marked.
            parts = (
                sorted(self.runs_dir.glob(f"*/{name}.parquet{PARTIAL_SUFFIX}/{PART_GLOB}"))
                if name == "telemetry" and self.runs_dir.is_dir()
                else []
            )
            selects = []
            if files:
                flag = False if name == "telemetry" else None
                selects.append(_select_files(files, levels=1, partial=flag))
            if parts:
                selects.append(_select_files(parts, levels=2, partial=True))
            if selects:
                con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(selects))
            else:
                con.execute(f"CREATE VIEW {name} AS SELECT NULL::VARCHAR AS run_id WHERE false")
        return con

    def query(self, sql: str) -> pd.DataFrame:
        """Run SQL over the audit's views; a SQL error is a user error with DuckDB's message."""
        import duckdb

        con = self.connect()
        try:
            result: pd.DataFrame = con.execute(sql).df()
            return result
        except duckdb.Error as exc:
            raise StabilityBenchError(f"query failed: {str(exc).splitlines()[0]}") from None
        finally:
            con.close()


def _select_files(files: Sequence[Path], *, levels: int, partial: bool | None) -> str:
    """SQL reading `files` with a `run_id` column: the folder `levels` above each file. With
    `partial` given, a `partial` column says whether the rows come from an unfinished run."""
    file_list = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    sep = "[/\\\\]"
    part = "[^/\\\\]+"
    pattern = f"({part}){sep}" + f"{part}{sep}" * (levels - 1) + f"{part}$"
    flag = "" if partial is None else f", {'true' if partial else 'false'} AS partial"
    return (
        f"SELECT regexp_extract(filename, '{pattern}', 1) AS run_id{flag}, "
        f"* EXCLUDE (filename) FROM read_parquet([{file_list}], "
        "union_by_name = true, filename = true)"
    )
