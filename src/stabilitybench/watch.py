"""`stabilitybench watch`: a live view of an audit's runs, read from the files they stream.

Reading only: nothing here writes a file. `read_snapshot` builds a typed `WatchSnapshot` from an
audit folder (or one run's folder), re-reading and re-scoring a run's tables only when their
files changed since the previous snapshot (a new part file, a finished table); `render` turns a
snapshot into a rich Table; `watch_folder` is the loop behind the command.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import sleep
from typing import TYPE_CHECKING, Any, NamedTuple

from rich import box
from rich.table import Table
from rich.text import Text

from stabilitybench.errors import StabilityBenchError
from stabilitybench.io import read_json
from stabilitybench.store import AUDIT_FILE, PREFIX_DIR, PREFIX_MEMBERS, RunInfo, RunStore
from stabilitybench.streaming import PART_GLOB, partial_dir, read_parts
from stabilitybench.types import RunStatus

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from rich.console import Console

SIGNALS = ("loss", "grad_norm", "update_ratio")
"""The telemetry columns shown (a role's column, `critic/grad_norm`, where the plain one is absent)."""
RECENT_FINISHED = 5
"""Finished runs shown besides the running ones (`--all`: every run)."""
GUARD_EVENT_KIND = "guard"  # the `kind` of a guard intervention's events row (guard.core)
WATCHED_TABLES = ("telemetry", "events")
RUN_FILE = "run.json"
_FINISHED = (RunStatus.DONE, RunStatus.FAILED)
_UNFINISHED = (RunStatus.RUNNING, RunStatus.PENDING)
_STATUS_STYLE = {
    RunStatus.RUNNING: "bold yellow",
    RunStatus.DONE: "green",
    RunStatus.FAILED: "bold red",
    RunStatus.PENDING: "dim",
}
_BAR_WIDTH = 8
_RUN_MIN_WIDTH = 20


class WatchTarget(NamedTuple):
    """What `watch` reads: an audit folder (every run under `runs/`) or one run's folder."""

    folder: Path
    single_run: bool
    title: str

    def run_dirs(self) -> list[Path]:
        """The run folders to show, listed afresh at each refresh (an audit adds runs)."""
        if self.single_run:
            return [self.folder]
        store = RunStore(self.folder)
        return [store.run_dir(run_id) for run_id in store.run_ids()]


@dataclass(frozen=True)
class DetectorView:
    """One detector on one run so far: its latest score, whether it alarms there, how often."""

    name: str
    score: float  # at the latest step with a finite score (NaN: none yet)
    alarm: bool  # the detector's native rule holds at that step
    alarms: int  # alarm episodes so far (the rule turning on)


class GuardAction(NamedTuple):
    """One guard intervention: the step whose row alarmed and what was done (skip, lr_cut, …)."""

    step: int
    action: str


@dataclass(frozen=True)
class TableView:
    """What a run's tables say so far; `stamp` names the files it was read from (None: unread)."""

    stamp: tuple[Any, ...] | None = None
    step: int | None = None  # the latest optimizer step
    env_step: int | None = None  # the latest environment step (RL)
    values: Mapping[str, float] = field(default_factory=dict)  # SIGNALS → latest value
    detectors: tuple[DetectorView, ...] = ()
    actions: tuple[GuardAction, ...] | None = None  # None: no events written yet


@dataclass(frozen=True)
class RunView:
    """One run as the view shows it: its run.json and what its tables say so far."""

    run_id: str
    info: RunInfo
    tables: TableView
    # the tables are those of the prefix it shares with other runs (`share_prefix`)
    shared: bool = False

    @property
    def label(self) -> str:
        return self.info.label or self.run_id

    @property
    def guard_label(self) -> str | None:
        """The guard's label (`zclip:skip`), or None for an unguarded run."""
        guard = self.info.guard
        return None if not guard else str(guard.get("label") or guard.get("detector") or "guard")

    @property
    def progress(self) -> tuple[int | None, int | None]:
        """(done, total) in the unit of the workload's `total_steps`: environment steps for RL,
        optimizer steps otherwise; total None where the spec does not say."""
        workload = self.info.spec.get("workload")
        total = workload.get("total_steps") if isinstance(workload, dict) else None
        if self.info.kind == "rl":
            done = self.tables.env_step
        else:
            done = None if self.tables.step is None else self.tables.step + 1
        return done, (int(total) if isinstance(total, int | float) and total > 0 else None)


@dataclass(frozen=True)
class WatchSnapshot:
    """The view at one refresh: the runs shown (in order) and every run's status counted."""

    title: str
    runs: tuple[RunView, ...]  # running first, then the latest finished, then pending (--all)
    counts: Mapping[str, int]  # status → runs, over every run (shown or not)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> bool:
        """Every run is done or failed (and there is at least one)."""
        return self.total > 0 and all(self.counts.get(s.value, 0) == 0 for s in _UNFINISHED)


# -- reading -------------------------------------------------------------------------------------
def resolve_target(path: Path) -> WatchTarget:
    """An audit folder or one run's folder; anything else is a user error naming the path."""
    if not path.exists():
        raise StabilityBenchError(f"{path}: no such folder")
    if (path / AUDIT_FILE).is_file():
        try:
            name = RunStore(path).audit().name
        except (OSError, ValueError):
            name = ""
        return WatchTarget(path, single_run=False, title=name or str(path))
    if (path / RUN_FILE).is_file():
        return WatchTarget(path, single_run=True, title=str(path))
    raise StabilityBenchError(
        f"{path} is neither an audit folder (no {AUDIT_FILE}) nor a run's folder (no {RUN_FILE}); "
        "watch an audit (`stabilitybench watch audits/NAME`) or one of its runs "
        "(`audits/NAME/runs/RUN_ID`)"
    )


def read_snapshot(
    target: WatchTarget, previous: WatchSnapshot | None = None, *, show_all: bool = False
) -> WatchSnapshot:
    """The view now. Only the runs shown have their tables read, and a run's tables are read and
    scored again only when their files changed since `previous`."""
    infos = [(d, info) for d in target.run_dirs() if (info := _read_info(d)) is not None]
    infos.sort(key=lambda item: _order(item[1]))
    if not (show_all or target.single_run):
        running = [i for i in infos if i[1].status == RunStatus.RUNNING]
        finished = [i for i in infos if i[1].status in _FINISHED]
        shown = running + finished[:RECENT_FINISHED]
    else:
        shown = infos
    before = {} if previous is None else {r.run_id: r.tables for r in previous.runs}
    prefixes = {} if target.single_run else shared_prefixes(target.folder)
    views = []
    for d, info in shown:
        prefix = prefixes.get(d.name) if info.status == RunStatus.RUNNING else None
        if prefix is not None and not any(_written(table_stamp(d), n) for n in WATCHED_TABLES):
            views.append(RunView(d.name, info, read_tables(prefix, before.get(d.name)), True))
        else:
            views.append(RunView(d.name, info, read_tables(d, before.get(d.name))))
    runs = tuple(views)
    counts = {s.value: 0 for s in RunStatus}
    for _, info in infos:
        counts[info.status.value] += 1
    return WatchSnapshot(target.title, runs, counts)


def shared_prefixes(folder: Path) -> dict[str, Path]:
    """run id → the folder of the prefix it shares with other runs while that prefix trains
    (`.prefix/<run id>/`, its `members.json`; a prefix without one, from an older version, is
    its first run's only)."""
    root = folder / PREFIX_DIR
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for prefix in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            members = [str(m) for m in read_json(prefix / PREFIX_MEMBERS)]
        except (OSError, ValueError, TypeError):
            members = [prefix.name]
        found.update(dict.fromkeys(members, prefix))
    return found


def _read_info(run_dir: Path) -> RunInfo | None:
    try:
        return RunInfo.of(read_json(run_dir / RUN_FILE))
    except (OSError, ValueError):  # gone, or not a run.json this version can read
        return None


def _order(info: RunInfo) -> tuple[int, float, str]:
    """Running runs first (oldest first), then finished ones (the latest first), then pending."""
    if info.status == RunStatus.RUNNING:
        return 0, info.started or 0.0, info.label
    if info.status in _FINISHED:
        return 1, -(info.finished or 0.0), info.label
    return 2, 0.0, info.label


def table_stamp(run_dir: Path) -> tuple[Any, ...]:
    """What the watched tables' files are now: per table, the finished file's size and time and
    the number of part files. Equal stamps: nothing to read again."""
    stamp: list[Any] = []
    for name in WATCHED_TABLES:
        path = run_dir / f"{name}.parquet"
        try:
            stat = path.stat()
            finished: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            finished = None
        parts = partial_dir(path)
        stamp.append((finished, sum(1 for _ in parts.glob(PART_GLOB)) if parts.is_dir() else 0))
    return tuple(stamp)


def read_tables(run_dir: Path, previous: TableView | None = None) -> TableView:
    """A run's telemetry and events so far, summarised; `previous` if its files are unchanged."""
    stamp = table_stamp(run_dir)
    if previous is not None and previous.stamp == stamp:
        return previous
    if not any(_written(stamp, name) for name in WATCHED_TABLES):
        return TableView(stamp=stamp)  # a pending run, or one just started
    try:
        telemetry = _read_table(run_dir, "telemetry")
        events = _read_table(run_dir, "events")
    except (OSError, ValueError):
        # A part removed under us as the run finishes its table: read it again next refresh.
        return TableView() if previous is None else replace(previous, stamp=None)
    return TableView(
        stamp=stamp,
        step=_last_int(telemetry, "step"),
        env_step=_last_int(telemetry, "env_step"),
        values=latest_values(telemetry),
        detectors=detector_views(telemetry),
        actions=guard_actions(events) if _written(stamp, "events") else None,
    )


def _written(stamp: tuple[Any, ...], name: str) -> bool:
    """Whether the table had a finished file or part files when `stamp` was taken."""
    finished, parts = stamp[WATCHED_TABLES.index(name)]
    return finished is not None or parts > 0


def _read_table(run_dir: Path, name: str) -> pd.DataFrame:
    """A finished table, else the part files of one being written, else an empty table."""
    import pandas as pd

    path = run_dir / f"{name}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    return read_parts(partial_dir(path))  # no folder: an empty table


def _last_int(table: pd.DataFrame, column: str) -> int | None:
    if column not in table.columns:
        return None
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce").dropna()
    return int(values.max()) if len(values) else None


def signal_column(columns: Sequence[str], signal: str) -> str | None:
    """The column holding `signal`: itself, else the first role's (`critic/grad_norm`)."""
    if signal in columns:
        return signal
    return next((c for c in columns if c.rpartition("/")[2] == signal), None)


def latest_values(telemetry: pd.DataFrame) -> dict[str, float]:
    """The latest recorded value of each of SIGNALS the telemetry has (a probe that skips steps
    leaves gaps: the last value it measured)."""
    import pandas as pd

    out: dict[str, float] = {}
    for signal in SIGNALS:
        column = signal_column([str(c) for c in telemetry.columns], signal)
        if column is None:
            continue
        values = pd.to_numeric(telemetry[column], errors="coerce").dropna()
        if len(values):
            out[signal] = float(values.iloc[-1])
    return out


def detector_views(telemetry: pd.DataFrame) -> tuple[DetectorView, ...]:
    """Every detector that needs no fit and is not a control, scored offline on the telemetry so
    far (`score` gives what `update` would have given step by step)."""
    import numpy as np

    from stabilitybench.detectors.base import DetectorSettings, detector_classes

    views = []
    for name, cls in detector_classes().items():
        if cls.fitted or cls.control:
            continue
        detector = cls.create(DetectorSettings())
        scores = np.asarray(detector.score(telemetry), dtype=float)
        alarms = np.asarray(detector.native(scores), dtype=bool)
        views.append(detector_view(name, scores, alarms))
    return tuple(views)


def detector_view(name: str, scores: np.ndarray, alarms: np.ndarray) -> DetectorView:
    """A detector's latest finite score (n,), whether its alarm (n,) bool holds there, and how
    many alarm episodes (stretches of the rule holding) there were."""
    import numpy as np

    finite = np.flatnonzero(np.isfinite(scores))
    if finite.size == 0:
        return DetectorView(name, math.nan, False, 0)
    from stabilitybench.metrics.alarms import episode_bounds

    last = int(finite[-1])
    starts, _ = episode_bounds(alarms)
    return DetectorView(name, float(scores[last]), bool(alarms[last]), len(starts))


def guard_actions(events: pd.DataFrame) -> tuple[GuardAction, ...]:
    """The guard interventions of an events table, by step."""
    if events.empty or not {"kind", "name", "start_step"} <= set(events.columns):
        return ()
    rows = events[events["kind"] == GUARD_EVENT_KIND]
    actions = [
        GuardAction(int(step), str(action))
        for step, action in zip(rows["start_step"], rows["name"], strict=True)
        if step is not None and not (isinstance(step, float) and math.isnan(step))
    ]
    return tuple(sorted(actions))


# -- rendering -----------------------------------------------------------------------------------
def render(snapshot: WatchSnapshot, width: int | None = None) -> Table:
    """The snapshot as one table: a row per run shown, a column per signal and detector that any
    run shown has a value for. Where one column per detector would not fit in `width`
    characters, the detectors share one column, a line each."""
    runs = snapshot.runs
    signals = [s for s in SIGNALS if any(s in r.tables.values for r in runs)]
    detectors = shown_detectors(runs)
    rows = [_cells(run, signals, detectors) for run in runs]
    wide = width is None or _wide_width(signals, detectors, rows) <= width
    table = Table(
        title=_title(snapshot),
        caption=_caption(snapshot, bool(detectors)),
        box=box.SIMPLE_HEAD,  # no vertical rules: a column more fits a terminal's width
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("run", overflow="fold", min_width=_RUN_MIN_WIDTH)
    table.add_column("status")
    table.add_column("progress", min_width=_BAR_WIDTH)  # narrow: the numbers under the bar
    for name in signals:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("guard", min_width=10)  # before the detectors: what a narrow view crops
    for name in detectors if wide else ["detectors"] if detectors else []:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        if wide:
            scores = [detector_cell(n, v) for n, v in zip(detectors, row.views, strict=True)]
        else:  # one column: a line per detector, named
            views = zip(detectors, row.views, strict=True)
            lines = [detector_cell(n, v, named=True) for n, v in views]
            scores = [Text("\n").join(lines)] if lines else []
        table.add_row(*row.fixed, row.guard, *scores)
    return table


class _RowCells(NamedTuple):
    """One run's cells: run, status, progress and signals; guard; its detectors' views."""

    fixed: list[Text]
    guard: Text
    views: list[DetectorView | None]  # in the order of the detectors shown


def _cells(run: RunView, signals: Sequence[str], detectors: Sequence[str]) -> _RowCells:
    by_name = {d.name: d for d in run.tables.detectors}
    label = Text(run.label)
    if run.shared:
        label.append(" (shared prefix)", style="dim")
    return _RowCells(
        [
            label,
            Text(run.info.status.value, style=_STATUS_STYLE.get(run.info.status, "")),
            progress_cell(*run.progress),
            *[_number(run.tables.values.get(s)) for s in signals],
        ],
        guard_cell(run),
        [by_name.get(name) for name in detectors],
    )


def _wide_width(signals: Sequence[str], detectors: Sequence[str], rows: Sequence[_RowCells]) -> int:
    """The characters the table needs with a column per detector (the run column at its least)."""
    widths = [len(h) for h in ["status", "progress", *signals, "guard", *detectors]]
    for row in rows:
        views = [detector_cell(n, v) for n, v in zip(detectors, row.views, strict=True)]
        cells = [*row.fixed[1:], row.guard, *views]
        widths = [max(w, c.cell_len) for w, c in zip(widths, cells, strict=True)]
    # Each column: its text, a space of padding either side and a rule between columns; the
    # outer edges (no edge, no outer padding) take nothing.
    return _RUN_MIN_WIDTH + sum(w + 3 for w in widths)


def shown_detectors(runs: Sequence[RunView]) -> list[str]:
    """The detectors with a score on some run shown (one whose signals no run records is left
    out), in the registry's order."""
    views = [view for run in runs for view in run.tables.detectors]
    scored = {view.name for view in views if math.isfinite(view.score)}
    return [name for name in dict.fromkeys(view.name for view in views) if name in scored]


def _title(snapshot: WatchSnapshot) -> Text:
    counts = ", ".join(f"{n} {status}" for status, n in snapshot.counts.items() if n)
    return Text(f"{snapshot.title}: {counts or 'no runs yet'}")


def _caption(snapshot: WatchSnapshot, detectors: bool) -> Text:
    lines = []
    if detectors:
        lines.append("detectors: latest score (alarms so far); ● red: in alarm at the latest step")
    hidden = snapshot.total - len(snapshot.runs)
    if hidden:
        lines.append(f"{hidden} more run(s) not shown (--all shows every run)")
    return Text("\n".join(lines))


def progress_cell(done: int | None, total: int | None) -> Text:
    """A bar and `done/total` where the total is known, else the step reached."""
    if done is None:
        return Text("–" if total is None else f"0/{total}")
    if total is None:
        return Text(f"step {done}")
    filled = round(min(done / total, 1.0) * _BAR_WIDTH)
    bar = Text("━" * filled, style="green")
    bar.append("─" * (_BAR_WIDTH - filled), style="dim")
    bar.append(f" {done}/{total}")
    return bar


def detector_cell(name: str, view: DetectorView | None, *, named: bool = False) -> Text:
    """`score (alarms so far)`, red with a ● while the detector alarms; `named`: its name first."""
    prefix = f"{name} " if named else ""
    if view is None or not math.isfinite(view.score):
        return Text(f"{prefix}–", style="dim")
    text = f"{prefix}{view.score:.3g} ({view.alarms})"
    return Text(f"● {text}", style="bold red") if view.alarm else Text(text)


def guard_cell(run: RunView) -> Text:
    """The guard's label, its interventions so far and the latest one (`zclip:skip 3, skip @34`)."""
    label = run.guard_label
    if label is None:
        return Text("–", style="dim")
    actions = run.tables.actions
    if actions is None:  # the run has written no events yet (nothing to count)
        return Text(label)
    if not actions:
        return Text(f"{label} 0")
    last = actions[-1]
    return Text(f"{label} {len(actions)}, {last.action} @{last.step}", style="yellow")


def _number(value: float | None) -> Text:
    return Text("–", style="dim") if value is None else Text(f"{value:.4g}")


# -- the loop ------------------------------------------------------------------------------------
def watch_folder(
    path: Path,
    console: Console,
    *,
    interval: float = 2.0,
    once: bool = False,
    show_all: bool = False,
    follow: bool = False,
) -> None:
    """Show the runs under `path` and refresh every `interval` seconds until every run has
    finished (`follow`: until Ctrl-C); `once`: print the view one time. Ctrl-C ends it quietly."""
    if not (math.isfinite(interval) and interval > 0):
        raise StabilityBenchError(f"--interval: a positive number of seconds; got {interval}")
    try:
        target = resolve_target(path)
        snapshot = read_snapshot(target, show_all=show_all)
        if once:
            console.print(render(snapshot, console.width))
            return
        snapshot = _live(
            target, snapshot, console, interval=interval, show_all=show_all, follow=follow
        )
    except KeyboardInterrupt:
        console.print("stopped watching", style="dim", highlight=False)
        return
    console.print(f"every run has finished ({_title(snapshot).plain})", highlight=False)


def _live(
    target: WatchTarget,
    snapshot: WatchSnapshot,
    console: Console,
    *,
    interval: float,
    show_all: bool,
    follow: bool,
) -> WatchSnapshot:
    """Refresh a rich Live view until every run has finished (or forever with `follow`)."""
    from rich.live import Live

    try:
        with Live(render(snapshot, console.width), console=console, auto_refresh=False) as live:
            while follow or not snapshot.finished:
                sleep(interval)
                snapshot = read_snapshot(target, snapshot, show_all=show_all)
                live.update(render(snapshot, console.width), refresh=True)
    finally:
        if not console.is_terminal:  # Live ends its last view with a new line on a terminal only
            console.line()
    return snapshot
