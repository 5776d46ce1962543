"""The README's second quick start runs as printed and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _quick_start_2() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start 2") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_quick_start_2_skips_the_spiked_update_at_its_own_step_on_the_device() -> None:
    """The default guard (auto, skip) decides on the device: the ×1000 update is skipped at its
    own step (step 150), and nothing else."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quick_start_2(), "README.md", "exec"), {})
    assert out.getvalue().split("\n")[:-1] == ["skip 150 None"]
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "This prints `skip 150`" in text and "skipped at its own step, step 150" in text


def test_quick_start_2_without_the_spike_never_intervenes() -> None:
    code = "\n".join(
        line for line in _quick_start_2().splitlines() if "PerturbationSchedule(" not in line
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == ""


def test_quick_start_2_with_escalate_prints_the_escalation_the_readme_describes() -> None:
    code = _quick_start_2().replace("protect(model, opt)", 'protect(model, opt, action="escalate")')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().split("\n")[:4] == [
        "skip 152 None",
        "lr_cut 153 None",
        "reset_moments 154 None",
        "rollback 155 120",
    ]
    assert "`skip 152`, `lr_cut 153`, `reset_moments 154` and `rollback 155 120`" in " ".join(
        README.read_text(encoding="utf-8").split()
    )


def test_the_guards_guides_one_line_prints_what_the_guide_says() -> None:
    guide = README.parent / "docs" / "guides" / "guards.md"
    code = re.search(r"```python\n(.*?)```", guide.read_text(encoding="utf-8"), re.S).group(1)  # type: ignore[union-attr]
    printed = []
    for variant in (
        code,
        code.replace("protect(model, opt)", 'protect(model, opt, action="escalate")'),
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(variant, "guards.md", "exec"), {})
        printed.append([line.strip() for line in out.getvalue().splitlines()])
    assert printed == [
        ["150 skip"],
        ["152 skip", "153 lr_cut", "154 reset_moments", "155 rollback 120"],
    ]
    text = " ".join(guide.read_text(encoding="utf-8").split())
    assert "This prints `150 skip`" in text
    assert "`152 skip`, `153 lr_cut`, `154 reset_moments`, `155 rollback 120`" in text
