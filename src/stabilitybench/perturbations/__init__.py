"""Controlled perturbations of a training run along four dimensions (optimization, data,
parametric, learning signal), scheduled by optimizer step and recorded as events."""

from stabilitybench.perturbations import data, optimization, parametric, sham, signal
from stabilitybench.perturbations.base import (
    ADAPTERS,
    DIMENSIONS,
    Param,
    Perturbation,
    available,
    build,
    register,
    registry,
)
from stabilitybench.perturbations.data import DYNAMICS_QUANTITIES
from stabilitybench.perturbations.schedule import PerturbationSchedule

__all__ = [
    "ADAPTERS",
    "DIMENSIONS",
    "DYNAMICS_QUANTITIES",
    "Param",
    "Perturbation",
    "PerturbationSchedule",
    "available",
    "build",
    "data",
    "optimization",
    "parametric",
    "register",
    "registry",
    "sham",
    "signal",
]
