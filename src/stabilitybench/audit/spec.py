"""Audit specs: the YAML a user writes, validated by pydantic, expanded into RunSpecs."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from stabilitybench.errors import StabilityBenchError, validation_message
from stabilitybench.settings import CollapseSettings, WarningSettings
from stabilitybench.types import RunSpec
from stabilitybench.workloads.config import (  # the workload models, also read from here
    BUILTIN_SPECS,
    EVAL_KEYS,
    CustomWorkloadSpec,
    EvalSpec,
    SpecModel,
    WorkloadSpec,
    check_label,
    label_problem,
    workload_spec,
)
from stabilitybench.workloads.config import MAX_LABEL_CHARS as MAX_LABEL_CHARS
from stabilitybench.workloads.config import LMWorkloadSpec as LMWorkloadSpec
from stabilitybench.workloads.config import RLWorkloadSpec as RLWorkloadSpec
from stabilitybench.workloads.config import ToyWorkloadSpec as ToyWorkloadSpec

Scalar = int | float | str | bool | None


class AuditSpec(SpecModel):
    """A whole audit: workloads × knob levels × perturbations × seeds."""

    name: str = Field(min_length=1)
    workloads: list[dict[str, Any]] = Field(min_length=1)
    perturbations: list[Any] = Field(default_factory=lambda: ["none"], min_length=1)
    seeds: list[int] | int = Field(default_factory=lambda: [0])
    eval: EvalSpec | None = None
    collapse: CollapseSettings = Field(default_factory=CollapseSettings)
    warning: WarningSettings | None = None
    # Optional grid axis: `none` (unguarded) or {detector, action, ...} (see stabilitybench.guard).
    guards: list[Any] | None = Field(default=None, min_length=1)
    # Execution only (not part of the spec's hash): RL runs that differ only in perturbations
    # train their common prefix once and fork where they part (see `share_prefix_groups`).
    share_prefix: bool = False

    _name_is_label = field_validator("name")(check_label)

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, seeds: list[int] | int) -> list[int]:
        values = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if not values:
            raise ValueError("give at least one seed (a list such as [0, 1, 2], or a count >= 1)")
        if any(seed < 0 for seed in values):
            raise ValueError(f"seeds must be integers >= 0, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"seeds repeat: {values}")
        return values


# ---- loading ---------------------------------------------------------------------------------


def parse_yaml(text: str, source: str = "spec") -> dict[str, Any]:
    """Parse YAML into a mapping; a syntax error names the line."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StabilityBenchError(f"{source}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise StabilityBenchError(
            f"{source}: an audit spec must be a YAML mapping with keys name, workloads, "
            f"perturbations, seeds; got {type(data).__name__}"
        )
    return data


def load_spec(path: str | Path, *, unfitted: list[str] | None = None) -> AuditSpec:
    """Read and validate an audit spec file.

    A guard's monitor that is not fitted yet is an error, unless `unfitted` is given (a dry
    run): then its message is appended there and validation goes on.
    """
    path = Path(path)
    if not path.is_file():
        raise StabilityBenchError(f"{path}: no such spec file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StabilityBenchError(f"{path}: cannot read the spec file: {exc.strerror}") from None
    data = parse_yaml(decode_spec(raw, str(path)), source=str(path))
    return validate_spec(data, unfitted=unfitted)


def decode_spec(raw: bytes, source: str = "spec") -> str:
    """A spec file's text; anything but UTF-8 is one clear error naming where it breaks."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StabilityBenchError(
            f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, "
            f"byte offset {exc.start}); save the spec as UTF-8"
        ) from None


def validate_spec(data: dict[str, Any], *, unfitted: list[str] | None = None) -> AuditSpec:
    """Validate a spec mapping (top level, each workload by kind, each perturbation); see
    `load_spec` for `unfitted`."""
    try:
        spec = AuditSpec.model_validate(data)
    except ValidationError as exc:
        raise StabilityBenchError(validation_message(exc)) from None
    seen: set[str] = set()
    workloads: list[WorkloadSpec] = []
    for index, raw in enumerate(spec.workloads):
        try:
            workload = _workload_model(raw, index).model_validate(raw)
        except ValidationError as exc:
            raise StabilityBenchError(validation_message(exc, ("workloads", index))) from None
        if workload.name in seen:
            raise StabilityBenchError(f"workloads[{index}].name: {workload.name!r} is used twice")
        seen.add(workload.name)
        _check_reference(workload, index)
        workloads.append(workload)
    _check_eval_every(spec, workloads)
    _check_warning(spec, workloads)
    _perturbation_lists(spec.perturbations)
    for index, workload in enumerate(workloads):
        if workload.perturbations is not None:
            _perturbation_lists(workload.perturbations, f"workloads[{index}].perturbations")
    _check_guards(spec, workloads, unfitted)
    return spec


def workload_specs(spec: AuditSpec) -> list[WorkloadSpec]:
    """The workloads of a validated spec, each as its kind's model (in the spec's order)."""
    return [_workload_model(w, i).model_validate(w) for i, w in enumerate(spec.workloads)]


def _guards(items: list[Any] | None, where: str = "guards") -> list[dict[str, Any] | None]:
    """A `guards:` list (the audit's or one workload's) as run guard dicts, checked (None =
    unguarded); `[None]` without one."""
    if items is None:
        return [None]
    from stabilitybench.guard.config import guard_configs

    guard_configs(list(items), where)  # checks every entry (raises naming where[i].field)
    out: list[dict[str, Any] | None] = []
    for item in items:
        if item == "none" or item is None:
            out.append(None)
        else:
            rest = {k: v for k, v in item.items() if k not in ("detector", "action")}
            out.append({"detector": item["detector"], "action": item["action"], **rest})
    return out


def _check_guards(
    spec: AuditSpec, workloads: list[WorkloadSpec], unfitted: list[str] | None = None
) -> None:
    """Each guard is valid and every workload it runs on can host it (the audit's `guards:` on
    the workloads without their own); a monitor folder that is not fitted yet goes to
    `unfitted` when that is a list, and is an error otherwise."""
    from stabilitybench.guard.config import (
        check_monitor_folder,
        check_monitor_kind,
        check_workload,
        parse_guard,
    )

    axes: list[tuple[str, list[Any], list[WorkloadSpec]]] = []
    if spec.guards is not None:
        axes.append(("guards", spec.guards, [w for w in workloads if w.guards is None]))
    for index, workload in enumerate(workloads):
        if workload.guards is not None:
            axes.append((f"workloads[{index}].guards", workload.guards, [workload]))
    for where, items, hosts in axes:
        for index, guard in enumerate(_guards(items, where)):
            if guard is None:
                continue
            here = f"{where}[{index}]"
            config = parse_guard(guard, here)
            try:
                check_monitor_folder(config, here)
            except StabilityBenchError as exc:
                if unfitted is None:
                    raise
                unfitted.append(str(exc))
            for workload in hosts:
                check_workload(config, workload.kind, here)
                check_monitor_kind(config, workload.kind, workload.name, here)


def _check_eval_every(spec: AuditSpec, workloads: list[WorkloadSpec]) -> None:
    """An `eval.every` the user gave that exceeds `total_steps` would judge nothing."""
    top = spec.eval.every if spec.eval is not None else None
    for index, workload in enumerate(workloads):
        own = workload.eval.every if workload.eval is not None else None
        every, where = (
            (own, f"workloads[{index}].eval.every") if own is not None else (top, "eval.every")
        )
        total = workload.total_steps
        if every is not None and every > total:
            raise StabilityBenchError(
                f"{where}: {every} is larger than total_steps ({total}) of workload "
                f"{workload.name!r}; no evaluation would happen during the run, so collapse "
                f"could not be judged; use an eval.every of at most {total}"
            )


def _check_warning(spec: AuditSpec, workloads: list[WorkloadSpec]) -> None:
    """Each workload's warning settings (its own over the audit's) must keep a calibrated
    detector out of warning most of the time (`WarningSettings.check`)."""
    top = spec.warning or WarningSettings()
    for index, workload in enumerate(workloads):
        if workload.warning is None:
            top.check("warning")
        else:
            top.over(workload.warning).check(f"workloads[{index}].warning")


def _check_reference(workload: WorkloadSpec, index: int) -> None:
    """Every `reference` knob must be a swept knob of this workload, at one of its swept values."""
    reference, knobs = workload.reference, workload.knobs
    if reference is None:
        return
    swept = [k for k, v in knobs.items() if isinstance(v, list)]
    allowed = ", ".join(swept) if swept else "none (this workload sweeps no knob)"
    for key, value in reference.items():
        where = f"workloads[{index}].reference.{key}"
        if key not in knobs:
            raise StabilityBenchError(
                f"{where}: {key!r} is not a knob of this workload; reference names swept knobs: "
                f"{allowed}"
            )
        if key not in swept:
            raise StabilityBenchError(
                f"{where}: knob {key!r} is not swept (it is {knobs[key]!r} in every run); "
                f"reference names swept knobs: {allowed}"
            )
        if not any(same_value(value, v) for v in knobs[key]):
            raise StabilityBenchError(
                f"{where}: {value!r} is not one of the swept values {knobs[key]!r}"
            )


def reference_knobs(workload: WorkloadSpec) -> dict[str, Any]:
    """The healthy knob levels of a workload: its `reference`, else the first value of every
    swept knob (a workload that sweeps nothing: {} — every unperturbed run is healthy)."""
    first = {k: v[0] for k, v in workload.knobs.items() if isinstance(v, list)}
    explicit = workload.reference
    return {**first, **explicit} if explicit else first


def references(spec: AuditSpec) -> dict[str, dict[str, Any]]:
    """Workload name → its healthy knob levels (what audit.json stores as `references`)."""
    return {w.name: reference_knobs(w) for w in workload_specs(spec)}


def is_healthy(run: RunSpec, reference: dict[str, Any]) -> bool:
    """A healthy run: perturbation `none` and the workload's reference knob levels."""
    knobs = workload_spec(run.workload).knobs
    return (
        not run.perturbations
        and run.guard is None
        and all(k in knobs and same_value(knobs[k], v) for k, v in reference.items())
    )


def same_value(a: Any, b: Any) -> bool:
    """Knob values are equal: numbers by value (1 == 1.0), but true is not 1 and "1" is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _workload_model(workload: Any, index: int) -> type[WorkloadSpec]:
    if not isinstance(workload, dict):
        raise StabilityBenchError(f"workloads[{index}]: must be a mapping with name, kind, …")
    kind = workload.get("kind")
    if kind is None:
        raise StabilityBenchError(f"workloads[{index}].kind: is required")
    if kind in BUILTIN_SPECS:
        return BUILTIN_SPECS[kind]
    from stabilitybench.workloads.base import workload_kinds

    kinds = workload_kinds()
    if kind not in kinds:
        allowed = sorted(set(kinds) | set(BUILTIN_SPECS))
        raise StabilityBenchError(
            f"workloads[{index}].kind: unknown workload kind {kind!r}; allowed: {', '.join(allowed)}"
        )
    return CustomWorkloadSpec


def _perturbation_lists(
    items: list[Any], prefix: str = "perturbations"
) -> list[tuple[dict[str, Any], ...]]:
    """Each item of a `perturbations` list (the audit's or one workload's) as a tuple of configs
    (empty for `none`), checked by `build`."""
    result: list[tuple[dict[str, Any], ...]] = []
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]"
        if item == "none" or item is None:
            group: tuple[dict[str, Any], ...] = ()
        elif isinstance(item, dict):
            group = (item,)
        elif isinstance(item, list) and item and all(isinstance(p, dict) for p in item):
            group = tuple(item)
        else:
            raise StabilityBenchError(
                f"{where}: must be `none`, a mapping such as {{kind: lr_spike, at: 0.3, factor: 10}}, "
                f"or a list of such mappings (applied together); got {item!r}"
            )
        for sub, config in enumerate(group):
            sub_where = where if len(group) == 1 else f"{where}[{sub}]"
            _check_perturbation(config, sub_where)
        if group in result:
            raise StabilityBenchError(f"{where}: repeats {prefix}[{result.index(group)}]")
        result.append(group)
    return result


def _check_perturbation(config: dict[str, Any], where: str) -> None:
    if "kind" not in config:
        raise StabilityBenchError(f"{where}.kind: is required (e.g. kind: lr_spike)")
    label = config.get("label")
    if label is not None:
        problem = "must be text" if not isinstance(label, str) else label_problem(label)
        if problem is not None:
            raise StabilityBenchError(f"{where}.label: {problem}")
    from stabilitybench.perturbations import build

    try:
        build(dict(config))
    except StabilityBenchError as exc:
        raise StabilityBenchError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise StabilityBenchError(f"{where}: {exc}") from None


# ---- expansion -------------------------------------------------------------------------------


# workload keys that are not part of a run's own config
NOT_RUN_KEYS = ("reference", "warning", "perturbations", "guards")


def resolved_workloads(spec: AuditSpec) -> list[dict[str, Any]]:
    """Each workload config with its eval settings resolved (its own > the top-level `eval`);
    what is still unset is left to the workload's own defaults."""
    top = spec.eval.model_dump(exclude_none=True) if spec.eval else {}
    out = []
    for model in workload_specs(spec):
        config = model.model_dump(exclude_none=True)
        if model.warning is not None:  # what it sets, so the audit's `warning` fills the rest
            config["warning"] = model.warning.model_dump(include=model.warning.model_fields_set)
        if model.perturbations is not None:  # its own axes, in the audit's resolved form
            config["perturbations"] = [list(g) for g in _perturbation_lists(model.perturbations)]
        if model.guards is not None:
            config["guards"] = ["none" if g is None else g for g in _guards(model.guards)]
        keys = EVAL_KEYS.get(model.kind, ("every", "batches"))
        own = model.eval.model_dump(exclude_none=True) if model.eval is not None else {}
        merged = {**top, **own}
        config["eval"] = {k: merged[k] for k in keys if k in merged}
        config.setdefault("knobs", {})
        out.append(config)
    return out


def resolved_spec(spec: AuditSpec) -> dict[str, Any]:
    """The whole spec with every default filled in (what audit.json stores and hashes)."""
    resolved = {
        "name": spec.name,
        "workloads": resolved_workloads(spec),
        "perturbations": [list(g) for g in _perturbation_lists(spec.perturbations)],
        "seeds": list(spec.seeds),  # type: ignore[arg-type]
        "collapse": spec.collapse.recorded(),
    }
    if spec.warning is not None:  # only where given, like a workload's own `warning`
        resolved["warning"] = spec.warning.model_dump(include=spec.warning.model_fields_set)
    if spec.guards is not None:  # only where given: specs without guards hash as before
        resolved["guards"] = ["none" if g is None else g for g in _guards(spec.guards)]
    return resolved


def spec_hash(spec: AuditSpec) -> str:
    """A stable hash of the resolved spec: same spec, same hash."""
    payload = json.dumps(resolved_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def expand(spec: AuditSpec) -> list[RunSpec]:
    """The grid, in a stable order: workload → knob levels → perturbation → guard → seed."""
    runs: list[RunSpec] = []
    collapse = spec.collapse.recorded()
    audit_perturbations, audit_guards = (
        _perturbation_lists(spec.perturbations),
        _guards(spec.guards),
    )
    for config in resolved_workloads(spec):
        perturbations = (
            [tuple(g) for g in config["perturbations"]]
            if "perturbations" in config
            else audit_perturbations
        )
        guards = _guards(config["guards"]) if "guards" in config else audit_guards
        # how runs are judged, and where the grid's axes were listed, are not part of a run:
        # its id stays the same whatever they say
        config = {k: v for k, v in config.items() if k not in NOT_RUN_KEYS}
        knobs: dict[str, Any] = config["knobs"]
        axes = [v if isinstance(v, list) else [v] for v in knobs.values()]
        for levels in itertools.product(*axes):
            workload = {**config, "knobs": dict(zip(knobs, levels, strict=True))}
            for group in perturbations:
                for guard in guards:
                    for seed in spec.seeds:  # type: ignore[union-attr]
                        runs.append(
                            RunSpec(
                                workload=workload,
                                perturbations=group,
                                seed=seed,
                                audit=spec.name,
                                collapse=collapse,
                                guard=guard,
                            )
                        )
    return runs


def check_runs(spec: AuditSpec, runs: list[RunSpec]) -> None:
    """Ask each workload whether it can host each run (knob ranges, perturbation adapters)."""
    from stabilitybench.workloads.base import build_workload

    index_by_name = {w["name"]: i for i, w in enumerate(spec.workloads)}
    checked: set[tuple[str, str]] = set()
    for run in runs:
        key = (
            json.dumps(run.workload, sort_keys=True),
            json.dumps(run.perturbations, sort_keys=True),
        )
        if key in checked:
            continue  # seeds do not change what a workload can host
        checked.add(key)
        index = index_by_name.get(run.workload["name"], 0)
        try:
            build_workload(run.workload).validate(run)
        except StabilityBenchError as exc:
            message = str(exc).removeprefix(f"workload {run.workload['name']!r}: ")
            raise StabilityBenchError(
                f"workloads[{index}] ({run.workload['name']}): {message}"
            ) from None
