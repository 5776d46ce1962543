"""Logged points of one run → the store's `telemetry`, `evals`, `events` tables and `run.json`.

The points file (long format, see `points.py`) is pivoted by DuckDB, out of core (a memory
limit and a spill folder), into one telemetry row per logged step, written to Parquet in row
groups; the last value logged for a (step, tag) wins. Evaluations come from the `eval_loss` /
`eval_return` tags (`perf = -eval_loss`, or the return; a non-finite value is `perf = -inf`).
With neither, an RL run's training-episode return (`episode_return`) stands in. A run whose
loss (training or evaluation) or gradient norm becomes non-finite diverged there: like a
workload, it gets an evaluation with `perf = -inf` at that step and `diverged: true` in its
outcome, and later evaluations are dropped (a workload stops there); telemetry keeps every
logged step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.importers.columns import (
    ENV_STEP,
    EVAL_LOSS,
    EVAL_RETURN,
    SKIP,
    Assignment,
    Column,
)
from stabilitybench.io import write_parquet

TELEMETRY_ROW_GROUP = 100_000
DUCKDB_MEMORY = "512MB"


@dataclass
class BuiltRun:
    """What was written for one run (the facts its run.json and the console report)."""

    telemetry_rows: int
    telemetry_columns: list[str]
    eval_rows: int
    perf_source: str | None
    final_perf: float
    diverged: bool
    diverged_step: int | None
    last_step: int | None
    last_env_step: int | None
    notes: list[str] = field(default_factory=list)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def build_run(
    points_path: Path,
    tag_ids: dict[str, int],
    assignment: Assignment,
    run_dir: Path,
    spill_dir: Path,
) -> BuiltRun:
    """Write `run_dir/{telemetry,evals,events}.parquet` from the points file."""
    import duckdb

    run_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
        con.execute("SET threads = 1")
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"SET temp_directory = {_literal(spill_dir)}")
        con.execute(f"CREATE VIEW points AS SELECT * FROM read_parquet({_literal(points_path)})")
        return _build(con, tag_ids, assignment, run_dir)
    finally:
        con.close()


def _pick(tag_id: int, sign: float = 1.0) -> str:
    scale = "" if sign == 1.0 else f" * {sign!r}"
    return f"arg_max(value, seq) FILTER (WHERE tag = {tag_id}){scale}"


def _build(con: Any, tag_ids: dict[str, int], assignment: Assignment, run_dir: Path) -> BuiltRun:
    """Write the three tables of one run from the `points` view; what was written."""
    telemetry = [c for c in assignment.telemetry if c.tag in tag_ids]
    env_tags = [t for t in assignment.tags_for(ENV_STEP) if t in tag_ids]
    sql = _telemetry_sql(tag_ids, assignment, telemetry, env_tags)
    has_env = bool(env_tags) or assignment.dialect == "sb3"
    telemetry_rows, last_step, last_env = _write_telemetry(con, sql, run_dir, has_env)

    evals, perf_source = _evals(con, tag_ids, assignment, env_from_step=assignment.dialect == "sb3")
    diverged_step = _divergence(con, tag_ids, assignment)
    if diverged_step is not None:
        evals = _cut_at_divergence(evals, diverged_step, env_from_step=assignment.dialect == "sb3")
        if perf_source is None:
            perf_source = "divergence only"
    evals["step"] = evals["step"].astype("int64")
    write_parquet(run_dir / "evals.parquet", evals)
    from stabilitybench.store import empty_events

    write_parquet(run_dir / "events.parquet", empty_events())
    from stabilitybench.metrics.collapse import final_performance

    final = final_performance(evals["perf"].to_numpy(dtype=float)) if len(evals) else math.nan
    return BuiltRun(
        telemetry_rows=telemetry_rows,
        telemetry_columns=[c.target for c in telemetry],
        eval_rows=len(evals),
        perf_source=perf_source,
        final_perf=final,
        diverged=diverged_step is not None,
        diverged_step=diverged_step,
        last_step=last_step,
        last_env_step=last_env,
    )


def _telemetry_sql(
    tag_ids: dict[str, int],
    assignment: Assignment,
    telemetry: list[Column],
    env_tags: list[str],
) -> str:
    """The query that pivots the points into one telemetry row per logged step."""
    selects = ["step"]
    if env_tags:
        selects.append(f"CAST({_pick(tag_ids[env_tags[0]])} AS BIGINT) AS env_step")
    elif assignment.dialect == "sb3":  # SB3 logs against the number of environment steps
        selects.append("step AS env_step")
    selects += [f"{_pick(tag_ids[c.tag], c.sign)} AS {_quote(c.target)}" for c in telemetry]
    wanted = [tag_ids[c.tag] for c in telemetry] + [tag_ids[t] for t in env_tags]
    where = f"WHERE tag IN ({', '.join(map(str, wanted))})" if wanted else ""
    if not telemetry:  # no training signal at all: one row per logged step, for the clock
        skipped = [str(tag_ids[c.tag]) for c in assignment.columns.values() if c.target == SKIP]
        where = f"WHERE tag NOT IN ({', '.join(skipped)})" if skipped else ""
    return f"SELECT {', '.join(selects)} FROM points {where} GROUP BY step ORDER BY step"


def _write_telemetry(
    con: Any, sql: str, run_dir: Path, has_env: bool
) -> tuple[int, int | None, int | None]:
    """Write telemetry.parquet from `sql` (through a temporary file, in row groups); its (rows,
    last step, last env step)."""
    telemetry_path = run_dir / "telemetry.parquet"
    tmp = run_dir / ".telemetry.parquet.tmp"
    con.execute(
        f"COPY ({sql}) TO {_literal(tmp)} (FORMAT PARQUET, ROW_GROUP_SIZE {TELEMETRY_ROW_GROUP})"
    )
    tmp.replace(telemetry_path)
    stats = con.execute(
        f"SELECT count(*), max(step){', max(env_step)' if has_env else ''} "
        f"FROM read_parquet({_literal(telemetry_path)})"
    ).fetchone()
    telemetry_rows, last_step = int(stats[0]), None if stats[1] is None else int(stats[1])
    last_env = int(stats[2]) if has_env and stats[2] is not None else None
    return telemetry_rows, last_step, last_env


def _cut_at_divergence(
    evals: pd.DataFrame, diverged_step: int, env_from_step: bool
) -> pd.DataFrame:
    """The evaluations up to `diverged_step`, with perf −inf there (a row added if none was)."""
    evals = evals[evals["step"] <= diverged_step].reset_index(drop=True)
    at = evals["step"] == diverged_step
    if at.any():
        evals.loc[at, "perf"] = -math.inf
        return evals
    row = {c: np.nan for c in evals.columns}
    row.update(step=diverged_step, perf=-math.inf)
    if "env_step" in evals.columns and env_from_step:
        row["env_step"] = diverged_step
    evals = pd.concat([evals, pd.DataFrame([row])], ignore_index=True)
    return evals.sort_values("step", kind="stable").reset_index(drop=True)


def _evals(
    con: Any, tag_ids: dict[str, int], assignment: Assignment, env_from_step: bool
) -> tuple[pd.DataFrame, str | None]:
    """(evals table with step, env_step, perf and the raw value; which tag gave perf)."""
    loss = [t for t in assignment.tags_for(EVAL_LOSS) if t in tag_ids]
    ret = [t for t in assignment.tags_for(EVAL_RETURN) if t in tag_ids]
    source: str | None = None
    if ret:
        tag, raw, sign, source = ret[0], "return", 1.0, ret[0]
    elif loss:
        tag, raw, sign, source = loss[0], "val_loss", -1.0, loss[0]
    else:
        dense = [t for t in assignment.tags_for("episode_return") if t in tag_ids]
        if not dense:
            empty = {"step": "int64", "env_step": "float64", "perf": "float64"}
            return pd.DataFrame({k: pd.Series([], dtype=v) for k, v in empty.items()}), None
        tag, raw, sign, source = dense[0], "return", 1.0, f"{dense[0]} (training episodes)"
    frame: pd.DataFrame = con.execute(
        f"SELECT step, {_pick(tag_ids[tag])} AS v FROM points WHERE tag = {tag_ids[tag]} "
        "GROUP BY step ORDER BY step"
    ).df()
    values = frame["v"].to_numpy(dtype=float)
    perf = np.where(np.isfinite(values), sign * values, -np.inf)
    out = pd.DataFrame(
        {
            "step": frame["step"].to_numpy(dtype=np.int64),
            "env_step": frame["step"].to_numpy(dtype=float) if env_from_step else np.nan,
            "perf": perf,
            raw: values,
        }
    )
    return out, source


def _divergence(con: Any, tag_ids: dict[str, int], assignment: Assignment) -> int | None:
    """First step at which the training or evaluation loss, or the gradient norm, is non-finite.

    The gradient norm counts because the HF Trainer hides a NaN loss by default
    (`logging_nan_inf_filter`) while it logs the NaN gradient norm.
    """
    watched = ("loss", EVAL_LOSS, "grad_norm", "grad_norm_raw")
    tags = [t for target in watched for t in assignment.tags_for(target) if t in tag_ids]
    if not tags:
        return None
    row = con.execute(
        f"SELECT min(step) FROM points WHERE tag IN ({', '.join(str(tag_ids[t]) for t in tags)}) "
        "AND NOT isfinite(value)"
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])
