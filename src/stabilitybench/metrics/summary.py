"""The audit summary: per-run stability metrics, per-condition aggregates with CIs, decoupling.

`summarize(store)` reads only the store and returns the `summary --json` document (every field
is documented in docs/readme/metrics.md); `print_summary` renders it as tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics import reliability as rel
from stabilitybench.metrics.collapse import (
    DEFAULT_PRE_EVALS,
    DEFAULT_RECOVERY,
    DEFAULT_THRESHOLD,
    analyze_collapse,
    final_performance,
)
from stabilitybench.metrics.intervals import (
    DEFAULT_REPS,
    iqm,
    probability_of_improvement,
    stratified_bootstrap_ci,
    wilson_interval,
)
from stabilitybench.metrics.stability import (
    collapse_rate_by,
    decoupling,
    stability_score,
    within_group_rank,
)
from stabilitybench.store import RunStore

SEED = 0  # the bootstrap's seed: the same store always gives the same summary
# Parameter names that carry a perturbation's size, in order of preference.
MAGNITUDE_KEYS = (
    "factor",
    "scale",
    "sigma",
    "std",
    "fraction",
    "magnitude",
    "strength",
    "prob",
    "probability",
    "rate",
    "noise",
    "shift",
    "amount",
)
NOT_MAGNITUDE = {"at", "duration", "seed", "every", "period", "start", "end"}


# -- helpers ---------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Replace NaN/±inf by None and numpy scalars by Python ones, recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def _perturbation(info: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(label, kind, params) of a run's perturbation; the baseline is ('none', 'none', {})."""
    pert = info.get("perturbation") or {"kind": "none"}
    kind = str(pert.get("kind", "none"))
    label = str(pert.get("label") or kind)
    params = dict(pert.get("params") or {})
    return label, kind, params


def perturbation_magnitude(params: Mapping[str, Any]) -> float | None:
    """The numeric size of a perturbation (factor, scale, sigma, fraction, …), or None."""
    for key in MAGNITUDE_KEYS:
        value = params.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    for key, value in params.items():
        if (
            key not in NOT_MAGNITUDE
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            return float(value)
    return None


def collapse_config(store: RunStore, infos: list[dict[str, Any]]) -> dict[str, float]:
    """Thresholds from audit.json's spec.collapse, else a run's spec.collapse, else defaults."""
    config: Mapping[str, Any] = {}
    audit = store.audit()
    spec = audit.get("spec") if isinstance(audit.get("spec"), Mapping) else {}
    if isinstance(spec, Mapping) and isinstance(spec.get("collapse"), Mapping):
        config = spec["collapse"]
    else:
        for info in infos:
            run_spec = info.get("spec") or {}
            if isinstance(run_spec.get("collapse"), Mapping):
                config = run_spec["collapse"]
                break
    threshold = float(config.get("threshold", DEFAULT_THRESHOLD))
    recovery = float(config.get("recovery", DEFAULT_RECOVERY))
    pre_evals = int(config.get("pre_evals", config.get("k", DEFAULT_PRE_EVALS)))
    if not 0 < threshold <= recovery:
        raise StabilityBenchError(
            f"collapse.threshold must be in (0, collapse.recovery], got threshold={threshold}, "
            f"recovery={recovery}"
        )
    if pre_evals < 1:
        raise StabilityBenchError(f"collapse.pre_evals must be >= 1, got {pre_evals}")
    return {"threshold": threshold, "recovery": recovery, "pre_evals": pre_evals}


def _onset(events: pd.DataFrame) -> tuple[int | None, int | None]:
    """(start_step, start_env_step) of the earliest perturbation window."""
    if events is None or events.empty or "start_step" not in events:
        return None, None
    starts = pd.to_numeric(events["start_step"], errors="coerce").to_numpy(dtype=float)
    if np.all(np.isnan(starts)):
        return None, None
    i = int(np.nanargmin(starts))
    env = float("nan")
    if "start_env_step" in events:
        env = pd.to_numeric(events["start_env_step"], errors="coerce").to_numpy(dtype=float)[i]
    return int(starts[i]), None if np.isnan(env) else int(env)


def _knobs_key(knobs: Mapping[str, Any]) -> str:
    return json.dumps(dict(knobs), sort_keys=True, default=str)


def _eval_arrays(evals: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(steps, perf, env_steps or None) sorted by step; perf None → NaN."""
    if evals is None or evals.empty or "perf" not in evals or "step" not in evals:
        return np.array([]), np.array([]), None
    frame = evals.sort_values("step", kind="stable")
    steps = pd.to_numeric(frame["step"], errors="coerce").to_numpy(dtype=float)
    perf = pd.to_numeric(frame["perf"], errors="coerce").to_numpy(dtype=float)
    env = None
    if "env_step" in frame and frame["env_step"].notna().any():
        env = pd.to_numeric(frame["env_step"], errors="coerce").to_numpy(dtype=float)
    return steps, perf, env


def _within_run_reliability(perf: np.ndarray) -> dict[str, float]:
    """Chan et al.'s within-run metrics on the finite part of the curve, in curve ranges."""
    curve = rel.finite_prefix(perf)
    nan = float("nan")
    if curve.size < 2:
        return {"dispersion_across_time": nan, "short_term_risk": nan, "long_term_risk": nan}
    span = abs(rel.curve_range(curve))
    if not span > 1e-12:
        return {"dispersion_across_time": nan, "short_term_risk": nan, "long_term_risk": nan}
    normalised = curve / span
    return {
        "dispersion_across_time": rel.dispersion_across_time(normalised),
        "short_term_risk": rel.short_term_risk(normalised),
        "long_term_risk": rel.long_term_risk(normalised),
    }


# -- per run ---------------------------------------------------------------------------------
def _run_record(
    info: Mapping[str, Any],
    evals: pd.DataFrame | None,
    onset: tuple[int | None, int | None],
    onset_source: str | None,
    config: Mapping[str, float],
) -> dict[str, Any]:
    label, kind, params = _perturbation(info)
    record: dict[str, Any] = {
        "run_id": info.get("run_id"),
        "label": info.get("label"),
        "workload": info.get("workload"),
        "kind": info.get("kind"),
        "knobs": dict(info.get("knobs") or {}),
        "perturbation": label,
        "perturbation_kind": kind,
        "magnitude": perturbation_magnitude(params),
        "seed": info.get("seed"),
        "status": info.get("status", "pending"),
        "collapsed": None,
        "irreversible": None,
        "diverged": None,
        "onset_step": onset[0],
        "onset_source": onset_source,
        "collapse_step": None,
        "collapse_env_steps": None,
        "recovery_steps": None,
        "recovery_env_steps": None,
        "progress_undefined": None,
        "perf_0": None,
        "perf_pre": None,
        "min_progress": None,
        "final_perf": None,
        "n_evals": 0,
        "n_missing_evals": 0,
        "dispersion_across_time": None,
        "short_term_risk": None,
        "long_term_risk": None,
        "stability_score": None,
        "error": None,
    }
    if record["status"] == "failed":
        lines = str(info.get("error") or "").strip().splitlines()
        record["error"] = lines[-1] if lines else "unknown error"
    if record["status"] != "done" or evals is None:
        return record
    steps, perf, env = _eval_arrays(evals)
    record["n_evals"] = int(steps.size)
    if steps.size == 0:
        record["n_missing_evals"] = 0
        return record
    result = analyze_collapse(
        steps,
        perf,
        onset[0],
        env_steps=env,
        onset_env_step=onset[1],
        threshold=config["threshold"],
        recovery=config["recovery"],
        k=int(config["pre_evals"]),
    )
    reliability = _within_run_reliability(perf)
    steps_after = None
    if result.collapsed and result.onset_step is not None and result.collapse_step is not None:
        steps_after = int(np.nanmax(steps) - (result.onset_step + result.collapse_step))
    record.update(
        collapsed=result.collapsed,
        irreversible=result.irreversible,
        diverged=result.diverged,
        collapse_step=result.collapse_step,
        collapse_env_steps=result.collapse_env_steps,
        recovery_steps=result.recovery_steps,
        recovery_env_steps=result.recovery_env_steps,
        progress_undefined=result.progress_undefined,
        perf_0=result.perf_0,
        perf_pre=result.perf_pre,
        min_progress=result.min_progress,
        final_perf=final_performance(perf),
        n_missing_evals=result.n_missing_evals,
        stability_score=stability_score(
            result.collapsed,
            result.irreversible,
            result.recovery_steps,
            steps_after,
            reliability["dispersion_across_time"],
        ),
        **reliability,
    )
    return record


def _baseline_onsets(
    infos: list[dict[str, Any]], onsets: dict[str, tuple[int | None, int | None]]
) -> dict[str, tuple[tuple[int | None, int | None], str | None]]:
    """Onset for each baseline run: earliest among matched perturbed runs (workload, knobs, seed),
    else among perturbed runs of the same workload and knobs, else of the same workload."""
    by_match: dict[tuple[Any, ...], list[tuple[int, int | None]]] = {}
    for info in infos:
        onset = onsets.get(str(info.get("run_id")))
        if onset is None or onset[0] is None:
            continue
        workload, knobs = info.get("workload"), _knobs_key(info.get("knobs") or {})
        for key in ((workload, knobs, info.get("seed")), (workload, knobs), (workload,)):
            by_match.setdefault(key, []).append((onset[0], onset[1]))
    out: dict[str, tuple[tuple[int | None, int | None], str | None]] = {}
    for info in infos:
        if _perturbation(info)[1] != "none":
            continue
        workload, knobs = info.get("workload"), _knobs_key(info.get("knobs") or {})
        keys = (
            ((workload, knobs, info.get("seed")), "matched_seed"),
            ((workload, knobs), "matched_knobs"),
            ((workload,), "matched_workload"),
        )
        chosen: tuple[tuple[int | None, int | None], str | None] = ((None, None), None)
        for key, source in keys:
            if by_match.get(key):
                chosen = (min(by_match[key], key=lambda o: o[0]), source)
                break
        out[str(info.get("run_id"))] = chosen
    return out


# -- per condition ---------------------------------------------------------------------------
def _across_runs(
    curves: list[tuple[np.ndarray, np.ndarray]], final: list[float]
) -> dict[str, float]:
    """Dispersion across runs (on the evaluation steps every run reached) and risk across runs."""
    nan = float("nan")
    finals = np.array([f for f in final if f is not None and math.isfinite(f)])
    risk = rel.risk_across_runs(finals) if finals.size else nan
    if len(curves) < 2:
        return {"dispersion_across_runs": nan, "risk_across_runs": risk}
    common: set[float] | None = None
    for steps, perf in curves:
        ok = set(steps[np.isfinite(perf)].tolist())
        common = ok if common is None else common & ok
    grid = sorted(common or ())
    if len(grid) < 2:
        return {"dispersion_across_runs": nan, "risk_across_runs": risk}
    matrix = np.array([[perf[steps == g][0] for g in grid] for steps, perf in curves])
    ranges = np.array([abs(rel.curve_range(row)) for row in matrix])
    scale = float(np.median(ranges))
    if not scale > 1e-12:
        return {"dispersion_across_runs": nan, "risk_across_runs": risk}
    dispersion = rel.dispersion_across_runs(matrix / scale)
    return {"dispersion_across_runs": float(np.mean(dispersion)), "risk_across_runs": risk}


def _condition(
    key: tuple[Any, str, str],
    runs: list[dict[str, Any]],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    baseline_finals: list[float] | None,
    rng: np.random.Generator,
    reps: int,
) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "done"]
    judged = [r for r in done if r["collapsed"] is not None]
    collapsed = [r for r in judged if r["collapsed"]]
    recovered = [r for r in collapsed if not r["irreversible"]]
    finals_all = [
        r["final_perf"]
        for r in done
        if r["final_perf"] is not None and not math.isnan(r["final_perf"])
    ]
    finals = np.array([f for f in finals_all if math.isfinite(f)])
    perf_iqm = iqm(finals) if finals.size else float("nan")
    perf_ci = (
        stratified_bootstrap_ci(finals, iqm, rng=rng, reps=reps)
        if finals.size
        else (float("nan"),) * 2
    )
    rate = len(collapsed) / len(judged) if judged else float("nan")
    improvement = float("nan")
    if baseline_finals and finals_all:
        improvement = probability_of_improvement(np.array(finals_all), np.array(baseline_finals))
    first = runs[0]
    return {
        "workload": key[0],
        "knobs": dict(first["knobs"]),
        "perturbation": key[2],
        "perturbation_kind": first["perturbation_kind"],
        "magnitude": first["magnitude"],
        "n_runs": len(done),
        "n_failed": sum(r["status"] == "failed" for r in runs),
        "n_unfinished": sum(r["status"] in ("pending", "running") for r in runs),
        "n_judged": len(judged),
        "n_collapsed": len(collapsed),
        "collapse_rate": rate,
        "collapse_rate_ci": list(wilson_interval(len(collapsed), len(judged))),
        "median_collapse_steps": _median([r["collapse_step"] for r in collapsed]),
        "median_collapse_env_steps": _median([r["collapse_env_steps"] for r in collapsed]),
        "recovery_rate": len(recovered) / len(collapsed) if collapsed else float("nan"),
        "median_recovery_steps": _median([r["recovery_steps"] for r in recovered]),
        "irreversible_rate": (len(collapsed) - len(recovered)) / len(judged)
        if judged
        else float("nan"),
        "n_diverged": sum(bool(r["diverged"]) for r in done),
        "final_perf_iqm": perf_iqm,
        "final_perf_iqm_ci": list(perf_ci),
        "n_final_perf_nonfinite": len(finals_all) - int(finals.size),
        "prob_improvement_vs_baseline": improvement,
        "stability_score_median": _median([r["stability_score"] for r in done]),
        "dispersion_across_time": _median([r["dispersion_across_time"] for r in done]),
        "short_term_risk": _median([r["short_term_risk"] for r in done]),
        "long_term_risk": _median([r["long_term_risk"] for r in done]),
        **_across_runs([curves[r["run_id"]] for r in done if r["run_id"] in curves], finals_all),
    }


# -- audit level -----------------------------------------------------------------------------
def _decoupling(runs: list[dict[str, Any]], rng: np.random.Generator, reps: int) -> dict[str, Any]:
    usable = [
        r
        for r in runs
        if r["status"] == "done"
        and r["final_perf"] is not None
        and r["stability_score"] is not None
        and not math.isnan(r["final_perf"])
    ]
    per_workload = []
    for workload in dict.fromkeys(r["workload"] for r in usable):
        group = [r for r in usable if r["workload"] == workload]
        result = decoupling(
            [r["final_perf"] for r in group],
            [r["stability_score"] for r in group],
            rng=rng,
            reps=reps,
        )
        per_workload.append({"workload": workload, **result})
    pooled_perf = within_group_rank(
        [r["final_perf"] for r in usable], [str(r["workload"]) for r in usable]
    )
    pooled = decoupling(pooled_perf, [r["stability_score"] for r in usable], rng=rng, reps=reps)
    return {
        "method": "spearman(final_perf, stability_score), percentile bootstrap 95% CI; pooled uses "
        "final_perf ranked within each workload",
        "per_workload": per_workload,
        "pooled": pooled,
    }


def _dose_response(runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r["status"] == "done" and r["collapsed"] is not None]
    magnitude = []
    for workload in dict.fromkeys(r["workload"] for r in done):
        group = [r for r in done if r["workload"] == workload]
        kinds = dict.fromkeys(
            r["perturbation_kind"]
            for r in group
            if r["perturbation_kind"] != "none" and "+" not in r["perturbation_kind"]
        )
        baseline = [r for r in group if r["perturbation_kind"] == "none"]
        baseline_rate = (
            sum(bool(r["collapsed"]) for r in baseline) / len(baseline)
            if baseline
            else float("nan")
        )
        for kind in kinds:
            members = [
                r for r in group if r["perturbation_kind"] == kind and r["magnitude"] is not None
            ]
            if members:
                magnitude.append(
                    {
                        "workload": workload,
                        "perturbation_kind": kind,
                        "baseline_collapse_rate": baseline_rate,
                        "points": collapse_rate_by(
                            [r["magnitude"] for r in members], [r["collapsed"] for r in members]
                        ),
                    }
                )
    knobs = []
    for workload in dict.fromkeys(r["workload"] for r in done):
        perturbed = [
            r for r in done if r["workload"] == workload and r["perturbation_kind"] != "none"
        ]
        names = sorted({k for r in perturbed for k in r["knobs"]})
        for name in names:
            values = [r["knobs"].get(name) for r in perturbed]
            numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if len(set(numeric)) < 2:
                continue  # a fixed knob has no dose-response
            members = [
                r
                for r in perturbed
                if isinstance(r["knobs"].get(name), int | float)
                and not isinstance(r["knobs"].get(name), bool)
            ]
            knobs.append(
                {
                    "workload": workload,
                    "knob": name,
                    "points": collapse_rate_by(
                        [r["knobs"][name] for r in members], [r["collapsed"] for r in members]
                    ),
                }
            )
    return {"magnitude": magnitude, "knobs": knobs}


def summarize(store: RunStore, *, reps: int = DEFAULT_REPS, seed: int = SEED) -> dict[str, Any]:
    """The `summary --json` document: {"audit", "conditions", "runs", "decoupling", "dose_response"}.

    Failed and unfinished runs are listed but excluded from every aggregate. NaN and ±inf become
    None (JSON null). Raises StabilityBenchError for an audit without runs or without finished runs.
    """
    infos = store.infos()
    name = store.audit().get("name", store.root.name)
    if not infos:
        raise StabilityBenchError(
            f"audit {store.root} has no runs yet; start them with "
            f"`stabilitybench audit SPEC --out {store.root}`"
        )
    counts = store.status_counts()
    if not any(i.get("status") == "done" for i in infos):
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        raise StabilityBenchError(
            f"audit {store.root} has no finished runs ({detail}); resume it with "
            f"`stabilitybench audit SPEC --out {store.root}`, and see failures with "
            f"`stabilitybench status {store.root}`"
        )
    config = collapse_config(store, infos)
    rng = np.random.default_rng(seed)

    done_ids = [str(i["run_id"]) for i in infos if i.get("status") == "done"]
    evals = {rid: store.table(rid, "evals") for rid in done_ids}
    onsets = {
        str(i["run_id"]): _onset(store.table(str(i["run_id"]), "events"))
        for i in infos
        if i.get("status") == "done" and _perturbation(i)[1] != "none"
    }
    baseline_onsets = _baseline_onsets([i for i in infos if i.get("status") == "done"], onsets)

    runs = []
    for info in infos:
        rid = str(info.get("run_id"))
        if rid in baseline_onsets:
            onset, source = baseline_onsets[rid]
        else:
            onset = onsets.get(rid, (None, None))
            source = "events" if onset[0] is not None else None
        runs.append(_run_record(info, evals.get(rid), onset, source, config))

    curves = {}
    for rid, frame in evals.items():
        steps, perf, _ = _eval_arrays(frame)
        curves[rid] = (steps, perf)

    groups: dict[tuple[Any, str, str], list[dict[str, Any]]] = {}
    for record in runs:
        key = (record["workload"], _knobs_key(record["knobs"]), record["perturbation"])
        groups.setdefault(key, []).append(record)
    conditions = []
    for key, members in groups.items():
        baseline = groups.get((key[0], key[1], "none"))
        baseline_finals = None
        if baseline and key[2] != "none":
            baseline_finals = [
                r["final_perf"]
                for r in baseline
                if r["status"] == "done"
                and r["final_perf"] is not None
                and not math.isnan(r["final_perf"])
            ]
        conditions.append(_condition(key, members, curves, baseline_finals, rng, reps))

    notes = []
    failed = [r for r in runs if r["status"] == "failed"]
    unfinished = [r for r in runs if r["status"] in ("pending", "running")]
    if failed:
        notes.append(f"{len(failed)} failed run(s) are listed but excluded from every aggregate")
    if unfinished:
        notes.append(
            f"{len(unfinished)} unfinished run(s) (pending/running) are excluded; resume the audit to include them"
        )
    missing = sum(r["n_missing_evals"] for r in runs)
    if missing:
        notes.append(f"{missing} NaN evaluation(s) were treated as missing and skipped")
    undefined = sum(bool(r["progress_undefined"]) and r["onset_step"] is not None for r in runs)
    if undefined:
        notes.append(
            f"{undefined} run(s) did not learn before onset: collapse judged on the relative scale"
        )
    unjudged = sum(r["status"] == "done" and r["collapsed"] is None for r in runs)
    if unjudged:
        notes.append(
            f"{unjudged} finished run(s) have no perturbation onset to judge collapse against"
        )

    audit = {
        "name": name,
        "path": str(store.root),
        "n_runs": len(runs),
        "status_counts": counts,
        "n_done": len(done_ids),
        "n_failed": len(failed),
        "n_unfinished": len(unfinished),
        "collapse": config,
        "bootstrap_reps": reps,
        "confidence": 0.95,
        "seed": seed,
        "notes": notes,
    }
    document = {
        "audit": audit,
        "conditions": conditions,
        "runs": runs,
        "decoupling": _decoupling(runs, rng, reps),
        "dose_response": _dose_response(runs),
    }
    result: dict[str, Any] = jsonable(document)
    return result


# -- display ---------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_ci(point: Any, ci: Any) -> str:
    if point is None:
        return "–"
    if not ci or ci[0] is None or ci[1] is None:
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _knobs_text(knobs: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "–"


def _short_perturbation(record: Mapping[str, Any]) -> str:
    """`none`, or the kind with its magnitude: `lr_spike×50`."""
    kind = str(record.get("perturbation_kind", "none"))
    magnitude = record.get("magnitude")
    if kind == "none" or magnitude is None:
        return kind
    return f"{kind}×{magnitude:g}"


def print_summary(result: Mapping[str, Any], console: Any) -> None:
    """Render a `summarize` document as rich tables: conditions, runs, decoupling, notes."""
    from rich.table import Table

    audit = result["audit"]
    table = Table(
        title=f"audit {audit['name']}: {audit['n_done']} finished of {audit['n_runs']} runs",
        caption="rates/IQM with 95% CIs; stability = median per-run score; disp./risk: Chan et al.",
    )
    for column in (
        "workload",
        "knobs",
        "perturbation",
        "runs",
        "collapse rate",
        "median collapse step",
        "recovery rate",
        "final perf IQM",
        "stability",
        "disp. time",
        "disp. runs",
        "risk runs",
    ):
        table.add_column(column, overflow="fold")
    for c in result["conditions"]:
        table.add_row(
            str(c["workload"]),
            _knobs_text(c["knobs"]),
            _short_perturbation(c),
            f"{c['n_runs']}" + (f" (+{c['n_failed']} failed)" if c["n_failed"] else ""),
            _fmt_ci(c["collapse_rate"], c["collapse_rate_ci"]),
            _fmt(c["median_collapse_steps"]),
            _fmt(c["recovery_rate"]),
            _fmt_ci(c["final_perf_iqm"], c["final_perf_iqm_ci"]),
            _fmt(c["stability_score_median"]),
            _fmt(c["dispersion_across_time"]),
            _fmt(c["dispersion_across_runs"]),
            _fmt(c["risk_across_runs"]),
        )
    console.print(table)

    runs = Table(title="runs")
    for column in (
        "run",
        "condition",
        "seed",
        "status",
        "collapse step",
        "recovery steps",
        "final perf",
        "stability",
    ):
        runs.add_column(column, overflow="fold")
    for r in result["runs"]:
        if r["status"] == "failed":
            status = f"[red]failed[/]: {r['error']}"
        elif r["collapsed"] is None:
            status = r["status"]
        elif r["collapsed"]:
            status = "[red]irreversible[/]" if r["irreversible"] else "[yellow]recovered[/]"
        else:
            status = "[green]stable[/]"
        condition = f"{r['workload']}[{_knobs_text(r['knobs'])}] {_short_perturbation(r)}"
        runs.add_row(
            str(r["run_id"])[:8],
            condition,
            _fmt(r["seed"]),
            status,
            _fmt(r["collapse_step"]),
            _fmt(r["recovery_steps"]),
            _fmt(r["final_perf"]),
            _fmt(r["stability_score"]),
        )
    console.print(runs)

    for item in result["decoupling"]["per_workload"]:
        console.print(
            f"decoupling {item['workload']}: rho={_fmt_ci(item['rho'], item['ci'])} "
            f"(n={item['n']}) → {item['verdict']}",
            highlight=False,
        )
    pooled = result["decoupling"]["pooled"]
    console.print(
        f"decoupling pooled: rho={_fmt_ci(pooled['rho'], pooled['ci'])} (n={pooled['n']}) "
        f"→ {pooled['verdict']}",
        highlight=False,
    )
    for note in audit["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
