"""Sampling: class-conditional images (or latents) from a supernet, one of its subnets or a sliced model.

`sample_images` is the library call (deterministic under a seed); `save_grid` writes a PNG grid, `save_latents` an
`.npz` in the layout `load_dataset("npz:PATH")` reads; `run_sample` is what `dynasearch sample` runs. Latent models
(4 channels) can be decoded with a local diffusers AutoencoderKL folder; diffusers is optional and imported lazily.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ..model.config import DiTConfig
from .gaussian import GaussianDiffusion


# ---------------------------------------------------------------------------------------------------------- sampling
def diffusion_for(config: DiTConfig, checkpoint_doc: dict[str, Any] | None = None) -> GaussianDiffusion:
    """The diffusion a model was trained with: its `learn_sigma`, and a checkpoint's "diffusion" section if present."""
    kwargs: dict[str, Any] = {}
    section = (checkpoint_doc or {}).get("diffusion")
    if isinstance(section, dict):
        for key in ("num_timesteps", "beta_start", "beta_end"):
            if key in section:
                kwargs[key] = section[key]
    try:
        return GaussianDiffusion(learn_sigma=config.learn_sigma, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint diffusion settings {section!r} are invalid: {exc}") from None
