"""Which logged tag becomes which store column: the default names, `--map`, and what is left.

A source logs tags (`train/loss`, `eval/loss`, `lr-AdamW`, …). Each tag gets one *target*:

- a telemetry column (`loss`, `grad_norm`, `lr`, …), one row per logged step;
- `eval_loss` (an evaluation: `perf = -value`, kept as `val_loss`) or `eval_return`
  (`perf = value`, kept as `return`) in `evals.parquet`;
- `step` (tabular sources: the column that holds the step) or `env_step`;
- `skip` (dropped).

Tags with no default and no `--map` are kept as extra telemetry columns, with `/` replaced by
`.` so that `val/acc` cannot be read as the role-prefixed column of a multi-optimizer run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from stabilitybench.errors import StabilityBenchError

EVAL_LOSS = "eval_loss"
EVAL_RETURN = "eval_return"
STEP = "step"
ENV_STEP = "env_step"
SKIP = "skip"
EVAL_TARGETS = (EVAL_LOSS, EVAL_RETURN)
SPECIAL_TARGETS = (*EVAL_TARGETS, STEP, ENV_STEP, SKIP)

# The telemetry columns the rest of the package knows by name (probes, workloads, integrations).
TELEMETRY_COLUMNS = (
    "loss",
    "grad_norm",
    "grad_norm_raw",
    "grad_norm_max_layer",
    "update_norm",
    "update_ratio",
    "param_norm",
    "lr",
    "grad_cos_prev",
    "grad_cos_ema",
    "sharpness",
    "m_coherence",
    "grad_noise_scale",
    "value_loss",
    "policy_loss",
    "critic_loss",
    "actor_loss",
    "entropy",
    "approx_kl",
    "clip_fraction",
    "explained_variance",
    "ent_coef",
    "ent_coef_loss",
    "action_std",
    "episode_return",
)
TARGETS = (*TELEMETRY_COLUMNS, *SPECIAL_TARGETS)
OUR_PREFIX = "stability/"  # what TensorBoardSink / WandbSink / MLflowSink write under

# Normalised tag (lower case; runs of `/ . - space` → `_`) → target, in order of preference:
# where two tags of one run map to the same target, the earlier one wins, the other is kept.
DEFAULTS: tuple[tuple[str, str], ...] = (
    # training loss: HF `train/loss`, SB3 `train/loss`, Lightning `train_loss[_step]`, plain
    ("loss", "loss"),
    ("train_loss", "loss"),
    ("train_loss_step", "loss"),
    ("training_loss", "loss"),
    ("loss_train", "loss"),
    ("train_total_loss", "loss"),
    # gradient norm (HF's `train/grad_norm` is the pre-clip one: see `dialect`)
    ("grad_norm", "grad_norm"),
    ("train_grad_norm", "grad_norm"),
    ("gradient_norm", "grad_norm"),
    ("grad_2_0_norm_total", "grad_norm"),  # lightning.pytorch.utilities.grad_norm
    ("grad_norm_raw", "grad_norm_raw"),
    # learning rate: HF/SB3 `train/learning_rate`, Lightning's LearningRateMonitor `lr-Adam`
    ("lr", "lr"),
    ("learning_rate", "lr"),
    ("train_learning_rate", "lr"),
    ("train_lr", "lr"),
    ("lr_adam", "lr"),
    ("lr_adamw", "lr"),
    ("lr_sgd", "lr"),
    # SB3's own signals (the same names as integrations/sb3.py records)
    ("train_value_loss", "value_loss"),
    ("train_policy_gradient_loss", "policy_loss"),
    ("train_approx_kl", "approx_kl"),
    ("train_clip_fraction", "clip_fraction"),
    ("train_explained_variance", "explained_variance"),
    ("train_std", "action_std"),
    ("train_ent_coef", "ent_coef"),
    ("train_ent_coef_loss", "ent_coef_loss"),
    ("train_actor_loss", "actor_loss"),
    ("train_critic_loss", "critic_loss"),
    ("rollout_ep_rew_mean", "episode_return"),
    ("episode_return", "episode_return"),
    ("train_return", "episode_return"),
    # evaluations
    ("eval_loss", EVAL_LOSS),
    ("val_loss", EVAL_LOSS),
    ("val_loss_epoch", EVAL_LOSS),
    ("validation_loss", EVAL_LOSS),
    ("valid_loss", EVAL_LOSS),
    ("loss_val", EVAL_LOSS),
    ("loss_validation", EVAL_LOSS),
    ("eval_mean_reward", EVAL_RETURN),
    ("eval_return", EVAL_RETURN),
    ("eval_mean_return", EVAL_RETURN),
    ("eval_episode_return", EVAL_RETURN),
)
# Signals stored with the opposite sign (SB3 logs the entropy *loss*, the store keeps entropy).
NEGATED = {"train_entropy_loss": "entropy"}
# Tabular sources: the step column, in order of preference (W&B exports of Lightning/HF runs
# hold both `_step`, W&B's own counter, and the trainer's optimizer step).
STEP_COLUMNS = ("trainer/global_step", "train/global_step", "global_step", "step", "_step", "Step")


def normalise(tag: str) -> str:
    return re.sub(r"[\s/.\-]+", "_", tag.strip().lower())


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """`["train/acc=skip", "my_loss=loss"]` → {tag: target}; a bad target is a user error."""
    out: dict[str, str] = {}
    for item in items:
        tag, sep, target = item.rpartition("=")
        if not sep or not tag:
            raise StabilityBenchError(
                f"--map {item!r}: expected TAG=COLUMN, e.g. --map my_loss=loss"
            )
        target = target.strip()
        if not valid_target(target):
            raise StabilityBenchError(
                f"--map {item!r}: {target!r} is not a column name; allowed: "
                + ", ".join(TARGETS)
                + " (a telemetry column may carry an optimizer role, e.g. actor/grad_norm)"
            )
        if tag in out and out[tag] != target:
            raise StabilityBenchError(f"--map: tag {tag!r} is mapped twice ({out[tag]}, {target})")
        out[tag] = target
    return out


def valid_target(target: str) -> bool:
    if target in TARGETS:
        return True
    role, sep, base = target.partition("/")
    return bool(sep) and bool(role) and "/" not in base and base in TELEMETRY_COLUMNS


def extra_name(tag: str) -> str:
    """The column an unknown tag is kept as: the tag, with `/` → `.` (never a role prefix)."""
    return tag.strip().replace("/", ".") or "unnamed"


@dataclass(frozen=True)
class Column:
    """Where one source tag goes: a target (see the module doc) and a sign (−1: negated)."""

    tag: str
    target: str
    sign: float = 1.0
    extra: bool = False  # an unknown tag kept under its own name


@dataclass
class Assignment:
    """The columns of one source run, resolved from its tags."""

    columns: dict[str, Column] = field(default_factory=dict)  # tag → column
    dialect: str = "generic"  # hf | sb3 | generic

    def tags_for(self, target: str) -> list[str]:
        return [c.tag for c in self.columns.values() if c.target == target]

    @property
    def telemetry(self) -> list[Column]:
        return [c for c in self.columns.values() if c.target not in SPECIAL_TARGETS]

    def described(self) -> dict[str, str]:
        return {c.tag: c.target for c in self.columns.values()}


def dialect(tags: Iterable[str]) -> str:
    """Which writer logged these tags: `hf` (Trainer), `sb3` (x-axis = env steps) or generic."""
    names = {normalise(t) for t in tags}
    if "time_fps" in names or "rollout_ep_rew_mean" in names or "time_total_timesteps" in names:
        return "sb3"
    if {"train_epoch", "train_learning_rate"} <= names or "train_global_step" in names:
        return "hf"
    return "generic"


def assign(tags: Sequence[str], overrides: Mapping[str, str]) -> Assignment:
    """Resolve every tag of one run to its column (overrides first, then defaults, then extra)."""
    kind = dialect(tags)
    defaults = dict(DEFAULTS)
    if kind == "hf":  # the Trainer logs the norm `clip_grad_norm_` returns: before clipping
        defaults["train_grad_norm"] = "grad_norm_raw"
        defaults["grad_norm"] = "grad_norm_raw"
    rank = {name: i for i, (name, _) in enumerate(DEFAULTS)}
    result = Assignment(dialect=kind)
    taken: set[str] = set()
    for tag in tags:
        if tag in overrides:
            target = overrides[tag]
            if target != SKIP and target in taken:
                other = next(t for t, c in result.columns.items() if c.target == target)
                raise StabilityBenchError(
                    f"--map: tags {other!r} and {tag!r} both map to {target!r}; "
                    "a column takes one tag (map the other one to skip)"
                )
            result.columns[tag] = Column(tag, target)
            if target != SKIP:
                taken.add(target)
    own = [t for t in tags if t not in overrides and t.startswith(OUR_PREFIX)]
    for tag in own:  # our own sinks' output maps back to the exact column
        target = tag[len(OUR_PREFIX) :]
        if target and target not in taken and target != STEP:
            result.columns[tag] = Column(tag, target)
            taken.add(target)
    candidates = sorted(
        (t for t in tags if t not in result.columns and normalise(t) in defaults),
        key=lambda t: (rank.get(normalise(t), len(rank)), t),
    )
    for tag in candidates:
        target = defaults[normalise(tag)]
        if target not in taken:
            result.columns[tag] = Column(tag, target)
            taken.add(target)
    for tag in tags:  # a tag named as a telemetry column (`update_ratio`, `param_norm`) is it
        name = normalise(tag)
        if tag not in result.columns and name in TELEMETRY_COLUMNS and name not in taken:
            result.columns[tag] = Column(tag, name)
            taken.add(name)
    for tag in tags:
        name = normalise(tag)
        if tag not in result.columns and name in NEGATED and NEGATED[name] not in taken:
            result.columns[tag] = Column(tag, NEGATED[name], sign=-1.0)
            taken.add(NEGATED[name])
    used = {c.target for c in result.columns.values()}
    for tag in tags:
        if tag not in result.columns:
            name = extra_name(tag)
            while name in used or name in TARGETS:
                name = f"{name}_"
            result.columns[tag] = Column(tag, name, extra=True)
            used.add(name)
    return result
