"""Knobs that let a run diverge without a perturbation: LM qk_layernorm, z_loss, adam_eps,
adam_beta2, warmup 0; PPO max_grad_norm null; the `probes: stability` workload field."""

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
from stabilitybench.workloads import lm, rl
from stabilitybench.workloads.base import build_workload

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}


def lm_config(**knobs: Any) -> dict[str, Any]:
    return {
        "name": "gpt2-knobs",
        "kind": "lm",
        "size": TINY,
        "total_steps": 6,
        "eval": {"every": 3, "batches": 1},
        "knobs": {"batch_size": 2, "block_size": 16, **knobs},
    }


def test_qk_layernorm_normalises_each_heads_queries_and_keys() -> None:
    torch.manual_seed(0)
    plain = lm.build_model(TINY, 64, 16, 0.0)
    torch.manual_seed(0)
    normed = lm.build_model(TINY, 64, 16, 0.0, qk_layernorm=True)
    plain_names = {n for n, _ in plain.named_parameters()}
    normed_names = {n for n, _ in normed.named_parameters()}
    added = normed_names - plain_names
    assert plain_names <= normed_names  # GPT-2's own names are kept
    assert added == {
        f"transformer.h.{i}.attn.{q}_norm.{w}"
        for i in range(2)
        for q in "qk"
        for w in ("weight", "bias")
    }
    attn = normed.transformer.h[0].attn
    hidden = torch.randn(3, 5, 32)
    q, k, v = attn.c_attn(hidden).split(32, dim=2)  # the hook has normalised q and k
    for part in (q, k):
        heads = part.reshape(3, 5, 2, 16)  # (B, T, H, d): LayerNorm over d with weight 1, bias 0
        assert heads.mean(-1).abs().max() < 1e-5
        assert heads.var(-1, unbiased=False).sub(1).abs().max() < 1e-2  # σ²/(σ² + 1e-5)
    raw = torch.nn.functional.linear(hidden, attn.c_attn.weight.T, attn.c_attn.bias)
    assert torch.allclose(v, raw[..., 64:])  # values untouched
    x = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(plain(input_ids=x).logits, normed(input_ids=x).logits)


def test_z_loss_adds_the_squared_logsumexp_and_the_logged_loss_is_cross_entropy() -> None:
    torch.manual_seed(0)
    model = lm.build_model(TINY, 64, 16, 0.0)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    logits = model(input_ids=x).logits.detach().reshape(-1, 64)
    ce = torch.nn.functional.cross_entropy(logits, y.reshape(-1))
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    got_ce, got_total = (t.detach() for t in lm.lm_losses(model, x, y, z_loss=1e-2))
    assert float(got_ce) == pytest.approx(float(ce), rel=1e-6)
    assert float(got_total) == pytest.approx(float(ce + 1e-2 * z), rel=1e-6)
    assert float(lm.lm_loss(model, x, y).detach()) == pytest.approx(float(ce), rel=1e-6)


def test_optimizer_knobs_reach_adamw_and_warmup_zero_starts_at_full_lr() -> None:
    settings = lm.parse_config(lm_config(adam_eps=1e-6, adam_beta2=0.99, warmup=0, lr=2e-3))
    trainer = lm.LMTrainer(settings, seed=0)
    group = trainer.optimizer.param_groups[0]
    assert group["eps"] == 1e-6 and group["betas"] == (0.9, 0.99)
    assert group["lr"] == pytest.approx(2e-3)  # lr_multiplier(0, T, 0) = 1: no ramp-up
    assert lm.lr_multiplier(0, 100, 0) == 1.0
    # after warmup: cosine decay to MIN_LR_RATIO, or the full LR with lr_schedule: constant
    assert lm.lr_multiplier(100, 100, 10) == pytest.approx(lm.MIN_LR_RATIO)
    assert [lm.lr_multiplier(s, 100, 10, "constant") for s in (4, 10, 60, 100)] == [
        0.5,
        1.0,
        1.0,
        1.0,
    ]
    constant = lm.LMTrainer(lm.parse_config(lm_config(lr_schedule="constant", warmup=0)), seed=0)
    for _ in range(3):
        constant.scheduler.step()
    assert constant.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    defaults = lm.parse_config(lm_config()).knobs
    assert (
        defaults["qk_layernorm"],
        defaults["z_loss"],
        defaults["adam_eps"],
        defaults["adam_beta2"],
    ) == (
        False,
        0.0,
        1e-8,
        0.95,
    )


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"qk_layernorm": 1}, ["knobs.qk_layernorm", "true or false"]),
        ({"z_loss": -1.0}, ["knobs.z_loss", "-1.0"]),
        ({"adam_beta2": 1.0}, ["knobs.adam_beta2", "[0.0, 1.0)"]),
        ({"adam_eps": "tiny"}, ["knobs.adam_eps"]),
        ({"qk_norm": True}, ["knobs.qk_norm", "qk_layernorm", "z_loss"]),
    ],
)
def test_bad_lm_knob_is_one_clear_error(knobs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(StabilityBenchError) as info:
        lm.parse_config(lm_config(**knobs))
    for word in words:
        assert word in str(info.value)


def test_bad_probes_field_is_an_error() -> None:
    with pytest.raises(StabilityBenchError, match="probes must be one of cheap, stability"):
        lm.parse_config({**lm_config(), "probes": "all"})
    with pytest.raises(StabilityBenchError, match="probes must be one of cheap, stability"):
        rl.parse_config(
            {
                "name": "p",
                "kind": "rl",
                "algo": "ppo",
                "env": "CartPole-v1",
                "total_steps": 256,
                "probes": "x",
            }
        )


def test_lm_run_with_stability_probes_records_them_and_the_index(tmp_path: Path) -> None:
    config = {
        **lm_config(qk_layernorm=True, z_loss=1e-4, warmup=0),
        "total_steps": 12,
        "probes": "stability",
    }
    spec = RunSpec(workload=config, seed=0)
    workload = build_workload(config)
    workload.validate(spec)
    writer = RunWriter(tmp_path / "run")
    writer.start({"run_id": spec.run_id})
    workload.run(spec, writer)
    tel = pd.read_parquet(tmp_path / "run" / "telemetry.parquet")
    for column in ("adam_rms_max", "eos_ratio", "update_ratio_layer_max", "grad_norm_layer_argmax"):
        assert tel[column].iloc[1:].notna().all(), column
    assert tel["attn_logit_max"].notna().tolist() == [s == 10 for s in range(12)]  # every 10, not 0
    assert {"attn_logit_max/0", "attn_logit_max/1", "out_logit_max"} <= set(tel.columns)
    index = json.loads((tmp_path / "run" / "run.json").read_text())["telemetry_index"]
    names = index["adam_rms"]
    assert names[0] == "transformer.wte.weight" and "transformer.h.1.attn.k_norm.bias" in names
    assert int(tel["adam_rms_argmax"].iloc[-1]) < len(names)


def test_ppo_max_grad_norm_null_turns_clipping_off() -> None:
    config = {"name": "p", "kind": "rl", "algo": "ppo", "env": "CartPole-v1", "total_steps": 256}
    settings = rl.parse_config({**config, "knobs": {"max_grad_norm": None, "learning_rate": 0.01}})
    model = rl.build_model(settings, seed=0)
    assert model.max_grad_norm == math.inf
    # What SB3 then does: clip_grad_norm_ with an infinite max leaves the gradients bit-identical.
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([30.0, -40.0, 1e-3])
    before = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_([p], math.inf)
    assert torch.equal(p.grad, before) and float(norm) == pytest.approx(50.00000001)
    model.get_env().close()
    with pytest.raises(StabilityBenchError, match=r"knobs.max_grad_norm .* or null \(off\)"):
        rl.parse_config({**config, "knobs": {"max_grad_norm": 0}})


def test_a_null_knob_survives_the_spec_and_reaches_the_run() -> None:
    from stabilitybench.audit.spec import expand, validate_spec

    spec = validate_spec(
        {
            "name": "noclip",
            "workloads": [
                {
                    "name": "ppo",
                    "kind": "rl",
                    "algo": "ppo",
                    "env": "CartPole-v1",
                    "total_steps": 256,
                    "knobs": {"max_grad_norm": None, "learning_rate": [0.001, 0.01]},
                }
            ],
        }
    )
    runs = expand(spec)
    assert [r.workload["knobs"]["max_grad_norm"] for r in runs] == [None, None]
    assert rl.parse_config(runs[0].workload).knobs["max_grad_norm"] is None
