"""The LM workload: a GPT-2 (built from a config, no weights downloaded) trained on a text corpus.

Config (the `workload` dict of a RunSpec)::

    name: gpt2-tiny
    kind: lm
    size: tiny                       # tiny | small | gpt2-124m | {n_layer, n_embd, n_head}
    corpus: shakespeare              # shakespeare | shakespeare-folio | a path | hf:NAME[:CONFIG]
    total_steps: 600                 # optimizer steps
    eval: {every: 50, batches: 8}    # every N optimizer steps; M fixed validation batches
    tokenizer: byte                  # byte (vocab 256, default) | bpe | {kind: bpe, vocab_size: N}
    knobs: {dropout: 0.1, grad_noise: 0.0, label_smoothing: 0.0, lr: 0.001}
    probes: cheap                    # cheap (default) | stability (adds the build-up probes)

AdamW (decoupled weight decay on matrices only) with linear warmup and cosine decay to 10% of
`lr` (`warmup: 0` starts at the full `lr`; `lr_schedule: constant` keeps the full `lr` after the
warmup); betas (0.9, `adam_beta2`), eps `adam_eps`. The loss is
next-token cross-entropy computed here (so `label_smoothing` applies to it), plus `z_loss` ×
mean(logsumexp(logits)²) when `z_loss` > 0 (PaLM's auxiliary loss; validation loss is the plain
cross-entropy). `qk_layernorm: true` normalises each head's queries and keys with a LayerNorm over
the head dimension before the dot product (off by default, as in GPT-2).
`grad_noise` adds Gaussian noise to the clipped gradient every step: with `grad_noise_mode:
relative` (default) the noise vector's expected norm is `grad_noise` × the gradient's norm; with
`absolute` each entry gets standard deviation `grad_noise`. A `data_shift` perturbation replaces
the training batches in its window by batches from its `source`: `tail` (default: the last 10% of
the training split, alone), `upper` (the training text in capitals), or another corpus
(`shakespeare-folio`: the same plays in First Folio spelling; a path; hf:NAME).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from stabilitybench.errors import StabilityBenchError
from stabilitybench.guard.device import DeviceGuard
from stabilitybench.guard.protection import guard_for_run
from stabilitybench.store import RunWriter
from stabilitybench.telemetry import Telemetry
from stabilitybench.telemetry.stability_probes import close_probes, index_names
from stabilitybench.types import RunSpec
from stabilitybench.workloads import corpus as corpora
from stabilitybench.workloads.base import (
    RunOutcome,
    finish_validated_run,
    register_workload,
    train_and_validate,
)
from stabilitybench.workloads.config import (
    EvalConfig,
    ProbeSet,
    WorkloadConfig,
    probes_validator,
    total_steps_validator,
    workload_name,
)

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "small": {"n_layer": 6, "n_embd": 256, "n_head": 8},
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
CONFIG_KEYS = (
    "name",
    "kind",
    "size",
    "corpus",
    "total_steps",
    "eval",
    "knobs",
    "tokenizer",
    "device",
    "probes",
)
DEFAULT_KNOBS: dict[str, Any] = {
    "lr": 1e-3,
    "batch_size": 16,
    "block_size": 128,
    "warmup": 0.05,  # a fraction of total_steps (float < 1) or a number of steps (int)
    "lr_schedule": "cosine",  # after warmup: cosine decay to MIN_LR_RATIO, or constant
    "weight_decay": 0.1,
    "grad_clip": 1.0,  # 0 turns clipping off
    "dropout": 0.0,
    "grad_noise": 0.0,
    "grad_noise_mode": "relative",
    "label_smoothing": 0.0,
    "qk_layernorm": False,
    "z_loss": 0.0,  # coefficient of mean(logsumexp(logits)²) added to the training loss
    "adam_eps": 1e-8,
    "adam_beta2": 0.95,
}
GRAD_NOISE_MODES = ("relative", "absolute")
LR_SCHEDULES = ("cosine", "constant")
MIN_LR_RATIO = 0.1
ADAPTERS = {"batch"}  # perturbations may also transform training batches
ATTN_LOGITS_EVERY = 10  # `probes: stability`: attention/output logits every 10 optimizer steps


def _fail(name: str, message: str) -> StabilityBenchError:
    return StabilityBenchError(f"workload {name!r}: {message}")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(size: Any) -> dict[str, int]:
    """A size name or mapping as {n_layer, n_embd, n_head}."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(
                f"unknown size {size!r}; allowed: {', '.join(SIZES)} or "
                "{n_layer: L, n_embd: E, n_head: H}"
            )
        return dict(SIZES[size])
    if isinstance(size, dict):
        keys = ("n_layer", "n_embd", "n_head")
        if set(size) != set(keys) or not all(_integer(size[k]) and size[k] >= 1 for k in keys):
            raise ValueError(
                f"size as a mapping needs exactly n_layer, n_embd, n_head (integers >= 1); got {size!r}"
            )
        if size["n_embd"] % size["n_head"]:
            raise ValueError(
                f"size.n_embd ({size['n_embd']}) must be a multiple of size.n_head ({size['n_head']})"
            )
        return {k: int(size[k]) for k in keys}
    raise ValueError(f"size: expected one of {', '.join(SIZES)} or a mapping, got {size!r}")


def _check_knobs(knobs: Any) -> dict[str, Any]:
    """Every knob, defaults filled in, each checked for type and range."""
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise ValueError(
            f"unknown knob knobs.{unknown[0]}; allowed: {', '.join(sorted(DEFAULT_KNOBS))}"
        )
    values = {**DEFAULT_KNOBS, **knobs}

    def number(
        key: str, low: float, high: float = math.inf, *, integer: bool = False, closed: bool = False
    ) -> None:
        value = values[key]
        ok_type = (
            _integer(value)
            if integer
            else isinstance(value, int | float) and not isinstance(value, bool)
        )
        in_range = ok_type and (low <= value <= high if closed else low <= value < high)
        if not in_range:
            kind = "an integer" if integer else "a number"
            bracket = "]" if closed else ")"
            raise ValueError(
                f"knobs.{key} must be {kind} in [{low}, {high}{bracket}, got {value!r}"
            )

    number("lr", 1e-12)
    number("batch_size", 1, integer=True)
    number("block_size", 2, integer=True)
    number("weight_decay", 0.0)
    number("grad_clip", 0.0)
    number("dropout", 0.0, 1.0)
    number("grad_noise", 0.0)
    number("label_smoothing", 0.0, 1.0)
    number("z_loss", 0.0)
    number("adam_eps", 0.0)
    number("adam_beta2", 0.0, 1.0)
    if not isinstance(values["qk_layernorm"], bool):
        raise ValueError(
            f"knobs.qk_layernorm must be true or false, got {values['qk_layernorm']!r}"
        )
    warmup = values["warmup"]
    if _integer(warmup):
        number("warmup", 0, integer=True)
    else:
        number("warmup", 0.0, 1.0)
    if values["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(
            f"knobs.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {values['lr_schedule']!r}"
        )
    if values["grad_noise_mode"] not in GRAD_NOISE_MODES:
        raise ValueError(
            f"knobs.grad_noise_mode must be one of {', '.join(GRAD_NOISE_MODES)}, got {values['grad_noise_mode']!r}"
        )
    return values


class LMEval(EvalConfig):
    """When and how much an LM run evaluates: every `every` optimizer steps, on `batches` fixed
    validation batches."""

    shape: ClassVar[str] = "{every: N, batches: M}"

    every: int = 50
    batches: int = 8


class LMConfig(WorkloadConfig):
    """A checked LM workload config with every default filled in (no corpus read yet); its
    fields in the order they are checked."""

    default_name: ClassVar[str] = "lm"
    config_keys: ClassVar[tuple[str, ...] | None] = CONFIG_KEYS

    size: dict[str, int] = Field(default="tiny", validate_default=True)  # n_layer, n_embd, n_head
    corpus: str = "shakespeare"
    total_steps: int = Field(default=None, validate_default=True)  # optimizer steps
    eval: LMEval = Field(default_factory=LMEval)
    tokenizer: corpora.TokenizerSpec = Field(default=None, validate_default=True)
    device: str = Field(default="auto", validate_default=True)  # cpu or cuda; auto: cuda if there
    probes: ProbeSet = "cheap"
    knobs: dict[str, Any] = Field(default_factory=dict, validate_default=True)  # all, filled in

    _size = field_validator("size", mode="before")(_check_size)
    _total_steps = total_steps_validator()
    _probes = probes_validator()
    _knobs = field_validator("knobs", mode="before")(_check_knobs)

    @field_validator("corpus", mode="before")
    @classmethod
    def _corpus_name(cls, corpus: Any) -> Any:
        if not isinstance(corpus, str) or not corpus:
            raise ValueError(f"corpus: expected shakespeare, a path, or hf:NAME; got {corpus!r}")
        return corpus

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer(cls, tokenizer: Any) -> corpora.TokenizerSpec:
        try:
            return corpora.TokenizerSpec.parse(tokenizer)
        except StabilityBenchError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, device: Any) -> str:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(device)


def parse_config(config: dict[str, Any]) -> LMConfig:
    """Check an LM workload config (no corpus reading) and fill in defaults."""
    return LMConfig.read(config)


def build_model(
    size: dict[str, int],
    vocab_size: int,
    block_size: int,
    dropout: float,
    qk_layernorm: bool = False,
) -> nn.Module:
    """A randomly initialised GPT2LMHeadModel of the given size (uses the global torch RNG)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=size["n_embd"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    model: nn.Module = GPT2LMHeadModel(config)
    if qk_layernorm:
        add_qk_layernorm(model)
    return model


def _normalise_qk(attn: Any, output: torch.Tensor) -> torch.Tensor:
    """c_attn's output (B, T, 3C) with each head's query and key LayerNorm-ed over the head
    dimension."""
    q, k, v = output.split(attn.split_size, dim=2)  # each (B, T, C)
    heads = (*q.shape[:-1], -1, attn.head_dim)  # (B, T, H, d)
    q = attn.q_norm(q.reshape(heads)).reshape(v.shape)
    k = attn.k_norm(k.reshape(heads)).reshape(v.shape)
    return torch.cat([q, k, v], dim=2)


def add_qk_layernorm(model: nn.Module) -> None:
    """Give every GPT-2 attention layer a LayerNorm on its queries and keys, per head.

    Each `GPT2Attention` gets two `nn.LayerNorm(head_dim)` modules, `q_norm` and `k_norm` (shared
    by its heads, so the parameter names of GPT-2 stay as they are and two are added per layer),
    applied to the output of its `c_attn` projection by a forward hook — before the attention
    scores, in the eager and the SDPA attention paths alike. The LayerNorms are created with the
    model, before it moves to its device.
    """
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    for module in model.modules():
        if isinstance(module, GPT2Attention):
            module.add_module("q_norm", nn.LayerNorm(module.head_dim))
            module.add_module("k_norm", nn.LayerNorm(module.head_dim))
            module.c_attn.register_forward_hook(
                lambda _mod, _inputs, output, attn=module: _normalise_qk(attn, output)
            )


def lm_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy of targets y (B, T) given inputs x (B, T), plus `z_loss` ×
    the mean over positions of logsumexp(logits)² (PaLM's z-loss) when `z_loss` > 0."""
    return lm_losses(model, x, y, label_smoothing, z_loss)[1]


def lm_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, the loss to train on: cross-entropy + z-loss term)."""
    logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
    flat = logits.reshape(-1, logits.shape[-1])  # (B·T, V)
    ce = F.cross_entropy(flat, y.reshape(-1), label_smoothing=label_smoothing)
    if z_loss > 0:
        return ce, ce + z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
    return ce, ce


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warmup over `warmup` steps, then cosine decay to MIN_LR_RATIO at `total_steps`
    (`schedule` "constant": the full LR after warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LMTrainer:
    """Model, optimizer, data and one `train_step()`: the LM workload's loop without the run folder."""

    def __init__(self, settings: LMConfig, seed: int) -> None:
        knobs = settings.knobs
        self.settings = settings
        self.device = torch.device(settings.device)
        self.batch_size, self.block_size = int(knobs["batch_size"]), int(knobs["block_size"])
        try:
            tokens = corpora.load_tokens(settings.corpus, settings.tokenizer)
        except StabilityBenchError as exc:
            raise _fail(settings.name, str(exc)) from None
        for split, data in (("training", tokens.train), ("validation", tokens.validation)):
            if len(data) < self.block_size + 2:
                raise _fail(
                    settings.name,
                    f"the corpus's {split} split has {len(data)} tokens, fewer than "
                    f"knobs.block_size + 2 = {self.block_size + 2}; use a larger corpus or a smaller block_size",
                )
        self.tokens = tokens
        torch.manual_seed(seed)  # model init and dropout
        self.batch_gen = torch.Generator().manual_seed(seed * 7919 + 1)
        self.shift_gen = torch.Generator().manual_seed(seed * 7919 + 2)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed * 7919 + 3)
        self.model = build_model(
            settings.size,
            tokens.vocab_size,
            self.block_size,
            float(knobs["dropout"]),
            qk_layernorm=bool(knobs["qk_layernorm"]),
        )
        self.model.to(self.device).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": float(knobs["weight_decay"])},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=float(knobs["lr"]),
            betas=(0.9, float(knobs["adam_beta2"])),
            eps=float(knobs["adam_eps"]),
        )
        warmup = knobs["warmup"]
        warmup_steps = (
            int(warmup) if _integer(warmup) else round(float(warmup) * settings.total_steps)
        )
        total, schedule = settings.total_steps, str(knobs["lr_schedule"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, total, warmup_steps, schedule)
        )
        self.validation = corpora.fixed_batches(
            tokens.validation, settings.eval.batches, self.batch_size, self.block_size
        )
        self.label_smoothing = float(knobs["label_smoothing"])
        self.z_loss = float(knobs["z_loss"])
        self.grad_clip = float(knobs["grad_clip"])
        self.grad_norm_raw: torch.Tensor | None = None
        self.grad_noise = float(knobs["grad_noise"])
        self.grad_noise_relative = knobs["grad_noise_mode"] == "relative"
        self.schedule: Any = None
        # Called after backward (and clipping) with the loss and the pre-clip gradient norm.
        self.before_update: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch (x, y), each (B, T)."""
        return corpora.sample_batch(
            self.tokens.train, self.batch_size, self.block_size, self.batch_gen
        )

    def shifted_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch from the active data_shift's `source` (tail, upper or a corpus), on the device."""
        source = self._shift_source()
        tokens = corpora.load_shift_tokens(self.settings.corpus, self.settings.tokenizer, source)
        if len(tokens) < self.block_size + 2:
            raise _fail(
                self.settings.name,
                f"data_shift source {source!r} has {len(tokens)} tokens, fewer than block_size + 2",
            )
        x, y = corpora.sample_batch(tokens, self.batch_size, self.block_size, self.shift_gen)
        return x.to(self.device), y.to(self.device)

    def _shift_source(self) -> str:
        shifts = [p for p in getattr(self.schedule, "perturbations", []) if p.name == "data_shift"]
        step = self.schedule.telemetry.step + 1 if shifts else 0
        active = [p for p in shifts if p.would_cover(step)] or shifts
        return str(active[0].values["source"]) if active else "tail"

    def train_step(self) -> float:
        """One optimizer step; returns the training cross-entropy (a host sync).

        With clipping on, the gradient norm before clipping is kept in `grad_norm_raw` (the
        telemetry's `grad_norm` is what the optimizer sees: the clipped gradient).
        """
        x, y = self.sample()
        x, y = x.to(self.device), y.to(self.device)
        if self.schedule is not None:
            x, y = self.schedule.transform_batch(x, y, shifted_batch=self.shifted_batch)
        if self.z_loss > 0:
            cross_entropy, loss = lm_losses(self.model, x, y, self.label_smoothing, self.z_loss)
        else:
            loss = cross_entropy = lm_loss(self.model, x, y, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            self.grad_norm_raw = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.grad_clip
            ).detach()
        if self.grad_noise > 0:
            self._add_grad_noise()
        if self.before_update is not None:  # a guard that decides before the update reads them
            self.before_update(cross_entropy.detach(), self.grad_norm_raw)
        self.optimizer.step()
        self.scheduler.step()
        return float(cross_entropy.detach())  # the logged loss leaves the z-loss term out

    def _add_grad_noise(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.grad_noise_relative:
            count = sum(g.numel() for g in grads)
            norm = torch.stack(torch._foreach_norm(grads)).norm()  # stays on device: no sync
            std = self.grad_noise * norm / math.sqrt(count)
        else:
            std = torch.tensor(self.grad_noise, device=self.device)
        for g in grads:
            g.add_(
                torch.randn(g.shape, generator=self.noise_gen, device=g.device, dtype=g.dtype) * std
            )

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean cross-entropy (no label smoothing, no dropout) over the fixed validation batches."""
        self.model.eval()
        losses = [
            lm_loss(self.model, x.to(self.device), y.to(self.device)) for x, y in self.validation
        ]
        self.model.train()
        return float(torch.stack(losses).mean())


class LMWorkload:
    """GPT-2 language modelling on a text corpus; perf = −validation loss."""

    kind = "lm"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.name = workload_name(config, LMConfig.default_name)

    def _schedule(self, spec: RunSpec, total_steps: int, vocab_size: int | None = None) -> Any:
        """The perturbation schedule, or None for a baseline run."""
        if not spec.perturbations:
            return None
        from stabilitybench.perturbations import PerturbationSchedule, build

        return PerturbationSchedule(
            [build(dict(p)) for p in spec.perturbations],
            total_steps=total_steps,
            seed=spec.seed,
            vocab_size=vocab_size,
        )

    def validate(self, spec: RunSpec) -> None:
        """Check size, corpus, knobs and that every perturbation can act on this workload."""
        settings = parse_config(spec.workload)
        try:
            corpora.check_corpus(settings.corpus)
        except StabilityBenchError as exc:
            raise _fail(settings.name, str(exc)) from None
        schedule = self._schedule(spec, settings.total_steps)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {settings.name!r} (kind lm)")
            for p in schedule.perturbations:
                if p.name == "data_shift":
                    try:
                        corpora.check_shift_source(str(p.values["source"]))
                    except StabilityBenchError as exc:
                        raise _fail(
                            settings.name, f"perturbation {p.label!r}: source: {exc}"
                        ) from None

    def run(self, spec: RunSpec, writer: RunWriter) -> RunOutcome:
        """Train for `total_steps` optimizer steps, writing the run's telemetry, evals and events."""
        settings = parse_config(spec.workload)
        trainer = LMTrainer(settings, spec.seed)
        telemetry = Telemetry(
            trainer.model,
            trainer.optimizer,
            probes=settings.probes,
            sink=writer,
            total_steps=settings.total_steps,
            scheduled_every=ATTN_LOGITS_EVERY,
        )
        schedule = self._schedule(spec, settings.total_steps, trainer.tokens.vocab_size)
        if schedule is not None:
            schedule.validate(ADAPTERS, where=f"workload {settings.name!r} (kind lm)")
            schedule.attach(telemetry)
            trainer.schedule = schedule
            # a sham restarts the batch order and the gradient-noise stream (dropout: torch's)
            schedule.add_reseed(trainer.batch_gen.manual_seed)
            schedule.add_reseed(trainer.noise_gen.manual_seed)
        guard = guard_for_run(spec.guard, telemetry)  # after the schedule: sees the spiked LR
        if isinstance(guard, DeviceGuard):  # it decides before the update: give it the loss
            trainer.before_update = _log_before_update(telemetry)

        def train_step(step: int) -> float:
            loss = trainer.train_step()
            if trainer.grad_norm_raw is not None:
                telemetry.log(loss=loss, grad_norm_raw=trainer.grad_norm_raw)
            else:
                telemetry.log(loss=loss)
            return loss

        try:
            result = train_and_validate(
                settings.total_steps,
                settings.eval.every,
                train_step,
                trainer.validation_loss,
                guard,
                writer=writer,
                stop_on_nonfinite_validation=True,
            )
        finally:
            telemetry.close(read_back=False)
            close_probes(telemetry.probes)
        index = index_names(telemetry.probes)
        if index:  # what the *_argmax columns' tensor indices name
            writer.update_info(telemetry_index=index)
        return finish_validated_run(writer, result, schedule, guard)


register_workload("lm", LMWorkload)


def _log_before_update(telemetry: Telemetry) -> Callable[[torch.Tensor, torch.Tensor | None], None]:
    """Logs the loss (and the gradient norm before clipping) into the step's row before the
    update, where a guard that decides on the device reads them."""

    def log(loss: torch.Tensor, grad_norm_raw: torch.Tensor | None) -> None:
        extra = {} if grad_norm_raw is None else {"grad_norm_raw": grad_norm_raw}
        telemetry.log_before_step(None, loss=loss, **extra)

    return log
