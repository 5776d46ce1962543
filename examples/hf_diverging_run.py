"""A Hugging Face Trainer run that diverges, logged to TensorBoard — to try `stabilitybench import`.

A 1-layer GPT-2 on the bundled Shakespeare bytes, plain SGD with learning rate `--lr`
(default 1e3: the gradient turns non-finite within a few steps), `report_to="tensorboard"`,
an evaluation every 4 steps. Then:

    stabilitybench import OUT_DIR --out hf-diverged-audit
    stabilitybench summary hf-diverged-audit
    stabilitybench monitor score hf-diverged-audit [--monitor OTHER_AUDIT/monitor]

Run: `.venv/bin/python examples/hf_diverging_run.py --out hf-diverged` (about 10 s on CPU).
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

from stabilitybench.workloads import corpus as corpora
from stabilitybench.workloads.lm import build_model


class ByteWindows(torch.utils.data.Dataset):
    """Fixed 32-byte windows of the corpus, as causal-LM examples (labels = inputs)."""

    def __init__(self, n: int, offset: int = 0, block: int = 32) -> None:
        tokens = corpora.load_tokens("shakespeare").train
        self.windows = [
            tokens[offset + i * 997 : offset + i * 997 + block].long() for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="hf-diverged")
    parser.add_argument("--lr", type=float, default=1e3)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model({"n_layer": 1, "n_embd": 32, "n_head": 2}, 256, 32, 0.0)
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=args.lr,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=ByteWindows(80),
        eval_dataset=ByteWindows(8, offset=500),
    )
    trainer.train()
    print(
        f"TensorBoard logs in {args.out}/runs/; next: stabilitybench import {args.out} --out AUDIT"
    )


if __name__ == "__main__":
    main()
