"""The HTML page: sections, numbers, escaping, no outside requests, graceful gaps, and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from stabilitybench.cli import app
from stabilitybench.errors import StabilityBenchError
from stabilitybench.metrics.intervals import wilson_interval
from stabilitybench.report.html import write_report
from stabilitybench.store import RunStore

from .synthetic import evaluation_document, make_audit

SCRIPT = "<script>alert(1)</script>"
SECTIONS = (
    "overview",
    "conditions",
    "curves",
    "latent",
    "detectors",
    "decoupling",
    "dose-response",
    "runs",
)
RESOURCE = re.compile(
    r"""(?:\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)(?:https?:)?//""",
    re.I,
)


def test_full_report_has_every_section_with_figures(full_report: tuple[Path, Path]) -> None:
    path, _ = full_report
    html = path.read_text(encoding="utf-8")
    assert path.name == "report.html"
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in html
    # every figure section drew: 2 condition figures, latent, decoupling, dose-response
    assert html.count('<img src="data:image/png;base64,') == 5
    assert "No meta-state latents" not in html and "No monitor evaluation" not in html
    assert "No stability metrics" not in html


def test_conditions_table_shows_collapse_rates_with_wilson_intervals(
    full_report: tuple[Path, Path],
) -> None:
    html = full_report[0].read_text(encoding="utf-8")
    conditions = html.split('id="conditions"')[1].split('id="curves"')[0]
    # noise=0.0 under lr_spike: both seeds collapse (one recovers, one diverges) → 2/2
    low, high = wilson_interval(2, 2)
    assert f"100% [{100 * low:.0f}%, {100 * high:.0f}%]" in conditions
    # noise=0.2 under lr_spike: one of two collapses
    low, high = wilson_interval(1, 2)
    assert f"50% [{100 * low:.0f}%, {100 * high:.0f}%]" in conditions
    assert conditions.count("<tr>") == 1 + 4  # header + 2 knob settings × {none, lr_spike}


def test_detector_table_shows_the_evaluation(full_report: tuple[Path, Path]) -> None:
    html = full_report[0].read_text(encoding="utf-8")
    detectors = html.split('id="detectors"')[1].split('id="decoupling"')[0]
    doc = evaluation_document()
    for name in doc["detectors"]:
        assert f"({name})" in detectors
    msm = doc["detectors"]["msm"]
    assert f"{msm['auroc']} [{msm['auroc_ci'][0]}, {msm['auroc_ci'][1]:g}]" in detectors
    assert (
        '<tr class="best">' in detectors
        and "Meta-State Monitor" in detectors.split('class="best"')[1][:200]
    )
    assert "too few runs" in detectors and "too few runs (too few runs)" not in detectors
    # per workload, then the macro average; the no-lead collapse is said in words
    assert "<h3>toy</h3>" in detectors and "Macro average over 1 workloads" in detectors
    assert "3 collapsed, 2 not collapsed, 4 healthy runs" in detectors
    assert "1 collapses came within 1 step of a jolt" in detectors
    assert "SOP 100 optimizer steps" in detectors and "clock control" in detectors


def test_figures_folder_holds_one_png_per_embedded_figure(full_report: tuple[Path, Path]) -> None:
    _, figures = full_report
    names = sorted(p.name for p in figures.iterdir())
    assert names == sorted(
        [
            "decoupling.png",
            "dose_response.png",
            "latent_toy.png",
            "performance_toy-none.png",
            "performance_toy-lr-spike-at-40-factor-10-duration-10.png",
        ]
    )
    for name in names:
        with Image.open(figures / name) as image:
            assert image.format == "PNG"
            assert min(image.size) > 300
            assert len(set(image.convert("L").getdata())) > 10  # not blank


def test_no_external_resource_references(full_report: tuple[Path, Path]) -> None:
    html = full_report[0].read_text(encoding="utf-8")
    assert not RESOURCE.search(html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "<iframe" not in html
    assert RESOURCE.search('<img src="https://example.org/x.png">')  # the check can fire


def test_names_and_labels_are_rendered_as_text(tmp_path: Path, quick_summary: None) -> None:
    store = make_audit(tmp_path / "a", name=SCRIPT, workload=f"toy{SCRIPT}", label_suffix=SCRIPT)
    html = write_report(store).read_text(encoding="utf-8")
    assert SCRIPT not in html
    assert "<script" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"<h1>{escaped}</h1>" in html
    assert f"<title>StabilityBench report: {escaped}</title>" in html
    assert html.count(escaped) >= 9  # name, workload, every run label
    assert "&lt;boom&gt; &amp; more" in html  # error text of the failed run


def test_missing_monitor_and_metrics_are_noticed_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stabilitybench.metrics.summary as summary

    def broken(store: RunStore) -> None:
        raise StabilityBenchError("the metrics could not be computed")

    monkeypatch.setattr(summary, "summarize", broken)
    store = make_audit(tmp_path / "a", scores=False, evaluation=False)
    html = write_report(store, output=tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in html
    assert "No meta-state latents yet" in html
    assert "No monitor evaluation yet" in html
    assert html.count("No stability metrics") == 3  # conditions, decoupling, dose-response
    assert html.count('<img src="data:image/png;base64,') == 2  # the curves still draw
    conditions = html.split('id="conditions"')[1].split('id="curves"')[0]
    assert "1 failed" in conditions and "2 done" in conditions


def test_audit_without_perturbed_runs(tmp_path: Path, quick_summary: None) -> None:
    store = make_audit(
        tmp_path / "a", perturbed=False, scores=False, evaluation=False, failed=False
    )
    html = write_report(store).read_text(encoding="utf-8")
    assert "No dose-response" in html
    curves = html.split('id="curves"')[1].split('id="latent"')[0]
    assert curves.count('<img src="data:image/png;base64,') == 1  # the baseline curves only
    assert "lr_spike" not in curves


def test_empty_audit_says_so(tmp_path: Path, quick_summary: None) -> None:
    store = RunStore(tmp_path / "empty")
    store.root.mkdir()
    store.write_audit({"name": "empty"})
    html = write_report(store).read_text(encoding="utf-8")
    assert "has no runs yet" in html
    assert "No finished runs" in html
    assert "<img" not in html


def test_unreadable_evaluation_is_an_error_notice(tmp_path: Path, quick_summary: None) -> None:
    store = make_audit(tmp_path / "a", scores=False, evaluation=False, failed=False)
    (store.root / "monitor").mkdir()
    (store.root / "monitor" / "evaluation.json").write_text("{not json")
    html = write_report(store).read_text(encoding="utf-8")
    detectors = html.split('id="detectors"')[1].split('id="decoupling"')[0]
    assert 'class="notice error"' in detectors and "evaluation.json could not be read" in detectors


def test_output_that_is_a_folder_is_a_user_error(tmp_path: Path) -> None:
    store = make_audit(
        tmp_path / "a", scores=False, evaluation=False, failed=False, perturbed=False
    )
    with pytest.raises(StabilityBenchError, match="--output"):
        write_report(store, output=tmp_path)


def test_cli_writes_report_and_figures(tmp_path: Path, quick_summary: None) -> None:
    store = make_audit(tmp_path / "a", evaluation=False, failed=False)
    out, figures = tmp_path / "page.html", tmp_path / "figs"
    result = CliRunner().invoke(
        app, ["report", str(store.root), "-o", str(out), "--figures", str(figures)]
    )
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output and out.name in result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert len(list(figures.glob("*.png"))) == 5
    assert not (store.root / "report.html").exists()


def test_cli_on_a_folder_that_is_not_an_audit_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a StabilityBench audit" in result.output
