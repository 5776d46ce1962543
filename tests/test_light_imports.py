"""`import stabilitybench` and the CLI's quick verbs load no heavy framework (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "stable_baselines3", "ray", "lightning", "matplotlib", "scipy")
SRC = str(Path(__file__).resolve().parents[1] / "src")

# Runs the CLI in-process, then prints which heavy modules it loaded (after every exit path).
PROBE = """
import json, sys
heavy = {heavy!r}
args = json.loads(sys.argv[1])
code = 0
if args is None:
    import stabilitybench
    from stabilitybench import StabilityBenchError, __version__  # noqa: F401
else:
    from stabilitybench.cli import app
    sys.argv = ["stabilitybench", *args]
    try:
        app()
    except SystemExit as exc:
        code = exc.code or 0
print(json.dumps({{"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}}),
      file=sys.__stderr__)
"""


def _loaded(args: list[str] | None, cwd: Path) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return int(report["code"]), list(report["loaded"]), result.stdout + result.stderr


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny audit folder written by hand (run.json files only; no run needed)."""
    root = tmp_path_factory.mktemp("light") / "audit"
    (root / "runs" / "0123456789abcdef").mkdir(parents=True)
    (root / "audit.json").write_text(json.dumps({"name": "light"}))
    (root / "runs" / "0123456789abcdef" / "run.json").write_text(
        json.dumps({"run_id": "0123456789abcdef", "status": "done", "workload": "w"})
    )
    return root


def test_import_stabilitybench_is_light(tmp_path: Path) -> None:
    code, loaded, output = _loaded(None, tmp_path)
    assert code == 0 and loaded == [], output


def test_public_names_still_import_lazily() -> None:
    import stabilitybench
    from stabilitybench import RunStore, Telemetry
    from stabilitybench.store import RunStore as StoreClass
    from stabilitybench.telemetry import Telemetry as TelemetryClass

    assert RunStore is StoreClass and Telemetry is TelemetryClass
    assert set(stabilitybench.__all__) <= set(dir(stabilitybench))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        stabilitybench.Nope  # noqa: B018


def _bad_spec(tmp_path: Path, name: str, text: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text)
    return str(path)


TOY = "name: x\nworkloads: [{name: t, kind: toy, total_steps: 40}]\n"
PERT_BAD = TOY + "perturbations: [none, {kind: lr_spike, at: 0.3, factor: -2}]\n"
PERT_UNKNOWN = TOY + "perturbations: [none, {kind: lr_spyke, at: 0.3}]\n"


def _spec_with(tmp_path: Path, name: str, text: str) -> str:
    return _bad_spec(tmp_path, name, text.encode())


@pytest.mark.parametrize(
    "verb",
    [
        "--help",
        "--version",
        "audit --help",
        "status",
        "query",
        "malformed",
        "unknown key",
        "latin-1",
        "perturbation parameter",
        "unknown perturbation",
    ],
)
def test_quick_verbs_load_no_framework(verb: str, audit_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    args = {
        "--help": (["--help"], 0),
        "--version": (["--version"], 0),
        "audit --help": (["audit", "--help"], 0),
        "status": (["status", str(audit_dir)], 0),
        "query": (["query", str(audit_dir), "SELECT count(*) AS n FROM runs"], 0),
        "malformed": (["audit", _bad_spec(tmp_path, "a.yaml", b"name: [\n"), "--out", out], 2),
        "unknown key": (
            [
                "audit",
                _bad_spec(
                    tmp_path,
                    "b.yaml",
                    b"name: x\nworkloads: [{name: t, kind: toy, total_steps: 5, epochs: 3}]\n",
                ),
                "--out",
                out,
            ],
            2,
        ),
        "latin-1": (
            [
                "audit",
                _bad_spec(tmp_path, "c.yaml", "name: café\n".encode("latin-1")),
                "--out",
                out,
            ],
            2,
        ),
        "perturbation parameter": (
            ["audit", _spec_with(tmp_path, "d.yaml", PERT_BAD), "--out", out],
            2,
        ),
        "unknown perturbation": (
            ["audit", _spec_with(tmp_path, "e.yaml", PERT_UNKNOWN), "--out", out],
            2,
        ),
    }[verb]
    code, loaded, output = _loaded(args[0], tmp_path)
    assert code == args[1], output
    assert loaded == [], f"{verb} imported {loaded}"
