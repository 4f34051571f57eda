"""Samplers and the one sampling loop: DDIM (Song et al.) and ancestral DDPM over a respaced schedule.

The split is diffusers' `set_timesteps` / `step`: a sampler is built over a diffusion for a number of steps
(`make_sampler`: the timesteps it visits, and the respaced schedule between them) and says how one step maps
x_t to x_prev (`step`). :func:`sample` is the only loop: it draws x_T, makes one (guided) model call per
timestep and hands the output to the sampler's step, so whatever varies per timestep (a timestep schedule's
subnet, through `model_fn`) runs in this one place for every sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .gaussian import GaussianDiffusion, ModelFn, NoiseSchedule, learned_log_variance

__all__ = ["DDIM", "DDPM", "SAMPLERS", "ProgressFn", "Sampler", "check_sampler", "make_sampler", "randn", "sample"]

ProgressFn = Callable[[int, int], None]
"""progress(k, n): step k (from 0) of the n steps of one sampling run is done."""


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn from generator (on its own device) and moved to device."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


@dataclass(frozen=True, eq=False)
class Sampler:
    """The timesteps a sampler visits (descending) and the respaced schedule over them; subclasses add `step`."""

    diffusion: GaussianDiffusion
    timesteps: tuple[int, ...]
    schedule: NoiseSchedule  # respaced to `timesteps`, ascending: step k uses index len(timesteps) - 1 - k
    clip_denoised: bool = True

    @classmethod
    def over(cls, diffusion: GaussianDiffusion, steps: int, clip_denoised: bool = True, **settings: float) -> Sampler:
        """This sampler over `diffusion.timestep_schedule(steps)` (ValueError for steps outside [1, T])."""
        timesteps = diffusion.timestep_schedule(steps)
        return cls(diffusion, tuple(timesteps), diffusion.respaced(timesteps[::-1]), clip_denoised, **settings)

    def index(self, k: int) -> int:
        """Index into the respaced (ascending) schedule of step k."""
        return len(self.timesteps) - 1 - k

    def predict_x0(self, x: Tensor, eps: Tensor, ac_t: float) -> Tensor:
        """x0 predicted from x_t and epsilon at cumulative alpha ac_t (clipped to [-1, 1] if clip_denoised)."""
        pred_x0 = (x - math.sqrt(1.0 - ac_t) * eps) / math.sqrt(ac_t)  # (B, C, H, W)
        return pred_x0.clamp(-1.0, 1.0) if self.clip_denoised else pred_x0

    def step(self, k: int, x: Tensor, eps: Tensor, v: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """x_prev from x_t at step k, given the model's epsilon and variance channels (None without learn_sigma)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class DDIM(Sampler):
    """DDIM; eta=0 is deterministic given x_T, eta=1 has the ancestral variance."""

    eta: float = 0.0

    def step(self, k: int, x: Tensor, eps: Tensor, v: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps (+ sigma z when eta > 0)."""
        i = self.index(k)
        ac_t = float(self.schedule.alphas_cumprod[i])
        ac_prev = float(self.schedule.alphas_cumprod_prev[i])
        pred_x0 = self.predict_x0(x, eps, ac_t)  # (B, C, H, W)
        eps = (x - math.sqrt(ac_t) * pred_x0) / math.sqrt(1.0 - ac_t)  # consistent with clipped x0
        sigma = self.eta * math.sqrt((1.0 - ac_prev) / (1.0 - ac_t)) * math.sqrt(1.0 - ac_t / ac_prev)
        x = math.sqrt(ac_prev) * pred_x0 + math.sqrt(max(1.0 - ac_prev - sigma**2, 0.0)) * eps  # (B, C, H, W)
        if sigma > 0.0:
            x = x + sigma * randn(tuple(x.shape), generator, x.device)  # (B, C, H, W)
        return x


@dataclass(frozen=True, eq=False)
class DDPM(Sampler):
    """Ancestral sampling over the respaced schedule.

    The variance is the learned range (respaced posterior log-variance to respaced log beta) when the model has
    variance channels, else the fixed respaced posterior variance ("fixed small").
    """

    def step(self, k: int, x: Tensor, eps: Tensor, v: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """x_prev ~ N(posterior mean of the predicted x0, the model's variance); no noise at the last step."""
        i = self.index(k)
        s = self.schedule
        pred_x0 = self.predict_x0(x, eps, float(s.alphas_cumprod[i]))  # (B, C, H, W)
        mean = float(s.posterior_mean_coef1[i]) * pred_x0 + float(s.posterior_mean_coef2[i]) * x  # (B, C, H, W)
        min_log = float(s.posterior_log_variance_clipped[i])
        if v is not None:
            lo, hi = torch.full_like(v, min_log), torch.full_like(v, float(s.log_betas[i]))
            log_var = learned_log_variance(v, lo, hi)  # (B, C, H, W)
        else:
            log_var = torch.full_like(x, min_log)  # (B, C, H, W)
        if i == 0:
            return mean
        return mean + torch.exp(0.5 * log_var) * randn(tuple(x.shape), generator, x.device)  # (B, C, H, W)


_KINDS: dict[str, type[Sampler]] = {"ddim": DDIM, "ddpm": DDPM}
SAMPLERS = tuple(_KINDS)
"""The sampler names `make_sampler` (and `dynasearch sample --sampler`) accept."""


def check_sampler(name: str) -> None:
    """Raise ConfigError unless `name` is one of SAMPLERS."""
    if name not in _KINDS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def make_sampler(
    diffusion: GaussianDiffusion, name: str, steps: int, eta: float = 0.0, clip_denoised: bool = True
) -> Sampler:
    """The sampler `name` ("ddim" or "ddpm") over `steps` respaced timesteps of `diffusion`; eta is DDIM's."""
    check_sampler(name)
    if name != "ddim" and eta != 0.0:
        raise ValueError(f"eta {eta} is a DDIM setting; the {name.upper()} sampler has none")
    settings = {"eta": float(eta)} if name == "ddim" else {}
    return _KINDS[name].over(diffusion, steps, clip_denoised, **settings)


@torch.no_grad()
def sample(
    sampler: Sampler,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    y: Tensor,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    null_class: int | None = None,
) -> Tensor:
    """The sampling loop: x_T ~ N(0, I) from `generator`, then one guided model call and `sampler.step` per timestep.

    `model_fn(x, t, y)` sees the batched [conditional | null class] inputs under guidance (`cfg_scale != 1`).
    """
    if cfg_scale != 1.0 and null_class is None:
        raise ValueError(f"cfg_scale {cfg_scale} needs a null_class label for the unconditional half")
    dev = torch.device(device)
    x = randn(tuple(shape), generator, dev)  # (B, C, H, W)
    labels = y.to(device=dev, dtype=torch.long)  # (B,)
    if labels.shape != (shape[0],):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match batch size {shape[0]}")
    n = len(sampler.timesteps)
    for k, timestep in enumerate(sampler.timesteps):
        t = torch.full((shape[0],), timestep, dtype=torch.long, device=dev)  # (B,)
        eps, v = sampler.diffusion.guided(model_fn, x, t, labels, cfg_scale, null_class)
        x = sampler.step(k, x, eps, v, generator)  # (B, C, H, W)
        if progress is not None:
            progress(k, n)
    return x
