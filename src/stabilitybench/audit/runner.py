"""Runs an audit: validate the spec, prepare the folder, execute what is not done, report."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stabilitybench.audit.backends import Backend, RunResult, RunTask, make_backend
from stabilitybench.audit.lock import LOCK_FILE, AuditLock
from stabilitybench.audit.spec import (
    AuditSpec,
    check_runs,
    expand,
    is_healthy,
    load_spec,
    references,
    resolved_spec,
    same_value,
    spec_hash,
)
from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import PerturbationInfo, RunInfo, RunStore
from stabilitybench.types import RunSpec, RunStatus
from stabilitybench.workloads.config import (
    EvalSpec,
    LMWorkloadSpec,
    RLWorkloadSpec,
    ToyWorkloadSpec,
    workload_spec,
)

PROCESS_OVERHEAD_S = 1.0  # a fresh worker process, imports, writing the run's files
RL_ENV_STEPS_PER_S = {  # SAC/TD3: only a fallback, see estimate_run_seconds
    "ppo": 1000.0,
    "sac": 100.0,
    "td3": 120.0,
}  # CartPole-v1 PPO: 1,000 (measured)
LM_SECONDS_PER_STEP = {"tiny": 0.18, "small": 1.05, "gpt2-124m": 6.0}
"""Seconds per optimizer step at batch 16 x block 128 (tiny, small: measured on one core)."""
LM_REFERENCE_TOKENS = 16 * 128
LM_FIXED_SHARE = (
    0.03  # the share of a step's cost that does not shrink with fewer tokens (measured)
)
OFF_POLICY_ENV_S = 0.0015  # SAC/TD3: env step + action, per env step (HalfCheetah, measured)
OFF_POLICY_UPDATE_S = {  # one gradient step with telemetry on it: fixed + per sample of the batch
    "sac": (0.0036, 0.000029),  # 7.3 ms at batch 128 (SB3's 256 x 256 networks)
    "td3": (0.008, 0.0000625),  # 16 ms at batch 128 (SB3's 400 x 300 networks)
}
"""Fitted to the paper audits' runs on HalfCheetah-v5, two at a time on 2 cores: TD3 (batch 128,
one gradient step every 2 env steps, 50k env steps) took a median 489 s a run, SAC (batch 128,
one per env step, 60k) 520 s, after their env steps, evaluations and the `learning_starts` env
steps without updates. The estimate said 296 s and 703 s before."""
EVAL_STEPS_PER_S = 1250.0
"""An evaluation episode's env steps per second (SB3 `evaluate_policy` of a TD3 or SAC policy on
HalfCheetah-v5, beside a two-run audit on 2 cores: measured)."""
LM_VOCAB_SECONDS = 2.8e-8
"""Seconds per token, per vocabulary entry beyond the 256 bytes and per 128 of `n_embd`, a step
(the embedding and output layer): the tiny GPT-2 at 16 x 64 tokens trained 400 steps in 43.7 s
on bytes and 64.6 s on 2,048 BPE tokens, two runs at a time on 2 cores (measured)."""
LM_PROBE_SHARE = 0.09
"""`probes: stability` (the build-up probes, every 10 steps): 47.5 s instead of 43.7 s and 69.3 s
instead of 64.6 s in the same measurement."""
TOY_SECONDS_PER_STEP = 0.001


@dataclass
class AuditPlan:
    """A validated audit, ready to run: its runs and the state of its folder."""

    spec: AuditSpec
    runs: list[RunSpec]
    out: Path
    spec_hash: str
    statuses: dict[str, str] = field(default_factory=dict)  # run_id → status, for an existing audit
    references: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload → healthy knobs
    unfitted: list[str] = field(default_factory=list)  # dry run: guards' monitors not fitted yet
    only: dict[str, list[Any]] = field(default_factory=dict)  # `--only`: the slice to run

    @property
    def unfinished(self) -> list[RunSpec]:
        """The runs not done, in the slice or not."""
        return [r for r in self.runs if self.statuses.get(r.run_id) != RunStatus.DONE.value]

    @property
    def todo(self) -> list[RunSpec]:
        """The runs to run now: those not done, in the `--only` slice."""
        return [r for r in self.unfinished if in_slice(r, self.only)]

    @property
    def outside(self) -> int:
        """How many of the spec's runs `--only` leaves out."""
        return sum(not in_slice(r, self.only) for r in self.runs)


ONLY_KEYS = ("seed", "workload", "perturbation")
"""What `--only KEY=VALUE` selects on besides the knobs."""


def run_facet(run: RunSpec, key: str) -> Any:
    """The value `--only` compares for `key`: a knob's level, or the seed, workload name or
    perturbation label; None where the run's workload has no such knob."""
    if key == "seed":
        return run.seed
    if key == "workload":
        return run.workload["name"]
    if key == "perturbation":
        return run.perturbation_label
    return run.workload.get("knobs", {}).get(key)


def in_slice(run: RunSpec, only: dict[str, list[Any]]) -> bool:
    """Whether `run` is in the `--only` slice: for every key, one of its values."""
    return all(
        any((value is not None and same_value(run_facet(run, key), value)) for value in values)
        for key, values in only.items()
    )


def parse_only(items: list[str], runs: list[RunSpec]) -> dict[str, list[Any]]:
    """`--only KEY=VALUE` options → key → the values given (a key given twice: either value;
    different keys: all of them), values read as YAML (`0.3` is a number); a user error for a
    malformed item, a key that is no knob, seed, workload or perturbation of the spec, or a
    slice that holds no run."""
    import yaml

    only: dict[str, list[Any]] = {}
    knobs = {k for run in runs for k in run.workload.get("knobs", {})}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise StabilityBenchError(
                f"--only: {item!r} is not KEY=VALUE (e.g. --only action_noise=0.3 --only seed=1)"
            )
        if key not in knobs and key not in ONLY_KEYS:
            known = ", ".join(sorted(knobs) + list(ONLY_KEYS))
            raise StabilityBenchError(f"--only: {key!r} is none of the spec's keys ({known})")
        try:
            value = text.strip() if key == "perturbation" else yaml.safe_load(text)
        except yaml.YAMLError:
            value = text.strip()
        only.setdefault(key, []).append(value)
    if only and not any(in_slice(r, only) for r in runs):
        raise StabilityBenchError(
            f"--only: no run of the spec has {' and '.join(items)} (see `--dry-run` for the grid)"
        )
    return only


def plan_audit(
    spec_path: str | Path,
    out: str | Path,
    *,
    dry_run: bool = False,
    only: list[str] | None = None,
) -> AuditPlan:
    """Validate the spec, the runs and `--out` without writing anything. A dry run tolerates
    guard monitors that are not fitted yet (it lists them in `unfitted`); a real run does not.
    `only`: `--only KEY=VALUE` items, the slice of the grid to run (`parse_only`)."""
    unfitted: list[str] | None = [] if dry_run else None
    spec = load_spec(spec_path, unfitted=unfitted)
    runs = expand(spec)
    selected = parse_only(list(only or []), runs)
    check_runs(spec, runs)
    digest = spec_hash(spec)
    out = Path(out).expanduser().absolute()
    statuses = folder_statuses(out, digest, resolved_spec(spec))
    return AuditPlan(
        spec=spec,
        runs=runs,
        out=out,
        spec_hash=digest,
        statuses=statuses,
        references=references(spec),
        unfitted=unfitted or [],
        only=selected,
    )


def without_scoring(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved spec without what only scores the runs (`warning`, the audit's and each
    workload's): two specs equal here train the same runs."""
    out = {k: v for k, v in resolved.items() if k != "warning"}
    out["workloads"] = [
        {k: v for k, v in w.items() if k != "warning"} for w in resolved.get("workloads") or []
    ]
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def folder_statuses(out: Path, digest: str, resolved: Mapping[str, Any]) -> dict[str, str]:
    """run_id → status of an existing audit folder of this spec ({} for a new or empty one). A
    folder whose spec differs from `resolved` (this spec) only in `warning` is this spec's: its
    runs are the same, and `prepare_store` records the new warning settings."""
    if out.exists() and not out.is_dir():
        raise StabilityBenchError(f"--out: {out} is a file; give a folder for the audit")
    if not out.is_dir() or all(p.name == LOCK_FILE for p in out.iterdir()):
        return {}
    store = RunStore(out)
    if not store.exists():
        raise StabilityBenchError(
            f"--out: {out} is a non-empty folder that is not a StabilityBench audit "
            "(no audit.json); give a new or empty folder"
        )
    existing = store.audit()
    if existing.spec_hash != digest and without_scoring(existing.spec) != without_scoring(resolved):
        raise StabilityBenchError(
            f"--out: {out} was created from a different spec (audit "
            f"{existing.name!r}); runs of different specs are never mixed, "
            "so use a new --out for this spec"
        )
    return {r: store.info(r).status.value for r in store.run_ids()}


def run_info(run: RunSpec, reference: dict[str, Any] | None = None) -> RunInfo:
    """The descriptive fields of run.json (the runner adds status and timings); with the
    workload's `reference` knob levels, also `healthy` (perturbation none and those levels)."""
    if not run.perturbations:
        perturbation = PerturbationInfo(kind="none", label="none", params={})
    else:
        kinds = [str(p["kind"]) for p in run.perturbations]
        params_list = [{k: v for k, v in p.items() if k != "kind"} for p in run.perturbations]
        if len(params_list) == 1:
            params: dict[str, Any] = params_list[0]
        else:  # keyed by kind, with the position added where a kind repeats
            params = {
                (k if kinds.count(k) == 1 else f"{k}#{i}"): p
                for i, (k, p) in enumerate(zip(kinds, params_list, strict=True))
            }
        perturbation = PerturbationInfo(
            kind="+".join(kinds), label=run.perturbation_label, params=params
        )
    info = RunInfo(
        run_id=run.run_id,
        label=run.label,
        audit=run.audit,
        workload=run.workload["name"],
        kind=run.workload["kind"],
        knobs=dict(workload_spec(run.workload).knobs),
        perturbation=perturbation,
        guard=None if run.guard is None else {"label": run.guard_label, **run.guard},
        seed=run.seed,
        spec=run.to_dict(),
    )
    if reference is not None:
        info.healthy = is_healthy(run, reference)
    return info


def _reference(plan: AuditPlan, run: RunSpec) -> dict[str, Any] | None:
    return plan.references.get(run.workload["name"]) if plan.references else None


def prepare_store(plan: AuditPlan) -> RunStore:
    """Create the audit folder (or reuse it) and mark every unfinished run `pending` (those
    outside an `--only` slice too: the folder is an audit of the whole spec, resumable)."""
    from stabilitybench import __version__

    store = RunStore(plan.out)
    if not store.exists():
        plan.out.mkdir(parents=True, exist_ok=True)
        store.write_audit(
            {
                "name": plan.spec.name,
                "spec": resolved_spec(plan.spec),
                "spec_hash": plan.spec_hash,
                "version": __version__,
                "created": time.time(),
                "run_ids": [r.run_id for r in plan.runs],
                "references": plan.references,
            }
        )
    else:
        audit = store.audit()
        if audit.spec_hash != plan.spec_hash:  # only `warning` differs (`folder_statuses`)
            audit = audit.model_copy(
                update={"spec": resolved_spec(plan.spec), "spec_hash": plan.spec_hash}
            )
            store.write_audit(audit)
        if audit.references is None:  # an audit created before references existed
            store.write_audit(audit.model_copy(update={"references": plan.references}))
    for run in plan.unfinished:
        store.writer(run.run_id).update_info(
            **run_info(run, _reference(plan, run)).document(), status=RunStatus.PENDING.value
        )
    return store


def execute_plan(
    plan: AuditPlan,
    *,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    console: Console | None = None,
    lock: AuditLock | None = None,
) -> dict[str, int]:
    """Run every unfinished run (of the `--only` slice); return counts by status over the
    whole grid (over the slice).

    The audit folder is locked while runs execute (a second audit of it is refused). Pass a
    `lock` to keep holding it afterwards (the caller releases it); otherwise it is released here.
    """
    console = console or Console()
    runner = make_backend(backend, workers, ray_address)
    runner.open()  # before writing anything: a bad --ray-address leaves no folder behind
    own_lock = lock is None
    lock = lock or AuditLock(plan.out)
    try:
        if not lock.held:
            lock.acquire()
        # Another audit may have finished runs since `plan_audit` looked: look again, now that
        # nobody else can write the folder.
        plan.statuses = folder_statuses(plan.out, plan.spec_hash, resolved_spec(plan.spec))
        return _execute(plan, runner, console)
    finally:
        try:
            runner.close()
        finally:
            if own_lock:
                lock.release()


def _say_what_runs(plan: AuditPlan, console: Console) -> None:
    """The slice `--only` runs, and the runs a resumed audit has already done."""
    skipped = len(plan.runs) - plan.outside - len(plan.todo)
    if plan.outside:
        console.print(
            f"--only: {len(plan.runs) - plan.outside} of the spec's {len(plan.runs)} runs; the "
            f"other {plan.outside} stay pending (run them with another --only, here or elsewhere, "
            "and `stabilitybench merge` the exports)"
        )
    if skipped:
        console.print(
            f"resuming: {skipped} of {len(plan.runs) - plan.outside} runs already done, "
            f"{len(plan.todo)} to run"
        )


def _execute(plan: AuditPlan, runner: Backend, console: Console) -> dict[str, int]:
    store = prepare_store(plan)
    todo = plan.todo
    _say_what_runs(plan, console)
    groups = share_prefix_groups(todo) if plan.spec.share_prefix else [[run] for run in todo]
    tasks = [
        RunTask(
            str(store.root),
            group[0].to_dict(),
            run_info(group[0], _reference(plan, group[0])).document(),
            tuple(
                (run.to_dict(), run_info(run, _reference(plan, run)).document())
                for run in group[1:]
            ),
        )
        for group in groups
    ]
    labels = {run.run_id: run.label for run in todo}
    counts = {"done": 0, "failed": 0}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        disable=not todo,
    ) as progress:
        bar = progress.add_task(escape(plan.spec.name), total=len(todo), done=0, failed=0)

        def on_result(result: RunResult) -> None:
            key = "done" if result.status == RunStatus.DONE.value else "failed"
            counts[key] += 1
            if key == "failed":
                label = labels.get(result.run_id, "")
                progress.console.print(
                    f"[red]failed[/] {escape(f'{result.run_id} ({label}): {result.error}')}",
                    highlight=False,
                )
            progress.update(bar, advance=1, done=counts["done"], failed=counts["failed"])

        runner.run(tasks, on_result)
    final = {s.value: 0 for s in RunStatus}
    ids = {r.run_id for r in plan.runs if in_slice(r, plan.only)}
    for run_id in store.run_ids():
        if run_id in ids:
            status = store.info(run_id).status.value
            final[status] = final.get(status, 0) + 1
    return final


def share_prefix_groups(runs: list[RunSpec]) -> list[list[RunSpec]]:
    """`share_prefix: true`: the runs to do, grouped where they can train their common prefix
    once (RL runs of one workload config and seed that differ only in perturbations whose
    onsets are fractions of the env steps, unguarded: `shared_fork_step`); every other run
    alone. In the grid's order."""
    from stabilitybench.workloads.rl import shared_fork_step

    keyed: dict[str, list[RunSpec]] = {}
    for run in runs:
        key = json.dumps([run.workload, run.seed, run.guard], sort_keys=True, default=str)
        keyed.setdefault(key, []).append(run)
    groups: list[list[RunSpec]] = []
    for members in keyed.values():
        if members[0].workload.get("kind") == "rl" and shared_fork_step(members) is not None:
            groups.append(members)
        else:
            groups.extend([run] for run in members)
    return groups


def _note(console: Console, what: str, exc: BaseException, retry: str) -> None:
    """One line saying what could not be done after the runs, and the command that retries it."""
    console.print(
        "[yellow]note:[/] " + escape(f"{what} ({_one_line(exc)}); retry with `{retry}`"),
        highlight=False,
    )


def analyse_and_report(store: RunStore, console: Console) -> Path | None:
    """Fit the detectors, analyse the audit and write the report; a problem there is one line,
    not a lost audit (the runs are safe on disk, and each step can be retried by hand)."""
    from stabilitybench.analysis import Analysis, analyse
    from stabilitybench.evaluation.fitting import fit_audit
    from stabilitybench.report.html import write_report

    analysis: Analysis | None = None
    try:
        fit_audit(store, console=console)
    except Exception as exc:
        _note(console, "monitor not fitted", exc, f"stabilitybench monitor fit {store.root}")
    else:
        try:
            analysis = analyse(store, evaluation="fresh")  # saved under monitor/ too
        except Exception as exc:
            retry = f"stabilitybench monitor evaluate {store.root}"
            _note(console, "detectors not evaluated", exc, retry)
    try:
        return write_report(store, analysis=analysis)
    except Exception as exc:
        _note(console, "no report written", exc, f"stabilitybench report {store.root}")
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, StabilityBenchError) else f"{type(exc).__name__}: {message}"


def run_audit_cli(
    spec_path: str | Path,
    out: str | Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    dry_run: bool = False,
    report: bool = True,
    only: list[str] | None = None,
    console: Console | None = None,
) -> int:
    """`stabilitybench audit`: returns the exit code (0 all done, 1 some runs failed); with
    `only`, all of the slice done is 0."""
    console = console or Console()
    make_backend(backend, workers, ray_address)  # check the options before anything else
    plan = plan_audit(spec_path, out, dry_run=dry_run, only=only)
    if dry_run:
        print_plan(plan, console, workers=workers)
        return 0
    lock = AuditLock(plan.out)  # held from the first write to the report
    try:
        counts = execute_plan(
            plan,
            backend=backend,
            workers=workers,
            ray_address=ray_address,
            console=console,
            lock=lock,
        )
        store = RunStore(plan.out)
        report_path = analyse_and_report(store, console) if report and counts["done"] > 0 else None
    finally:
        lock.release()
    print_where(plan.out, report_path, console)
    total = len(plan.runs) - plan.outside  # the runs outside a slice are not this command's
    unfinished = total - counts["done"] - counts["failed"]
    if counts["failed"] or unfinished:
        console.print(
            f"[red]{counts['failed']} of {total} runs failed[/]"
            + (f", {unfinished} unfinished" if unfinished else "")
            + escape(f"; see `stabilitybench status {plan.out}`"),
            highlight=False,
        )
        return 1
    if plan.only:
        console.print(
            f"[green]all {total} runs of the slice done[/]"
            + escape(
                f"; {plan.outside} runs of the spec are outside it (export this part with "
                f"`stabilitybench export {plan.out} --out PART --partial --refittable`)"
            ),
            highlight=False,
        )
        return 0
    console.print(f"[green]all {total} runs done[/]")
    return 0


def print_where(out: Path, report_path: Path | None, console: Console) -> None:
    """Tell the user where the results are and what to type next."""
    console.print(f"\nresults: [bold]{escape(str(out))}[/]", highlight=False)
    console.print(escape(f"  stabilitybench status {out}"), highlight=False)
    console.print(escape(f"  stabilitybench summary {out}"), highlight=False)
    console.print(
        escape(
            f'  stabilitybench query {out} "SELECT perturbation, status, count(*) FROM runs GROUP BY ALL"'
        ),
        highlight=False,
    )
    if report_path is not None:
        console.print(escape(f"  report: {report_path}"), highlight=False)


# ---- dry run ---------------------------------------------------------------------------------


def estimate_run_seconds(workload: dict[str, Any]) -> float:
    """A rough wall-clock estimate of one run on one CPU core (for `--dry-run`), from a resolved
    workload config (a RunSpec's `workload`)."""
    spec = workload_spec(workload)
    steps = float(spec.total_steps)
    evaluation = spec.eval or EvalSpec()
    n_evals = steps / max(float(evaluation.every or steps), 1.0) + 1
    if isinstance(spec, RLWorkloadSpec):
        return _rl_seconds(spec, steps, n_evals * (evaluation.episodes or 5))
    if isinstance(spec, LMWorkloadSpec):
        from stabilitybench.workloads.lm import parse_config

        shape = parse_config(workload)  # the model's width and the tokenizer's vocabulary
        return _lm_seconds(
            spec,
            steps,
            n_evals * (evaluation.batches or 8),
            vocab_size=shape.tokenizer.vocab_size,
            width=shape.size["n_embd"],
        )
    if isinstance(spec, ToyWorkloadSpec):
        return PROCESS_OVERHEAD_S + steps * TOY_SECONDS_PER_STEP
    return PROCESS_OVERHEAD_S + steps * 0.01


def _rl_seconds(spec: RLWorkloadSpec, steps: float, eval_episodes: float) -> float:
    train_s = steps / RL_ENV_STEPS_PER_S.get(spec.algo, 500.0)
    if spec.algo in OFF_POLICY_UPDATE_S:  # the gradient steps dominate: how many, how big
        fixed, per_sample = OFF_POLICY_UPDATE_S[spec.algo]
        update = fixed + per_sample * _knob_number(spec.knobs, "batch_size", 256)
        ratio = _knob_number(spec.knobs, "gradient_steps", 1) / _knob_number(
            spec.knobs, "train_freq", 1
        )
        updating = max(steps - _knob_number(spec.knobs, "learning_starts", 100), 0.0)
        train_s = steps * OFF_POLICY_ENV_S + updating * ratio * update
    eval_s = eval_episodes * _episode_steps(spec.env) / EVAL_STEPS_PER_S
    return PROCESS_OVERHEAD_S + 2.0 + train_s + eval_s


def _episode_steps(env_id: str) -> float:
    """An evaluation episode's length: the env's time limit (1,000 if it has none or is unknown;
    an episode that ends early makes the estimate high)."""
    try:
        import gymnasium

        limit = gymnasium.spec(env_id).max_episode_steps
    except Exception:  # not installed, not registered: the estimate stays rough
        limit = None
    return float(limit or 1000)


def _lm_seconds(
    spec: LMWorkloadSpec,
    steps: float,
    eval_batches: float,
    *,
    vocab_size: int = 256,
    width: int = 128,
) -> float:
    per_step = LM_SECONDS_PER_STEP.get(str(spec.size), 1.0)
    tokens = _knob_number(spec.knobs, "batch_size", 16) * _knob_number(
        spec.knobs, "block_size", 128
    )
    per_step *= LM_FIXED_SHARE + (1 - LM_FIXED_SHARE) * tokens / LM_REFERENCE_TOKENS
    per_step += LM_VOCAB_SECONDS * tokens * max(vocab_size - 256, 0) * width / 128
    if spec.probes is not None:
        per_step *= 1 + LM_PROBE_SHARE
    eval_s = eval_batches * per_step / 3.0
    return PROCESS_OVERHEAD_S + 2.0 + steps * per_step + eval_s


def _shared_seconds(plan: AuditPlan) -> float | None:
    """`share_prefix`: the estimated seconds of the runs to do that their groups save (each
    group trains its prefix once instead of once per run); None without `share_prefix`."""
    if not plan.spec.share_prefix:
        return None
    from stabilitybench.workloads.rl import shared_fork_step

    saved = 0.0
    for group in share_prefix_groups(plan.todo):
        fork = shared_fork_step(group) if len(group) > 1 else None
        if fork is None:
            continue
        share = fork / float(workload_spec(group[0].workload).total_steps)
        saved += (len(group) - 1) * share * estimate_run_seconds(group[0].workload)
    return saved


def _knob_number(knobs: dict[str, Any], key: str, default: float) -> float:
    """A knob's value for the estimate: a number, the first of a swept list, else `default`."""
    value = knobs.get(key)
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_plan(plan: AuditPlan, console: Console, workers: int | None = None) -> None:
    """The expanded grid as a table, and what it will cost."""
    import os

    table = Table(title=escape(f"audit {plan.spec.name}: {len(plan.runs)} runs"))
    guarded = any(run.guard is not None for run in plan.runs)
    columns = ("run id", "workload", "knobs", "perturbation", "guard", "seed", "est.")
    for column in columns if guarded else tuple(c for c in columns if c != "guard"):
        table.add_column(column, overflow="fold")
    if plan.statuses:
        table.add_column("status")
    total_s = 0.0
    todo_s = 0.0
    shared_s = _shared_seconds(plan)
    for run in plan.runs:
        seconds = estimate_run_seconds(run.workload)
        total_s += seconds
        status = plan.statuses.get(run.run_id, "new")
        if status != RunStatus.DONE.value and in_slice(run, plan.only):
            todo_s += seconds
        knobs = ", ".join(f"{k}={v}" for k, v in workload_spec(run.workload).knobs.items())
        row = [
            run.run_id,
            run.workload["name"],
            knobs,
            run.perturbation_label,
            *([run.guard_label] if guarded else []),
            str(run.seed),
            _duration(seconds),
        ]
        if plan.statuses:
            row.append(status)
        table.add_row(*[escape(cell) for cell in row])
    console.print(table)
    parallel = min(workers or os.cpu_count() or 1, max(len(plan.todo), 1))
    saved = ""
    if shared_s is not None:
        saved = f" (share_prefix saves ≈ {_duration(shared_s)}: each shared prefix trained once)"
        todo_s -= shared_s
    console.print(
        f"estimated cost: {_duration(total_s)} of CPU time for the whole grid; "
        f"{len(plan.todo)} runs to do ≈ {_duration(todo_s / parallel)} with {parallel} worker(s)"
        f"{saved} (rough: from per-kind rates on one core)",
        highlight=False,
    )
    for message in plan.unfitted:
        console.print(
            "[yellow]not fitted yet; the audit will stop here until it is:[/] " + escape(message),
            highlight=False,
        )
    console.print(
        escape(f"nothing was run or written (dry run); the audit folder would be {plan.out}"),
        highlight=False,
    )
