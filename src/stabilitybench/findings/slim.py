"""A findings folder's per-run data: a slim copy of the audit that is re-judged without retraining.

`export` writes, beside the documents, what the analysis reads from each run::

    audit.json                              the resolved spec (as in the audit)
    runs/<run_id>/run.json                  identity, status, outcome (every run)
    runs/<run_id>/evals.parquet             every evaluation (a finished run), as stored
    runs/<run_id>/events.parquet            every perturbation window and intervention, as stored
    runs/<run_id>/scores.parquet            the fitted detectors' per-step columns (msm, pca)
    runs/<run_id>/telemetry.parquet         `kept_telemetry_columns` of the run's telemetry only
                                            (every column with `export --refittable`)
    monitor/fit.json, attribution.json, evaluation.json, score.json   (those the audit has)
    monitor/workload-*/                     each fitted monitor, when under `MAX_MODEL_BYTES`

So the folder is an audit folder to `RunStore.open`: `findings --rejudge` and `export` of it judge
the collapses again, evaluate the saved scores with the warning protocol and judge the claims,
with the criteria of the version that runs them, and never refit or retrain (`monitor/fit.json`
is there; saved scores are used as they are). The scores of the detectors that need no fit are
not kept: they are a function of the telemetry alone, and the analysis scores them from the kept
telemetry (`evaluation.fitting.complete_scores`, as for a detector added after the scores were
written) to the same values — on the committed findings folders, every column of every run (see
tests/audit/test_rejudge.py). They were most of a folder: on a long RL run, 13 detectors' scores
per optimizer step.
The large Parquet files are rewritten with the same columns and types, with zstd and encodings
that suit numbers (byte-stream-split floats, delta-coded integers), and their per-step floats
rounded to `KEPT_MANTISSA_BITS` bits of mantissa (`rounded`: a relative error of at most 2^-9,
finer than bfloat16): one float per step and signal is the entropy of a run's data, 47k optimizer
steps of a PPO run kept 3 MB exactly and keep 0.7 MB rounded. The performance and claim columns
(`exact_columns`), the integers and the flags are kept exactly. `export` judges the folder it
wrote (`findings.export`), so its documents are what `findings --rejudge` finds in it; the audit
itself, judged at full precision, can differ at a threshold's edge.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stabilitybench.evaluation.results import EVALUATION_FILE, MONITOR_DIR
from stabilitybench.store import AUDIT_FILE, FINDINGS_FILE, RUNS_DIR, RunStore
from stabilitybench.types import RunStatus

MAX_MODEL_BYTES = 1 << 20
"""A fitted monitor folder (weights and config) is copied only when it is at most this big: the
re-judge never needs it, a reader may want to score other runs with it."""
CLAIM_COLUMNS = ("ent_coef",)
"""Telemetry the claims read: SAC's learned temperature orders an `ent_coef: auto` level."""
PROBE_COLUMNS = ("attn_logit_max", "out_logit_max")
"""The stability probes' maxima over layers (`probes: stability`, every 10 steps): the attention-
and output-logit growth a sweep for divergences on their own reads (`paper_lm_intrinsic`)."""
RESCORE_COLUMNS = ("perturbed", "grad_cos_prev", "grad_cos_ema", "nonfinite_grads")
"""Telemetry the detectors that need no fit read, kept whatever the report shows so that they
are scored from it (`evaluation.fitting.complete_scores`): the perturbation flag the clock
control counts from, the gradient cosines of the coherence guard, the count of non-finite
gradients that makes a diverged step score +inf (the loss and gradient norm are kept anyway)."""
KEPT_MANTISSA_BITS = 8
"""Bits of mantissa a findings folder keeps of a per-step float (float32 keeps 23, bfloat16 7)."""
RUN_TABLES = ("evals", "events")
"""A finished run's tables copied byte for byte."""


def kept_telemetry_columns(columns: Sequence[str]) -> list[str]:
    """The telemetry columns a findings folder keeps, in the table's order: the dense performance
    signal's (`metrics.records.DENSE_COLUMNS`: step, env_step, loss, episode returns), the
    claims' (`CLAIM_COLUMNS`), the stability probes' maxima (`PROBE_COLUMNS`), the report's
    telemetry panels' (`report.data.TELEMETRY_SIGNALS`)
    the re-scored detectors' (`RESCORE_COLUMNS`, and every column in a registered detector's
    `reads`: `detector_reads`) and the manifold report's
    (`evaluation.manifold.SIGNALS`), the last three also as `role/signal` for a run with several
    optimizers."""
    from stabilitybench.evaluation.manifold import SIGNALS
    from stabilitybench.metrics.records import DENSE_COLUMNS
    from stabilitybench.report.data import TELEMETRY_SIGNALS

    exact = {*DENSE_COLUMNS, *CLAIM_COLUMNS, *PROBE_COLUMNS, *TELEMETRY_SIGNALS, *RESCORE_COLUMNS}
    exact |= set(SIGNALS)
    exact |= detector_reads()
    panels = {*TELEMETRY_SIGNALS, *RESCORE_COLUMNS, *SIGNALS}

    def kept(column: str) -> bool:
        role, _, signal = column.partition("/")
        return column in exact or (bool(role) and "/" not in signal and signal in panels)

    return [c for c in columns if kept(c)]


def kept_score_columns(columns: Sequence[str]) -> list[str]:
    """The scores.parquet columns a findings folder keeps, in order: all but those of the
    registered detectors that need no fit (`<column>`, `<column>_native`), which the analysis
    scores again from the kept telemetry."""
    from stabilitybench.detectors.base import detector_classes

    rederived = {
        name
        for cls in detector_classes().values()
        if not cls.fitted
        for name in (cls.column, f"{cls.column}_native")
    }
    return [c for c in columns if c not in rederived]


def exact_columns() -> set[str]:
    """The per-step float columns kept exactly: the performance signal's (loss, episode returns:
    the collapse labels read them) and the claims' (`CLAIM_COLUMNS`)."""
    from stabilitybench.metrics.records import DENSE_COLUMNS

    return {*DENSE_COLUMNS, *CLAIM_COLUMNS}


def rounded(values: np.ndarray) -> np.ndarray:
    """`values` (float64) rounded to the nearest float32 with `KEPT_MANTISSA_BITS` bits of
    mantissa, returned as float64: a relative error of at most 2^-(KEPT_MANTISSA_BITS + 1); NaN
    and ±inf kept, magnitudes beyond float32's range become ±inf. Rounding twice changes nothing."""
    with np.errstate(over="ignore"):
        single = np.asarray(values, dtype=np.float64).astype(np.float32)
    bits = single.view(np.uint32).copy()
    finite = np.isfinite(single)
    drop = 23 - KEPT_MANTISSA_BITS
    mask = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    # Half a kept unit added, the rest cut: to nearest (a carry into the exponent is correct).
    bits[finite] = (bits[finite] + np.uint32(1 << (drop - 1))) & mask
    return bits.view(np.float32).astype(np.float64)


def detector_reads() -> set[str]:
    """Every column a registered detector that needs no fit reads (`reads`): a folder re-scores
    a detector added after its scores were written from the same columns as its audit would."""
    from stabilitybench.detectors.base import detector_classes

    return {
        column
        for cls in detector_classes().values()
        if not cls.fitted
        for group in cls.reads
        for column in group
    }


def monitor_files() -> tuple[str, ...]:
    """The monitor folder's small documents the analysis and the report read: the fit (whose
    presence means "do not refit"), first-alarm attributions, the evaluation, `monitor score`'s
    alarms."""
    from stabilitybench.evaluation.fitting import ATTRIBUTION_FILE, FIT_FILE
    from stabilitybench.evaluation.scoring import SCORE_FILE

    return (FIT_FILE, ATTRIBUTION_FILE, EVALUATION_FILE, SCORE_FILE)


def has_run_data(path: Path) -> bool:
    """Whether `path` holds an audit's per-run data (an audit folder or a slim copy of one)."""
    return (path / AUDIT_FILE).is_file() and (path / RUNS_DIR).is_dir()


def write_run_data(store: RunStore, folder: Path, *, refittable: bool = False) -> None:
    """Copy the per-run data of the audit in `store` into `folder` (see the module docstring);
    `refittable`: every telemetry column, not only `kept_telemetry_columns`, so the monitor can
    be fitted on the folder's runs again (`findings.merge`)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store.audit_file, folder / AUDIT_FILE)
    for run_id in store.run_ids():
        _copy_run(store, run_id, folder / RUNS_DIR / run_id, refittable=refittable)
    _copy_monitor(store.root / MONITOR_DIR, folder / MONITOR_DIR)


def working_copy(path: Path, folder: Path) -> RunStore:
    """A copy of the findings folder's per-run data at `path` in `folder` (marked as a findings
    folder: nothing is fitted on it), for an analysis that writes (the evaluation saves itself
    under monitor/) while `path` stays as it is."""
    shutil.copyfile(path / FINDINGS_FILE, folder / FINDINGS_FILE)
    shutil.copyfile(path / AUDIT_FILE, folder / AUDIT_FILE)
    shutil.copytree(path / RUNS_DIR, folder / RUNS_DIR)
    if (path / MONITOR_DIR).is_dir():
        shutil.copytree(path / MONITOR_DIR, folder / MONITOR_DIR)
    return RunStore(folder)


def _copy_run(store: RunStore, run_id: str, dest: Path, *, refittable: bool = False) -> None:
    """run.json of any run; the tables of a finished one (the analysis reads no others)."""
    source = store.run_dir(run_id)
    dest.mkdir(parents=True)
    shutil.copyfile(source / "run.json", dest / "run.json")
    if store.info(run_id).status != RunStatus.DONE:
        return
    for name in RUN_TABLES:
        if (source / f"{name}.parquet").is_file():
            shutil.copyfile(source / f"{name}.parquet", dest / f"{name}.parquet")
    if (source / "scores.parquet").is_file():
        # From an audit only: an older findings folder's telemetry may lack a column the
        # re-scoring reads (`nonfinite_grads`), so its scores are copied whole.
        slim = not store.is_findings_folder
        write_compact(dest / "scores.parquet", source / "scores.parquet", scores=slim)
    if (source / "telemetry.parquet").is_file():
        write_compact(
            dest / "telemetry.parquet",
            source / "telemetry.parquet",
            telemetry=True,
            refittable=refittable,
        )


def write_compact(
    dest: Path,
    source: Path,
    *,
    telemetry: bool = False,
    scores: bool = False,
    refittable: bool = False,
) -> None:
    """Rewrite the Parquet file `source` as `dest`, small (`telemetry`: only
    `kept_telemetry_columns`, or every column if `refittable`; `scores`: only
    `kept_score_columns`), its float columns but `exact_columns` `rounded`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = pq.read_schema(source).names
    kept = (
        (None if refittable else kept_telemetry_columns(columns))
        if telemetry
        else kept_score_columns(columns)
        if scores
        else None
    )
    table = pq.read_table(source, columns=kept)
    exact = exact_columns()
    for index, column in enumerate(table.schema):
        if column.type == pa.float64() and column.name.rpartition("/")[2] not in exact:
            data = table.column(index).combine_chunks()
            values = rounded(data.to_numpy(zero_copy_only=False))
            table = table.set_column(
                index, column, pa.array(values, mask=data.is_null().to_numpy(zero_copy_only=False))
            )
    encodings: dict[str, str] = {}
    for column in table.schema:
        if pa.types.is_floating(column.type):
            encodings[column.name] = "BYTE_STREAM_SPLIT"  # floats: bytes grouped, then zstd
        elif pa.types.is_integer(column.type):
            encodings[column.name] = "DELTA_BINARY_PACKED"  # steps: a constant difference
    pq.write_table(
        table,
        dest,
        compression="zstd",
        compression_level=19,
        use_dictionary=[c for c in table.column_names if c not in encodings],
        column_encoding=encodings,
        write_statistics=False,
    )


def _copy_monitor(source: Path, dest: Path) -> None:
    """The monitor's small documents, and each fitted monitor folder under `MAX_MODEL_BYTES`
    (not the copy at `monitor/` itself that a one-workload audit also keeps)."""
    if not source.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in monitor_files():
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    for model in sorted(p for p in source.iterdir() if p.is_dir()):
        files = [p for p in model.iterdir() if p.is_file()]
        if files and sum(p.stat().st_size for p in files) <= MAX_MODEL_BYTES:
            (dest / model.name).mkdir()
            for file in files:
                shutil.copyfile(file, dest / model.name / file.name)
