"""Environment and data perturbations: RL observations, rewards and dynamics; LM labels and batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations.base import Param, Perturbation, register

if TYPE_CHECKING:
    import torch

    Batch = tuple[torch.Tensor, torch.Tensor]


def _normal(generator: torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    import torch

    return torch.randn(shape, generator=generator, dtype=torch.float64).numpy()


@register
class ObsNoise(Perturbation):
    """Add Gaussian noise of `sigma` × the running std of each observation dimension (RL)."""

    name = "obs_noise"
    magnitude_field = "sigma"  # the parameter that is its size
    dimension = "data"
    adapter = "env"
    scope = "env"
    params: ClassVar[dict[str, Param]] = {"sigma": Param(float, low=0.0, low_open=True)}
    models = "sensor noise, a changed observation pipeline"
    ramp_field = "sigma"
    ramp_mode = "additive"

    def perturb_obs(self, obs: np.ndarray, obs_std: np.ndarray) -> np.ndarray:
        noisy = obs + self.magnitude() * obs_std * _normal(self.generator, np.shape(obs))
        return noisy.astype(np.asarray(obs).dtype, copy=False)


@register
class RewardNoise(Perturbation):
    """Add Gaussian noise of `sigma` × the running RMS of the clean reward (RL).

    The RMS (not the std) sets the scale, so that an env with a constant reward (CartPole's +1)
    still gets noise of size `sigma` × that reward.
    """

    name = "reward_noise"
    magnitude_field = "sigma"  # the parameter that is its size
    dimension = "data"
    adapter = "env"
    scope = "env"
    params: ClassVar[dict[str, Param]] = {"sigma": Param(float, low=0.0, low_open=True)}
    models = "noisy human or learned reward signals"
    ramp_field = "sigma"
    ramp_mode = "additive"

    def perturb_reward(self, reward: float, reward_rms: float) -> float:
        return float(reward + self.magnitude() * reward_rms * _normal(self.generator, ())[()])


@register
class RewardScale(Perturbation):
    """Multiply the reward by `factor` (RL)."""

    name = "reward_scale"
    magnitude_field = "factor"  # the parameter that is its size
    dimension = "data"
    adapter = "env"
    scope = "env"
    params: ClassVar[dict[str, Param]] = {"factor": Param(float, low=0.0, low_open=True)}
    models = "a changed reward scale (new reward normalisation, unit change)"
    ramp_field = "factor"

    def perturb_reward(self, reward: float, reward_rms: float) -> float:
        return float(reward * self.magnitude())


# MuJoCo model quantities `dynamics_shift` can scale, and how to reach each array.
DYNAMICS_QUANTITIES: dict[str, Callable[[Any], np.ndarray]] = {
    "gravity": lambda m: m.opt.gravity,
    "friction": lambda m: m.geom_friction,
    "body_mass": lambda m: m.body_mass,
    "damping": lambda m: m.dof_damping,
    "actuator_gear": lambda m: m.actuator_gear,
}


@register
class DynamicsShift(Perturbation):
    """Scale a MuJoCo model quantity (gravity, friction, body mass…) by `factor`, then restore it."""

    name = "dynamics_shift"
    magnitude_field = "factor"  # the parameter that is its size
    dimension = "data"
    adapter = "mujoco"
    scope = "env"
    params: ClassVar[dict[str, Param]] = {
        "quantity": Param(str, choices=tuple(DYNAMICS_QUANTITIES)),
        "factor": Param(float, low=0.0, low_open=True),
    }
    models = "sim-to-real gap, a changed robot or terrain"

    def shift_model(self, model: Any) -> Any:
        array = DYNAMICS_QUANTITIES[self.values["quantity"]](model)
        saved = array.copy()
        array[...] = array * self.values["factor"]
        return saved

    def restore_model(self, model: Any, saved: Any) -> None:
        DYNAMICS_QUANTITIES[self.values["quantity"]](model)[...] = saved


@register
class LabelNoise(Perturbation):
    """Replace `fraction` of the target tokens by uniform random tokens in [0, vocab_size) (LM).

    Exactly round(fraction × n) of the n eligible targets are replaced; targets < 0 (padding,
    ignore_index) are never touched. `vocab_size` may be given here; otherwise the schedule's
    `vocab_size`, or the model's `config.vocab_size`, is used.
    """

    name = "label_noise"
    magnitude_field = "fraction"  # the parameter that is its size
    dimension = "data"
    adapter = "batch"
    scope = "batch"
    params: ClassVar[dict[str, Param]] = {
        "fraction": Param(float, low=0.0, high=1.0, low_open=True),
        "vocab_size": Param(int, default=None, low=2),
    }
    models = "noisy or mislabelled training data"
    ramp_field = "fraction"
    ramp_mode = "additive"

    def transform(
        self, x: torch.Tensor, y: torch.Tensor, schedule: Any, shifted_batch: Any
    ) -> Batch:
        import torch

        vocab = self.values["vocab_size"] or schedule.vocab_size
        if vocab is None:
            raise StabilityBenchError(
                f"perturbation {self.label!r}: vocab_size is unknown; give label_noise a "
                "vocab_size (an integer >= 2) or pass vocab_size to PerturbationSchedule"
            )
        flat = y.reshape(-1)
        eligible = torch.nonzero(flat.cpu() >= 0).reshape(-1)
        telemetry = getattr(schedule, "telemetry", None)
        step = telemetry.step + 1 if telemetry is not None else None  # the batch's step
        count = round(self.magnitude(step) * eligible.numel())
        chosen = eligible[torch.randperm(eligible.numel(), generator=self.generator)[:count]]
        tokens = torch.randint(0, int(vocab), (count,), generator=self.generator)
        noisy = flat.clone()
        noisy[chosen.to(flat.device)] = tokens.to(device=flat.device, dtype=flat.dtype)
        return x, noisy.reshape(y.shape)


@register
class DataShift(Perturbation):
    """Train on batches from another part of the data or another corpus (LM).

    The workload supplies the other batches (`shifted_batch`); `source` names them (the LM workload
    reads it, e.g. "tail" for the last part of the corpus or a corpus name).
    """

    name = "data_shift"
    dimension = "data"
    adapter = "batch"
    scope = "batch"
    params: ClassVar[dict[str, Param]] = {"source": Param(str, default="tail")}
    models = "a distribution shift in the data stream (new domain, a bad shard)"

    def transform(
        self, x: torch.Tensor, y: torch.Tensor, schedule: Any, shifted_batch: Any
    ) -> Batch:
        if shifted_batch is None:
            raise StabilityBenchError(
                f"perturbation {self.label!r}: data_shift needs the workload to pass "
                "shifted_batch= (a callable returning an (x, y) batch) to transform_batch"
            )
        new_x, new_y = shifted_batch()
        return new_x, new_y
