"""`import_logs` on logs built by hand in the test: columns, values, divergence, bad input."""

from __future__ import annotations

import json
import math
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from stabilitybench.errors import StabilityBenchError
from stabilitybench.importers import import_logs
from stabilitybench.importers.columns import assign, parse_map
from stabilitybench.store import RunStore


def quiet() -> Console:
    return Console(file=StringIO(), width=200)


def only_run(out: Path) -> tuple[RunStore, str]:
    store = RunStore.open(out)
    (run_id,) = store.run_ids()
    return store, run_id


def write_tb(folder: Path, steps: int = 30, nan_at: int | None = None) -> None:
    writer = SummaryWriter(str(folder))
    for step in range(steps):
        loss = 3.0 - 0.05 * step if nan_at is None or step < nan_at else math.nan
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("lr", 0.01, step)
        writer.add_scalar("acc/top1", step / 100, step)
        if step % 10 == 0:
            writer.add_scalar("val_loss", 3.5 - 0.05 * step, step)
    writer.add_text("notes", "a text summary is not a scalar", 0)
    writer.close()


def test_summary_writer_log_becomes_one_done_run_with_the_logged_values(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb" / "run_a")
    result = import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.status == "done" and run.is_baseline
    assert run.info.kind == "imported" and run.info.label == "run_a"
    assert list(run.telemetry["step"]) == list(range(30))
    assert np.allclose(run.telemetry["loss"], [3.0 - 0.05 * s for s in range(30)])
    assert np.allclose(run.telemetry["lr"], 0.01)
    assert np.allclose(run.telemetry["acc.top1"], [s / 100 for s in range(30)])  # kept, `/`→`.`
    # evaluations: perf = -val_loss at steps 0, 10, 20
    assert list(run.evals["step"]) == [0, 10, 20]
    assert np.allclose(run.evals["perf"], [-3.5, -3.0, -2.5])
    assert np.allclose(run.evals["val_loss"], [3.5, 3.0, 2.5])
    assert run.info.outcome.diverged is False
    assert run.info.outcome.final_perf == pytest.approx(-3.0)  # mean of the last 3 evals
    assert result.runs[0].columns["val_loss"] == "eval_loss"
    assert any("notes" in note for note in result.runs[0].notes)  # the text tag was skipped


def test_a_nan_loss_is_imported_as_an_irreversible_collapse(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb", nan_at=17)
    import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.info.outcome.diverged is True
    assert run.info.outcome.diverged_step == 17
    # evals 0 and 10 as logged, then the divergence at 17; the eval at 20 (after it) is dropped
    assert list(run.evals["step"]) == [0, 10, 17]
    assert run.evals["perf"].iloc[-1] == -math.inf
    assert math.isnan(run.telemetry.set_index("step").loc[17, "loss"])  # telemetry as logged
    from stabilitybench.metrics.summary import summary_document

    record = summary_document(store)["runs"][0]
    assert record["collapsed"] is True and record["irreversible"] is True
    assert record["diverged"] is True


def test_last_value_of_a_step_wins_and_files_of_one_folder_are_one_run(tmp_path: Path) -> None:
    folder = tmp_path / "tb"
    first = SummaryWriter(str(folder), filename_suffix=".a")
    first.add_scalar("loss", 1.0, 0)
    first.add_scalar("loss", 2.0, 1)
    first.close()
    second = SummaryWriter(str(folder), filename_suffix=".b")  # a resumed run: a second file
    second.add_scalar("loss", 5.0, 1)  # logged again at step 1: the later value wins
    second.add_scalar("loss", 6.0, 2)
    second.close()
    import_logs(folder, tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    table = store.load(run_id).telemetry
    assert list(table["step"]) == [0, 1, 2]
    assert list(table["loss"]) == [1.0, 5.0, 6.0]


def test_truncated_event_file_imports_what_is_readable_and_says_what_was_skipped(
    tmp_path: Path,
) -> None:
    write_tb(tmp_path / "tb", steps=40)
    (path,) = (tmp_path / "tb").glob("*tfevents*")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])  # a writer killed mid-record
    result = import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    table = store.load(run_id).telemetry
    assert 10 < len(table) < 40
    assert list(table["step"]) == list(range(len(table)))
    assert np.allclose(table["loss"], [3.0 - 0.05 * s for s in table["step"]])
    notes = " ".join(result.runs[0].notes)
    assert "truncated or corrupt record" in notes and path.name in notes
    assert (store.info(run_id).source or {})["skipped"] == result.runs[0].notes


def test_corrupt_record_in_the_middle_keeps_the_events_before_it(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb", steps=40)
    (path,) = (tmp_path / "tb").glob("*tfevents*")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff" * 8  # a CRC check fails here
    path.write_bytes(bytes(data))
    result = import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    table = store.load(run_id).telemetry
    assert 5 < len(table) < 35
    assert list(table["step"]) == list(range(len(table)))  # everything before the damage
    assert "truncated or corrupt record" in " ".join(result.runs[0].notes)


def test_csv_like_lightning_csvlogger_with_empty_cells_and_a_logged_nan(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,train_loss,val_loss\n"
        "0,0,2.0,\n"
        "0,1,1.5,\n"
        "0,1,,1.8\n"  # validation at step 1 on its own row, as CSVLogger writes it
        "0,2,nan,\n"
        "0,3,1.0,\n",
        encoding="utf-8",
    )
    import_logs(csv, tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert list(run.telemetry["step"]) == [0, 1, 2, 3]
    assert run.telemetry["loss"].tolist()[:2] == [2.0, 1.5]
    assert math.isnan(run.telemetry["loss"].iloc[2])  # logged NaN, not "missing"
    assert run.telemetry["epoch"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert list(run.evals["step"]) == [1, 2]
    assert run.evals["perf"].tolist() == [-1.8, -math.inf]
    assert run.info.outcome.diverged_step == 2


def test_wandb_history_export_uses_the_trainer_step_and_map_overrides(tmp_path: Path) -> None:
    csv = tmp_path / "wandb_export.csv"
    csv.write_text(
        "_step,_runtime,trainer/global_step,my_loss,eval/acc\n"
        "0,1.0,10,4.0,0.1\n"
        "1,2.0,20,3.0,0.2\n"
        "2,3.0,30,2.0,0.4\n",
        encoding="utf-8",
    )
    import_logs(
        csv,
        tmp_path / "audit",
        mapping=["my_loss=loss", "eval/acc=eval_return", "_runtime=skip"],
        console=quiet(),
    )
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert list(run.telemetry["step"]) == [10, 20, 30]  # trainer/global_step, not _step
    assert run.telemetry["loss"].tolist() == [4.0, 3.0, 2.0]
    assert "_runtime" not in run.telemetry.columns
    assert "_step" in run.telemetry.columns  # unknown columns are kept
    assert run.evals["perf"].tolist() == [0.1, 0.2, 0.4]
    assert (run.info.source or {})["columns"]["my_loss"] == "loss"


def test_jsonl_one_object_per_step_keeps_nan_apart_from_missing(tmp_path: Path) -> None:
    lines = [
        {"step": 0, "loss": 2.0, "grad_norm": 1.0},
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": float("inf"), "grad_norm": float("nan"), "note": "text"},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    result = import_logs(path, tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    table = store.load(run_id).telemetry
    assert table["loss"].tolist() == [2.0, 1.0, math.inf]
    assert table["grad_norm"].iloc[0] == 1.0 and math.isnan(table["grad_norm"].iloc[1])
    assert store.info(run_id).outcome.diverged_step == 2
    assert any("note" in n for n in result.runs[0].notes)  # a text column is skipped, said so


def test_own_sink_prefix_maps_back_to_exact_columns() -> None:
    assignment = assign(["stability/grad_norm", "stability/actor/grad_norm", "train/grad_norm"], {})
    assert assignment.columns["stability/grad_norm"].target == "grad_norm"
    assert assignment.columns["stability/actor/grad_norm"].target == "actor/grad_norm"
    # grad_norm is taken by our own column, so the other one is kept under its own name
    assert assignment.columns["train/grad_norm"].target == "train.grad_norm"


def test_a_tag_named_as_a_telemetry_column_is_that_column() -> None:
    assignment = assign(["loss", "update_ratio", "param_norm", "my_metric"], {})
    assert assignment.columns["update_ratio"].target == "update_ratio"
    assert assignment.columns["param_norm"].target == "param_norm"
    assert not assignment.columns["param_norm"].extra
    assert assignment.columns["my_metric"].extra  # unknown tags stay extra columns


def test_hf_dialect_grad_norm_is_the_pre_clip_one_and_sb3_entropy_is_negated() -> None:
    hf = assign(["train/loss", "train/grad_norm", "train/learning_rate", "train/epoch"], {})
    assert hf.dialect == "hf" and hf.columns["train/grad_norm"].target == "grad_norm_raw"
    sb3 = assign(["rollout/ep_rew_mean", "time/fps", "train/entropy_loss"], {})
    assert sb3.dialect == "sb3"
    assert sb3.columns["train/entropy_loss"].target == "entropy"
    assert sb3.columns["train/entropy_loss"].sign == -1.0


def test_map_target_that_is_not_a_column_is_one_clear_error() -> None:
    with pytest.raises(
        StabilityBenchError, match=r"'accuracy' is not a column name; allowed: loss"
    ):
        parse_map(["val/acc=accuracy"])
    with pytest.raises(StabilityBenchError, match="expected TAG=COLUMN"):
        parse_map(["loss"])
    assert parse_map(["a=actor/grad_norm"]) == {"a": "actor/grad_norm"}


def test_map_of_a_tag_the_source_does_not_have_fails_and_writes_nothing(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb", steps=3)
    with pytest.raises(StabilityBenchError, match="no tag 'nope'"):
        import_logs(tmp_path / "tb", tmp_path / "audit", mapping=["nope=loss"], console=quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_two_tags_mapped_to_one_column_is_an_error(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb", steps=3)
    with pytest.raises(StabilityBenchError, match="both map to 'loss'"):
        import_logs(
            tmp_path / "tb",
            tmp_path / "audit",
            mapping=["train/loss=loss", "lr=loss"],
            console=quiet(),
        )
    assert not (tmp_path / "audit").exists()


def test_reimporting_the_same_source_replaces_it_and_a_different_audit_is_refused(
    tmp_path: Path,
) -> None:
    write_tb(tmp_path / "tb", steps=5)
    import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    again = import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    assert again.replaced and len(RunStore.open(tmp_path / "audit").run_ids()) == 1
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(StabilityBenchError, match="already holds a different audit"):
        import_logs(tmp_path / "tb", tmp_path / "audit", name="other", console=quiet())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_many_runs_in_one_folder_get_distinct_seeds_for_leave_one_out(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        write_tb(tmp_path / "tb" / name, steps=4)
    import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    infos = RunStore.open(tmp_path / "audit").infos()
    assert sorted((i.label, i.seed) for i in infos) == [("a", 0), ("b", 1), ("c", 2)]
    assert {i.workload for i in infos} == {"tb"}


def test_tables_have_the_store_columns(tmp_path: Path) -> None:
    write_tb(tmp_path / "tb", steps=4)
    import_logs(tmp_path / "tb", tmp_path / "audit", console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    run = store.load(run_id)
    assert run.telemetry["step"].dtype == np.int64
    assert {"step", "env_step", "perf"} <= set(run.evals.columns)
    assert list(run.events.columns) == list(
        pd.read_parquet(store.run_dir(run_id) / "events.parquet").columns
    )
    assert len(run.events) == 0


def test_map_step_to_a_column_the_csv_does_not_have_is_an_error(tmp_path: Path) -> None:
    csv = tmp_path / "log.csv"
    csv.write_text("it,loss\n0,1.0\n1,0.5\n", encoding="utf-8")
    with pytest.raises(StabilityBenchError, match="has no column 'iteration'"):
        import_logs(csv, tmp_path / "audit", mapping=["iteration=step"], console=quiet())
    import_logs(csv, tmp_path / "audit", mapping=["it=step"], console=quiet())
    store, run_id = only_run(tmp_path / "audit")
    assert store.load(run_id).telemetry["loss"].tolist() == [1.0, 0.5]
