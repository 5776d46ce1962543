"""The sham: a perturbation that changes nothing but the run's own randomness.

At its onset it re-seeds every random stream of the run — torch's, NumPy's and Python's global
generators (dropout, an RL policy's action sampling, SB3's minibatch order) and the streams a
workload registered with `PerturbationSchedule.add_reseed` (an LM's batch order, the toy's data,
an RL environment's own generator, applied at its next reset) — from a seed of its own. The run
then goes on as it would have with other luck: its trajectory parts from its baseline's without
any harm done. How often the collapse criterion flags sham runs (and unperturbed ones) is its
false-positive rate, printed beside every collapse rate.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from stabilitybench.errors import StabilityBenchError
from stabilitybench.perturbations.base import Perturbation, register
from stabilitybench.types import StepContext


@register
class Sham(Perturbation):
    """Re-seed the run's randomness at onset, and nothing else: the control arm of an audit."""

    name = "sham"
    dimension = "control"
    scope = "model"  # once, at the first optimizer step of the window
    one_shot = True
    models = "nothing: other luck from the onset on (the criterion's false positives)"

    def _check_magnitude(self, where: str, magnitude: Mapping[str, Any]) -> dict[str, Any]:
        if magnitude:
            raise StabilityBenchError(
                f"{where}: unknown field {sorted(magnitude)[0]!r}; a sham changes nothing but the "
                "run's randomness, so it takes no magnitude (allowed fields: at, label)"
            )
        return {}

    def new_seed(self) -> int:
        """The seed the run's streams restart from: drawn from this perturbation's own generator
        (seeded from the run's seed and its place in the schedule), so it is reproducible."""
        import torch

        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())

    def apply(self, ctx: StepContext) -> None:
        import torch

        seed = self.new_seed()
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.schedule is not None:
            self.schedule.reseed(seed)
