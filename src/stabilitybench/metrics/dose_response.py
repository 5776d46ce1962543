"""Collapse rate against a perturbation's magnitude and against each swept knob (finding 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from stabilitybench.metrics.records import RunRecord
from stabilitybench.metrics.stability import DosePoint, collapse_rate_by


@dataclass
class MagnitudeResponse:
    """Collapse rate per magnitude of one perturbation kind on one workload."""

    workload: str
    perturbation_kind: str
    baseline_collapse_rate: float | None
    points: list[DosePoint]


@dataclass
class KnobResponse:
    """Collapse rate under perturbation per value of one swept numeric knob."""

    workload: str
    knob: str
    points: list[DosePoint]


@dataclass
class DoseResponse:
    magnitude: list[MagnitudeResponse] = field(default_factory=list)
    knobs: list[KnobResponse] = field(default_factory=list)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _magnitude(workload: str, group: Sequence[RunRecord]) -> list[MagnitudeResponse]:
    baseline = [r for r in group if r.is_baseline]
    rate = sum(bool(r.collapsed) for r in baseline) / len(baseline) if baseline else None
    kinds = dict.fromkeys(
        r.perturbation_kind for r in group if not r.is_baseline and "+" not in r.perturbation_kind
    )
    out = []
    for kind in kinds:
        members = [r for r in group if r.perturbation_kind == kind and r.magnitude is not None]
        if members:
            points = collapse_rate_by(
                [float(r.magnitude or 0) for r in members], [r.collapsed for r in members]
            )
            out.append(MagnitudeResponse(workload, kind, rate, points))
    return out


def _knobs(workload: str, group: Sequence[RunRecord]) -> list[KnobResponse]:
    perturbed = [r for r in group if not r.is_baseline]
    out = []
    for name in sorted({k for r in perturbed for k in r.knobs}):
        numeric = [r.knobs.get(name) for r in perturbed if _is_number(r.knobs.get(name))]
        if len(set(numeric)) < 2:
            continue  # a fixed knob has no dose-response
        members = [r for r in perturbed if _is_number(r.knobs.get(name))]
        points = collapse_rate_by([r.knobs[name] for r in members], [r.collapsed for r in members])
        out.append(KnobResponse(workload, name, points))
    return out


def dose_response(records: Sequence[RunRecord]) -> DoseResponse:
    """Over finished, judged runs, per workload in order of appearance."""
    done = [r for r in records if r.done and r.collapsed is not None]
    result = DoseResponse()
    for workload in dict.fromkeys(r.workload for r in done):
        group = [r for r in done if r.workload == workload]
        result.magnitude += _magnitude(workload, group)
        result.knobs += _knobs(workload, group)
    return result
