"""Overview: the spec, versions, runs by status, compute and elapsed time, failed runs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from stabilitybench.report.data import ReportData
from stabilitybench.report.markup import duration, esc, notice, table
from stabilitybench.store import RunStore


def audit_spec(data: ReportData) -> Mapping[str, Any]:
    return data.audit.spec


def audit_name(data: ReportData, store: RunStore) -> str:
    return data.audit.name or str(audit_spec(data).get("name") or store.root.name)


def short_perturbation(perturbation: Any) -> str:
    """`lr_spike(at=0.3, factor=10)` for one perturbation, `a + b` for a list, `none` for []."""
    if isinstance(perturbation, Mapping):
        args = ", ".join(f"{k}={v}" for k, v in perturbation.items() if k != "kind")
        return f"{perturbation.get('kind', '?')}({args})"
    if isinstance(perturbation, list):
        return " + ".join(short_perturbation(p) for p in perturbation) or "none"
    return str(perturbation)


def _cards(data: ReportData) -> str:
    counts = Counter(r.status for r in data.records)
    timings = [r.timing for r in data.records]
    wall = [t.wall_s for t in timings if t.wall_s is not None]
    started = [t.started for t in timings if t.started is not None]
    finished = [t.finished for t in timings if t.finished is not None]
    elapsed = max(finished) - min(started) if started and finished else None
    cards = [("runs", str(len(data.records)))]
    cards += [(status, str(n)) for status, n in sorted(counts.items())]
    cards.append(("compute time", duration(sum(wall)) if wall else "—"))
    cards.append(("elapsed", duration(elapsed) if elapsed is not None and elapsed >= 0 else "—"))
    items = "".join(
        f'<div class="card"><b>{esc(v)}</b><span class="muted">{esc(k)}</span></div>'
        for k, v in cards
    )
    return f'<div class="cards">{items}</div>'


def _facts(data: ReportData, store: RunStore) -> str:
    from stabilitybench import __version__

    spec = audit_spec(data)
    version = data.audit.version
    # A findings folder's report is written in export's temporary folder: name where its runs
    # came from (the summary's path, which export sets to the audit folder or the merged parts).
    source = data.summary.audit.path if data.summary is not None else None
    rows = [
        ("audit folder", esc(source or store.root)),
        ("package version (audit)", esc(version or "unknown")),
        ("package version (report)", esc(__version__)),
    ]
    if isinstance(workloads := spec.get("workloads"), list):
        names = [f"{w.get('name', '?')} ({w.get('kind', '?')})" for w in workloads]
        rows.append(("workloads", esc(", ".join(names))))
    if isinstance(seeds := spec.get("seeds"), list):
        rows.append(("seeds", esc(", ".join(str(s) for s in seeds))))
    if isinstance(perturbations := spec.get("perturbations"), list):
        rows.append(("perturbations", esc("; ".join(map(short_perturbation, perturbations)))))
    for w in workloads if isinstance(workloads, list) else []:
        if isinstance(w, dict) and isinstance(own := w.get("perturbations"), list):
            text = "; ".join(map(short_perturbation, own))
            rows.append((f"perturbations of {esc(w.get('name', '?'))}", esc(text)))
    html = table([("", False), ("", False)], rows)
    return html.replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _failures(data: ReportData) -> list[str]:
    failed = [r for r in data.records if r.status == "failed"]
    if not failed:
        return []
    parts = [f"<h3>Failed runs ({len(failed)})</h3>"]
    for r in failed:
        text = r.error_text or "no error text recorded"
        parts.append(
            f"<details><summary>{esc(r.label or r.run_id)}: {esc(r.error or '')}</summary>"
            f"<pre>{esc(text)}</pre></details>"
        )
    return parts


def section_overview(data: ReportData, store: RunStore) -> str:
    """Spec, versions, runs by status, wall time, failed runs."""
    parts = ['<h2 id="overview">Overview</h2>', _cards(data), _facts(data, store)]
    parts.append(
        "<details><summary>the resolved spec (audit.json)</summary><pre>"
        + esc(json.dumps(data.audit.document(), indent=2, sort_keys=True, default=str))
        + "</pre></details>"
    )
    parts += _failures(data)
    unfinished = sum(r.status in ("pending", "running") for r in data.records)
    if unfinished:
        parts.append(
            notice(
                f"{unfinished} runs have not finished; they are left out of every section below."
            )
        )
    return "\n".join(parts)
