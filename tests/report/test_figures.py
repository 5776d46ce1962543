"""Figure functions: the statistics they draw, and what ends up on the axes."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stabilitybench.report import figures as figs
from stabilitybench.report.data import project_2d, slug, unique_slugs


def test_quantile_band_is_median_and_quartiles_across_runs() -> None:
    x = [0.0, 1.0, 2.0]
    frames = [pd.DataFrame({"x": x, "perf": [1.0 * k, 2.0 * k, 3.0 * k]}) for k in (1, 2, 3)]
    band = figs.quantile_band(frames, "perf")
    # values at each x are (1, 2, 3)·(x+1): median 2(x+1), quartiles 1.5(x+1) and 2.5(x+1)
    np.testing.assert_allclose(band["median"], [2.0, 4.0, 6.0])
    np.testing.assert_allclose(band["q25"], [1.5, 3.0, 4.5])
    np.testing.assert_allclose(band["q75"], [2.5, 5.0, 7.5])


def test_quantile_band_keeps_a_diverged_run_at_the_floor() -> None:
    alive = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "perf": [0.0, 1.0, 2.0, 3.0]})
    dead = pd.DataFrame({"x": [0.0, 1.0], "perf": [0.0, -math.inf]})
    band = figs.quantile_band([alive, dead], "perf", floor=-10.0, x_end=3.0)
    # after its divergence the dead run counts as -10 until the end, so the median is the mean
    np.testing.assert_allclose(band["median"], [0.0, -4.5, -4.0, -3.5])


def test_quantile_band_interpolates_runs_with_different_eval_steps() -> None:
    a = pd.DataFrame({"x": [0.0, 10.0], "perf": [0.0, 10.0]})
    b = pd.DataFrame({"x": [0.0, 5.0, 10.0], "perf": [0.0, 1.0, 2.0]})
    band = figs.quantile_band([a, b], "perf")
    np.testing.assert_allclose(band["x"], [0.0, 5.0, 10.0])
    np.testing.assert_allclose(band["median"], [0.0, 3.0, 6.0])  # mean of (5, 1) and (10, 2)


def _series(label: str, seeds: int, *, with_msd: bool) -> figs.ConditionSeries:
    steps = np.arange(50, dtype=float)
    telemetry = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        frame = pd.DataFrame(
            {
                "x": steps,
                "grad_norm": np.exp(rng.normal(0, 0.1, 50)),
                "grad_cos_prev": rng.uniform(-0.2, 0.5, 50),
                "update_ratio": np.full(50, 1e-3),
            }
        )
        if with_msd:
            frame["msd"] = rng.random(50)
        telemetry.append(frame)
    perf = [
        pd.DataFrame({"x": steps[::10], "perf": -np.exp(-steps[::10] / 20)}) for _ in range(seeds)
    ]
    return figs.ConditionSeries(
        label=label, perf=perf, telemetry=telemetry, collapses=[(20.0, -0.5)]
    )


@pytest.mark.parametrize("with_msd", [True, False])
def test_condition_figure_has_one_panel_per_available_signal(with_msd: bool) -> None:
    fig = figs.condition_figure(
        [_series("lr=0.1", 3, with_msd=with_msd), _series("lr=$1$", 2, with_msd=with_msd)],
        windows=[(20.0, 30.0)],
        title="toy · lr_spike",
    )
    try:
        axes = fig.axes
        assert len(axes) == 1 + 3 + int(with_msd)  # performance + grad norm, cosine, ratio (+ MSD)
        assert axes[1].get_yscale() == "linear"  # gradient norm within 0.7-1.4: no decade
        assert axes[2].get_yscale() == "linear"  # cosine can be negative
        assert [a.get_xlim() for a in axes[1:]] == [axes[0].get_xlim()] * (len(axes) - 1)  # aligned
        legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
        assert legend[:2] == ["lr=0.1 (n=3)", r"lr=\$1\$ (n=2)"]
        assert "perturbation window" in legend and "collapse" in legend
        shaded = [p for p in axes[0].patches if p.get_x() == 20.0]
        assert shaded and math.isclose(shaded[0].get_width(), 10.0)
        image = Image.open(io.BytesIO(figs.png_bytes(fig)))
        assert image.size == (round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100))
    finally:
        plt.close(fig)


@pytest.mark.parametrize(("spread", "scale"), [(0.001, "linear"), (3.0, "log")])
def test_grad_norm_panel_is_logarithmic_only_across_a_decade(spread: float, scale: str) -> None:
    # PPO clips its gradient norm at 0.5: a log axis there labelled every tick "5×10⁻¹".
    series = _series("ppo", 3, with_msd=False)
    for seed, frame in enumerate(series.telemetry):
        rng = np.random.default_rng(seed)
        frame["grad_norm"] = 0.5 * np.exp(rng.normal(0, spread, len(frame)))
    fig = figs.condition_figure([series], title="ppo · none")
    try:
        panel = fig.axes[1]
        assert panel.get_ylabel() == "grad norm"
        assert panel.get_yscale() == scale
        fig.canvas.draw()
        low, high = panel.get_ylim()
        labels = [
            t.get_text()
            for t in panel.get_yticklabels()
            if t.get_text() and low <= t.get_position()[1] <= high
        ]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    finally:
        plt.close(fig)


def test_latent_figure_marks_collapses_and_onsets() -> None:
    t = np.linspace(0, 1, 30)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    trajectories = [
        figs.LatentTrajectory("baseline", circle),
        figs.LatentTrajectory("lr_spike", circle + 0.5, onset_index=10, collapse_index=20),
    ]
    fig = figs.latent_figure(trajectories, axis_label="z_1 / z_2")
    try:
        ax = fig.axes[0]
        offsets = [c.get_offsets() for c in ax.collections]
        collapse_xy = circle[20] + 0.5
        assert any(np.allclose(o, [collapse_xy]) for o in offsets if len(o) == 1)
        assert ax.get_xlabel() == "z_1" and ax.get_ylabel() == "z_2"
    finally:
        plt.close(fig)


def test_decoupling_and_dose_response_figures_draw_every_point() -> None:
    runs = pd.DataFrame(
        {
            "workload": ["a", "a", "a", "b"],
            "perturbation": ["none", "lr_spike", "lr_spike", "none"],
            "final_perf": [1.0, 0.5, 0.7, -3.0],
            "stability_score": [0.9, 0.2, 0.4, 1.0],
        }
    )
    fig = figs.decoupling_figure(runs, stats={"a": "Spearman ρ = 1"})
    try:
        drawn = sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections)
        assert drawn == 4
        assert "Spearman ρ = 1" in fig.axes[0].get_title(loc="left")
    finally:
        plt.close(fig)
    points = pd.DataFrame(
        {
            "panel": ["a · dropout"] * 2,
            "series": ["all"] * 2,
            "x": [0.0, 0.1],
            "rate": [0.8, 0.2],
            "lo": [0.5, 0.05],
            "hi": [0.95, 0.5],
        }
    )
    fig = figs.dose_response_figure(points)
    try:
        line = fig.axes[0].lines[0]
        np.testing.assert_allclose(line.get_ydata(), [0.8, 0.2])
        assert fig.axes[0].get_xlabel() == "dropout"
    finally:
        plt.close(fig)


def test_projection_uses_baseline_principal_axes() -> None:
    rng = np.random.default_rng(0)
    # baseline varies along e1 (large) and e2 (small), almost nothing along e3
    baseline = rng.normal(size=(200, 3)) * np.array([5.0, 1.0, 0.01])
    (projected,), label = project_2d(baseline, [baseline])
    assert "PC" in label
    spreads = projected.std(axis=0)
    assert spreads[0] == pytest.approx(5.0, rel=0.15) and spreads[1] == pytest.approx(1.0, rel=0.15)


def test_slugs_are_file_safe_and_unique() -> None:
    assert slug("toy · lr_spike(at=0.3,factor=10)") == "toy-lr-spike-at-0-3-factor-10"
    assert slug("<script>") == "script"
    assert unique_slugs(["a b", "a-b", "c"]) == ["a-b", "a-b-2", "c"]


def test_condition_figure_marks_each_guard_intervention_on_the_performance_panel() -> None:
    guarded = _series("lr=0.1 · guard zclip:rollback", 2, with_msd=False)
    guarded.interventions = [("rollback", 21.0), ("skip", 25.0), ("rollback", 40.0)]
    fig = figs.condition_figure([_series("lr=0.1", 2, with_msd=False), guarded], title="guards")
    try:
        perf = fig.axes[0]
        marks = {
            tuple(c.get_paths()[0].vertices.round(3).flatten()[:4]): sorted(c.get_offsets()[:, 0])
            for c in perf.collections
            if len(c.get_offsets()) and np.allclose(c.get_offsets()[:, 1], 0.97)
        }
        assert sorted(sorted(xs) for xs in marks.values()) == [[21.0, 40.0], [25.0]]
        legend = [t.get_text() for t in perf.get_legend().get_texts()]
        assert "guard: rollback" in legend and "guard: skip" in legend
        assert "guard: lr cut" not in legend
    finally:
        plt.close(fig)


def test_embedded_figures_are_256_colour_pngs_a_third_of_the_size() -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.linspace(0, 10, 400)
    for k in range(3):
        ax.plot(x, np.sin(x + k), label=f"run {k}")
        ax.fill_between(x, np.sin(x + k) - 0.2, np.sin(x + k) + 0.2, alpha=0.2)
    ax.legend()
    lossless = io.BytesIO()
    fig.savefig(lossless, format="png", dpi=100, metadata={"Software": None})
    png = figs.png_bytes(fig, dpi=100)
    plt.close(fig)
    with Image.open(io.BytesIO(png)) as small, Image.open(lossless) as full:
        assert small.mode == "P" and small.size == full.size
        # Few pixels change, and by little: the palette holds the plot's colours.
        diff = np.abs(
            np.asarray(small.convert("RGB"), float) - np.asarray(full.convert("RGB"), float)
        )
        assert (diff.max(axis=2) > 24).mean() < 0.01
    assert len(png) < 0.6 * len(lossless.getvalue())
    assert figs.palette_png(png) == figs.palette_png(png)  # deterministic
