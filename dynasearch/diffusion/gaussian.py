"""Gaussian diffusion: linear betas, epsilon prediction, learned-range variance, respacing, classifier-free guidance.

Written from the equations of Ho et al. (DDPM) and Nichol & Dhariwal (improved DDPM: learned
variance range, hybrid loss). Schedules are kept as float64 numpy arrays, indexed by timestep and
only then cast to the dtype and device of the tensor they scale. The samplers (DDIM, DDPM) and the
one sampling loop that drives them are in `samplers.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianDiffusion",
    "ModelFn",
    "NoiseSchedule",
    "discretized_gaussian_log_likelihood",
    "learned_log_variance",
    "normal_kl",
]

ModelFn = Callable[..., Tensor]
"""model_fn(x_t, t, y, ...) -> output (B, 2C or C, H, W): epsilon, then (with learn_sigma) the variance channels."""

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class NoiseSchedule:
    """Float64 quantities derived from one beta sequence (the full or a respaced schedule)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> NoiseSchedule:
        """Derive every schedule array from the betas (computed in float64)."""
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at the first step; log(0) is replaced by the next value.
        # A one-step schedule has no next value, so it falls back to log(beta).
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas.copy())
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )

    @property
    def log_betas(self) -> np.ndarray:
        """Log of the betas: the upper end of the learned variance range."""
        return np.log(self.betas)


def _gather(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """Index a float64 schedule by t and shape it to broadcast against like (same dtype/device)."""
    values = torch.from_numpy(np.asarray(arr[t.detach().cpu().numpy()]))  # (B,) float64
    shape = (-1,) + (1,) * (like.dim() - 1)
    return values.to(device=like.device, dtype=like.dtype).view(shape)  # (B, 1, ..., 1)


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch dimension."""
    return x.reshape(x.shape[0], -1).mean(dim=1)  # (B,)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of data in [-1, 1] quantised to 256 bins under a Gaussian.

    The edge bins extend to -inf / +inf, so the probabilities of all 256 bins sum to one.
    """
    half_bin = 1.0 / 255.0  # bins are 2/255 wide over [-1, 1]
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centred + half_bin)
    lower = inv_std * (centred - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(z <= upper), lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(z >= lower), highest bin
    delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def learned_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Interpolate the log-variance between min_log (v=-1) and max_log (v=+1)."""
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log  # (B, C, H, W)


class GaussianDiffusion:
    """Linear-beta DDPM with epsilon prediction and optional learned-range variance."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        learn_sigma: bool = True,
    ) -> None:
        """Precompute the float64 schedule for num_timesteps linearly spaced betas."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps {num_timesteps} must be at least 1")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"betas [{beta_start}, {beta_end}] must satisfy 0 < start <= end < 1")
        self.num_timesteps = int(num_timesteps)
        self.learn_sigma = bool(learn_sigma)
        betas = np.linspace(beta_start, beta_end, self.num_timesteps, dtype=np.float64)
        self.schedule = NoiseSchedule.from_betas(betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """Float64 cumulative product of (1 - beta) for the full schedule."""
        return self.schedule.alphas_cumprod

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
        ac = _gather(self.schedule.alphas_cumprod, t, x0)  # (B, 1, 1, 1)
        return ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise  # (B, C, H, W)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        log_var = _gather(self.schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)  # (B, C, H, W)
        return self._posterior_mean(x0, x_t, t), log_var

    def _posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Posterior mean coef1_t * x0 + coef2_t * x_t."""
        s = self.schedule
        return _gather(s.posterior_mean_coef1, t, x_t) * x0 + _gather(s.posterior_mean_coef2, t, x_t) * x_t

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert q_sample: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        ac = _gather(self.schedule.alphas_cumprod, t, x_t)  # (B, 1, 1, 1)
        return (x_t - (1.0 - ac).sqrt() * eps) / ac.sqrt()  # (B, C, H, W)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None, device: torch.device | str
    ) -> Tensor:
        """Uniform random training timesteps in [0, T), dtype long, drawn from generator."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)  # (B,)

    def stratified_timesteps(self, n: int) -> Tensor:
        """n timesteps spread evenly over [0, T): t_i = floor((i + 0.5) * T / n), ascending, long."""
        if n < 1:
            raise ValueError(f"number of timesteps {n} must be at least 1")
        i = torch.arange(n, dtype=torch.float64)
        return torch.floor((i + 0.5) * self.num_timesteps / n).long().clamp_(0, self.num_timesteps - 1)

    # ------------------------------------------------------------------ loss
    def _check_output(self, output: Tensor, x: Tensor) -> None:
        """Raise ValueError unless output has the channel count this diffusion expects."""
        c = x.shape[1]
        want = 2 * c if self.learn_sigma else c
        if output.dim() != x.dim() or output.shape[1] != want or output.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output shape {tuple(output.shape)} does not match input {tuple(x.shape)} "
                f"(expected {want} channels, learn_sigma={self.learn_sigma})"
            )

    def loss_from_output(
        self, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample losses {loss, mse, vb} (each (B,)) for a model output at (x_t, t).

        mse is the epsilon MSE averaged over C, H, W. With learn_sigma, vb is the variational-bound
        term in bits per dim (KL to the true posterior for t > 0, discretised decoder NLL at t == 0)
        computed with the epsilon channels detached, so it only trains the variance channels; it is
        scaled by T / 1000 (the rescaled hybrid loss). loss = mse + vb.
        """
        self._check_output(output, x0)
        c = x0.shape[1]
        eps = output[:, :c]  # (B, C, H, W)
        mse = _mean_flat((noise - eps) ** 2)  # (B,)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        v = output[:, c:]  # (B, C, H, W)
        s = self.schedule
        true_mean, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps.detach())  # (B, C, H, W), no grad to eps
        model_mean = self._posterior_mean(pred_x0, x_t, t)  # (B, C, H, W)
        model_log_var = learned_log_variance(
            v, _gather(s.posterior_log_variance_clipped, t, x_t), _gather(s.log_betas, t, x_t)
        )
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LOG2  # (B,)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / _LOG2
        vb = torch.where(t.to(kl.device) == 0, nll, kl) * (self.num_timesteps / 1000.0)  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def training_losses(
        self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None, **model_kwargs: Any
    ) -> dict[str, Tensor]:
        """Noise x0 to x_t, run model_fn(x_t, t, **model_kwargs) and return the losses plus `output`."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # (B, C, H, W)
        output = model_fn(x_t, t, **model_kwargs)  # (B, 2C or C, H, W)
        losses = self.loss_from_output(output, x0, x_t, t, noise)
        losses["output"] = output
        return losses

    # ------------------------------------------------------------------ respacing
    def timestep_schedule(self, steps: int) -> list[int]:
        """`steps` distinct original timesteps, evenly spaced, in descending (sampling) order.

        For steps >= 2 the list runs from T-1 down to 0 inclusive (t_i = round(i (T-1) / (steps-1)),
        halves rounded up); steps == 1 gives [T-1], a single jump from pure noise to x0.
        """
        t_max = self.num_timesteps - 1
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"sampling steps {steps} must be in [1, {self.num_timesteps}]")
        if steps == 1:
            return [t_max]
        d = steps - 1
        ascending = [(2 * i * t_max + d) // (2 * d) for i in range(steps)]
        return ascending[::-1]

    def respaced(self, timesteps: list[int]) -> NoiseSchedule:
        """Schedule for a subset of timesteps: beta'_i = 1 - abar[t_i] / abar[t_{i-1}] (ascending order)."""
        kept = sorted({int(t) for t in timesteps})
        ac = self.schedule.alphas_cumprod[kept]
        ac_prev = np.append(1.0, ac[:-1])
        return NoiseSchedule.from_betas(1.0 - ac / ac_prev)

    # ------------------------------------------------------------------ guidance
    def guided(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, null_class: int | None
    ) -> tuple[Tensor, Tensor | None]:
        """One model call (batched [cond, uncond] under guidance); returns (eps, v or None)."""
        c = x.shape[1]
        if cfg_scale == 1.0:
            out = model_fn(x, t, y)  # (B, 2C or C, H, W)
            self._check_output(out, x)
        else:
            x_in = torch.cat([x, x], dim=0)  # (2B, C, H, W)
            t_in = torch.cat([t, t], dim=0)  # (2B,)
            y_in = torch.cat([y, torch.full_like(y, int(null_class))], dim=0)  # (2B,)
            both = model_fn(x_in, t_in, y_in)  # (2B, 2C or C, H, W)
            self._check_output(both, x_in)
            cond, uncond = both.chunk(2, dim=0)  # (B, 2C or C, H, W) each
            eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])  # (B, C, H, W)
            out = torch.cat([eps, cond[:, c:]], dim=1)  # variance channels from the conditional half
        return out[:, :c], (out[:, c:] if self.learn_sigma else None)
