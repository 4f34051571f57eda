"""Gaussian diffusion: the noise schedule and training loss, the samplers, and the one factory everything calls."""

from .factory import diffusion_for
from .gaussian import GaussianDiffusion, NoiseSchedule

__all__ = ["GaussianDiffusion", "NoiseSchedule", "diffusion_for"]
