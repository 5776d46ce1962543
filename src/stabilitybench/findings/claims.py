"""The paper's three claims, judged per workload with CIs and a verdict (`stabilitybench findings`).

arXiv 2601.13160 claims that (1) high final performance is often decoupled from stability,
(2) controlled stochasticity buffers training, and (3) meta-state deviations precede collapse.
`audit_claims` reads an audit's typed summary, its early-warning evaluation and (for two facts
the summary does not hold) its store, and returns one `Claims` record; `claims_markdown` renders
it as the tables that `findings.md`, `stabilitybench findings` and the README show.

The verdict rules are fixed here, before any paper-scale run was looked at, and are the same on
every workload (`VERDICT_RULES` is what the JSON and the markdown quote):

1. Decoupling (`metrics.decoupling`, the rule `summary` reports too). Spearman rho between final
   performance and the stability measured before the final window, both ranked within each
   perturbation, with a percentile bootstrap 95% CI. Supported (decoupled) only on positive
   evidence: both quantities differ between the workload's conditions beyond seed noise
   (Kruskal–Wallis p < 0.05 each; otherwise inconclusive: nothing to decouple) and the CI's upper
   bound is below 0.5; not supported (coupled) when its lower bound is above 0.5; otherwise
   inconclusive. Fewer than 10 runs: inconclusive.
2. Buffering. For each swept stochasticity knob, a paired difference-in-differences: per seed,
   (perturbed − control) collapsed at the most stochastic level minus the same at the least,
   the control being the same-seed sham run (else the unperturbed run); its mean with a
   percentile bootstrap 95% CI over seeds. Supported when the CI's upper bound is below 0; not
   supported when its lower bound is above 0 (more collapses with more noise) or when it is at
   least −0.1 with a point estimate ≥ 0 (a buffering of more than 10 points is ruled out);
   otherwise inconclusive (fewer than 3 paired seeds: inconclusive). Not testable when the
   criterion flags more than 10% of the workload's sham and unperturbed runs, or when no (or
   every) perturbed run collapsed at both levels.
3. Early warning. The monitor (`msm`) under the prospective protocol of `monitor evaluate`.
   Supported when its step AUROC's CI lower bound is above 0.5 and it warns of at least half
   the collapses (event recall ≥ 0.5); not supported when the AUROC's CI upper bound is below
   0.6 or the Wilson CI of the recall lies below 0.5; otherwise inconclusive. Fewer than 3
   collapses: inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stabilitybench.evaluation.results import DetectorResult, Evaluation, WorkloadResult
from stabilitybench.metrics.conditions import number, number_pair
from stabilitybench.metrics.decoupling import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    WorkloadCorrelation,
)
from stabilitybench.metrics.guards import GuardComparison
from stabilitybench.metrics.intervals import (
    DEFAULT_REPS,
    iqm,
    stratified_bootstrap_ci,
    wilson_interval,
)
from stabilitybench.metrics.records import RunRecord

if TYPE_CHECKING:
    from stabilitybench.metrics.summary import AuditSummary
    from stabilitybench.store import RunStore


NOT_TESTABLE = "not testable"
MAX_FLAG_RATE = 0.10  # claim 2: above this sham/unperturbed flag rate the labels are not trusted
MIN_SEEDS = 3  # claim 2: seeds with both arms at both levels
SMALLEST_BUFFERING = 0.10  # claim 2: a buffering smaller than 10 points counts as none
MIN_COLLAPSES = 3  # claim 3: collapses with room for a warning
MAX_FA_RATIO = 2.0  # claim 3: held-out false alarms at most this many times the target

STOCHASTICITY_KNOBS = ("ent_coef", "action_noise", "target_policy_noise", "dropout", "grad_noise")
"""Knobs whose higher levels inject more noise into training: claim 2's axes. Other swept knobs
(a learning rate, a batch size) are recipes, shown in the robustness table but not judged."""

VERDICT_RULES = {
    "1": (
        "Spearman rho(final perf, stability before the final window), both ranked within each "
        "perturbation, bootstrap 95% CI: supported if both differ between conditions "
        "(Kruskal-Wallis p < 0.05) and CI high < 0.5, not supported if CI low > 0.5, else "
        "inconclusive (< 10 runs: inconclusive)"
    ),
    "2": (
        "paired difference-in-differences over seeds: (perturbed - same-seed sham) collapsed, "
        "most minus least stochastic level, bootstrap 95% CI over seeds: supported if CI high "
        "< 0; not supported if CI low > 0, or CI low >= -0.1 with the estimate >= 0; else "
        "inconclusive (< 3 seeds: inconclusive); not testable if the criterion flags > 10% of "
        "sham/unperturbed runs or no (every) perturbed run collapsed at both levels"
    ),
    "3": (
        "the monitor (msm), alarm episodes renewed every SOP, true if the collapse starts SPH to "
        "SPH + SOP steps later: supported if its event recall is above its chance 95th percentile "
        "(shifted alarms) and above the clock control (the best alarm schedule from the onset of "
        "the run's perturbation, matched per perturbation (not per dose) to its false-alarm rate "
        "on the runs of that perturbation that did not collapse; a perturbation none of whose runs "
        "escaped: the clock warns), its held-out false alarms are at most 2x the target and its "
        "median lead >= SPH; else not supported (< 3 collapses with room for a warning: "
        "inconclusive); not testable if the criterion flags > 10% of sham/unperturbed runs or no "
        "run of the perturbations that collapsed runs escaped collapse (no hard negative)"
    ),
}


@dataclass
class Verdict:
    """A claim's verdict on one workload and the figure that decided it."""

    verdict: str  # supported | not supported | inconclusive
    reason: str


@dataclass
class RecipeRow:
    """One recipe (a knob setting) of a workload, over all its perturbations."""

    knobs: dict[str, Any]
    n_runs: int
    final_perf_iqm: float | None
    final_perf_iqm_ci: list[float | None]
    stability_mean: float | None
    stability_mean_ci: list[float | None]
    collapse_rate: float | None  # of its perturbed runs


@dataclass
class DecouplingFinding:
    """Claim 1 on one workload."""

    workload: str
    n_runs: int
    rho: float | None  # within perturbation (the verdict's figure, as `summary` reports it)
    rho_ci: list[float | None]
    signal_p: float | None  # Kruskal–Wallis across conditions: is there anything to decouple
    best_scoring: dict[str, Any] | None  # the recipe with the highest final-perf IQM
    most_stable: dict[str, Any] | None  # the recipe with the highest mean stability score
    recipes: list[RecipeRow]
    verdict: Verdict


@dataclass
class LevelRow:
    """The perturbed runs at one level of a stochasticity knob."""

    value: Any
    order: float | None  # the number the levels are ordered by (see `StochasticityAxis`)
    n_runs: int
    n_collapsed: int
    collapse_rate: float | None
    collapse_rate_ci: list[float | None]
    n_recovered: int
    recovery_rate: float | None  # of its collapsed runs
    recovery_rate_ci: list[float | None]
    final_perf_iqm: float | None
    baseline_final_perf_iqm: float | None  # its unperturbed runs
    baseline_n_runs: int = 0
    baseline_n_collapsed: int = 0  # unperturbed runs the collapse criterion flagged anyway


@dataclass
class PerturbationRates:
    """Collapses per level of one knob under one perturbation (the per-perturbation view)."""

    perturbation: str
    name: str  # short: `lr_spike×10`, `lr_spike×30 ramp`
    n_collapsed: list[int]  # per level, in level order
    n_runs: list[int]


@dataclass
class BufferingFinding:
    """Claim 2 on one workload and one stochasticity knob."""

    workload: str
    knob: str
    least: Any  # the least stochastic level
    most: Any
    order_note: str
    levels: list[LevelRow]
    difference: float | None  # collapse rate, most − least (descriptive)
    difference_ci: list[float | None]
    # The verdict's figure: the paired difference-in-differences — per seed, (perturbed −
    # control) collapsed at the most stochastic level minus the same at the least — its mean,
    # bootstrap 95 % CI over seeds, the number of seeds, and the control arm used.
    excess_difference: float | None
    excess_difference_ci: list[float | None]
    n_seeds: int
    control: str | None
    per_perturbation: list[PerturbationRates]
    verdict: Verdict


@dataclass
class DetectorRow:
    """One detector's early-warning figures on one workload (from `monitor evaluate`)."""

    detector: str
    event_recall: float | None
    event_recall_ci: list[float | None]
    n_warned: int | None
    n_collapses: int  # with room for a warning: the recall's denominator
    n_no_lead_possible: int  # collapses that began less than SPH after their onset
    chance_recall: float | None
    chance_recall_p95: float | None
    clock_recall: float | None
    lead_time_median: float | None
    lead_time_iqr: list[float | None]
    false_alarms_per_1k: float | None
    false_alarms_per_1k_not_collapsed: float | None
    false_alarms_per_1k_collapsed: float | None
    false_alarms_per_1k_sham: float | None
    time_in_warning: float | None
    auroc: float | None
    auroc_ci: list[float | None]
    outcome_auroc: float | None
    outcome_auroc_doses: float | None = None  # between doses of one perturbation


@dataclass
class WarningFinding:
    """Claim 3 on one workload."""

    workload: str
    n_collapsed: int
    n_not_collapsed: int
    n_healthy: int
    detectors: list[DetectorRow]
    best_auroc: str | None  # the detector with the highest step AUROC
    verdict: Verdict


@dataclass
class RobustnessRow:
    """Per workload and perturbation: collapse rate per level of the first stochasticity knob."""

    workload: str
    perturbation: str
    name: str
    knob: str | None
    levels: list[Any]
    n_collapsed: list[int]
    n_runs: list[int]
    final_perf_iqm: list[float | None]
    most_robust: Any  # the level with the fewest collapses (ties: higher final perf)


@dataclass
class Throughput:
    """Steps per second of a workload's finished runs in this audit (telemetry on, evals in)."""

    workload: str
    unit: str  # env steps | optimizer steps
    n_runs: int
    median: float | None
    low: float | None  # the slowest run
    high: float | None


@dataclass
class Claims:
    """The three claims on every workload of one audit, and what they mean in practice."""

    audit: str
    horizon: int | None  # SOP, optimizer steps
    horizon_unit: str | None
    target_false_alarms_per_1k: float | None
    decoupling: list[DecouplingFinding]
    buffering: list[BufferingFinding]
    warning: list[WarningFinding]
    robustness: list[RobustnessRow]
    throughput: list[Throughput]
    # Guarded conditions beside the same condition unguarded (the summary's), when the audit
    # has a `guards:` axis: what a guard saved, in practice.
    guards: list[GuardComparison] = field(default_factory=list)
    perturbation_names: dict[str, str] = field(default_factory=dict)  # label → `lr_spike×30 ramp`
    rules: dict[str, str] = field(default_factory=lambda: dict(VERDICT_RULES))
    notes: list[str] = field(default_factory=list)
    sph: int | None = None  # the least useful lead of claim 3's protocol (the audit's)


# ---- pure helpers ---------------------------------------------------------------------------


def newcombe_difference(
    k_high: int, n_high: int, k_low: int, n_low: int
) -> tuple[float, tuple[float, float]]:
    """p_high − p_low and its Newcombe hybrid-score 95% interval (Newcombe 1998, method 10).

    (NaN, (NaN, NaN)) when either side has no runs.
    """
    if n_high == 0 or n_low == 0:
        nan = float("nan")
        return nan, (nan, nan)
    p_high, p_low = k_high / n_high, k_low / n_low
    l_high, u_high = wilson_interval(k_high, n_high)
    l_low, u_low = wilson_interval(k_low, n_low)
    diff = p_high - p_low
    low = diff - math.sqrt((p_high - l_high) ** 2 + (u_low - p_low) ** 2)
    high = diff + math.sqrt((u_high - p_high) ** 2 + (p_low - l_low) ** 2)
    return diff, (max(low, -1.0), min(high, 1.0))


def buffering_verdict(
    did: float | None,
    ci: Sequence[float | None],
    n_seeds: int,
    rates: tuple[float | None, float | None],
    flag_rate: float | None,
) -> Verdict:
    """Claim 2's rule (module docstring) on the paired difference-in-differences `did` (its CI,
    its seeds), the perturbed collapse rates at the (most, least) stochastic levels, and the
    criterion's flag rate on the workload's sham and unperturbed runs."""
    if flag_rate is not None and flag_rate > MAX_FLAG_RATE:
        return Verdict(
            NOT_TESTABLE,
            f"the collapse criterion flags {flag_rate:.0%} of the runs nothing harmful happened "
            f"to (above {MAX_FLAG_RATE:.0%})",
        )
    if rates[0] is not None and rates[0] == rates[1] and rates[0] in (0.0, 1.0):
        every = "no perturbed run" if rates[0] == 0.0 else "every perturbed run"
        return Verdict(NOT_TESTABLE, f"{every} collapsed at both levels: nothing to buffer")
    if did is None or ci[0] is None or ci[1] is None or n_seeds < MIN_SEEDS:
        return Verdict(
            INCONCLUSIVE, f"{n_seeds} seeds with both arms at both levels (need {MIN_SEEDS})"
        )
    text = (
        f"paired difference-in-differences {did:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}], {n_seeds} seeds"
    )
    if ci[1] < 0:
        return Verdict(SUPPORTED, f"{text}: fewer collapses with more stochasticity")
    if ci[0] > 0:
        return Verdict(NOT_SUPPORTED, f"{text}: more collapses with more stochasticity")
    if ci[0] >= -SMALLEST_BUFFERING and did >= 0:
        return Verdict(NOT_SUPPORTED, f"{text}: a buffering > 0.10 is ruled out")
    return Verdict(INCONCLUSIVE, f"{text}: CI spans 0")


def paired_did(
    runs: Sequence[RunRecord], axis: StochasticityAxis, rng: np.random.Generator, reps: int
) -> tuple[float | None, list[float | None], int, str | None]:
    """Claim 2's figure: per seed, (perturbed − control) collapsed at the most stochastic level
    minus the same at the least; mean, percentile bootstrap 95 % CI over seeds, seeds, control."""
    most, control = _excess_by_seed(runs, axis, axis.levels[-1])
    least, _ = _excess_by_seed(runs, axis, axis.levels[0])
    seeds = sorted(set(most) & set(least), key=str)
    if not seeds:
        return None, [None, None], 0, control
    diffs = np.array([most[s] - least[s] for s in seeds])
    draws = diffs[rng.integers(0, diffs.size, size=(reps, diffs.size))].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(diffs.mean()), [number(float(low)), number(float(high))], len(seeds), control


def _excess_by_seed(
    runs: Sequence[RunRecord], axis: StochasticityAxis, level: Any
) -> tuple[dict[Any, float], str | None]:
    """Per seed at one level: the perturbed runs' mean collapse minus the same-seed control's
    (the sham arm where there is one, else the unperturbed run); and which control."""
    at = [r for r in runs if json_value(r.knobs.get(axis.knob)) == level]
    shams = {r.seed: bool(r.collapsed) for r in at if r.perturbation_kind == "sham"}
    control = shams or {r.seed: bool(r.collapsed) for r in at if r.is_baseline}
    perturbed: dict[Any, list[float]] = {}
    for r in at:
        if not r.is_baseline and r.perturbation_kind != "sham":
            perturbed.setdefault(r.seed, []).append(float(bool(r.collapsed)))
    excess = {
        s: float(np.mean(v)) - float(control[s]) for s, v in perturbed.items() if s in control
    }
    return excess, ("sham" if shams else "none") if control else None


@dataclass(frozen=True)
class WarningRule:
    """What claim 3 is judged against on one workload."""

    target_false_alarms: float
    sph: int
    sham_flag_rate: float | None = None


def warning_verdict(msm: DetectorRow | None, rule: WarningRule) -> Verdict:
    """Claim 3's rule (`VERDICT_RULES["3"]`) on the monitor's row of one workload."""
    if rule.sham_flag_rate is not None and rule.sham_flag_rate > MAX_FLAG_RATE:
        return Verdict(
            NOT_TESTABLE,
            f"the criterion flags {rule.sham_flag_rate:.0%} of sham/unperturbed runs",
        )
    if msm is None or (msm.event_recall is None and msm.false_alarms_per_1k is None):
        return Verdict(INCONCLUSIVE, "the monitor was not evaluated on this workload")
    if msm.n_collapses < MIN_COLLAPSES or msm.event_recall is None:
        late = (
            f"; {msm.n_no_lead_possible} began less than SPH = {rule.sph} steps after their onset"
            if msm.n_no_lead_possible
            else ""
        )
        return Verdict(
            INCONCLUSIVE,
            f"{msm.n_collapses} collapses left room for a warning (need {MIN_COLLAPSES}){late}",
        )
    if msm.clock_recall is None:
        return Verdict(
            NOT_TESTABLE,
            "no run of the perturbations that collapsed runs escaped collapse (the sham arm "
            "aside): no hard negative to tell a warning of collapse from a reaction to the "
            "perturbation",
        )
    text = (
        f"recall {msm.event_recall:.2f} ({msm.n_warned}/{msm.n_collapses}), chance p95 "
        f"{_f(msm.chance_recall_p95)}, clock {_f(msm.clock_recall)}, FA/1k "
        f"{_f(msm.false_alarms_per_1k)} (target {rule.target_false_alarms:g}), lead "
        f"{_f(msm.lead_time_median, 0)} (SPH {rule.sph})"
    )
    fa = msm.false_alarms_per_1k
    failed = [
        what
        for what, ok in (
            ("not above chance", msm.event_recall > (msm.chance_recall_p95 or 0.0)),
            ("not above the clock", msm.event_recall > msm.clock_recall),
            (
                f"FA above {MAX_FA_RATIO:g}x the target",
                fa is not None and fa <= MAX_FA_RATIO * rule.target_false_alarms,
            ),
            ("lead below SPH", (msm.lead_time_median or -1.0) >= rule.sph),
        )
        if not ok
    ]
    if not failed:
        return Verdict(SUPPORTED, text)
    return Verdict(NOT_SUPPORTED, f"{text}: {', '.join(failed)}")


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ---- from an audit ----------------------------------------------------------------------------


def _judged(records: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.done and r.guard == "none" and r.collapsed is not None]


def _perf(records: Sequence[RunRecord]) -> np.ndarray:
    values = [r.final_perf for r in records if r.final_perf is not None]
    arr = np.asarray(values, dtype=float)
    return arr[~np.isnan(arr)]


def _iqm(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return number(iqm(finite)) if finite.size else None


def _iqm_ci(
    values: np.ndarray, rng: np.random.Generator, reps: int
) -> tuple[float | None, list[float | None]]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, [None, None]
    low, high = stratified_bootstrap_ci(finite, rng=rng, reps=reps)
    return number(iqm(finite)), [number(low), number(high)]


def _decoupling(
    workload: str,
    runs: Sequence[RunRecord],
    found: WorkloadCorrelation,
    rng: np.random.Generator,
    reps: int,
) -> DecouplingFinding:
    """Claim 1 on one workload: the summary's rho and verdict (one rule for both), and the
    recipes it compares."""
    recipes = []
    for key in dict.fromkeys(r.knobs_key for r in runs):
        members = [r for r in runs if r.knobs_key == key]
        perf_iqm, perf_ci = _iqm_ci(_perf(members), rng, reps)
        scores = np.array(
            [r.stability_before_final for r in members if r.stability_before_final is not None]
        )
        if scores.size:
            s_low, s_high = stratified_bootstrap_ci(scores, np.mean, rng=rng, reps=reps)
            s_mean, s_ci = number(float(scores.mean())), [number(s_low), number(s_high)]
        else:
            s_mean, s_ci = None, [None, None]
        perturbed = [r for r in members if not r.is_baseline]
        judged = [r for r in perturbed if r.collapsed is not None]
        rate = sum(bool(r.collapsed) for r in judged) / len(judged) if judged else None
        recipes.append(
            RecipeRow(dict(members[0].knobs), len(members), perf_iqm, perf_ci, s_mean, s_ci, rate)
        )
    by_perf = [r for r in recipes if r.final_perf_iqm is not None]
    by_score = [r for r in recipes if r.stability_mean is not None]
    return DecouplingFinding(
        workload=workload,
        n_runs=found.n,
        rho=found.rho,
        rho_ci=list(found.ci),
        signal_p=found.signal_p,
        best_scoring=max(by_perf, key=lambda r: r.final_perf_iqm or 0.0).knobs if by_perf else None,
        most_stable=max(by_score, key=lambda r: r.stability_mean or 0.0).knobs
        if by_score
        else None,
        recipes=recipes,
        verdict=Verdict(found.verdict, found.reason),
    )


@dataclass(frozen=True)
class StochasticityAxis:
    """A swept knob of a workload and its levels, least stochastic first.

    Numbers order themselves (a higher entropy bonus, exploration noise, dropout or gradient
    noise is more stochastic). SAC's `ent_coef: auto` (a learned temperature) is placed by the
    mean temperature its runs actually used, read from the telemetry's `ent_coef` column.
    """

    knob: str
    levels: tuple[Any, ...]
    orders: tuple[float | None, ...]
    note: str


def _learned_temperature(store: RunStore | None, runs: Sequence[RunRecord]) -> float | None:
    if store is None:
        return None
    means = []
    for r in runs:
        frame = store.table(r.run_id, "telemetry", columns=["ent_coef"])
        if "ent_coef" in frame.columns:
            values = np.asarray(frame["ent_coef"], dtype=float)
            values = values[np.isfinite(values)]
            if values.size:
                means.append(float(values.mean()))
    return float(np.mean(means)) if means else None


def stochasticity_axes(
    runs: Sequence[RunRecord], store: RunStore | None = None, *, stochastic_only: bool = True
) -> list[StochasticityAxis]:
    """The swept knobs of one workload's runs (those with ≥ 2 values), levels ordered; only
    `STOCHASTICITY_KNOBS` unless `stochastic_only` is False."""
    axes = []
    names = sorted({k for r in runs for k in r.knobs})
    if stochastic_only:
        names = [k for k in names if k in STOCHASTICITY_KNOBS]
    for knob in names:
        values = list(dict.fromkeys(json_value(r.knobs.get(knob)) for r in runs))
        if len(values) < 2:
            continue
        orders: dict[Any, float | None] = {}
        notes = []
        for value in values:
            if isinstance(value, int | float) and not isinstance(value, bool):
                orders[value] = float(value)
            elif isinstance(value, str) and value.startswith("auto"):
                members = [r for r in runs if json_value(r.knobs.get(knob)) == value]
                learned = _learned_temperature(store, members)
                orders[value] = learned
                if learned is not None:
                    notes.append(f"{knob}={value} used a mean temperature of {learned:.3g}")
            else:
                orders[value] = None
        if any(o is None for o in orders.values()):
            notes.append(f"the levels of {knob} have no known order; listed as swept")
            ordered = values
        else:
            ordered = sorted(values, key=lambda v: orders[v] or 0.0)
        axes.append(
            StochasticityAxis(
                knob, tuple(ordered), tuple(orders[v] for v in ordered), "; ".join(notes)
            )
        )
    return axes


def short_name(run: RunRecord) -> str:
    """A perturbation in a table cell: `weight_noise×0.5`, `lr_spike×30 ramp`."""
    from stabilitybench.metrics.summary_printing import short_perturbation

    name = short_perturbation(run.perturbation_kind, run.magnitude)
    return f"{name} ramp" if "ramp=" in run.perturbation else name


def json_value(value: Any) -> Any:
    """A knob value as a hashable JSON scalar (lists → tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _level_row(
    axis: StochasticityAxis,
    index: int,
    runs: Sequence[RunRecord],
    rng: np.random.Generator,
    reps: int,
) -> LevelRow:
    value = axis.levels[index]
    at_level = [r for r in runs if json_value(r.knobs.get(axis.knob)) == value]
    perturbed = [r for r in at_level if not r.is_baseline and r.perturbation_kind != "sham"]
    baseline = [r for r in at_level if r.is_baseline]
    k = sum(bool(r.collapsed) for r in perturbed)
    collapsed = [r for r in perturbed if r.collapsed]
    recovered = sum(1 for r in collapsed if r.collapse is not None and not r.collapse.irreversible)
    low, high = wilson_interval(k, len(perturbed))
    r_low, r_high = wilson_interval(recovered, len(collapsed))
    perf_iqm, base_iqm = _iqm(_perf(perturbed)), _iqm(_perf(baseline))
    return LevelRow(
        value=value,
        order=axis.orders[index],
        n_runs=len(perturbed),
        n_collapsed=k,
        collapse_rate=k / len(perturbed) if perturbed else None,
        collapse_rate_ci=[number(low), number(high)],
        n_recovered=recovered,
        recovery_rate=recovered / len(collapsed) if collapsed else None,
        recovery_rate_ci=[number(r_low), number(r_high)],
        final_perf_iqm=perf_iqm,
        baseline_final_perf_iqm=base_iqm,
        baseline_n_runs=len(baseline),
        baseline_n_collapsed=sum(bool(r.collapsed) for r in baseline),
    )


def _buffering(
    workload: str,
    axis: StochasticityAxis,
    runs: Sequence[RunRecord],
    flag_rate: float | None,
    rng: np.random.Generator,
    reps: int,
) -> BufferingFinding:
    levels = [_level_row(axis, i, runs, rng, reps) for i in range(len(axis.levels))]
    least, most = levels[0], levels[-1]
    per_perturbation = []
    for label in dict.fromkeys(
        r.perturbation for r in runs if not r.is_baseline and r.perturbation_kind != "sham"
    ):
        members = [r for r in runs if r.perturbation == label]
        per_level = [
            [r for r in members if json_value(r.knobs.get(axis.knob)) == v] for v in axis.levels
        ]
        per_perturbation.append(
            PerturbationRates(
                label,
                short_name(members[0]),
                [sum(bool(r.collapsed) for r in g) for g in per_level],
                [len(g) for g in per_level],
            )
        )
    diff, (low, high) = newcombe_difference(
        most.n_collapsed, most.n_runs, least.n_collapsed, least.n_runs
    )
    did, did_ci, n_seeds, control = paired_did(runs, axis, rng, reps)
    rates = (most.collapse_rate, least.collapse_rate)
    verdict = buffering_verdict(did, did_ci, n_seeds, rates, flag_rate)
    if None in axis.orders:
        verdict = Verdict(INCONCLUSIVE, f"{verdict.reason}; {axis.note}")
    return BufferingFinding(
        workload=workload,
        knob=axis.knob,
        least=least.value,
        most=most.value,
        order_note=axis.note,
        levels=levels,
        difference=number(diff),
        difference_ci=[number(low), number(high)],
        excess_difference=did,
        excess_difference_ci=did_ci,
        n_seeds=n_seeds,
        control=control,
        per_perturbation=per_perturbation,
        verdict=verdict,
    )


def _detector_row(name: str, result: DetectorResult) -> DetectorRow:
    recall, n = number(result.event_recall), result.n_collapses
    warned = round(recall * n) if recall is not None else None
    low, high = wilson_interval(warned, n) if warned is not None and n else (None, None)
    return DetectorRow(
        detector=name,
        event_recall=recall,
        event_recall_ci=[number(low), number(high)],
        n_warned=warned,
        n_collapses=n,
        n_no_lead_possible=result.n_no_lead_possible,
        chance_recall=number(result.chance_recall),
        chance_recall_p95=number(result.chance_recall_p95),
        clock_recall=number(result.clock_recall),
        lead_time_median=number(result.lead_time_median),
        lead_time_iqr=number_pair(result.lead_time_iqr),
        false_alarms_per_1k=number(result.false_alarms_per_1k),
        false_alarms_per_1k_not_collapsed=number(result.false_alarms_per_1k_not_collapsed),
        false_alarms_per_1k_collapsed=number(result.false_alarms_per_1k_collapsed),
        false_alarms_per_1k_sham=number(result.false_alarms_per_1k_sham),
        time_in_warning=number(result.time_in_warning),
        auroc=number(result.auroc),
        auroc_ci=number_pair(result.auroc_ci),
        outcome_auroc=number(result.outcome_auroc),
        outcome_auroc_doses=number(result.outcome_auroc_doses),
    )


def _warning(workload: str, entry: WorkloadResult, flag_rate: float | None) -> WarningFinding:
    n_collapsed = entry.n_collapsed
    rows = [_detector_row(name, result) for name, result in entry.detectors.items()]
    scored = [r for r in rows if r.auroc is not None]
    best = max(scored, key=lambda r: r.auroc or 0.0).detector if scored else None
    msm = next((r for r in rows if r.detector == "msm"), None)
    return WarningFinding(
        workload=workload,
        n_collapsed=n_collapsed,
        n_not_collapsed=entry.n_not_collapsed,
        n_healthy=entry.n_healthy,
        detectors=rows,
        best_auroc=best,
        verdict=warning_verdict(
            msm,
            WarningRule(
                target_false_alarms=entry.target_false_alarms_per_1k or 1.0,
                sph=entry.sph if entry.sph is not None else 0,
                sham_flag_rate=flag_rate,
            ),
        ),
    )


def _robustness(
    workload: str,
    axis: StochasticityAxis | None,
    runs: Sequence[RunRecord],
    rng: np.random.Generator,
) -> list[RobustnessRow]:
    out = []
    levels: list[Any] = list(axis.levels) if axis is not None else [None]
    for label in dict.fromkeys(r.perturbation for r in runs if not r.is_baseline):
        members = [r for r in runs if r.perturbation == label]
        groups = [
            [r for r in members if axis is None or json_value(r.knobs.get(axis.knob)) == v]
            for v in levels
        ]
        collapsed = [sum(bool(r.collapsed) for r in g) for g in groups]
        perf = [_iqm(_perf(g)) for g in groups]
        # fewest collapses, then the best final perf, among the levels that ran
        ranks = {
            i: (collapsed[i] / len(g), -(p if p is not None else -math.inf))
            for i, (g, p) in enumerate(zip(groups, perf, strict=True))
            if g
        }
        best = min(ranks, key=ranks.__getitem__)
        out.append(
            RobustnessRow(
                workload=workload,
                perturbation=label,
                name=short_name(members[0]),
                knob=axis.knob if axis is not None else None,
                levels=levels,
                n_collapsed=collapsed,
                n_runs=[len(g) for g in groups],
                final_perf_iqm=perf,
                most_robust=levels[best],
            )
        )
    return out


def _throughput(workload: str, runs: Sequence[RunRecord], store: RunStore | None) -> Throughput:
    unit = "env steps" if any(r.kind == "rl" for r in runs) else "optimizer steps"
    rates = []
    for r in runs:
        if store is None or r.timing.wall_s is None or r.timing.wall_s <= 0:
            continue
        # total_steps is not on the record
        steps = (store.info(r.run_id).spec.get("workload") or {}).get("total_steps")
        if steps:
            rates.append(float(steps) / r.timing.wall_s)
    arr = np.asarray(rates)
    return Throughput(
        workload,
        unit,
        int(arr.size),
        number(float(np.median(arr))) if arr.size else None,
        number(float(arr.min())) if arr.size else None,
        number(float(arr.max())) if arr.size else None,
    )


def audit_claims(
    summary: AuditSummary,
    evaluation: Evaluation | None,
    store: RunStore | None = None,
    *,
    reps: int = DEFAULT_REPS,
    seed: int = 0,
) -> Claims:
    """The three claims per workload; `evaluation`: the early-warning evaluation (or None)."""
    rng = np.random.default_rng(seed)
    judged = _judged(summary.runs)
    claims = Claims(
        audit=summary.audit.name,
        horizon=None if evaluation is None else evaluation.horizon,
        horizon_unit=None if evaluation is None else evaluation.protocol.horizon_unit,
        sph=None if evaluation is None else evaluation.protocol.sph,
        target_false_alarms_per_1k=None
        if evaluation is None
        else evaluation.target_false_alarms_per_1k,
        decoupling=[],
        buffering=[],
        warning=[],
        robustness=[],
        throughput=[],
        guards=list(summary.guards),
        perturbation_names={r.perturbation: short_name(r) for r in summary.runs}
        if summary.guards
        else {},
    )
    left_out = sum(1 for r in summary.runs if r.done and r.guard != "none")
    if left_out:
        claims.notes.append(f"{left_out} guarded runs are left out of claims 1 and 2")
    found = {w.workload: w for w in summary.decoupling.per_workload}
    flags = {f.workload: f.sham_flag_rate for f in summary.false_positives}
    for workload in dict.fromkeys(r.workload for r in judged):
        runs = [r for r in judged if r.workload == workload]
        if workload in found:
            unguarded = [
                r for r in summary.runs if r.workload == workload and r.done and r.guard == "none"
            ]
            claims.decoupling.append(_decoupling(workload, unguarded, found[workload], rng, reps))
        axes = stochasticity_axes(runs, store)
        for axis in axes:
            claims.buffering.append(
                _buffering(workload, axis, runs, flags.get(workload), rng, reps)
            )
        if not axes:
            claims.notes.append(f"{workload}: no stochasticity knob is swept; claim 2 not judged")
        recipe_axes = axes or stochasticity_axes(runs, store, stochastic_only=False)
        claims.robustness += _robustness(
            workload, recipe_axes[0] if recipe_axes else None, runs, rng
        )
        done = [r for r in summary.runs if r.workload == workload and r.done]
        claims.throughput.append(_throughput(workload, done, store))
    for workload, entry in (evaluation.workloads if evaluation is not None else {}).items():
        claims.warning.append(_warning(workload, entry, flags.get(workload)))
    if evaluation is None:
        claims.notes.append("no early-warning evaluation: claim 3 is not judged")
    return claims
