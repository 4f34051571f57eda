"""Gaussian diffusion: the noise schedule and training loss, the samplers, and the one factory everything calls."""

from .factory import diffusion_for
from .gaussian import GaussianDiffusion, NoiseSchedule
from .samplers import DDIM, DDPM, SAMPLERS, Sampler, check_sampler, make_sampler, sample

__all__ = [
    "DDIM",
    "DDPM",
    "SAMPLERS",
    "GaussianDiffusion",
    "NoiseSchedule",
    "Sampler",
    "check_sampler",
    "diffusion_for",
    "make_sampler",
    "sample",
]
