"""The `guards:` axis of an audit spec: bad input is exit 2 with nothing written; unguarded run
ids are what they were before guards existed; a guarded toy audit records its interventions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stabilitybench.audit.spec import expand, resolved_spec, spec_hash, validate_spec
from stabilitybench.cli import app
from stabilitybench.store import RunStore
from stabilitybench.types import RunSpec


def _spec(guards: list[Any] | None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "guard-test",
        "seeds": [0],
        "workloads": [
            {
                "name": "toy",
                "kind": "toy",
                "total_steps": 60,
                "eval": {"every": 10, "batches": 1},
                "knobs": {"lr": 0.01, "hidden": 16},
            }
        ],
        "perturbations": ["none", {"kind": "lr_spike", "at": 0.5, "factor": 50, "duration": 3}],
    }
    if guards is not None:
        spec["guards"] = guards
    spec.update(extra)
    return spec


@pytest.fixture
def no_snapshot_kind() -> Any:
    """A user workload kind registered for the test (its loop hosts no guard)."""
    from stabilitybench.workloads import base

    class NoSnapshot:
        kind = "no_snapshot"

        def __init__(self, config: dict[str, Any]) -> None:
            self.config = config

        def validate(self, spec: RunSpec) -> None:
            pass

    base.register_workload("no_snapshot", NoSnapshot)  # type: ignore[arg-type]
    yield
    base.REGISTRY.unregister("no_snapshot")


@pytest.mark.parametrize(
    ("guard", "workloads", "words"),
    [
        ({"detector": "nope", "action": "skip"}, None, ["guards[1].detector", "'nope'", "zclip"]),
        (
            {"detector": "zclip", "action": "undo"},
            None,
            ["guards[1].action", "skip, lr_cut, reset_moments, rollback, escalate"],
        ),
        ({"detector": "msm", "action": "rollback"}, None, ["guards[1].monitor", "fitted monitor"]),
        (
            {"detector": "msm", "action": "rollback", "monitor": "no/such/folder"},
            None,
            ["guards[1].monitor", "not a fitted monitor folder"],
        ),
        (
            {"detector": "zclip", "action": "lr_cut", "factor": 1.5},
            None,
            ["guards[1].factor", "(0, 1)"],
        ),
        (
            {"detector": "zclip", "action": "lr_cut", "cooldown": 0},
            None,
            ["guards[1].cooldown", ">= 1"],
        ),
        (
            {"detector": "zclip", "action": "rollback", "every": 10, "keep": 2, "min_age": 50},
            None,
            ["guards[1].min_age", "<= (keep - 1) * every = 10"],
        ),
        (
            {"detector": "zclip", "action": "skip", "speed": 3},
            None,
            ["guards[1].speed", "unknown key"],
        ),
        (
            {"detector": "zclip", "action": "rollback", "every": 0},
            None,
            ["guards[1].every", ">= 1"],
        ),
        ({"detector": "zclip", "action": "rollback", "keep": 0}, None, ["guards[1].keep", ">= 1"]),
        ({"detector": "zclip", "action": "escalate", "window": 0}, None, ["guards[1].window"]),
        ({"detector": "zclip", "action": "rollback", "min_age": -1}, None, ["guards[1].min_age"]),
        ({"detector": "zclip", "action": "lr_cut", "factor": 0}, None, ["guards[1].factor"]),
        (
            {"detector": "auto", "action": "reset_moments", "spike_ratio": 1},
            None,
            ["guards[1].spike_ratio", "a number > 1"],
        ),
        ({"detector": "zclip", "action": "lr_cut", "factor": True}, None, ["guards[1].factor"]),
        ({"detector": "zclip", "action": "skip", "every": 2.5}, None, ["guards[1].every"]),
        ({"detector": "pca", "action": "skip"}, None, ["guards[1].detector", "must be fitted"]),
        (
            {"detector": "zclip", "action": "skip", "monitor": "x"},
            None,
            ["guards[1].monitor", "only detector msm"],
        ),
        ({"action": "skip"}, None, ["guards[1].detector", "is required"]),
        (
            {"detector": "auto", "action": "reset_moments", "on_device": True},
            None,
            ["guards[1].on_device", "decided on the host", "skip, lr_cut"],
        ),
        (
            {"detector": "zclip", "action": "skip", "on_device": True},
            None,
            ["guards[1].on_device", "zclip has no device form", "auto, olmo"],
        ),
        ({"detector": "auto", "action": "skip", "on_device": 1}, None, ["guards[1].on_device"]),
        (
            {"detector": "auto", "action": "skip", "on_device": True},
            None,
            ["guards[1].on_device", "kind 'toy' does not"],
        ),
        (
            {"detector": "zclip", "action": "rollback"},
            [{"name": "mine", "kind": "no_snapshot", "total_steps": 10}],
            ["guards[1].action", "rollback needs a workload that can snapshot", "lm, rl, toy"],
        ),
        (
            {"detector": "zclip", "action": "lr_cut"},
            [{"name": "mine", "kind": "no_snapshot", "total_steps": 10}],
            ["guards[1].action", "kind 'no_snapshot' does not host one"],
        ),
    ],
)
def test_bad_guard_is_exit_2_naming_the_field_and_nothing_is_written(
    tmp_path: Path,
    guard: dict[str, Any],
    workloads: list[Any] | None,
    words: list[str],
    no_snapshot_kind: None,
) -> None:
    spec = _spec(["none", guard])
    if workloads is not None:
        spec["workloads"] = workloads
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("error:"), message
    for word in words:
        assert word in message, (word, message)
    assert not out.exists()


def test_dry_run_names_a_monitor_not_fitted_yet_and_a_real_run_refuses_it(
    tmp_path: Path,
) -> None:
    # An audit's guards may name the monitor that another audit will fit (as
    # examples/paper_rl_guards.yaml does): `--dry-run` still prices the grid and says what is
    # missing; the run itself stops before writing anything.
    guard = {"detector": "msm", "action": "rollback", "monitor": str(tmp_path / "later")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(["none", guard])))
    out = tmp_path / "audit"
    dry = CliRunner().invoke(app, ["audit", str(path), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    message = " ".join(dry.output.split())
    assert "estimated cost" in message
    assert "not fitted yet" in message and "guards[1].monitor" in message, message
    assert not out.exists()
    real = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
    assert real.exit_code == 2, real.output
    assert "not a fitted monitor folder" in " ".join(real.output.split())
    assert not out.exists()


def test_msm_with_a_monitor_fitted_on_another_workload_kind_is_exit_2(tmp_path: Path) -> None:
    # What `audit` and `monitor fit` leave in an LM audit: audit.json, monitor/fit.json and the
    # monitor's files (their contents are not read for this check).
    other = tmp_path / "lm-audit"
    folder = other / "monitor" / "workload-abc"
    folder.mkdir(parents=True)
    (folder / "monitor.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    spec = {"workloads": [{"name": "gpt", "kind": "lm"}]}
    (other / "audit.json").write_text(json.dumps({"name": "lm", "spec": spec}))
    fit = {"workloads": {"gpt": {"model": "monitor/workload-abc"}}}
    (other / "monitor" / "fit.json").write_text(json.dumps(fit))
    for monitor in (folder, other / "monitor"):
        if monitor == other / "monitor":
            (monitor / "monitor.json").write_text("{}")
            (monitor / "model.safetensors").write_bytes(b"")
        guard = {"detector": "msm", "action": "rollback", "monitor": str(monitor)}
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(_spec(["none", guard])))
        out = tmp_path / "audit"
        result = CliRunner().invoke(app, ["audit", str(path), "--out", str(out)])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        for word in ("guards[1].monitor", "fitted on workload 'gpt' (kind lm)", "kind 'toy'"):
            assert word in message, (word, message)
        assert not out.exists()


def test_a_bad_guard_in_a_callback_is_one_clear_error_before_training() -> None:
    from stabilitybench.errors import StabilityBenchError
    from stabilitybench.integrations._adapter import TelemetryAdapter

    with pytest.raises(StabilityBenchError, match=r"guard\.factor: must be a number in \(0, 1\)"):
        TelemetryAdapter("x", "cheap", 1, None, None, None, None, {"detector": "zclip",
                         "action": "lr_cut", "factor": 2})  # fmt: skip


def test_unguarded_run_ids_and_spec_hash_are_what_they_were_before_guards() -> None:
    run = RunSpec(workload={"name": "toy", "kind": "toy"}, perturbations=(), seed=3)
    payload = json.dumps(
        {"workload": run.workload, "perturbations": [], "seed": 3},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert run.run_id == hashlib.sha256(payload.encode()).hexdigest()[:16]
    plain, with_none = validate_spec(_spec(None)), validate_spec(_spec(["none"]))
    assert [r.run_id for r in expand(plain)] == [r.run_id for r in expand(with_none)]
    assert "guards" not in resolved_spec(plain)  # so a spec without guards hashes as before
    assert spec_hash(plain) == spec_hash(validate_spec(_spec(None)))
    guarded = expand(validate_spec(_spec(["none", {"detector": "zclip", "action": "skip"}])))
    assert len(guarded) == 4 and len({r.run_id for r in guarded}) == 4
    assert {r.run_id for r in guarded if r.guard is None} == {r.run_id for r in expand(plain)}
    assert guarded[1].label == "toy[hidden=16,lr=0.01]/none/guard=zclip:skip/seed0"


def test_guarded_toy_audit_records_the_guard_and_its_interventions(tmp_path: Path) -> None:
    guard = {"detector": "zclip", "action": "rollback", "every": 5, "keep": 4, "min_age": 5}
    path = tmp_path / "spec.yaml"
    # two seeds: each run's collapse label is calibrated on the other seed's unperturbed run
    path.write_text(yaml.safe_dump(_spec(["none", guard], seeds=[0, 1])))
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app, ["audit", str(path), "--out", str(out), "--workers", "1", "--no-report"]
    )
    assert result.exit_code == 0, result.output
    store = RunStore.open(out)
    infos = {i.label: i for i in store.infos()}
    spiked = next(
        i for label, i in infos.items() if "lr_spike" in label and "guard=" in label and i.seed == 0
    )
    assert (spiked.guard or {})["label"] == "zclip:rollback(every=5,keep=4,min_age=5)"
    assert spiked.healthy is False
    unguarded = [i for i in infos.values() if i.guard is None]
    assert len(unguarded) == 4
    events = store.load(spiked.run_id).events
    kinds = list(events["kind"])
    assert "lr_spike" in kinds and "guard" in kinds
    params = json.loads(events[events["kind"] == "guard"]["params"].iloc[0])
    assert params["detector"] == "zclip" and params["guard"] == "rollback"
    summary = CliRunner().invoke(app, ["summary", str(out), "--json"])
    assert summary.exit_code == 0, summary.output
    document = json.loads(summary.output)
    conditions = document["conditions"]
    (spiked_guarded,) = [g for g in document["guards"] if g["perturbation"].startswith("lr_spike")]
    guarded = [i for i in infos.values() if i.guard is not None and "lr_spike" in i.label]
    n_events = [
        int((store.load(i.run_id).events["kind"] == "guard").sum()) for i in guarded
    ]  # per guarded run of the spiked condition (both seeds)
    assert spiked_guarded["n_runs"] == 2 and spiked_guarded["n_unguarded"] == 2
    assert spiked_guarded["interventions_per_run"] == pytest.approx(sum(n_events) / 2)
    assert sum(spiked_guarded["by_action"].values()) == sum(n_events)
    assert spiked_guarded["collapse_unguarded"]["n"] == 2
    assert sorted(c["guard"] for c in conditions) == [
        "none",
        "none",
        "zclip:rollback(every=5,keep=4,min_age=5)",
        "zclip:rollback(every=5,keep=4,min_age=5)",
    ]
    assert spiked_guarded["final_difference"]["n"] == 4
    # The table groups guarded conditions by condition, the unperturbed one first.
    text = CliRunner().invoke(app, ["summary", str(out), "--wide"], env={"COLUMNS": "250"})
    table = text.output[text.output.index(" guards ") :]
    rows = [line for line in table.splitlines() if "zclip:rollback" in line]
    assert len(rows) == 2 and " none " in rows[0] and "lr_spike" in rows[1], rows
    # The report: a guards section beside the unguarded condition, markers on the curves.
    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert '<h2 id="guards">Guards</h2>' in page and 'href="#guards"' in page
    section = page[page.index('id="guards"') : page.index('id="decoupling"')]
    assert "zclip:rollback(every=5,keep=4,min_age=5)" in section and "(false)" in section
    assert "◁ rollback" in page  # the curves' caption explains the markers


def test_steps_lost_per_intervention_by_hand() -> None:
    from stabilitybench.metrics.guards import Intervention

    assert Intervention(12, "rollback", 5).steps_lost == 8  # updates 5..12
    assert Intervention(7, "skip").steps_lost == 1
    assert Intervention(7, "lr_cut").steps_lost == 0


def test_lm_workload_hosts_a_guard_and_writes_its_events(tmp_path: Path, alarm_at: Any) -> None:
    from stabilitybench.store import RunWriter
    from stabilitybench.workloads.base import build_workload

    alarm_at.steps = {4, 9}
    config = {
        "name": "gpt2-guard",
        "kind": "lm",
        "size": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "corpus": "shakespeare",
        "total_steps": 12,
        "eval": {"every": 6, "batches": 1},
        "knobs": {"batch_size": 2, "block_size": 16},
    }
    guard = {"detector": "alarm_at", "action": "rollback", "every": 3, "keep": 3, "min_age": 3}
    spec = RunSpec(workload=config, seed=0, guard=guard)
    writer = RunWriter(tmp_path / "run")
    outcome = build_workload(config).run(spec, writer)
    assert outcome["steps"] == 12 and not outcome["diverged"]
    import pandas as pd

    events = pd.read_parquet(tmp_path / "run" / "events.parquet")
    assert list(events["name"]) == ["rollback", "rollback"]
    back = [json.loads(p)["rolled_back_to"] for p in events["params"]]
    assert back == [0, 6]  # 4 − 3 ≥ 3 → step 0's snapshot; 9 − 6 ≥ 3 → step 6's
    assert len(pd.read_parquet(tmp_path / "run" / "telemetry.parquet")) == 12


def test_lm_workload_hosts_a_device_guard_that_reads_the_loss_before_the_update(
    tmp_path: Path,
) -> None:
    import pandas as pd

    from stabilitybench.store import RunWriter
    from stabilitybench.workloads.base import build_workload

    config = {
        "name": "gpt2-device-guard",
        "kind": "lm",
        "size": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "corpus": "shakespeare",
        "total_steps": 70,
        "eval": {"every": 35, "batches": 1},
        "knobs": {"batch_size": 2, "block_size": 16, "grad_clip": 1.0},
    }
    guard = {"detector": "auto", "action": "skip", "on_device": True}
    spike = [{"kind": "lr_spike", "at": 60, "factor": 1000, "duration": 1}]
    spec = RunSpec(workload=config, seed=0, guard=guard, perturbations=spike)
    outcome = build_workload(config).run(spec, RunWriter(tmp_path / "run"))
    assert outcome["steps"] == 70
    table = pd.read_parquet(tmp_path / "run" / "telemetry.parquet")
    assert table["loss"].notna().all() and table["grad_norm_raw"].notna().all()
    # The ×1000 update is skipped at its own step: the proposed update ratio showed it.
    assert table.loc[table["guard_alarm"] > 0, "step"].tolist() == [60]
    events = pd.read_parquet(tmp_path / "run" / "events.parquet")
    guarded = events[events["kind"] == "guard"]
    assert list(guarded["name"]) == ["skip"] and list(guarded["start_step"]) == [60]


def test_recorded_steps_lost_wins_and_final_performance_is_compared_by_hand() -> None:
    import numpy as np

    from stabilitybench.metrics.guards import Intervention, guard_comparisons
    from stabilitybench.metrics.records import RunRecord

    # A second rollback to the same snapshot: the guard recorded 1, not 13 + 1 − 5.
    assert Intervention(13, "rollback", 5, recorded_lost=1).steps_lost == 1

    def record(run_id: str, guard: str, final: float) -> RunRecord:
        return RunRecord(
            run_id, None, "toy", "toy", {}, "none", "none", None, 0, "done", None,
            final_perf=final, guard=guard,
        )  # fmt: skip

    plain = [record(f"u{i}", "none", v) for i, v in enumerate([-4.0, -3.0, -2.0, -1.0])]
    guarded = [record(f"g{i}", "zclip:skip", v) for i, v in enumerate([-3.0, -2.0, -1.0, 0.0])]
    events = {"g0": [Intervention(3, "skip")], "g1": [Intervention(3, "skip")] * 3}
    (c,) = guard_comparisons(
        [*plain, *guarded], events, {f"g{i}": 100 for i in range(4)}, np.random.default_rng(0), 500
    )
    # IQM of 4 values = mean of the middle two: −2.5 unguarded, −1.5 guarded.
    assert c.final_unguarded is not None and c.final_unguarded.value == pytest.approx(-2.5)
    assert c.final is not None and c.final.value == pytest.approx(-1.5)
    assert c.final_difference is not None and c.final_difference.value == pytest.approx(1.0)
    low, high = c.final_difference.ci
    assert low is not None and high is not None and low < 1.0 < high
    assert c.interventions_per_run == 1.0 and c.false_interventions_per_run == 1.0
    assert c.extra_compute == pytest.approx(4 / 400)


def test_a_toy_audit_guarded_by_auto_escalate_needs_no_fit(tmp_path: Path) -> None:
    spec = _spec(["none", {"detector": "auto", "action": "escalate"}])
    spec["workloads"][0]["total_steps"] = 120  # past auto's 50 values of warm-up
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app, ["audit", str(path), "--out", str(out), "--workers", "1", "--no-report"]
    )
    assert result.exit_code == 0, result.output
    store = RunStore.open(out)
    guarded = [i for i in store.infos() if i.guard is not None]
    assert len(guarded) == 2 and all(i.status == "done" for i in store.infos())
    assert {(i.guard or {})["label"] for i in guarded} == {"auto:escalate"}
    for info in guarded:
        events = store.load(info.run_id).events
        for params in events[events["kind"] == "guard"]["params"]:
            assert json.loads(params)["detector"] == "auto"


def test_a_guarded_run_streams_its_interventions_as_they_happen(
    tmp_path: Path, alarm_at: Any
) -> None:
    """Each intervention reaches the run's events (part files `watch` reads) at the step it was
    taken; the finished events table has them all and the part files are gone."""
    import pandas as pd

    from stabilitybench.store import RunWriter
    from stabilitybench.streaming import partial_dir, read_parts
    from stabilitybench.workloads.base import build_workload

    seen: list[tuple[int, list[int]]] = []

    class Watching(RunWriter):
        def stream_events(self, events: Any) -> None:
            super().stream_events(events)
            parts = read_parts(partial_dir(self.run_dir / "events.parquet"))
            seen.append((len(self.read()), sorted(parts["start_step"].astype(int))))

    alarm_at.steps = {4, 9}
    config = _spec(None)["workloads"][0]
    spec = RunSpec(workload=config, seed=0, guard={"detector": "alarm_at", "action": "skip"})
    writer = Watching(tmp_path / "run")
    build_workload(config).run(spec, writer)
    # streamed at once (the rows read back so far lag by the telemetry's flush, 100 steps)
    assert [steps for _, steps in seen] == [[4], [4, 9]]
    events = pd.read_parquet(tmp_path / "run" / "events.parquet")
    assert sorted(events.loc[events["kind"] == "guard", "start_step"]) == [4, 9]
    assert not partial_dir(tmp_path / "run" / "events.parquet").exists()
