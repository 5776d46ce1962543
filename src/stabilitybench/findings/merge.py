"""Merge the parts of one audit, run on different machines or days, into one findings folder.

An audit too long for one sitting (a machine lent for a few hours, an audit folder that does
not outlive its machine) runs in slices: `stabilitybench audit SPEC --only action_noise=0.3`
here, `--only action_noise=0.1` elsewhere, each exported with `export --partial --refittable`
(the findings folder keeps every telemetry column, rounded like the rest: `findings.slim`).
`stabilitybench merge PART... --spec SPEC --out DIR` then

- checks that every finished run of every part is a run of SPEC (the same run id: the same
  workload, knobs, perturbations, seed and audit name; so a part may also come from a spec that
  lists only its slice) and that no run comes from two parts;
- assembles an audit folder of SPEC from them (audit.json of SPEC, each run's data as its part
  kept it, `healthy` set again from SPEC's reference levels, since a slice's own spec may name
  other ones);
- fits the monitor on it as an audit of SPEC would (healthy runs, leave one seed out: what a
  part fitted on its own runs is dropped) and exports it (`findings.export`).

The merged folder is then judged like any findings folder; `version.json` lists its parts.
The one difference from SPEC run in one sitting: the monitor is fitted on the telemetry as the
parts kept it (floats with `KEPT_MANTISSA_BITS` bits of mantissa, a relative error of at most
2^-9), not at full precision.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from stabilitybench.errors import StabilityBenchError
from stabilitybench.io import read_json, write_json
from stabilitybench.store import RunStore
from stabilitybench.types import RunStatus

REFITTABLE_HINT = (
    "export it again from its audit folder with `stabilitybench export AUDIT --out PART "
    "--partial --refittable`"
)


def merge_parts(
    parts: list[Path],
    spec_path: Path,
    out: Path,
    *,
    allow_partial: bool = False,
    refittable: bool = False,
    console: Any = None,
) -> Path:
    """Merge the findings folders (or audit folders) `parts` into the findings folder `out` of
    the audit `spec_path` (see the module docstring); `allow_partial`: runs of the spec that no
    part finished are exported as not done. Returns `out`."""
    from stabilitybench.audit.runner import plan_audit, prepare_store
    from stabilitybench.findings.export import export_results

    if not parts:
        raise StabilityBenchError("merge: give at least one part (a findings or audit folder)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StabilityBenchError(f"--out: {out} is a file; give a folder such as results/NAME")
    sources = [_open_part(Path(p)) for p in parts]
    resolved = {s.root.resolve() for s in sources}
    if len(resolved) < len(sources):
        raise StabilityBenchError("merge: a part is given twice")
    if out.resolve() in resolved:
        raise StabilityBenchError(f"--out: {out} is one of the parts; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.merge-{os.getpid()}-{time.time_ns()}.tmp")
    plan = plan_audit(spec_path, work)
    by_id = {run.run_id: run for run in plan.runs}
    chosen = _choose_runs(sources, by_id, spec_path)
    missing = [run for run in plan.runs if run.run_id not in chosen]
    if missing and not allow_partial:
        labels = ", ".join(run.label for run in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise StabilityBenchError(
            f"merge: {len(missing)} of the {len(plan.runs)} runs of {spec_path} are in no part "
            f"({labels}{more}); run them, or pass --partial to merge what is there"
        )
    try:
        store = prepare_store(plan)
        for run_id, source in chosen.items():
            _copy_part_run(source, run_id, store, by_id[run_id], plan)
        export_results(
            store,
            out,
            allow_partial=allow_partial,
            refittable=refittable,
            origin=", ".join(str(s.root) for s in sources),
            parts=[_describe_part(s, chosen) for s in sources],
            console=console,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _open_part(path: Path) -> RunStore:
    """A part: an audit folder (full telemetry), or a findings folder exported `--refittable`."""
    from stabilitybench.findings.export import is_refittable, open_source

    if not path.is_dir():
        raise StabilityBenchError(f"merge: {path} is not a folder (a findings or audit folder)")
    store = open_source(path)
    if store.is_findings_folder and not is_refittable(store):
        raise StabilityBenchError(
            f"merge: {path} keeps only the telemetry the analysis reads, so the monitor "
            f"cannot be fitted on it again; {REFITTABLE_HINT}"
        )
    return store


def _choose_runs(
    sources: list[RunStore], by_id: dict[str, Any], spec_path: Path
) -> dict[str, RunStore]:
    """run id → the part that finished it; a user error for a run that is not one of the spec's
    or that two parts finished."""
    chosen: dict[str, RunStore] = {}
    for source in sources:
        for info in source.infos():
            if info.status != RunStatus.DONE:
                continue  # a part's unfinished runs are another part's, or missing
            if info.run_id not in by_id:
                raise StabilityBenchError(
                    f"merge: {source.root} holds the run {info.label} ({info.run_id}), which is "
                    f"not a run of {spec_path} (another budget, knob, seed or audit name?)"
                )
            if info.run_id in chosen:
                raise StabilityBenchError(
                    f"merge: the run {info.label} ({info.run_id}) is in both "
                    f"{chosen[info.run_id].root} and {source.root}; keep it in one part"
                )
            chosen[info.run_id] = source
    if not chosen:
        raise StabilityBenchError("merge: the parts hold no finished run")
    return chosen


def _copy_part_run(source: RunStore, run_id: str, store: RunStore, run: Any, plan: Any) -> None:
    """One finished run of a part into the assembled audit folder: its tables (not its scores,
    which the fit writes again) and its run.json with `healthy` from the merged spec."""
    from stabilitybench.audit.spec import is_healthy
    from stabilitybench.findings.slim import write_compact

    src, dest = source.run_dir(run_id), store.run_dir(run_id)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for file in sorted(src.glob("*.parquet")):
        if file.name == "telemetry.parquet":  # every column, rounded as a part keeps it
            write_compact(dest / file.name, file, telemetry=True, refittable=True)
        elif file.name != "scores.parquet":
            shutil.copyfile(file, dest / file.name)
    info = read_json(src / "run.json")
    reference = plan.references.get(run.workload["name"]) if plan.references else None
    if reference is not None:
        info["healthy"] = is_healthy(run, reference)
    write_json(dest / "run.json", info)


def _describe_part(source: RunStore, chosen: dict[str, RunStore]) -> dict[str, Any]:
    """What version.json records of one part: where it was, what it gave and when it was made."""
    version = source.root / "version.json"
    recorded = read_json(version) if version.is_file() else {}
    return {
        "path": str(source.root),
        "runs": sum(1 for s in chosen.values() if s is source),
        "exported_at": recorded.get("exported_at"),
        "hosts": recorded.get("hosts"),
    }
