"""Wall-time ratio of training with telemetry on vs off, measured side by side.

Conditions are interleaved (their order rotates each repetition) so that machine load affects all
alike; each repetition trains `--steps` optimizer steps (the telemetry's `close()`, with its last
read-back, included) and the median over repetitions of the per-repetition ratio to "off" is
printed, by wall clock and by this process's CPU time (steadier on a shared machine).
Run: `.venv/bin/python benchmarks/overhead.py`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from _record import record

from stabilitybench import Telemetry

Loop = Callable[[int, Telemetry | None], None]


def gpt2_loop() -> tuple[torch.nn.Module, torch.optim.Optimizer, Loop, Callable[[], torch.Tensor]]:
    """A 4-layer GPT-2 (n_embd 128, byte vocabulary), batch 16, block 128, AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (64, 129), generator=gen)

    def loop(steps: int, tel: Telemetry | None) -> None:
        for i in range(steps):
            batch = data[(i * 16) % 48 : (i * 16) % 48 + 16]
            opt.zero_grad(set_to_none=True)
            loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if tel is not None:
                tel.log(loss=loss.detach())

    probe = data[:4, :-1]
    return model, opt, loop, lambda: model(probe, labels=probe).loss


def mlp_loop() -> tuple[torch.nn.Module, torch.optim.Optimizer, Loop, Callable[[], torch.Tensor]]:
    """A small MLP regression loop: tiny steps, so telemetry's fixed cost shows most."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = x.sum(1, keepdim=True).sin()

    def loop(steps: int, tel: Telemetry | None) -> None:
        for i in range(steps):
            xb, yb = (
                x[(i * 32) % 224 : (i * 32) % 224 + 32],
                y[(i * 32) % 224 : (i * 32) % 224 + 32],
            )
            opt.zero_grad(set_to_none=True)
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            opt.step()
            if tel is not None:
                tel.log(loss=loss.detach())

    return model, opt, loop, lambda: ((model(x[:64]) - y[:64]) ** 2).mean()


def measure(
    name: str, make: Callable[..., tuple], steps: int, reps: int, sharpness_every: int
) -> dict[str, float]:  # type: ignore[type-arg]
    model, opt, loop, closure = make()
    loop(3, None)  # warm-up
    conditions = ("off", "cheap", "full")
    wall: dict[str, list[float]] = {c: [] for c in conditions}
    cpu: dict[str, list[float]] = {c: [] for c in conditions}
    for rep in range(reps):
        order = conditions[rep % 3 :] + conditions[: rep % 3]
        for condition in order:
            tel = None
            if condition == "cheap":
                tel = Telemetry(model, opt)
            elif condition == "full":
                tel = Telemetry(
                    model,
                    opt,
                    probes=["cheap", "layer_norms", "sharpness"],
                    closure=closure,
                    scheduled_every=sharpness_every,
                )
            start, start_cpu = time.perf_counter(), time.process_time()
            loop(steps, tel)
            if tel is not None:
                tel.close()  # the last read-back and the sinks are part of the cost
            wall[condition].append((time.perf_counter() - start) / steps)
            cpu[condition].append((time.process_time() - start_cpu) / steps)

    def ratio(times: dict[str, list[float]], condition: str) -> float:
        return statistics.median(a / b for a, b in zip(times[condition], times["off"], strict=True))

    off = statistics.median(wall["off"])
    result = {
        "off_ms": off * 1e3,
        "cheap_ratio": ratio(wall, "cheap"),
        "full_ratio": ratio(wall, "full"),
        "cheap_cpu_ratio": ratio(cpu, "cheap"),
        "cheap_extra_cpu_ms": (statistics.median(cpu["cheap"]) - statistics.median(cpu["off"]))
        * 1e3,
        "full_cpu_ratio": ratio(cpu, "full"),
    }
    print(
        f"{name:<28} off {result['off_ms']:8.2f} ms/step | cheap every step "
        f"{result['cheap_ratio']:.3f}x wall, {result['cheap_cpu_ratio']:.3f}x cpu "
        f"(+{result['cheap_extra_cpu_ms']:.3f} ms cpu/step) | full (layer norms + sharpness "
        f"every {sharpness_every}) {result['full_ratio']:.3f}x",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gpt2-steps", type=int, default=50)
    parser.add_argument("--mlp-steps", type=int, default=500)
    parser.add_argument("--sharpness-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, 1 thread, {args.reps} interleaved repetitions, median per step, "
        f"load average {load_before:.1f} on {os.cpu_count()} cores at the start"
    )
    gpt2 = measure(
        "(a) GPT-2 4L n_embd128 b16", gpt2_loop, args.gpt2_steps, args.reps, args.sharpness_every
    )
    mlp = measure(
        "(b) MLP regression b32", mlp_loop, args.mlp_steps, args.reps, args.sharpness_every
    )
    record("overhead", {"gpt2": gpt2, "mlp": mlp}, settings=vars(args), load_before=load_before)


if __name__ == "__main__":
    main()
