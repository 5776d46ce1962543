"""The command line: a thin typer adapter over plain functions in the modules."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from stabilitybench.errors import StabilityBenchError


class _Commands(TyperGroup):
    """The verbs; a user error anywhere under them is one red line and exit code 2 — never a
    traceback (the one place errors are caught)."""

    def invoke(self, ctx: Any) -> Any:  # (typer vendors its own click Context)
        try:
            return super().invoke(ctx)
        except StabilityBenchError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}",
                highlight=False,
                markup=True,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None


app = typer.Typer(
    name="stabilitybench",
    cls=_Commands,
    help="Audit the stability of deep-learning training: telemetry, perturbations, early warning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
monitor_app = typer.Typer(
    help="Fit the Meta-State Monitor and evaluate early-warning detectors.", no_args_is_help=True
)
app.add_typer(monitor_app, name="monitor")

console = Console()
err_console = Console(stderr=True)


class Backend(StrEnum):
    local = "local"
    ray = "ray"


def _version_callback(value: bool) -> None:
    if value:
        from stabilitybench import __version__

        console.print(f"stabilitybench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """StabilityBench: audit the stability of deep-learning training."""


@app.command()
def audit(
    spec: Annotated[Path, typer.Argument(help="The audit spec (YAML).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The audit folder (created or resumed).")
    ],
    backend: Annotated[Backend, typer.Option(help="Where runs execute.")] = Backend.local,
    workers: Annotated[
        int | None, typer.Option(help="Runs in parallel (local backend); default: one per core.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Address of an existing Ray cluster.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the expanded grid and its estimated cost; run nothing."
        ),
    ] = False,
    report: Annotated[
        bool, typer.Option(help="Fit the monitor and write the HTML report at the end.")
    ] = True,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only the runs with KEY=VALUE (a knob, seed, workload or perturbation "
            "label; repeat a key for either value, give several keys for all): a slice of an "
            "audit too long for one sitting. Export it with --partial --refittable and "
            "`stabilitybench merge` the slices.",
        ),
    ] = None,
) -> None:
    """Run every run of an audit spec (resumable: finished runs are skipped)."""
    from stabilitybench.audit.runner import run_audit_cli

    code = run_audit_cli(
        spec,
        out,
        backend=backend.value,
        workers=workers,
        ray_address=ray_address,
        dry_run=dry_run,
        report=report,
        only=only,
        console=console,
    )
    raise typer.Exit(code)


@app.command()
def status(audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")]) -> None:
    """Counts of runs by status, and the first error line of each failed run."""
    from stabilitybench.printing import print_status
    from stabilitybench.store import RunStore

    print_status(RunStore.open(audit_dir), audit_dir, console)


@app.command()
def watch(
    folder: Annotated[
        Path, typer.Argument(help="An audit folder, or one run's folder (AUDIT/runs/RUN_ID).")
    ],
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print the view one time and exit (for scripts).")
    ] = False,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all", help="Show every run (default: the running ones and the 5 last finished)."
        ),
    ] = False,
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Keep watching after every run has finished (Ctrl-C ends)."),
    ] = False,
) -> None:
    """A live view of the runs as they train: progress, latest telemetry, detector alarms, guard
    actions (reads only; Ctrl-C ends it)."""
    from stabilitybench.watch import watch_folder

    watch_folder(folder, console, interval=interval, once=once, show_all=show_all, follow=follow)


@app.command()
def query(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")],
    sql: Annotated[
        str, typer.Argument(help="SQL over the views runs, telemetry, evals, events, scores.")
    ],
    output_json: Annotated[
        bool, typer.Option("--json", help="Print JSON records instead of a table.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Rows to print (the table view).")] = 50,
) -> None:
    """Run DuckDB SQL over the audit's Parquet files and print the result."""
    from stabilitybench.printing import print_query
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    print_query(store.query(sql), console, as_json=output_json, limit=limit)


@app.command()
def summary(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")],
    output_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Show every column.")] = False,
) -> None:
    """Stability metrics per run and per condition, with confidence intervals."""
    from stabilitybench.metrics.serialize import to_jsonable
    from stabilitybench.metrics.summary import summarize
    from stabilitybench.metrics.summary_printing import print_summary
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    result = summarize(store)
    if output_json:
        sys.stdout.write(json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")
    else:
        print_summary(result, console, wide=wide)


@monitor_app.command("fit")
def monitor_fit(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")],
    latent_dim: Annotated[int, typer.Option(help="Size k of the latent meta-state.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for the monitor's own training.")] = 0,
    include_controls: Annotated[
        bool,
        typer.Option(
            "--include-controls",
            help="Ablation: let the fitted detectors read what the audit controls (lr, "
            "ent_coef, the perturbed flag, knob columns); fit.json lists what was read.",
        ),
    ] = False,
) -> None:
    """Fit the Meta-State Monitor on the audit's healthy runs and score every run."""
    from stabilitybench.evaluation.fitting import fit_audit
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    fit_audit(
        store,
        latent_dim=latent_dim,
        seed=seed,
        console=console,
        include_controls=include_controls,
    )


@monitor_app.command("evaluate")
def monitor_evaluate(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")],
    output_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    target_false_alarms: Annotated[
        float | None,
        typer.Option(
            help="Target false alarms per 1,000 steps on held-out healthy runs [default: the "
            "spec's warning.target_false_alarms, else 1]."
        ),
    ] = None,
    horizon: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps (SOP): an alarm at step t is true if the run's collapse "
            "starts in [t + sph, t + sph + horizon], and an alarm episode renews its alarm every "
            "horizon steps [default: the spec's warning.horizon, per workload, else 100]."
        ),
    ] = None,
    sph: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps: the least lead that is still useful (time to act) [default: "
            "the spec's warning.sph, per workload, else 10]."
        ),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Show every column in full.")] = False,
) -> None:
    """Prospective warning, per workload and macro-averaged: event recall beside chance and the
    clock control, lead time, false alarms, time in warning, step and outcome AUROC."""
    from stabilitybench.evaluation.evaluate import evaluate_audit, print_evaluation
    from stabilitybench.metrics.serialize import to_jsonable
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    result = evaluate_audit(
        store, target_false_alarms=target_false_alarms, horizon=horizon, sph=sph
    )
    if output_json:
        sys.stdout.write(json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")
    else:
        from stabilitybench.evaluation.fitting import read_attributions

        print_evaluation(result, console, wide=wide, attributions=read_attributions(store.root))


@monitor_app.command("score")
def monitor_score(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder (imported runs or any).")],
    monitor: Annotated[
        Path | None,
        typer.Option(
            "--monitor",
            help="A monitor fitted on another audit (OTHER_AUDIT/monitor); without it the "
            "fitted detectors are skipped.",
        ),
    ] = None,
) -> None:
    """Every detector's per-step score and native alarms on each run (scores.parquet), and
    which signal deviated first."""
    from stabilitybench.evaluation.printing import print_score
    from stabilitybench.evaluation.scoring import score_audit
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    result = score_audit(store, monitor, console=console)
    print_score(result, console)


@app.command()
def report(
    audit_dir: Annotated[Path, typer.Argument(help="An audit folder.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The HTML file (default: DIR/report.html)."),
    ] = None,
    figures: Annotated[
        Path | None, typer.Option("--figures", help="Also write each figure as PNG here.")
    ] = None,
) -> None:
    """Write one self-contained HTML report (and optionally PNG figures)."""
    from stabilitybench.report.html import write_report
    from stabilitybench.store import RunStore

    store = RunStore.open(audit_dir)
    path = write_report(store, output=output, figures_dir=figures)
    console.print(f"report written to [bold]{escape(str(path))}[/]", highlight=False)


class ImportFormat(StrEnum):
    tensorboard = "tensorboard"
    csv = "csv"
    jsonl = "jsonl"
    mlflow = "mlflow"


@app.command("import")
def import_command(
    source: Annotated[
        Path, typer.Argument(help="A log folder or file: TensorBoard, CSV, JSONL, or mlruns/.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new audit folder.")],
    log_format: Annotated[
        ImportFormat | None,
        typer.Option("--format", help="The source's format (default: detected)."),
    ] = None,
    mapping: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            metavar="TAG=COLUMN",
            help="TAG=COLUMN: store a logged tag as this column (loss, grad_norm, lr, …, "
            "eval_loss, eval_return, step, env_step, skip); repeatable.",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The audit's name (default: the source's name).")
    ] = None,
) -> None:
    """Import runs logged by another tool as a new audit (one run per source run)."""
    from stabilitybench.importers import import_logs
    from stabilitybench.importers.report import print_import

    result = import_logs(
        source,
        out,
        fmt=None if log_format is None else log_format.value,
        mapping=mapping or [],
        name=name,
        console=console,
    )
    print_import(result, console)


@app.command()
def export(
    audit_dir: Annotated[
        Path, typer.Argument(help="A finished audit folder, or a findings folder to re-export.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The findings folder to write.")],
    target_false_alarms: Annotated[
        float | None,
        typer.Option(
            help="Target false alarms per 1,000 steps for evaluation.json [default: the spec's]."
        ),
    ] = None,
    horizon: Annotated[
        int | None,
        typer.Option(
            help="Early-warning horizon (SOP) in optimizer steps for evaluation.json [default: "
            "the spec's, per workload]."
        ),
    ] = None,
    sph: Annotated[
        int | None,
        typer.Option(
            help="The least useful lead in optimizer steps for evaluation.json [default: the "
            "spec's, per workload]."
        ),
    ] = None,
    partial: Annotated[
        bool, typer.Option("--partial", help="Export an unfinished audit's finished runs.")
    ] = False,
    refittable: Annotated[
        bool,
        typer.Option("--refittable", help="Keep every telemetry column (rounded), for `merge`."),
    ] = False,
    fit: Annotated[
        bool, typer.Option(help="Fit the monitor if the audit has none (--no-fit: for `merge`).")
    ] = True,
) -> None:
    """Write summary.json, evaluation.json, findings (the three claims), report.html with its
    figures, the spec, the versions and the slim per-run data (runs/: evaluations, events,
    scores, a few telemetry columns) into one small folder that opens offline; a findings folder
    given as the audit is judged again from its runs (--out may be that folder)."""
    from stabilitybench.findings.export import describe, export_results, open_source
    from stabilitybench.lifetime import exit_on_terminate

    store = open_source(audit_dir)
    with exit_on_terminate():  # `kill PID`: the half-written folder goes
        path = export_results(
            store,
            out,
            allow_partial=partial,
            target_false_alarms=target_false_alarms,
            horizon=horizon,
            sph=sph,
            refittable=refittable,
            fit=fit,
            console=console,
        )
    console.print(escape(describe(path)), highlight=False)


@app.command()
def merge(
    parts: Annotated[
        list[Path],
        typer.Argument(
            help="The parts: findings folders exported with --refittable, or audit folders."
        ),
    ],
    spec: Annotated[
        Path, typer.Option("--spec", help="The audit spec (YAML) whose runs the parts hold.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The findings folder to write.")],
    partial: Annotated[
        bool,
        typer.Option("--partial", help="Merge even if some of the spec's runs are in no part."),
    ] = False,
    refittable: Annotated[
        bool,
        typer.Option("--refittable", help="Keep every telemetry column in the merged folder."),
    ] = False,
) -> None:
    """Merge the parts of one audit, run in slices (`audit --only`) on different machines or
    days, into one findings folder: the runs are checked against the spec, the monitor is fitted
    again on all of them, and everything is judged as an export of the whole audit would be."""
    from stabilitybench.findings.export import describe
    from stabilitybench.findings.merge import merge_parts
    from stabilitybench.lifetime import exit_on_terminate

    with exit_on_terminate():  # `kill PID`: the assembled and half-written folders go
        path = merge_parts(
            parts, spec, out, allow_partial=partial, refittable=refittable, console=console
        )
    console.print(escape(describe(path)), highlight=False)


@app.command()
def findings(
    path: Annotated[
        Path, typer.Argument(help="A findings folder (from export) or an audit folder.")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print findings.json instead.")] = False,
    rejudge: Annotated[
        bool,
        typer.Option(
            "--rejudge",
            help="Judge the claims again from the folder's per-run data (runs/) with this "
            "version's collapse and warning criteria, instead of printing the saved findings; "
            "nothing is refitted or retrained, and a findings folder is left as it is.",
        ),
    ] = False,
) -> None:
    """The paper's three claims per workload, with CIs and a verdict (findings.md)."""
    from stabilitybench.findings.export import findings_markdown

    text = findings_markdown(path, as_json=json_out, rejudge=rejudge)
    sys.stdout.write(text)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
