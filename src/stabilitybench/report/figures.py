"""The report's figures: one function per figure, plain data in, a matplotlib Figure out."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

BASELINE_COLOR = "#9a9a9a"
WINDOW_COLOR = "#f4a259"
STYLE: dict[Any, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "figure.dpi": 100,
}
TELEMETRY_PANELS: tuple[tuple[str, str, bool], ...] = (
    # (signal, axis label, log scale)
    ("grad_norm", "grad norm", True),
    ("grad_cos_prev", "grad cosine", False),
    ("update_ratio", "update ratio", True),
    ("msd", "MSD", False),
)
MAX_GRID = 400


def text(value: object) -> str:
    """A label matplotlib draws literally: `$` would start mathtext, a leading `_` hides it."""
    out = str(value).replace("$", r"\$")
    return " " + out if out.startswith("_") else out


def palette(n: int) -> list[str]:
    """`n` distinguishable colours (tab10, then tab20)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(n)]


@dataclass
class ConditionSeries:
    """One line of a condition figure: the seeds of one knob setting under one perturbation."""

    label: str
    perf: list[pd.DataFrame]  # per run: columns x, perf (perf may be -inf)
    telemetry: list[pd.DataFrame] = field(default_factory=list)  # per run: x + signal columns
    baseline_perf: list[pd.DataFrame] = field(default_factory=list)  # matched unperturbed runs
    collapses: list[tuple[float, float]] = field(default_factory=list)  # (x, perf) per collapse
    alarms: list[tuple[str, float]] = field(default_factory=list)  # (detector, x of first alarm)
    interventions: list[tuple[str, float]] = field(default_factory=list)  # (guard action, x)


GUARD_MARKERS = {"skip": "v", "lr_cut": "s", "reset_moments": "D", "rollback": "<"}


def _intervention_marks(ax: Any, series: Sequence[ConditionSeries], colors: Sequence[Any]) -> None:
    """Each guard intervention: a marker along the top of the performance panel, in the colour
    of its series, shaped by the action (skip ▽, LR cut □, moment reset ◇, rollback ◁)."""
    top = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    for color, s in zip(colors, series, strict=True):
        for action, marker in GUARD_MARKERS.items():
            xs = [x for a, x in s.interventions if a == action and np.isfinite(x)]
            if xs:
                ax.scatter(xs, [0.97] * len(xs), transform=top, marker=marker, s=26,
                           color=color, edgecolors="black", linewidths=0.4, zorder=6,
                           clip_on=False)  # fmt: skip


def _grid(frames: Sequence[pd.DataFrame]) -> np.ndarray:
    xs = np.unique(
        np.concatenate([f["x"].to_numpy(dtype=float) for f in frames if len(f)] or [np.empty(0)])
    )
    xs = xs[np.isfinite(xs)]
    if len(xs) > MAX_GRID:
        xs = np.linspace(xs[0], xs[-1], MAX_GRID)
    return xs


def quantile_band(
    frames: Sequence[pd.DataFrame],
    column: str,
    *,
    floor: float | None = None,
    x_end: float | None = None,
) -> pd.DataFrame:
    """Median and inter-quartile range across runs of `column` on a common x grid.

    Each run is interpolated within its own x range. With `floor`, −inf becomes `floor` and a run
    that ended at −inf (diverged) stays at `floor` until `x_end`, so a dead seed keeps pulling
    the median down instead of vanishing from it.
    """
    frames = [f[["x", column]].dropna() for f in frames if column in f.columns]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"x": [], "median": [], "q25": [], "q75": []})
    grid = _grid(frames)
    if x_end is not None and len(grid) and x_end > grid[-1]:
        grid = np.append(grid, x_end)
    stack = np.full((len(frames), len(grid)), np.nan)
    for i, frame in enumerate(frames):
        x = frame["x"].to_numpy(dtype=float)
        y = frame[column].to_numpy(dtype=float)
        died = floor is not None and len(y) > 0 and np.isneginf(y[-1])
        if floor is not None:
            y = np.where(np.isneginf(y), floor, y)
        finite = np.isfinite(y)
        x, y = x[finite], y[finite]
        if not len(x):
            continue
        inside = (grid >= x[0]) & (grid <= x[-1])
        stack[i, inside] = np.interp(grid[inside], x, y)
        if died:
            stack[i, grid > x[-1]] = floor
    keep = np.isfinite(stack).any(axis=0)
    grid, stack = grid[keep], stack[:, keep]
    if not len(grid):
        return pd.DataFrame({"x": [], "median": [], "q25": [], "q75": []})
    q25, median, q75 = np.nanpercentile(stack, [25, 50, 75], axis=0)
    return pd.DataFrame({"x": grid, "median": median, "q25": q25, "q75": q75})


def _perf_floor(series: Sequence[ConditionSeries]) -> tuple[float | None, bool]:
    """Where −inf performance is drawn (below every finite value), and whether any exists."""
    values = [
        f["perf"].to_numpy(dtype=float)
        for s in series
        for f in (*s.perf, *s.baseline_perf)
        if "perf" in f.columns
    ]
    if not values:
        return None, False
    allv = np.concatenate(values)
    finite = allv[np.isfinite(allv)]
    has_neginf = bool(np.isneginf(allv).any())
    if not len(finite):
        return (-1.0 if has_neginf else None), has_neginf
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else max(abs(high), 1.0)
    return low - 0.15 * span, has_neginf


def _shade(ax: plt.Axes, windows: Sequence[tuple[float, float]], x_span: float) -> None:
    min_width = 0.004 * x_span if x_span > 0 else 1.0
    for start, end in windows:
        ax.axvspan(
            start, max(end, start + min_width), color=WINDOW_COLOR, alpha=0.25, lw=0, zorder=0
        )


def _present_signals(series: Sequence[ConditionSeries]) -> list[tuple[str, str, bool]]:
    """The telemetry panels that some run of these series has values for."""
    return [
        panel
        for panel in TELEMETRY_PANELS
        if any(
            panel[0] in f.columns and f[panel[0]].notna().any() for s in series for f in s.telemetry
        )
    ]


def _x_range(series: Sequence[ConditionSeries]) -> tuple[float, float]:
    all_x = [
        f["x"].to_numpy(dtype=float) for s in series for f in (*s.perf, *s.telemetry) if len(f)
    ]
    x_cat = np.concatenate(all_x) if all_x else np.zeros(1)
    return float(np.nanmin(x_cat)), float(np.nanmax(x_cat))


def _perf_panel(
    ax: Any, series: Sequence[ConditionSeries], colors: Sequence[Any], x_max: float
) -> None:
    """Performance median + IQR per series, dashed baselines, collapse marks, divergence floor."""
    floor, has_neginf = _perf_floor(series)
    for color, s in zip(colors, series, strict=True):
        if s.baseline_perf:
            base = quantile_band(s.baseline_perf, "perf", floor=floor, x_end=x_max)
            ax.plot(base["x"], base["median"], color=color, lw=1.0, ls="--", alpha=0.6)
        band = quantile_band(s.perf, "perf", floor=floor, x_end=x_max)
        ax.fill_between(band["x"], band["q25"], band["q75"], color=color, alpha=0.2, lw=0)
        label = f"{text(s.label)} (n={len(s.perf)})"
        ax.plot(band["x"], band["median"], color=color, lw=1.8, label=label)
        if s.collapses:
            cx = [c[0] for c in s.collapses]
            cy = [
                floor if (floor is not None and not math.isfinite(c[1])) else c[1]
                for c in s.collapses
            ]
            ax.scatter(cx, cy, marker="x", s=42, color=color, linewidths=1.8, zorder=5)
    if has_neginf and floor is not None:
        ax.axhline(floor, color="#555555", lw=0.8, ls=":")
        ax.annotate(
            "non-finite loss (diverged)",
            xy=(x_max, floor),
            xytext=(-2, 3),
            textcoords="offset points",
            fontsize=7,
            color="#555555",
            ha="right",
        )
    ax.set_ylabel("performance\n(median, IQR over seeds)")


def _alarm_lines(axes: Any, series: Sequence[ConditionSeries]) -> None:
    """A detector's first native alarm on each run: a dash-dot line across every panel, one
    colour per detector (labelled once, in the performance legend)."""
    names = list(dict.fromkeys(name for s in series for name, _ in s.alarms))
    cmap = plt.get_cmap("Dark2")
    for i, name in enumerate(names):
        color = matplotlib.colors.to_hex(cmap(i % cmap.N))
        xs = sorted({x for s in series for n, x in s.alarms if n == name})
        for j, x in enumerate(xs):
            for k, ax in enumerate(axes):
                label = f"first alarm: {text(name)}" if j == 0 and k == 0 else None
                ax.axvline(x, color=color, ls="-.", lw=1.0, alpha=0.9, label=label, zorder=4)


def _legends(
    axes: Any,
    series: Sequence[ConditionSeries],
    signals: Sequence[tuple[str, str, bool]],
    has_windows: bool,
) -> None:
    """The performance legend (with baseline / window / collapse keys) and the coherence key."""
    perf_ax = axes[0]
    handles, _ = perf_ax.get_legend_handles_labels()
    extra: list[Any] = []
    if any(s.baseline_perf for s in series):
        extra.append(
            plt.Line2D([], [], color="#555555", ls="--", lw=1.0, label="unperturbed baseline")
        )
    if has_windows:
        extra.append(
            matplotlib.patches.Patch(color=WINDOW_COLOR, alpha=0.4, label="perturbation window")
        )
    if any(s.collapses for s in series):
        extra.append(plt.Line2D([], [], color="#555555", marker="x", ls="", label="collapse"))
    actions = {a for s in series for a, _ in s.interventions}
    for action, marker in GUARD_MARKERS.items():
        if action in actions:
            label = f"guard: {action.replace('_', ' ')}"
            extra.append(plt.Line2D([], [], color="#555555", marker=marker, ls="", label=label))
    perf_ax.legend(
        handles=handles + extra, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )
    if any(signal == "grad_cos_prev" for signal, _, _ in signals) and any(
        "grad_cos_ema" in f.columns for s in series for f in s.telemetry
    ):
        extra_ax = axes[1 + [p[0] for p in signals].index("grad_cos_prev")]
        extra_ax.legend(
            handles=[
                plt.Line2D([], [], color="#555555", lw=1.3, label="vs previous step"),
                plt.Line2D([], [], color="#555555", lw=1.0, ls=":", label="vs gradient EMA"),
            ],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )


LOG_SPAN = 10.0  # a telemetry panel is drawn on a log axis when its band spans this factor


def _telemetry_panel(
    ax: Any, series: Sequence[ConditionSeries], colors: Sequence[Any], panel: tuple[str, str, bool]
) -> None:
    """One telemetry signal: median + IQR per series (log scale when positive and asked)."""
    signal, label, log = panel
    positive = True
    low, high = math.inf, 0.0
    for color, s in zip(colors, series, strict=True):
        band = quantile_band(s.telemetry, signal)
        if band.empty:
            continue
        positive = positive and bool((band["q25"] > 0).all())
        low = min(low, float(band["q25"].min()))
        high = max(high, float(band["q75"].max()))
        ax.fill_between(band["x"], band["q25"], band["q75"], color=color, alpha=0.2, lw=0)
        ax.plot(band["x"], band["median"], color=color, lw=1.3)
        if signal == "grad_cos_prev":
            ema = quantile_band(s.telemetry, "grad_cos_ema")
            if not ema.empty:
                ax.plot(ema["x"], ema["median"], color=color, lw=1.0, ls=":")
    # A log axis only where the signal spans a decade: inside a narrower range (PPO's clipped
    # gradient norm sits at 0.5) every tick label would read the same, e.g. "5×10⁻¹".
    if log and positive and high >= LOG_SPAN * low:
        ax.set_yscale("log")
    ax.set_ylabel(label)


def condition_figure(
    series: Sequence[ConditionSeries],
    *,
    windows: Sequence[tuple[float, float]] = (),
    title: str = "",
    x_label: str = "optimizer step",
) -> Figure:
    """Performance (median + IQR over seeds) with telemetry panels below it, sharing the x axis."""
    with plt.rc_context(STYLE):
        signals = _present_signals(series)
        heights = [2.8] + [1.3] * len(signals)
        fig, axes = plt.subplots(
            len(heights),
            1,
            figsize=(10.5, sum(heights) + 0.6),
            sharex=True,
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
        )
        axes = axes[:, 0]
        colors = palette(len(series))
        x_min, x_max = _x_range(series)
        for ax in axes:
            _shade(ax, windows, x_max - x_min)
        _perf_panel(axes[0], series, colors, x_max)
        _intervention_marks(axes[0], series, colors)
        _alarm_lines(axes, series)
        _legends(axes, series, signals, bool(windows))
        for ax, panel in zip(axes[1:], signals, strict=True):
            _telemetry_panel(ax, series, colors, panel)
        axes[-1].set_xlabel(x_label)
        if title:
            fig.suptitle(text(title), x=0.01, ha="left", fontsize=10)
        fig.align_ylabels(axes)
        fig.tight_layout()
        return fig


@dataclass
class LatentTrajectory:
    """One run's path through the 2-D projection of its latent meta-state."""

    group: str  # `baseline` or the perturbation label
    xy: np.ndarray  # (T, 2)
    onset_index: int | None = None
    collapse_index: int | None = None


def latent_figure(
    trajectories: Sequence[LatentTrajectory], *, axis_label: str = "z_1 / z_2", title: str = ""
) -> Figure:
    """Baseline runs as a grey cloud, perturbed runs coloured by perturbation, collapses as ×."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        groups = sorted({t.group for t in trajectories if t.group != "baseline"})
        colors = dict(zip(groups, palette(len(groups)), strict=True))
        labelled: set[str] = set()
        for t in trajectories:
            if t.group == "baseline" and len(t.xy):
                label = None if "baseline" in labelled else "baseline runs"
                labelled.add("baseline")
                ax.plot(
                    t.xy[:, 0], t.xy[:, 1], color=BASELINE_COLOR, lw=0.8, alpha=0.45, label=label
                )
                ax.scatter(t.xy[:, 0], t.xy[:, 1], color=BASELINE_COLOR, s=3, alpha=0.25, lw=0)
        for t in trajectories:
            if t.group == "baseline" or not len(t.xy):
                continue
            color = colors[t.group]
            label = None if t.group in labelled else text(t.group)
            labelled.add(t.group)
            ax.plot(t.xy[:, 0], t.xy[:, 1], color=color, lw=1.1, alpha=0.85, label=label)
            onset = {"marker": "o", "s": 28, "facecolor": "white", "edgecolor": color, "zorder": 4}
            _mark(ax, t.xy, t.onset_index, onset)
            collapse = {"marker": "x", "s": 70, "color": "black", "linewidths": 2.4, "zorder": 5}
            _mark(ax, t.xy, t.collapse_index, collapse)
            inner = {"marker": "x", "s": 55, "color": color, "linewidths": 1.4, "zorder": 6}
            _mark(ax, t.xy, t.collapse_index, inner)
        handles, _ = ax.get_legend_handles_labels()
        handles += [
            plt.Line2D(
                [],
                [],
                marker="o",
                ls="",
                markerfacecolor="white",
                markeredgecolor="#555555",
                label="onset",
            ),
            plt.Line2D([], [], marker="x", ls="", color="black", label="collapse"),
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        first, _, second = axis_label.partition(" / ")
        ax.set_xlabel(text(first))
        ax.set_ylabel(text(second or first))
        if title:
            ax.set_title(text(title), loc="left")
        fig.tight_layout()
        return fig


def decoupling_figure(
    runs: pd.DataFrame, *, stats: dict[str, str] | None = None, title: str = ""
) -> Figure:
    """Final performance vs stability score, one panel per workload, coloured by perturbation.

    `runs` has columns `workload`, `perturbation`, `final_perf`, `stability_score`;
    `stats` maps a workload to a subtitle (e.g. its Spearman rho and CI).
    """
    stats = stats or {}
    with plt.rc_context(STYLE):
        workloads = sorted(runs["workload"].astype(str).unique()) or ["(none)"]
        n_cols = min(len(workloads), 3)
        n_rows = math.ceil(len(workloads) / n_cols)
        fig, axes = plt.subplots(
            n_rows, n_cols, figsize=(3.6 * n_cols + 0.6, 3.3 * n_rows + 0.5), squeeze=False
        )
        perts = sorted(p for p in runs["perturbation"].astype(str).unique() if p != "none")
        colors = dict(zip(perts, palette(len(perts)), strict=True))
        colors["none"] = BASELINE_COLOR
        for ax, workload in zip(axes.flat, workloads, strict=False):
            sub = runs[runs["workload"].astype(str) == workload]
            for pert, group in sub.groupby(sub["perturbation"].astype(str)):
                ax.scatter(
                    group["stability_score"],
                    group["final_perf"],
                    s=22,
                    alpha=0.85,
                    color=colors.get(str(pert), "#333333"),
                    label=text(pert),
                    edgecolors="white",
                    linewidths=0.4,
                )
            subtitle = stats.get(workload, "")
            ax.set_title(
                text(workload) + (f"\n{text(subtitle)}" if subtitle else ""), loc="left", fontsize=9
            )
            ax.set_xlabel("stability score")
            ax.set_ylabel("final performance")
        for ax in axes.flat[len(workloads) :]:
            ax.axis("off")
        labels = _figure_legend(fig, axes)
        if title:
            fig.suptitle(text(title), x=0.01, ha="left", fontsize=10)
        fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
        return fig


def dose_response_figure(points: pd.DataFrame, *, title: str = "") -> Figure:
    """Collapse rate (with CI error bars) against a knob or perturbation magnitude.

    `points` has columns `panel` (what varies, e.g. `toy · dropout`), `series` (e.g. the
    perturbation), `x`, `rate`, `lo`, `hi` (lo/hi may be NaN).
    """
    with plt.rc_context(STYLE):
        panels = list(dict.fromkeys(points["panel"].astype(str))) or ["(none)"]
        n_cols = min(len(panels), 3)
        n_rows = math.ceil(len(panels) / n_cols)
        fig, axes = plt.subplots(
            n_rows, n_cols, figsize=(3.6 * n_cols + 0.6, 3.0 * n_rows + 0.6), squeeze=False
        )
        all_series = list(dict.fromkeys(points["series"].astype(str)))
        colors = dict(zip(all_series, palette(len(all_series)), strict=True))
        for ax, panel in zip(axes.flat, panels, strict=False):
            sub = points[points["panel"].astype(str) == panel]
            numeric = pd.to_numeric(sub["x"], errors="coerce").notna().all()
            categories = list(dict.fromkeys(sub["x"].astype(str)))
            for series_name, group in sub.groupby(sub["series"].astype(str), sort=False):
                if numeric:
                    group = group.assign(_x=pd.to_numeric(group["x"])).sort_values("_x")
                    xs = group["_x"].to_numpy(dtype=float)
                else:
                    xs = np.array([categories.index(str(v)) for v in group["x"]], dtype=float)
                rate = group["rate"].to_numpy(dtype=float)
                lo = np.nan_to_num(rate - group["lo"].to_numpy(dtype=float), nan=0.0).clip(min=0)
                hi = np.nan_to_num(group["hi"].to_numpy(dtype=float) - rate, nan=0.0).clip(min=0)
                ax.errorbar(
                    xs,
                    rate,
                    yerr=[lo, hi],
                    marker="o",
                    ms=4,
                    capsize=3,
                    lw=1.3,
                    color=colors[str(series_name)],
                    label=text(series_name),
                )
            if not numeric:
                ax.set_xticks(range(len(categories)), [text(c) for c in categories])
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(text(panel), loc="left", fontsize=9)
            ax.set_ylabel("collapse rate")
            xlabel = str(panel).rsplit(" · ", 1)[-1]
            ax.set_xlabel(text(xlabel))
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        _figure_legend(fig, axes)
        if title:
            fig.suptitle(text(title), x=0.01, ha="left", fontsize=10)
        fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(all_series) / 3), 1, 1))
        return fig


def _figure_legend(fig: Figure, axes: np.ndarray) -> list[str]:
    """One legend below all panels, each label once; returns the labels."""
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    return labels


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as a 256-colour PNG (what the report embeds), without the metadata block (it
    names a web address)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return palette_png(buffer.getvalue())


def palette_png(png: bytes) -> bytes:
    """An opaque PNG re-encoded with a 256-colour palette (median cut, no dithering): about a
    third of the bytes for these line-and-band plots, with no visible change; deterministic."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        palette = image.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def save_png(fig: Figure, path: Path, dpi: int = 150) -> Path:
    """Write the figure as a PNG file for papers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
    return path


def _mark(ax: Any, xy: np.ndarray, index: int | None, style: dict[str, Any]) -> None:
    """A marker at point `index` of a trajectory (xy: (n, 2)), if it lies on it."""
    if index is not None and 0 <= index < len(xy):
        ax.scatter(xy[index, 0], xy[index, 1], **style)
