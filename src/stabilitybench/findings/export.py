"""Export an audit's findings into a small folder a reader opens without rerunning anything.

`stabilitybench export AUDIT --out results/NAME` writes:

- `summary.json` — `summary --json`;
- `evaluation.json` — `monitor evaluate --json` (the monitor is fitted first if it is not yet);
- `report.html` and `figures/*.png` — the self-contained report and its figures;
- `spec.yaml` — the audit spec as expanded and recorded in audit.json;
- `version.json` — the package version and the versions of the libraries of the export, the
  number of runs by status, the distinct machines the runs trained on (`hosts`: CPU, torch and
  its CPU capability, with a run count; `unknown` for runs that recorded none), and when the
  export was made;
- `findings.json` and `findings.md` — the paper's three claims judged per workload with CIs and
  a verdict (`metrics/claims.py`); `stabilitybench findings FOLDER` prints findings.md;
- `audit.json`, `runs/<run_id>/` and `monitor/` — the per-run data the analysis reads, slim
  (`findings.slim`): evaluations, events, the detectors' scores as fitted and a few telemetry
  columns, no model weights over 1 MiB. The folder is itself an audit folder, so
  `findings --rejudge FOLDER` and `export FOLDER --out FOLDER` judge it again with the criteria
  of the version that runs them, without refitting or retraining.

The folder is built beside `--out` under a temporary name and renamed into place at the end, so
a failed export leaves nothing half-written (and an earlier export of the same name, the source
of a re-export included, is only replaced once the new one is complete).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from stabilitybench.errors import StabilityBenchError
from stabilitybench.host import distinct_hosts
from stabilitybench.io import write_json
from stabilitybench.store import FINDINGS_FILE, RUNS_DIR, RunStore

if TYPE_CHECKING:
    from stabilitybench.analysis import Analysis
    from stabilitybench.findings.claims import Claims

LIBRARIES = (
    "torch",
    "stable-baselines3",
    "gymnasium",
    "mujoco",
    "transformers",
    "numpy",
    "pandas",
    "duckdb",
)
"""The libraries whose versions `version.json` records (those installed)."""
OLD_EXPORT_HINT = "export the audit again from its audit folder"


def library_versions() -> dict[str, str]:
    """Installed versions of `LIBRARIES` and of stabilitybench itself (from package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ("stabilitybench", *LIBRARIES):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _status_counts(store: RunStore) -> dict[str, int]:
    return dict(sorted(Counter(i.status.value for i in store.infos()).items()))


def _check_complete(store: RunStore, counts: dict[str, int], allow_partial: bool) -> None:
    if not counts:
        raise StabilityBenchError(f"export: {store.root} has no runs; run the audit first")
    unfinished = {s: n for s, n in counts.items() if s not in ("done", "failed")}
    if unfinished and not allow_partial:
        parts = ", ".join(f"{n} {s}" for s, n in unfinished.items())
        raise StabilityBenchError(
            f"export: the audit is not finished ({parts}); resume it with `stabilitybench audit "
            f"SPEC --out {store.root}`, or pass --partial to export what is done"
        )


def _spec_yaml(store: RunStore) -> str:
    import yaml

    spec = store.audit().spec
    if not spec:
        raise StabilityBenchError(f"export: {store.root}/audit.json has no recorded spec")
    text: str = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return text


def is_findings_folder(path: Path) -> bool:
    """Whether `path` is a findings folder written by `export` (not an audit folder)."""
    return RunStore(path).is_findings_folder


def open_source(path: Path) -> RunStore:
    """The audit to export: an audit folder, or a findings folder that keeps its per-run data;
    a findings folder from before that is a user error that says so."""
    from stabilitybench.findings.slim import has_run_data

    path = Path(path)
    if is_findings_folder(path) and not has_run_data(path):
        raise StabilityBenchError(
            f"{path} is a findings folder without per-run data (runs/, exported by an older "
            f"version), so it cannot be exported or re-judged; {OLD_EXPORT_HINT}"
        )
    return RunStore.open(path)


def _check_destination(store: RunStore, out: Path) -> None:
    """`out` may be a new folder, an earlier export, or the findings folder being re-exported;
    never a file, a folder inside the source, or the audit folder itself (its runs would go)."""
    if out.exists() and not out.is_dir():
        raise StabilityBenchError(f"--out: {out} is a file; give a folder such as results/NAME")
    source, target = store.root.resolve(), out.resolve()
    if source in target.parents:
        raise StabilityBenchError(f"--out: {out} is inside the audit folder; choose another folder")
    if target == source and not store.is_findings_folder:
        raise StabilityBenchError(
            f"--out: {out} is the audit folder itself (its runs would be replaced); choose "
            "another folder"
        )


def export_results(
    store: RunStore,
    out: Path,
    *,
    allow_partial: bool = False,
    target_false_alarms: float | None = None,
    horizon: int | None = None,
    sph: int | None = None,
    refittable: bool = False,
    fit: bool = True,
    origin: str | None = None,
    parts: list[dict[str, Any]] | None = None,
    console: Any = None,
) -> Path:
    """Write the findings folder `out` for the audit in `store` (see the module docstring);
    `target_false_alarms` and `horizon` override the spec's `warning` settings. `store` may be a
    findings folder (`out` may be that folder): its findings are judged again from its runs.
    `refittable`: keep every telemetry column; `fit`: False exports an unfitted audit unfitted
    (a slice `merge` fits with the rest); `origin`: where the runs came from (summary.json);
    `parts`: what version.json records of a merged audit's parts (`findings.merge`)."""
    from stabilitybench.evaluation.fitting import needs_fit
    from stabilitybench.findings.slim import write_run_data

    out = Path(out)
    refittable = refittable or is_refittable(store)  # a re-export keeps what its source kept
    _check_destination(store, out)
    counts = _status_counts(store)
    _check_complete(store, counts, allow_partial)
    spec = _spec_yaml(store)
    if fit and needs_fit(store):  # never fitted, or resumed since: on the full telemetry
        _fit(store, allow_partial, console)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{time.time_ns()}.tmp")
    try:  # from the mkdir on: a SIGTERM that lands anywhere after it removes the folder
        tmp.mkdir()  # mode 0o777 filtered by the user's umask, like the files in it
        hosts = _hosts(store, console)
        write_run_data(store, tmp, refittable=refittable)
        _judge_folder(
            tmp, origin or str(store.root), spec, target_false_alarms, horizon, sph, console
        )
        write_json(
            tmp / "version.json",
            {
                "audit": store.audit().name or None,
                "versions": library_versions(),
                "python": sys.version.split()[0],
                "runs": counts,
                "hosts": hosts,
                "partial": bool(allow_partial and set(counts) - {"done", "failed"}),
                "rejudged": store.is_findings_folder,  # re-exported from its per-run data
                "refittable": refittable,  # every telemetry column kept: `merge` can refit
                **({"parts": parts} if parts is not None else {}),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        _replace(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_refittable(store: RunStore) -> bool:
    """Whether `store` is a findings folder exported `--refittable` (every telemetry column)."""
    from stabilitybench.io import read_json

    version = store.root / "version.json"
    return (
        store.is_findings_folder
        and version.is_file()
        and bool(read_json(version).get("refittable"))
    )


def _hosts(store: RunStore, console: Any) -> list[dict[str, Any]]:
    """The distinct machines the runs trained on, said when there are several."""
    hosts = distinct_hosts(i.host for i in store.infos())
    known = [h for h in hosts if not h.get("unknown")]
    if len(known) > 1 and console is not None:
        console.print(
            f"[yellow]note:[/] the runs trained on {len(known)} different machines (version.json "
            "`hosts`); at the edge of stability a run's outcome can depend on the CPU"
        )
    return hosts


def _fit(store: RunStore, allow_partial: bool, console: Any) -> None:
    """Fit the monitor on the audit's full telemetry; for a partial export, a slice that cannot
    be fitted (`audit --only` without the healthy runs: `merge` fits the whole) is a note."""
    from stabilitybench.evaluation.fitting import fit_audit

    try:
        fit_audit(store, console=console)
    except StabilityBenchError as exc:
        if not allow_partial:
            raise
        if console is not None:
            console.print(escape(f"note: the monitor is not fitted ({exc})"), highlight=False)


def _judge_folder(
    folder: Path,
    origin: str,
    spec: str,
    target_false_alarms: float | None,
    horizon: int | None,
    sph: int | None,
    console: Any,
) -> None:
    """Judge the per-run data just written to `folder` and write the documents and the report
    beside it: the documents are what `findings --rejudge` finds in the folder (its floats are
    rounded: `findings.slim`). It is marked a findings folder first, so nothing is fitted on it
    (monitor/fit.json is there: the saved scores are used as they are)."""
    from stabilitybench.analysis import analyse

    write_json(folder / FINDINGS_FILE, {})
    analysis = analyse(
        RunStore(folder),
        evaluation="fit",
        target_false_alarms=target_false_alarms,
        horizon=horizon,
        sph=sph,
        console=console,
    )
    analysis.summary.audit.path = origin  # where the runs came from
    _write_folder(folder, RunStore(folder), analysis, spec)


def _write_folder(folder: Path, store: RunStore, analysis: Analysis, spec: str) -> None:
    """The analysis' documents, the spec and the report with its figures, into `folder`."""
    from stabilitybench.findings.printing import claims_markdown
    from stabilitybench.metrics.serialize import to_jsonable
    from stabilitybench.report.html import write_report
    from stabilitybench.report.markup import EMBED_DPI

    write_json(folder / FINDINGS_FILE, to_jsonable(analysis.summary))
    write_json(folder / "evaluation.json", to_jsonable(analysis.evaluation))
    write_json(folder / "findings.json", to_jsonable(analysis.claims))
    (folder / "findings.md").write_text(claims_markdown(analysis.claims), encoding="utf-8")
    (folder / "spec.yaml").write_text(spec, encoding="utf-8")
    # The figures are the report's own images (100 dpi), not a second, larger rendering:
    # a findings folder stays a few MB.
    write_report(
        store,
        output=folder / "report.html",
        figures_dir=folder / "figures",
        figures_dpi=EMBED_DPI,
        analysis=analysis,
    )


def _replace(out: Path, new: Path) -> None:
    """Rename the finished folder `new` to `out`; an earlier `out` goes only once it is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def findings_markdown(path: Path, *, as_json: bool = False, rejudge: bool = False) -> str:
    """What `stabilitybench findings PATH` prints: a findings folder's findings.md (or .json), or
    the claims computed from an audit folder (claim 3 only if its monitor has been evaluated).
    `rejudge`: the claims computed again from the folder's runs, the evaluation included."""
    import json

    from stabilitybench.findings.printing import claims_markdown
    from stabilitybench.metrics.serialize import to_jsonable

    path = Path(path)
    saved = path / ("findings.json" if as_json else "findings.md")
    if rejudge:
        claims = rejudged_claims(path)
    elif saved.is_file():
        return saved.read_text(encoding="utf-8")
    elif is_findings_folder(path):
        raise StabilityBenchError(
            f"{path} is a findings folder without {saved.name} (exported by an older version); "
            "export the audit again"
        )
    else:
        from stabilitybench.analysis import analyse

        claims = analyse(_store_with_runs(path)).claims
    if as_json:
        return json.dumps(to_jsonable(claims), indent=2) + "\n"
    return claims_markdown(claims)


def rejudged_claims(path: Path) -> Claims:
    """The claims judged again from the per-run data at `path` with this version's criteria:
    collapses from the evaluations, the warning protocol on the saved scores (no refit, no
    retraining). A findings folder is read, never written (the analysis runs on a copy)."""
    import tempfile

    from stabilitybench.analysis import analyse
    from stabilitybench.findings.slim import working_copy

    if not is_findings_folder(path):
        return analyse(_store_with_runs(path), evaluation="rejudge").claims
    open_source(path)  # a findings folder without runs/: one clear error
    with tempfile.TemporaryDirectory(prefix="stabilitybench-rejudge-") as tmp:
        return analyse(working_copy(path, Path(tmp)), evaluation="rejudge").claims


def _store_with_runs(path: Path) -> RunStore:
    store = RunStore.open(path)
    if not store.infos():
        raise StabilityBenchError(f"{path} has no runs; run the audit first")
    return store


def folder_size(path: Path) -> int:
    """Total bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(path: Path) -> str:
    """One line: what was written where, and how big it is."""
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    shown = ", ".join(f for f in files if "/" not in f)
    n_figures = sum(1 for f in files if f.startswith("figures/"))
    runs = path / RUNS_DIR
    n_runs = sum(1 for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else 0
    run_bytes = folder_size(runs) if runs.is_dir() else 0
    return (
        f"findings written to {path} ({shown}; {n_figures} figures; per-run data of {n_runs} "
        f"runs in {RUNS_DIR}/, {run_bytes / 2**10:.0f} KiB; {folder_size(path) / 2**20:.1f} MiB)"
    )
