"""The one diffusion factory: train, search, sample, eval and bench all build their GaussianDiffusion here.

A model's diffusion is determined by its config alone: the default linear-beta schedule over 1000 timesteps, with
learned-range variance when the model predicts it (`learn_sigma`).
"""

from __future__ import annotations

from ..model.config import DiTConfig
from .gaussian import GaussianDiffusion

__all__ = ["diffusion_for"]


def diffusion_for(config: DiTConfig) -> GaussianDiffusion:
    """The diffusion a model of `config` is trained and sampled with (its `learn_sigma`, the default schedule)."""
    return GaussianDiffusion(learn_sigma=config.learn_sigma)
