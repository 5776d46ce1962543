"""mkdocs-macros module: tables of measured figures, rendered from the JSON that the benchmark
scripts write (`benchmarks/results/<name>.json`, see `benchmarks/_record.py`).

A page that quotes a measurement says `{{ measured("overhead") }}`; the table, the command
that produced it and the machine, commit and date come from the file. Without the file the
page says how to measure it. No measured number is typed into a page by hand.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
COMMANDS = {  # how to produce each file (the script's defaults unless said)
    "collapse_labels": (
        "python benchmarks/collapse_labels.py results/paper_rl_ppo results/paper_rl_td3 "
        "results/paper_rl_sac results/paper_lm_collapse results/paper_lm_guards "
        "results/paper_lm_doses results/lm_buildup"
    ),
    "warning_protocol": (
        "make demo && python benchmarks/warning_protocol.py audits/quickstart "
        "results/paper_lm_collapse "
        "results/paper_lm_doses results/lm_buildup"
    ),
    "overhead": "python benchmarks/overhead.py",
    "lm_overhead": "python benchmarks/lm_overhead.py",
    "rl_overhead": "python benchmarks/rl_overhead.py --cases ppo-halfcheetah",
    "rl_overhead_paper": "python benchmarks/rl_overhead.py --paper --reps 3",
    "cli_latency": "python benchmarks/cli_latency.py",
    "monitor_cost": "python benchmarks/monitor_cost.py",
    "guard_snapshot": "python benchmarks/guard_snapshot.py --reps 3 --steps 20",
    "guard_device": "python benchmarks/guard_device.py --reps 3 --steps 40",
    "guard_comparison": (
        "python benchmarks/guard_comparison.py results/lm_buildup_guards "
        "results/paper_lm_ramp_guards results/quickstart_guards "
        "results/paper_lm_intrinsic_guards"
    ),
    "telemetry_memory": "python benchmarks/telemetry_memory.py",
    "stability_probes_cost": "python benchmarks/stability_probes_cost.py --reps 4 --steps 5",
    "scaling": "python benchmarks/scaling.py --steps 3000",
    "import_throughput": "python benchmarks/import_throughput.py",
    "lm_intrinsic_sweep": "python benchmarks/lm_intrinsic_sweep.py results/paper_lm_intrinsic",
    "lm_intrinsic_edge": (
        "python benchmarks/lm_intrinsic_sweep.py results/paper_lm_intrinsic_edge "
        "--name lm_intrinsic_edge"
    ),
}


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def provenance(doc: dict[str, Any]) -> str:
    machine, git = doc.get("machine", {}), doc.get("git", {})
    commit = (git.get("commit") or "?")[:7]
    dirty = " with local changes" if git.get("dirty") else ""
    load_before = machine.get("load_average_before")
    load_text = f", load average {load_before:.1f} at the start" if load_before is not None else ""
    return (
        f"<small>Measured by `{doc.get('command', '?')}` on {str(doc.get('date', '?'))[:10]}, "
        f"commit `{commit}`{dirty}; {machine.get('cpu_count', '?')} CPUs "
        f"({machine.get('processor', '?')}, {machine.get('platform', '?')}), "
        f"Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}{load_text}. "
        f"Source: `benchmarks/results/{doc.get('benchmark', '?')}.json`.</small>"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def x(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def n(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _overhead(f: dict[str, Any]) -> str:
    names = {
        "gpt2": "4-layer GPT-2 (n_embd 128, byte vocabulary, batch 16, block 128)",
        "mlp": "small MLP regression (batch 32): the worst case",
    }
    rows = [
        [
            names.get(key, key),
            n(r["off_ms"], 2),
            x(r["cheap_ratio"]),
            x(r.get("cheap_cpu_ratio")),
            "+" + n(r.get("cheap_extra_cpu_ms"), 2),
            x(r["full_ratio"]),
        ]
        for key, r in f.items()
    ]
    return table(
        [
            "loop",
            "ms/step without telemetry",
            "`cheap`, wall",
            "`cheap`, CPU time",
            "`cheap`, extra CPU ms/step",
            "`full` (+ layer norms, sharpness), wall",
        ],
        rows,
    )


def _lm_overhead(f: dict[str, Any]) -> str:
    q1, q3 = f["on_off_ratio_quartiles"]
    return table(
        ["", "steps/s", "ms/step"],
        [
            ["telemetry off", n(f["off_steps_per_s"], 2), n(f["off_ms_per_step"])],
            ["telemetry on (`cheap`)", n(f["on_steps_per_s"], 2), n(f["on_ms_per_step"])],
            [
                "**on / off, paired per repetition**",
                f"**{f['on_off_ratio']:.3f}** (quartiles {q1:.3f}–{q3:.3f})",
                "",
            ],
        ],
    )


def _rl_overhead(f: dict[str, Any]) -> str:
    rows = []
    for c in f["cases"].values():
        sps, ratios = c["env_steps_per_s"], c["ratios"]
        d, e = ratios.get("defaults", {}), ratios.get("every=1", {})
        rows.append(
            [
                f"{c['algo'].upper()} {c['env']}",
                f"{c['env_steps']:,}",
                f"{c['optimizer_steps']:,}",
                n(sps.get("off"), 0),
                n(sps.get("defaults"), 0),
                n(sps.get("every=1"), 0),
                f"{x(d.get('wall'))} / {x(e.get('wall'))}",
                f"{x(d.get('cpu'))} / {x(e.get('cpu'))}",
                f"{n(d.get('wall_min'), 2)}–{n(d.get('wall_max'), 2)}",
            ]
        )
    return table(
        [
            "case",
            "env steps",
            "optimizer steps",
            "env steps/s, no telemetry",
            "`StabilityCallback()`",
            "`every=1` (audits)",
            "wall on/off: defaults / every=1",
            "CPU on/off: defaults / every=1",
            "wall ratio range, defaults",
        ],
        rows,
    )


def _cli_latency(f: dict[str, Any]) -> str:
    current = f["current"]
    before = f.get("before")
    header = ["command", "wall time (median)", "CPU time (median)"]
    if before:
        header += ["older tree: wall", "ratio (wall)"]
    rows = []
    for command, t in current.items():
        row = [
            f"`stabilitybench {command}`"
            if command.startswith("-") or command == "status"
            else command,
            f"{t['wall_s']:.2f} s",
            f"{t['cpu_s']:.2f} s",
        ]
        if before:
            b = before[command]
            row += [f"{b['wall_s']:.2f} s", x(b["wall_s"] / t["wall_s"], 1)]
        rows.append(row)
    return table(header, rows)


def _monitor_cost(f: dict[str, Any], settings: dict[str, Any]) -> str:
    return table(
        ["", "figure"],
        [
            [
                "`MetaStateMonitor.step` (online MSD), median per call",
                f"{f['step_median_us']:.1f} µs",
            ],
            [
                f"fit on {settings.get('runs', '?')} healthy runs × {settings.get('steps', '?'):,} steps",
                f"{f['fit_s']:.1f} s ({f['fit_epochs']} epochs)",
            ],
        ],
    )


def _guard_device(f: dict[str, Any]) -> str:
    rows = [
        [
            f"`{name}`",
            f"{v['ms_per_step']:.1f} ms ({x(v['ratio'])} unguarded)",
            f"{v['reads_per_step']:.2f}",
            f"{v['guard_bytes'] / 2**20:.3f} MiB",
        ]
        for name, v in f["variants"].items()
    ]
    ms = f.get("optimizer_ms")
    if ms:
        rows.append(
            [
                "AdamW step alone",
                f"torch {ms['torch_step']:.1f} ms; masked + update estimate "
                f"{ms['masked_step']:.1f} ms",
                "",
                "",
            ]
        )
    return table(["guard", "step time", "read-backs per step", "the guard holds"], rows)


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def _guard_comparison(f: dict[str, Any]) -> str:
    """One table per guarded audit (the benchmark takes several)."""
    audits = list(dict.fromkeys(g["audit"] for g in f["guards"]))
    if len(audits) == 1:
        return _guard_table(f["guards"])
    return "\n\n".join(
        f"**{audit}**\n\n" + _guard_table([g for g in f["guards"] if g["audit"] == audit])
        for audit in audits
    )


def _guard_table(guards: list[dict[str, Any]]) -> str:
    rows = []
    for g in guards:
        healthy, verdicts = g.get("healthy") or {}, g["verdicts"]
        for p in g["perturbed"] or [{}]:
            irr, plain = p.get("collapsed"), p.get("collapsed_unguarded")
            reduction = p.get("reduction")
            diff = healthy.get("final_difference") or {}
            ci = diff.get("ci") or [None, None]
            rows.append(
                [
                    f"`{g['guard']}`",
                    "–"
                    if irr is None
                    else f"{irr['k']}/{irr['n']} vs {plain['k']}/{plain['n']} ({p['measure']})",
                    "–" if reduction is None else f"{100 * reduction:.0f} %",
                    "–" if p.get("updates_lost") is None else f"{100 * p['updates_lost']:.0f} %",
                    n(healthy.get("interventions_per_run")),
                    x(healthy.get("wall_ratio"), 2),
                    "–"
                    if diff.get("value") is None
                    else f"{diff['value']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
                    " / ".join(
                        _yes_no(verdicts[k])
                        for k in (
                            "fewer_collapses",
                            "extra_compute",
                            "no_healthy_interventions",
                            "performance_unchanged",
                        )
                    ),
                ]
            )
    return table(
        [
            "guard",
            "collapses, guarded vs not",
            "fewer",
            "updates lost (perturbed)",
            "interventions per healthy run",
            "healthy wall time",
            "healthy final perf. difference [95 % CI]",
            "goals met: ≥ 80 % fewer / ≤ 1.10× / 0 healthy / perf. unchanged",
        ],
        rows,
    )


def _guard_snapshot(f: dict[str, Any]) -> str:
    ms, ratio = f["ms_per_step"], f["ratio"]
    return table(
        ["", "figure"],
        [
            ["model", f"{f['parameters']:,} parameters (AdamW)"],
            [
                "skip buffer (device copy)",
                f"{f['skip_buffer_mib']:.2f} MiB, "
                f"{f['skip_capture_ms']:.2f} ms per step to capture",
            ],
            [
                "rollback snapshot (CPU copy)",
                f"{f['snapshot_mib']:.2f} MiB each (× `keep`), "
                f"{f['snapshot_ms']:.2f} ms to take, every `every` steps",
            ],
            *[
                [f"step time, `{name}`", f"{ms[name]:.1f} ms ({x(ratio[name])} unguarded)"]
                for name in ms
            ],
        ],
    )


def _telemetry_memory(f: dict[str, Any], settings: dict[str, Any]) -> str:
    return table(
        ["", "figure"],
        [
            [
                "run",
                f"{settings.get('steps', 0):,} optimizer steps, tiny model, `cheap` preset, "
                f"streamed to the run store ({f['ms_per_step']:.3f} ms/step)",
            ],
            [
                f"resident memory after {settings.get('warmup', 0):,} steps",
                f"{f['rss_after_warmup_mib']:.1f} MiB",
            ],
            [
                "peak over the rest of the run, `close()` included",
                f"{f['rss_peak_mib']:.1f} MiB (**{f['rss_growth_mib']:+.1f} MiB**)",
            ],
            [
                "telemetry.parquet",
                f"{f['rows']:,} rows in {f['row_groups']:,} row groups, "
                f"{f['file_mib']:.1f} MiB, merged at `close()` in {f['close_s']:.1f} s",
            ],
        ],
    )


def _stability_probes_cost(f: dict[str, Any]) -> str:
    labels = {"cheap": "— (`cheap` alone)"}
    rows = []
    for name, clocks in f.items():
        cpu, wall = clocks["cpu"], clocks["wall"]
        q1, q3 = cpu["ratio_quartiles"]
        rows.append(
            [
                labels.get(name, f"`{name.lstrip('+')}`"),
                n(cpu["ms_per_step"]),
                f"{cpu['ratio']:.3f} ({q1:.3f}–{q3:.3f})",
                f"{wall['ratio']:.3f}",
            ]
        )
    return table(
        ["added to `cheap`", "CPU ms/step", "CPU time ratio to `cheap` (quartiles)", "wall ratio"],
        rows,
    )


def _scaling(f: dict[str, Any], settings: dict[str, Any]) -> str:
    rows = [
        [
            "1 worker → 2 workers",
            f"{f['one_worker_s']:.1f} s → {f['two_workers_s']:.1f} s: "
            f"**{f['speedup']:.2f}× speed-up**",
        ],
        ["orchestration overhead per run (8 one-step runs)", f"{f['overhead_per_run_s']:.2f} s"],
        ["a run of the grid", f"{f['run_s']:.1f} s ({settings.get('steps', '?')} steps)"],
        ["first audit in a process (starts the fork server)", f"{f['first_audit_s']:.1f} s"],
    ]
    if "ray_s" in f:
        rows.append(
            [
                "Ray (local instance, 2 CPUs) vs local pool (2 workers)",
                f"{f['ray_s']:.1f} s vs {f['two_workers_s']:.1f} s: {x(f['ray_over_local'], 2)}",
            ]
        )
    return table(["8-run toy grid", "figure"], rows)


def _import_throughput(f: dict[str, Any]) -> str:
    rows = []
    for log in f["logs"]:
        for key, label in (
            ("import", "`stabilitybench import`"),
            ("event_accumulator", "TensorBoard `EventAccumulator` + pandas"),
        ):
            if key in log:
                r = log[key]
                rows.append(
                    [
                        f"{log['steps']:,} steps ({log['scalars']:,} scalars, {log['mb']:.1f} MB)",
                        label,
                        f"{r['wall_s']:.1f} s",
                        f"{r['steps_per_s']:,.0f}",
                        f"{r['peak_rss_mb']:,.0f} MB",
                    ]
                )
    return (
        table(["log", "reader", "time", "steps/s", "peak RSS"], rows)
        + f"\n\nA process that only imports the same modules peaks at "
        f"{f['baseline_rss_mb']:,.0f} MB (the baseline both readers start from)."
    )


def _rate(value: float | None, ci: list[float | None] | None = None) -> str:
    if value is None:
        return "–"
    if ci and ci[0] is not None and ci[1] is not None:
        return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{value:.2f}"


def _collapse_labels(f: dict[str, Any]) -> str:
    rows = []
    for audit, workloads in f.items():
        for workload, w in workloads.items():
            skipped = ", ".join(f"{k}: {v}" for k, v in w["not_judged"].items()) or "–"
            conditions = "; ".join(
                f"{c['perturbation'].split('(')[0]} {c['n_collapsed']}/{c['n_judged']}"
                + (
                    f" (excess over {c['control']} {c['collapse_excess']:+.2f})"
                    if c["collapse_excess"] is not None
                    else ""
                )
                for c in w["conditions"]
            )
            rows.append(
                [
                    f"`{audit}`",
                    f"`{workload}`",
                    _rate(w["sham_flag_rate"], w["sham_flag_rate_ci"]),
                    f"{w['n_judged']} of {w['n_runs']}",
                    skipped,
                    conditions or "–",
                ]
            )
    flagged = sum(w["n_flagged"] for a in f.values() for w in a.values())
    judged = sum(w["n_judged"] for a in f.values() for w in a.values())
    runs = sum(w["n_runs"] for a in f.values() for w in a.values())
    rows.append(["all", "", f"{flagged} flagged of {judged} judged", f"{judged} of {runs}", "", ""])
    return table(
        [
            "audit",
            "workload",
            "flag rate, sham + unperturbed [95% CI]",
            "judged",
            "not judged (why)",
            "perturbed: collapsed / judged",
        ],
        rows,
    )


def _warning_protocol(f: dict[str, Any]) -> str:
    parts = []
    for audit, workloads in f.items():
        for workload, w in workloads.items():
            verdict = w.get("claim_3") or {}
            m = w.get("manifold") or {}
            head = (
                f"**`{audit}` / `{workload}`** — SPH {w['sph']}, SOP {w['sop']} steps, "
                f"{w['target_false_alarms']:g} FA/1k; {w['n_collapsed']} collapsed, "
                f"{w['n_not_collapsed']} not collapsed, {w['n_healthy']} healthy runs. "
                f"Claim 3: **{verdict.get('verdict', '–')}** ({verdict.get('reason', '')})."
            )
            if m.get("n_components_90") is not None:
                head += (
                    f" {m['n_components_90']} of {m['n_features']} principal components hold "
                    "90 % of the healthy telemetry"
                )
                if m.get("residual_ratio_median") is not None:
                    head += (
                        f"; before collapsing, runs reach {m['subspace_ratio_median']:.1f}× the "
                        f"healthy 99th percentile in them and {m['residual_ratio_median']:.1f}× "
                        "off them"
                    )
                head += "."
            rows = []
            for name, d in w["detectors"].items():
                if d["event_recall"] is None and d["false_alarms_per_1k"] is None:
                    continue
                lead = d["lead_time_median"]
                rows.append(
                    [
                        f"`{name}`",
                        _rate(d["event_recall"]) + f" (of {d['n_collapses']})",
                        _rate(d["chance_recall_p95"]),
                        _rate(d["clock_recall"]),
                        "–" if lead is None else f"{lead:.0f}",
                        _rate(d["false_alarms_per_1k"]),
                        _rate(d["false_alarms_per_1k_not_collapsed"]),
                        _rate(d["auroc"]),
                        _rate(d["outcome_auroc"]),
                        _rate(d.get("outcome_auroc_doses")),
                    ]
                )
            parts.append(head)
            parts.append(
                table(
                    [
                        "detector",
                        "recall",
                        "chance p95",
                        "clock at its FA",
                        "lead",
                        "FA/1k healthy",
                        "FA/1k perturbed, not collapsed",
                        "step AUROC",
                        "outcome AUROC",
                        "outcome AUROC between doses",
                    ],
                    rows,
                )
            )
    return "\n\n".join(parts)


def _lm_intrinsic(f: dict[str, Any]) -> str:
    def recipe(run: dict[str, Any]) -> str:
        knobs = {k: v for k, v in run["knobs"].items() if k != "lr"}
        return f"`{run['workload']}`" + (
            " " + ", ".join(f"{k} {v}" for k, v in knobs.items()) if knobs else ""
        )

    def g(value: float | None) -> str:
        return "–" if value is None else f"{value:.3g}"

    rows = [
        [
            recipe(r),
            r["knobs"].get("lr", "–"),
            r["seed"],
            f"{r['first_val_loss']:.2f}",
            f"{r['best_val_loss']:.2f} (step {r['best_step']})",
            f"{r['final_val_loss']:.2f}",
            "–" if r["given_back"] is None else f"{r['given_back']:.0%}",
            g(r["attn_logit_max"]),
            g(r["out_logit_max"]),
            f"**{r['outcome']}**" if r["outcome"] != "trained" else r["outcome"],
        ]
        for r in f["runs"]
    ]
    body = table(
        [
            "recipe",
            "lr",
            "seed",
            "val loss first",
            "best",
            "final",
            "gain given back",
            "attention-logit max",
            "output-logit max",
            "outcome",
        ],
        rows,
    )
    if any(r["runs"] > 1 for r in f.get("recipes", [])):
        body += "\n\n" + table(
            ["recipe", "lr", "runs", "diverged [95 % CI]", "of them after training"],
            [
                [
                    recipe(r),
                    r["knobs"].get("lr", "–"),
                    r["runs"],
                    f"{r['diverged']}/{r['runs']} [{r['diverged_ci'][0]:.2f}, "
                    f"{r['diverged_ci'][1]:.2f}]",
                    r["after_training"],
                ]
                for r in f["recipes"]
            ],
        )
    return body


RENDER: dict[str, Callable[..., str]] = {
    "collapse_labels": _collapse_labels,
    "warning_protocol": _warning_protocol,
    "overhead": _overhead,
    "lm_overhead": _lm_overhead,
    "rl_overhead": _rl_overhead,
    "rl_overhead_paper": _rl_overhead,
    "cli_latency": _cli_latency,
    "monitor_cost": _monitor_cost,
    "guard_snapshot": _guard_snapshot,
    "guard_device": _guard_device,
    "guard_comparison": _guard_comparison,
    "telemetry_memory": _telemetry_memory,
    "stability_probes_cost": _stability_probes_cost,
    "scaling": _scaling,
    "import_throughput": _import_throughput,
    "lm_intrinsic_sweep": _lm_intrinsic,
    "lm_intrinsic_edge": _lm_intrinsic,
}


def measured(name: str) -> str:
    """The table of `benchmarks/results/<name>.json`, or how to measure it when it is missing."""
    doc = load(name)
    command = COMMANDS.get(name, f"python benchmarks/{name}.py")
    if doc is None:
        return f"*Not measured yet — run `{command}`.*"
    render = RENDER[name]
    takes_settings = len(inspect.signature(render).parameters) > 1
    body = (
        render(doc["figures"], doc.get("settings", {}))
        if takes_settings
        else render(doc["figures"])
    )
    return body + "\n\n" + provenance(doc)


def figure(name: str, path: str, digits: int = 2, suffix: str = "") -> str:
    """One measured value (`path` is dotted into the figures), or 'not measured yet'."""
    doc = load(name)
    if doc is None:
        return f"(not measured yet — run `{COMMANDS.get(name, name)}`)"
    value: Any = doc["figures"]
    for key in path.split("."):
        value = value[key]
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def test_time() -> str:
    """The suites' running times where `benchmarks/test_time.py` measured them."""
    doc = load("test_time")
    if doc is None:
        return (
            "How long the suites take has not been measured yet — run "
            "`python benchmarks/test_time.py`."
        )
    figures = doc["figures"]
    return (
        f"`make test` took {figures['fast_s'] / 60:.1f} minutes and `make test-slow` "
        f"{figures['slow_s'] / 60:.1f}. {provenance(doc)}"
    )


def verdict_rules(audit: str = "paper_rl") -> str:
    """The verdict rules as `stabilitybench findings` printed them into a findings folder."""
    path = ROOT / "results" / audit / "findings.json"
    if not path.exists():
        return f"*No findings folder `results/{audit}/` yet — run `make findings`.*"
    rules = json.loads(path.read_text())["rules"]
    return "\n".join(f"{number}. {text}" for number, text in sorted(rules.items()))


def learned_at_onset(audit: str) -> str:
    """Per workload of a findings folder: runs whose progress before onset was undefined."""
    path = ROOT / "results" / audit / "summary.json"
    if not path.exists():
        return f"*No findings folder `results/{audit}/` yet — run `make findings`.*"
    counts: dict[str, list[int]] = {}
    for run in json.loads(path.read_text())["runs"]:
        if run.get("status") != "done":
            continue
        tally = counts.setdefault(run["workload"], [0, 0])
        tally[0] += bool(run.get("progress_undefined"))
        tally[1] += 1
    rows = [[f"`{w}`", f"{u} of {n}"] for w, (u, n) in sorted(counts.items())]
    return table(
        ["workload", "runs with no progress before onset (`progress_undefined`)"], rows
    ) + (f"\n\n<small>Counted from `results/{audit}/summary.json`.</small>")


def define_env(env: Any) -> None:
    for macro in (measured, figure, test_time, verdict_rules, learned_at_onset):
        env.macro(macro)
