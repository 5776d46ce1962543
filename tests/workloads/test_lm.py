"""The LM workload: corpus loading, a tiny real GPT-2 run, determinism, divergence, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from stabilitybench.errors import StabilityBenchError
from stabilitybench.store import RunWriter
from stabilitybench.types import RunSpec
from stabilitybench.workloads import corpus as corpora
from stabilitybench.workloads import lm
from stabilitybench.workloads.base import build_workload

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "gpt2-test",
        "kind": "lm",
        "size": TINY,
        "corpus": "shakespeare",
        "total_steps": 20,
        "eval": {"every": 5, "batches": 2},
        "knobs": {"batch_size": 4, "block_size": 32, "lr": 3e-3},
    }
    config.update(overrides)
    return config


def run(
    config: dict[str, Any], tmp_path: Path, seed: int = 0, perturbations: tuple = ()
) -> tuple[dict, Path]:
    spec = RunSpec(workload=config, perturbations=perturbations, seed=seed)
    workload = build_workload(config)
    workload.validate(spec)
    run_dir = tmp_path / f"run-{spec.run_id}-{len(list(tmp_path.iterdir()))}"
    outcome = workload.run(spec, RunWriter(run_dir))
    return outcome, run_dir


# ---- corpus ------------------------------------------------------------------------------------


def test_shakespeare_corpus_is_offline_real_text_without_gutenberg_boilerplate() -> None:
    # bundled with the package: one xz file per named corpus, a few MB in all
    files = corpora.corpus_files("shakespeare")
    assert files == [corpora.bundled_corpus_path("shakespeare")] and files[0].is_file()
    assert sum(corpora.bundled_corpus_path(n).stat().st_size for n in corpora.NAMED_CORPORA) < 4e6
    text = corpora.read_corpus("shakespeare")
    assert len(text) > 4_000_000
    assert "To be, or not to be" in text
    assert "Project Gutenberg" not in text and "SMALL PRINT" not in text
    folio = corpora.read_corpus("shakespeare-folio")
    assert "vnfold" in folio and folio != text


def test_strip_gutenberg_removes_header_and_licence() -> None:
    raw = (
        "The Project Gutenberg EBook of X\nRelease date\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
        "Actual text.\nMore text.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence: lots of words\n"
    )
    assert corpora.strip_gutenberg(raw) == "Actual text.\nMore text."
    old = "Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody\nEnd of the Project Gutenberg Etext\n"
    assert corpora.strip_gutenberg(old) == "Body"
    assert corpora.strip_gutenberg("  plain text  ") == "plain text"


def test_local_file_and_folder_corpora_split_deterministically(tmp_path: Path) -> None:
    single = tmp_path / "one.txt"
    single.write_text("abcdefghij" * 100, encoding="utf-8")
    tokens = corpora.load_tokens(str(single))
    assert tokens.vocab_size == 256
    assert len(tokens.train) == 900 and len(tokens.validation) == 100
    assert bytes(tokens.validation.tolist()) == b"abcdefghij" * 10  # the last 10%

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second", encoding="utf-8")
    (folder / "a.txt").write_text("first", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    assert corpora.read_corpus(str(folder)) == "first\n\nsecond\n\nthird"


def test_bpe_tokenizer_trains_offline_and_round_trips(tmp_path: Path) -> None:
    text_file = tmp_path / "small.txt"
    text_file.write_text(corpora.read_corpus("shakespeare")[:60_000], encoding="utf-8")
    spec = corpora.TokenizerSpec.parse({"kind": "bpe", "vocab_size": 400})
    tokens = corpora.load_tokens(str(text_file), spec)
    assert 257 <= tokens.vocab_size <= 400
    assert int(tokens.train.max()) < tokens.vocab_size
    train_text, validation_text = corpora.split_text(corpora.read_corpus(str(text_file)))
    assert len(tokens.train) < 0.8 * len(train_text.encode())  # merges compress the text
    decoded = corpora._train_bpe(str(text_file), 400).decode(tokens.validation.tolist())
    assert decoded == validation_text


def test_validation_batches_are_fixed_and_training_batches_follow_the_seed() -> None:
    tokens = corpora.load_tokens("shakespeare")
    first = corpora.fixed_batches(tokens.validation, 3, 4, 16)
    second = corpora.fixed_batches(tokens.validation, 3, 4, 16)
    assert len(first) == 3 and first[0][0].shape == (4, 16)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one token
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xa, _ = corpora.sample_batch(tokens.train, 4, 16, gen_a)
    xb, _ = corpora.sample_batch(tokens.train, 4, 16, gen_b)
    assert torch.equal(xa, xb)


# ---- training ----------------------------------------------------------------------------------


def test_tiny_run_writes_tables_and_learns(tmp_path: Path) -> None:
    outcome, run_dir = run(tiny_config(total_steps=30), tmp_path)
    telemetry = pd.read_parquet(run_dir / "telemetry.parquet")
    evals = pd.read_parquet(run_dir / "evals.parquet")
    events = pd.read_parquet(run_dir / "events.parquet")
    assert list(telemetry["step"]) == list(range(30))
    assert {"loss", "grad_norm", "grad_cos_prev", "update_norm", "lr"} <= set(telemetry.columns)
    assert telemetry["loss"].notna().all()
    # Evaluations: before training, every 5 steps (index of the latest optimizer step).
    assert list(evals["step"]) == [0, 4, 9, 14, 19, 24, 29]
    assert evals["env_step"].isna().all()
    assert (evals["perf"] == -evals["val_loss"]).all()
    assert evals["val_loss"].iloc[0] == pytest.approx(math.log(256), rel=0.05)  # untrained: uniform
    assert evals["val_loss"].iloc[-1] < evals["val_loss"].iloc[0] - 0.5
    assert telemetry["loss"].iloc[-5:].mean() < telemetry["loss"].iloc[:5].mean() - 0.5
    assert len(events) == 0
    assert outcome == {
        "final_perf": pytest.approx(evals["perf"].iloc[-3:].mean()),
        "diverged": False,
        "steps": 30,
        "env_steps": None,
    }
    # Warmup (5% of 30 = 2 steps: 1/2, 2/2 of the peak), then cosine decay towards 10% of it.
    lr_values = telemetry["lr"].to_numpy()
    assert lr_values[:4] == pytest.approx(
        [1.5e-3, 3e-3, 3e-3, 3e-3 * (0.55 + 0.45 * math.cos(math.pi / 28))]
    )
    assert lr_values[-1] == pytest.approx(3e-3 * (0.55 + 0.45 * math.cos(math.pi * 27 / 28)))


def test_same_seed_gives_identical_telemetry_and_other_seed_differs(tmp_path: Path) -> None:
    config = tiny_config(
        total_steps=8, knobs={"batch_size": 4, "block_size": 32, "dropout": 0.1, "grad_noise": 0.5}
    )
    _, dir_a = run(config, tmp_path, seed=1)
    _, dir_b = run(config, tmp_path, seed=1)
    _, dir_c = run(config, tmp_path, seed=2)
    table_a = pd.read_parquet(dir_a / "telemetry.parquet")
    pd.testing.assert_frame_equal(table_a, pd.read_parquet(dir_b / "telemetry.parquet"))
    pd.testing.assert_frame_equal(
        pd.read_parquet(dir_a / "evals.parquet"), pd.read_parquet(dir_b / "evals.parquet")
    )
    assert not table_a["loss"].equals(pd.read_parquet(dir_c / "telemetry.parquet")["loss"])


def test_grad_noise_adds_noise_of_the_documented_size() -> None:
    base = lm.parse_config(tiny_config(knobs={"batch_size": 4, "block_size": 32, "grad_clip": 0.0}))
    trainer = lm.LMTrainer(base, seed=0)
    x, y = trainer.sample()
    loss = lm.lm_loss(trainer.model, x, y)
    loss.backward()
    clean = [p.grad.clone() for p in trainer.model.parameters()]
    clean_norm = torch.stack([g.norm() for g in clean]).norm()
    trainer.grad_noise, trainer.grad_noise_relative = 2.0, True
    trainer._add_grad_noise()
    noise = torch.cat(
        [(p.grad - c).reshape(-1) for p, c in zip(trainer.model.parameters(), clean, strict=True)]
    )
    assert float(noise.norm()) == pytest.approx(
        2.0 * float(clean_norm), rel=0.02
    )  # ~1e5 entries: tight
    for p, c in zip(trainer.model.parameters(), clean, strict=True):
        p.grad.copy_(c)
    trainer.grad_noise, trainer.grad_noise_relative = 0.01, False
    trainer._add_grad_noise()
    noise = torch.cat(
        [(p.grad - c).reshape(-1) for p, c in zip(trainer.model.parameters(), clean, strict=True)]
    )
    assert float(noise.std()) == pytest.approx(0.01, rel=0.02)


def test_label_smoothing_and_dropout_reach_the_model_and_loss() -> None:
    settings = lm.parse_config(
        tiny_config(
            knobs={"batch_size": 4, "block_size": 32, "dropout": 0.2, "label_smoothing": 0.1}
        )
    )
    trainer = lm.LMTrainer(settings, seed=0)
    assert trainer.model.config.resid_pdrop == 0.2 and trainer.model.config.attn_pdrop == 0.2
    x, y = trainer.sample()
    trainer.model.eval()
    logits = trainer.model(input_ids=x).logits
    smoothed = lm.lm_loss(trainer.model, x, y, 0.1)
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(0.9 * logp.gather(-1, y[..., None]).squeeze(-1) + 0.1 * logp.mean(-1)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_non_finite_loss_is_recorded_as_divergence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = lm.lm_loss
    calls = {"train": 0}

    def exploding_loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        loss = real_loss(model, x, y, label_smoothing)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 7:  # the 7th training step sees a non-finite loss
                return loss * float("inf")
        return loss

    monkeypatch.setattr(lm, "lm_loss", exploding_loss)
    outcome, run_dir = run(tiny_config(total_steps=20), tmp_path)
    evals = pd.read_parquet(run_dir / "evals.parquet")
    telemetry = pd.read_parquet(run_dir / "telemetry.parquet")
    assert outcome["diverged"] is True and outcome["steps"] == 7
    assert outcome["final_perf"] == -math.inf
    assert evals["perf"].iloc[-1] == -math.inf and evals["step"].iloc[-1] == 6
    assert len(telemetry) == 7 and not math.isfinite(telemetry["loss"].iloc[-1])


def test_huge_learning_rate_runs_to_the_end_or_reports_divergence(tmp_path: Path) -> None:
    outcome, run_dir = run(
        tiny_config(
            total_steps=10, knobs={"batch_size": 4, "block_size": 32, "lr": 50.0, "grad_clip": 0.0}
        ),
        tmp_path,
    )
    evals = pd.read_parquet(run_dir / "evals.parquet")
    assert outcome["diverged"] == (not math.isfinite(evals["perf"].iloc[-1]))
    # An LR 10^4 times too large destroys what a good run learns.
    assert evals["val_loss"].iloc[-1] > 3.0


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"size": "huge"}, "unknown size 'huge'; allowed: tiny, small, gpt2-124m"),
        ({"size": {"n_layer": 2, "n_embd": 30, "n_head": 4}}, "multiple of size.n_head"),
        (
            {"knobs": {"temperature": 1.0}},
            "unknown knob knobs.temperature; allowed: adam_beta2, adam_eps, batch_size, block_size",
        ),
        ({"knobs": {"dropout": 1.5}}, "knobs.dropout must be a number in [0.0, 1.0)"),
        ({"knobs": {"batch_size": 2.5}}, "knobs.batch_size must be an integer"),
        (
            {"knobs": {"grad_noise_mode": "loud"}},
            "knobs.grad_noise_mode must be one of relative, absolute",
        ),
        (
            {"knobs": {"lr_schedule": "linear"}},
            "knobs.lr_schedule must be one of cosine, constant, got 'linear'",
        ),
        ({"total_steps": 0}, "total_steps must be an integer >= 1"),
        ({"eval": {"every": 5, "episodes": 3}}, "unknown key eval.episodes"),
        ({"tokenizer": "wordpiece"}, "tokenizer: expected one of byte, bpe"),
        ({"algo": "ppo"}, "unknown key 'algo'"),
        ({"corpus": "/no/such/corpus.txt"}, "no such file or folder"),
    ],
)
def test_bad_config_is_one_clear_error_before_training(
    overrides: dict[str, Any], message: str
) -> None:
    config = tiny_config(**overrides)
    with pytest.raises(StabilityBenchError, match="workload 'gpt2-test'") as info:
        build_workload(config).validate(RunSpec(workload=config))
    assert message in str(info.value)


def test_empty_corpus_file_and_folder_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    with pytest.raises(StabilityBenchError, match="is empty"):
        build_workload(tiny_config(corpus=str(empty))).validate(
            RunSpec(workload=tiny_config(corpus=str(empty)))
        )
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(StabilityBenchError, match=r"has no \.txt files"):
        corpora.read_corpus(str(folder))


def test_corpus_too_small_for_block_size_is_an_error(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("x" * 200, encoding="utf-8")
    config = tiny_config(corpus=str(small), knobs={"block_size": 64})
    with pytest.raises(StabilityBenchError, match="validation split has 20 tokens"):
        build_workload(config).run(RunSpec(workload=config), RunWriter(tmp_path / "run"))


def test_hf_corpus_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'datasets'", name="datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    config = tiny_config(corpus="hf:tiny_shakespeare")
    with pytest.raises(StabilityBenchError, match="needs the `datasets` package"):
        build_workload(config).validate(RunSpec(workload=config))


def test_named_sizes_match_the_issue() -> None:
    assert lm.SIZES["tiny"] == {"n_layer": 4, "n_embd": 128, "n_head": 4}
    assert lm.SIZES["small"]["n_layer"] == 6 and lm.SIZES["small"]["n_embd"] == 256
    model = lm.build_model(lm.SIZES["tiny"], 256, 128, 0.0)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n_params < 0.9e6  # 4 blocks of 12·128² plus embeddings
    json.dumps(lm.DEFAULT_KNOBS)  # knobs are plain JSON values (they go into run.json)


# ---- perturbations -----------------------------------------------------------------------------


def test_lr_spike_and_label_noise_are_applied_and_recorded(tmp_path: Path) -> None:
    perturbations = (
        {"kind": "lr_spike", "at": 10, "factor": 10.0, "duration": 3},
        {"kind": "label_noise", "at": 0.75, "fraction": 0.5, "duration": 2},
    )
    outcome, run_dir = run(tiny_config(), tmp_path, perturbations=perturbations)
    telemetry = pd.read_parquet(run_dir / "telemetry.parquet")
    events = pd.read_parquet(run_dir / "events.parquet").set_index("kind")
    assert outcome["steps"] == 20
    assert events.loc["lr_spike", "start_step"] == 10 and events.loc["lr_spike", "end_step"] == 12
    assert (
        events.loc["label_noise", "start_step"] == 15
        and events.loc["label_noise", "end_step"] == 16
    )
    assert json.loads(events.loc["label_noise", "params"])["fraction"] == 0.5
    assert telemetry.loc[telemetry["perturbed"], "step"].tolist() == [10, 11, 12, 15, 16]
    # The spike multiplies the scheduled LR inside its window only.
    _, clean_dir = run(tiny_config(), tmp_path)
    clean = pd.read_parquet(clean_dir / "telemetry.parquet")
    ratio = (telemetry["lr"] / clean["lr"]).to_numpy()
    assert ratio[10:13] == pytest.approx([10.0] * 3) and ratio[:10] == pytest.approx([1.0] * 10)
    # Same batches before the onset: a perturbed run and its baseline match step for step.
    assert telemetry["loss"].iloc[:10].tolist() == clean["loss"].iloc[:10].tolist()
    # Half the targets replaced by random bytes: the loss jumps in the label_noise window.
    assert telemetry["loss"].iloc[15] > clean["loss"].iloc[15] + 0.3


def test_data_shift_trains_on_batches_from_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    real_loss = lm.lm_loss

    def recording_loss(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        if model.training:
            seen.append(x.clone())
        return real_loss(model, x, y, label_smoothing)

    monkeypatch.setattr(lm, "lm_loss", recording_loss)
    shift = ({"kind": "data_shift", "at": 2, "duration": 3, "source": "upper"},)
    _, run_dir = run(tiny_config(total_steps=6), tmp_path, perturbations=shift)
    lowercase = [bool(((x >= ord("a")) & (x <= ord("z"))).any()) for x in seen]
    assert lowercase == [True, True, False, False, False, True]  # steps 2-4 read capitals
    events = pd.read_parquet(run_dir / "events.parquet")
    assert events[["kind", "start_step", "end_step"]].values.tolist() == [["data_shift", 2, 4]]

    seen.clear()
    folio = ({"kind": "data_shift", "at": 0, "duration": 1, "source": "shakespeare-folio"},)
    run(tiny_config(total_steps=1), tmp_path, perturbations=folio)
    folio_text = corpora.read_corpus("shakespeare-folio").encode()
    assert all(bytes(row.tolist()) in folio_text for row in seen[0])


def test_perturbations_the_lm_cannot_apply_are_rejected_before_training() -> None:
    config = tiny_config()
    spec = RunSpec(
        workload=config, perturbations=({"kind": "reward_noise", "at": 0.5, "sigma": 1.0},)
    )
    with pytest.raises(StabilityBenchError, match="reward_noise"):
        build_workload(config).validate(spec)
    bad_source = RunSpec(
        workload=config,
        perturbations=({"kind": "data_shift", "at": 0.5, "source": "/no/such/dir"},),
    )
    with pytest.raises(StabilityBenchError, match=r"data_shift.*no such file or folder"):
        build_workload(config).validate(bad_source)
