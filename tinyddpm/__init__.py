"""tinyddpm: diffusion models derived step by step, verified against ground truth."""

from .broadcast import extract
from .distances import energy_distance, sliced_wasserstein
from .mixture import GaussianMixture
from .samplers import (
    ddim_invert,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    ddpm_variances,
)
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture",
    "NoiseSchedule",
    "ddim_invert",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_variances",
    "energy_distance",
    "extract",
    "sliced_wasserstein",
]
