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


def test_quick_start_2_prints_the_escalation_it_describes() -> None:
    code = _quick_start_2()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().split("\n")[:4] == [
        "skip 152 None",
        "lr_cut 153 None",
        "reset_moments 154 None",
        "rollback 155 120",
    ]
    # and the README says so
    assert "`skip 152`, `lr_cut 153`, `reset_moments 154` and `rollback 155 120`" in " ".join(
        README.read_text(encoding="utf-8").split()
    )


def test_quick_start_2_without_the_spike_never_intervenes() -> None:
    code = "\n".join(
        line for line in _quick_start_2().splitlines() if "PerturbationSchedule(" not in line
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == ""


def test_quick_start_2_with_skip_decides_on_the_device_at_the_spike_itself() -> None:
    """The README's sentence on `action="skip"`: the same loop, the ×1000 update skipped at its
    own step (step 150) by a guard that decides on the device."""
    code = _quick_start_2().replace('action="escalate"', 'action="skip"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().split("\n")[:-1] == ["skip 150 None"]
    assert "skipped at its own step, step 150" in " ".join(
        README.read_text(encoding="utf-8").split()
    )
