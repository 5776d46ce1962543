"""One analysis pipeline: run records → summary → early-warning evaluation → findings.

`audit`, `export`, `findings` and `report` all call `analyse`, so each fact is computed once
(the run records are read and judged once; the evaluation reuses them) and the four verbs can
never disagree about the same audit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stabilitybench.errors import StabilityBenchError

if TYPE_CHECKING:
    from stabilitybench.evaluation.results import Evaluation
    from stabilitybench.findings.claims import Claims
    from stabilitybench.metrics.summary import AuditSummary
    from stabilitybench.store import RunStore

EvaluationMode = Literal["saved", "fresh", "rejudge", "fit"]
"""`saved`: read `monitor/evaluation.json` if there is one; `fresh`: evaluate the fitted
detectors now (and save it); `rejudge`: the same, but an audit that cannot be evaluated (no
perturbed runs) leaves claim 3 out with the reason instead of failing; `fit`: like `rejudge`,
fitting the detectors first if they are not."""


@dataclass
class Analysis:
    """Everything the verbs report about one audit, each part made once."""

    summary: AuditSummary
    evaluation: Evaluation | None
    claims: Claims
    notes: list[str] = field(default_factory=list)  # why a part is missing


def analyse(
    store: RunStore,
    *,
    evaluation: EvaluationMode = "saved",
    target_false_alarms: float | None = None,
    horizon: int | None = None,
    sph: int | None = None,
    console: Any = None,
) -> Analysis:
    """Analyse the audit in `store`. A user error in the summary or a fresh evaluation raises
    `StabilityBenchError`; a saved evaluation that cannot be read is a note (claim 3 is then
    not judged). `target_false_alarms`, `horizon` and `sph` override the spec's `warning` settings."""
    from stabilitybench.evaluation.fitting import fit_audit, needs_fit
    from stabilitybench.evaluation.results import evaluation_path, load_evaluation
    from stabilitybench.findings.claims import audit_claims
    from stabilitybench.metrics.summary import summarize

    summary = summarize(store)
    notes: list[str] = []
    result: Evaluation | None = None
    not_judged: str | None = None  # why claim 3 is left out, when an evaluation could not be made
    if evaluation == "fit" and needs_fit(store):
        fit_audit(store, console=console)
    if evaluation in ("fresh", "rejudge", "fit"):
        from stabilitybench.evaluation.evaluate import evaluate_audit

        try:
            result = evaluate_audit(
                store, target_false_alarms, horizon, sph=sph, records=summary.runs
            )  # also saved under monitor/
        except StabilityBenchError as exc:
            if evaluation == "fresh":
                raise
            # `fit`, `rejudge` (export, findings): the rest is judged; claim 3 says why not.
            not_judged = f"claim 3 is not judged: {exc}"
            notes.append(not_judged)
    elif evaluation_path(store.root).exists():
        try:
            result = load_evaluation(store.root)
        except StabilityBenchError as exc:
            notes.append(str(exc))
    claims = audit_claims(summary, result, store)
    if result is None:
        claims.notes.append(
            not_judged
            or f"claim 3 needs `stabilitybench monitor fit {store.root}` then "
            f"`monitor evaluate {store.root}`"
        )
    return Analysis(summary, result, claims, notes)
