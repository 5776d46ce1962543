"""Finding 1: is final performance decoupled from training stability? (per workload, pooled)"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stabilitybench.metrics.records import RunRecord
from stabilitybench.metrics.stability import Correlation, decoupling, within_group_rank

METHOD = (
    "spearman(final_perf, stability_score), percentile bootstrap 95% CI; pooled uses "
    "final_perf ranked within each workload"
)


@dataclass
class WorkloadCorrelation(Correlation):
    """The decoupling correlation of one workload's runs."""

    workload: str = ""


@dataclass
class Decoupling:
    """Spearman rho between final performance and stability score, per workload and pooled."""

    pooled: Correlation
    per_workload: list[WorkloadCorrelation] = field(default_factory=list)
    method: str = METHOD


def audit_decoupling(
    records: Sequence[RunRecord], rng: np.random.Generator, reps: int
) -> Decoupling:
    """Finished runs with a final performance and a stability score; NaN performance left out."""
    usable = [
        (r.workload, r.final_perf, r.stability_score)
        for r in records
        if r.done
        and r.final_perf is not None
        and r.stability_score is not None
        and not math.isnan(r.final_perf)
    ]
    per_workload = []
    for workload in dict.fromkeys(w for w, _, _ in usable):
        perf = [p for w, p, _ in usable if w == workload]
        score = [s for w, _, s in usable if w == workload]
        result = decoupling(perf, score, rng=rng, reps=reps)
        per_workload.append(WorkloadCorrelation(**vars(result), workload=workload))
    pooled_perf = within_group_rank([p for _, p, _ in usable], [w for w, _, _ in usable])
    pooled = decoupling(pooled_perf, [s for _, _, s in usable], rng=rng, reps=reps)
    return Decoupling(pooled, per_workload)
