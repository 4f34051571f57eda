"""Tests for dynasearch.diffusion: schedules, losses, respacing, the samplers' steps and the one sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from dynasearch.diffusion import diffusion_for
from dynasearch.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
)
from dynasearch.diffusion.samplers import DDIM, DDPM, SAMPLERS, make_sampler, sample
from dynasearch.errors import ConfigError
from dynasearch.model import get_config

T = 1000


def _oracle(diffusion: GaussianDiffusion, x0: Tensor, learn_sigma: bool):
    """A model_fn returning the exact epsilon that maps x0 to x_t at timestep t."""
    ac_all = torch.from_numpy(diffusion.alphas_cumprod)

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        ac = ac_all[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - ac.sqrt() * x0) / (1.0 - ac).sqrt()
        if learn_sigma:
            return torch.cat([eps, torch.zeros_like(eps)], dim=1)
        return eps

    return model_fn


def test_alphas_cumprod_matches_product_of_linear_betas() -> None:
    d = GaussianDiffusion()
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    expected = math.exp(math.fsum(math.log1p(-b) for b in betas))
    assert d.alphas_cumprod[-1] == pytest.approx(expected, rel=1e-10)
    s1, s2 = math.fsum(betas), math.fsum(b * b for b in betas)
    # exp(-sum b - sum b^2) <= prod(1 - b) <= exp(-sum b) for b in (0, 1/2)
    assert math.exp(-s1 - s2) <= d.alphas_cumprod[-1] <= math.exp(-s1)
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4, abs=1e-15)
    assert d.alphas_cumprod.dtype == np.float64


def test_q_sample_exact_and_statistics() -> None:
    d = GaussianDiffusion()
    gen = torch.Generator().manual_seed(0)
    n = 40000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    noise = torch.randn(x0.shape, generator=gen)
    for t_val in (0, T - 1):
        t = torch.full((n,), t_val, dtype=torch.long)
        xt = d.q_sample(x0, t, noise)
        ac = d.alphas_cumprod[t_val]
        assert torch.allclose(xt, math.sqrt(ac) * x0 + math.sqrt(1 - ac) * noise, atol=1e-6)
        assert xt.mean().item() == pytest.approx(0.5 * math.sqrt(ac), abs=4 * math.sqrt(1 - ac) / math.sqrt(n))
        assert xt.std().item() == pytest.approx(math.sqrt(1 - ac), rel=0.02)
    assert math.sqrt(1 - d.alphas_cumprod[0]) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_exact_epsilon_gives_zero_mse(learn_sigma: bool) -> None:
    d = GaussianDiffusion(learn_sigma=learn_sigma)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((6, 3, 4, 4), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise, torch.zeros_like(noise)], 1) if learn_sigma else noise
    losses = d.loss_from_output(out, x0, xt, t, noise)
    assert losses["mse"].shape == (6,)
    assert torch.all(losses["mse"] == 0)
    if not learn_sigma:
        assert torch.all(losses["vb"] == 0)
        assert torch.equal(losses["loss"], losses["mse"])
    # an off-by-0.1 epsilon has mse exactly 0.01
    bad = out.clone()
    bad[:, :3] += 0.1
    assert torch.allclose(d.loss_from_output(bad, x0, xt, t, noise)["mse"], torch.full((6,), 0.01), atol=1e-6)


def test_vb_nonnegative_finite_and_only_trains_variance() -> None:
    d = GaussianDiffusion()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand((8, 2, 4, 4), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 0, 1, 5, 100, 400, 800, 999])
    xt = d.q_sample(x0, t, noise)
    out = (torch.randn((8, 4, 4, 4), generator=gen) * 0.5).requires_grad_(True)
    losses = d.loss_from_output(out, x0, xt, t, noise)
    vb = losses["vb"]
    assert torch.isfinite(vb).all() and (vb >= 0).all() and (vb > 0).any()
    assert torch.allclose(losses["loss"], losses["mse"] + vb)
    vb.sum().backward()
    assert torch.all(out.grad[:, :2] == 0)  # epsilon channels get nothing from vb
    assert out.grad[:, 2:].abs().sum() > 0
    out.grad = None
    d.loss_from_output(out, x0, xt, t, noise)["mse"].sum().backward()
    assert torch.all(out.grad[:, 2:] == 0) and out.grad[:, :2].abs().sum() > 0


def test_vb_zero_for_exact_posterior_and_decoder_nll_value() -> None:
    d = GaussianDiffusion()
    x0 = torch.tensor([0.0, -1.0, 1.0, 0.5]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)  # (3, 1, 2, 2)
    noise = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 7, 600])
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise, -torch.ones_like(noise)], 1)  # v = -1: posterior variance exactly
    vb = d.loss_from_output(out, x0, xt, t, noise)["vb"]
    assert vb[1:].abs().max() < 1e-5  # KL(q || q) = 0
    # at t=0 the model mean is x0 itself and the std is sqrt(posterior variance at t=1)
    std = math.sqrt(d.schedule.posterior_variance[1])
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    h = 1 / 255
    interior = -math.log2(phi(h / std) - phi(-h / std))
    edge = -math.log2(phi(h / std))
    assert vb[0].item() == pytest.approx((2 * interior + 2 * edge) / 4, rel=1e-4)


def test_vb_matches_reference_kl_and_is_rescaled() -> None:
    n_steps, t_val, x0_v, noise_v, eps_v, v_v = 2000, 1234, 0.3, -0.7, -0.5, 0.4
    d = GaussianDiffusion(num_timesteps=n_steps)
    betas = [1e-4 + (0.02 - 1e-4) * i / (n_steps - 1) for i in range(n_steps)]
    ac = math.prod(1 - b for b in betas[: t_val + 1])
    ac_prev = ac / (1 - betas[t_val])
    beta = betas[t_val]
    xt = math.sqrt(ac) * x0_v + math.sqrt(1 - ac) * noise_v
    c1, c2 = beta * math.sqrt(ac_prev) / (1 - ac), (1 - ac_prev) * math.sqrt(1 - beta) / (1 - ac)
    true_mean, true_var = c1 * x0_v + c2 * xt, beta * (1 - ac_prev) / (1 - ac)
    pred_x0 = (xt - math.sqrt(1 - ac) * eps_v) / math.sqrt(ac)
    model_mean = c1 * pred_x0 + c2 * xt
    frac = (v_v + 1) / 2
    model_logvar = frac * math.log(beta) + (1 - frac) * math.log(true_var)
    kl = 0.5 * (-1 + model_logvar - math.log(true_var) + true_var / math.exp(model_logvar)
                + (true_mean - model_mean) ** 2 / math.exp(model_logvar))
    f64 = {"dtype": torch.float64}
    out = torch.tensor([eps_v, v_v], **f64).view(1, 2, 1, 1)
    x0 = torch.tensor([x0_v], **f64).view(1, 1, 1, 1)
    noise = torch.tensor([noise_v], **f64).view(1, 1, 1, 1)
    t = torch.tensor([t_val])
    losses = d.loss_from_output(out, x0, d.q_sample(x0, t, noise), t, noise)
    assert losses["vb"].item() == pytest.approx(kl / math.log(2) * n_steps / 1000, rel=1e-9)
    assert losses["mse"].item() == pytest.approx((noise_v - eps_v) ** 2, rel=1e-12)


def test_discretized_likelihood_sums_to_one_over_bins() -> None:
    bins = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.3), torch.full_like(bins, math.log(0.2)))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_wrong_output_channels_raise_and_training_losses_wrapper() -> None:
    d = GaussianDiffusion()
    x0 = torch.zeros((2, 3, 4, 4))
    t = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="expected 6 channels"):
        d.loss_from_output(torch.zeros((2, 3, 4, 4)), x0, x0, t, x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    seen: dict[str, object] = {}

    def model_fn(x: Tensor, t_in: Tensor, y: Tensor) -> Tensor:
        seen["y"] = y
        return torch.cat([x, x], 1)

    res = d.training_losses(model_fn, x0, t, noise=noise, y=torch.tensor([1, 2]))
    assert set(res) == {"loss", "mse", "vb", "output"}
    assert torch.equal(seen["y"], torch.tensor([1, 2]))
    xt = d.q_sample(x0, t, noise)
    assert torch.equal(res["output"][:, :3], xt)
    assert torch.allclose(res["mse"], ((xt - noise) ** 2).mean(dim=(1, 2, 3)))


def test_timestep_helpers() -> None:
    d = GaussianDiffusion()
    sched = d.timestep_schedule(50)
    assert len(sched) == 50 and len(set(sched)) == 50
    assert sched == sorted(sched, reverse=True) and sched[0] == 999 and sched[-1] == 0
    assert all(0 <= s <= 999 for s in sched)
    assert d.timestep_schedule(1) == [999]
    assert d.timestep_schedule(1000) == list(range(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            d.timestep_schedule(bad)
    assert d.stratified_timesteps(4).tolist() == [125, 375, 625, 875]
    assert d.stratified_timesteps(1000).tolist() == list(range(1000))
    t1 = d.sample_timesteps(64, torch.Generator().manual_seed(5), "cpu")
    t2 = d.sample_timesteps(64, torch.Generator().manual_seed(5), "cpu")
    assert t1.dtype == torch.long and t1.shape == (64,) and torch.equal(t1, t2)
    assert int(t1.min()) >= 0 and int(t1.max()) < T and len(set(t1.tolist())) > 40


def test_respaced_schedule_keeps_alphas_cumprod() -> None:
    d = GaussianDiffusion()
    kept = d.timestep_schedule(10)
    r = d.respaced(kept)
    assert np.allclose(r.alphas_cumprod, d.alphas_cumprod[sorted(kept)], rtol=1e-12)
    full = d.respaced(list(range(T)))
    assert np.allclose(full.betas, d.schedule.betas, rtol=1e-9)
    asc = sorted(kept)
    assert r.betas[-1] == pytest.approx(1 - d.alphas_cumprod[asc[-1]] / d.alphas_cumprod[asc[-2]], rel=1e-12)
    assert r.betas[-1] > 0.5  # a jump of ~111 steps late in the schedule removes most of the signal
    assert r.posterior_log_variance_clipped[0] == pytest.approx(math.log(r.posterior_variance[1]))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_oracle_model_recovers_x0(sampler: str) -> None:
    d = GaussianDiffusion()
    x0 = torch.rand((3, 2, 4, 4), generator=torch.Generator().manual_seed(6)) * 1.8 - 0.9
    y = torch.tensor([0, 1, 2])
    gen = torch.Generator().manual_seed(7)
    out = sample(make_sampler(d, sampler, 20), _oracle(d, x0, True), x0.shape, y, generator=gen)
    assert torch.allclose(out, x0, atol=1e-5)


def test_sampling_determinism_and_model_calls() -> None:
    d = GaussianDiffusion(learn_sigma=False)
    calls: list[Tensor] = []
    prog: list[tuple[int, int]] = []

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        calls.append(t.clone())
        return 0.5 * x

    shape, y = (2, 1, 4, 4), torch.tensor([0, 1])
    for name in ("ddpm", "ddim"):
        sampler = make_sampler(d, name, 8, eta=0.5 if name == "ddim" else 0.0)
        a = sample(sampler, model_fn, shape, y, generator=torch.Generator().manual_seed(1))
        b = sample(sampler, model_fn, shape, y, generator=torch.Generator().manual_seed(1))
        calls.clear()
        c = sample(sampler, model_fn, shape, y, generator=torch.Generator().manual_seed(2),
                   progress=lambda k, n: prog.append((k, n)))
        assert torch.equal(a, b) and not torch.allclose(a, c)
        assert [int(t[0]) for t in calls] == d.timestep_schedule(8)
        assert all(t.dtype == torch.long and t.shape == (2,) for t in calls)
        assert prog == [(k, 8) for k in range(8)]
        prog.clear()


def test_cfg_scale_one_equals_unguided_and_label_free_model_ignores_guidance() -> None:
    d = GaussianDiffusion()
    batch_sizes: list[int] = []

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        batch_sizes.append(x.shape[0])
        return torch.cat([0.3 * x + 0.01 * y.view(-1, 1, 1, 1), torch.tanh(x)], 1)

    shape, y = (2, 2, 4, 4), torch.tensor([3, 4])
    ddpm = make_sampler(d, "ddpm", 5)
    plain = sample(ddpm, model_fn, shape, y, generator=torch.Generator().manual_seed(0))
    one = sample(ddpm, model_fn, shape, y, cfg_scale=1.0, null_class=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, one) and set(batch_sizes) == {2}

    def no_label_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return torch.cat([0.3 * x, torch.tanh(x)], 1)

    a = sample(ddpm, no_label_fn, shape, y, generator=torch.Generator().manual_seed(0))
    b = sample(ddpm, no_label_fn, shape, y, cfg_scale=4.0, null_class=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="null_class"):
        sample(make_sampler(d, "ddim", 2), no_label_fn, shape, y, cfg_scale=2.0)


def test_cfg_combines_all_epsilon_channels() -> None:
    d = GaussianDiffusion()
    c, null, scale = 4, 9, 3.0
    chan = torch.arange(1, c + 1, dtype=torch.float32).view(1, c, 1, 1)

    def eps_of(y: Tensor) -> Tensor:
        return 0.05 * (y.float().view(-1, 1, 1, 1) + 1) * chan  # (B, C, 1, 1): depends on y in every channel

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        eps = eps_of(y).expand_as(x)
        v = torch.where(y == null, -1.0, 0.5).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, v], 1)

    shape, y = (2, c, 3, 3), torch.tensor([0, 5])
    out = sample(make_sampler(d, "ddim", 1, clip_denoised=False), model_fn, shape, y, cfg_scale=scale,
                 null_class=null, generator=torch.Generator().manual_seed(8))
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    ac = d.alphas_cumprod[T - 1]
    used = (x_t - math.sqrt(ac) * out) / math.sqrt(1 - ac)  # epsilon the single step used
    uncond = eps_of(torch.full((2,), null))
    expected = (uncond + scale * (eps_of(y) - uncond)).expand(shape)
    assert torch.allclose(used, expected, atol=1e-3)
    # variance channels come from the conditional half
    eps, v = d.guided(model_fn, x_t, torch.full((2,), 5), y, scale, null)
    assert torch.allclose(eps, expected) and torch.all(v == 0.5)


def test_ddpm_uses_respaced_learned_variance() -> None:
    d = GaussianDiffusion()
    v_val = 0.2

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(x), torch.full_like(x, v_val)], 1)  # eps = 0

    shape, y = (2, 1, 3, 3), torch.tensor([0, 1])
    out = sample(make_sampler(d, "ddpm", 2, clip_denoised=False), model_fn, shape, y,
                 generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    x_t, z = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ac0, ac1 = d.alphas_cumprod[0], d.alphas_cumprod[T - 1]
    beta = 1 - ac1 / ac0  # respaced beta of the jump 999 -> 0
    post_var = beta * (1 - ac0) / (1 - ac1)
    c1, c2 = beta * math.sqrt(ac0) / (1 - ac1), (1 - ac0) * math.sqrt(1 - beta) / (1 - ac1)
    frac = (v_val + 1) / 2
    std = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(post_var)))
    x_1 = c1 * x_t / math.sqrt(ac1) + c2 * x_t + std * z
    assert torch.allclose(out, x_1 / math.sqrt(ac0), atol=1e-5)


# ------------------------------------------------------------------ the samplers' split and the factory
def test_samplers_visit_the_respaced_timesteps_and_check_their_settings() -> None:
    d = GaussianDiffusion()
    assert SAMPLERS == ("ddim", "ddpm")
    ddim, ddpm = make_sampler(d, "ddim", 10, eta=0.3), make_sampler(d, "ddpm", 10, clip_denoised=False)
    assert isinstance(ddim, DDIM) and ddim.eta == 0.3 and ddim.clip_denoised
    assert isinstance(ddpm, DDPM) and not ddpm.clip_denoised
    for sampler in (ddim, ddpm):
        assert list(sampler.timesteps) == d.timestep_schedule(10)
        assert np.array_equal(sampler.schedule.alphas_cumprod, d.respaced(d.timestep_schedule(10)).alphas_cumprod)
        assert [sampler.index(k) for k in (0, 9)] == [9, 0]
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler(d, "euler", 10)
    with pytest.raises(ValueError, match="eta"):
        make_sampler(d, "ddpm", 10, eta=0.5)
    with pytest.raises(ValueError, match="sampling steps"):
        make_sampler(d, "ddim", 0)


def test_one_step_of_a_sampler_is_what_the_loop_applies() -> None:
    d = GaussianDiffusion(learn_sigma=False)

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return 0.5 * x

    shape, y = (2, 1, 4, 4), torch.tensor([0, 1])
    for name in SAMPLERS:
        sampler = make_sampler(d, name, 3, eta=1.0 if name == "ddim" else 0.0)
        looped = sample(sampler, model_fn, shape, y, generator=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(shape, generator=gen)
        for k in range(3):
            x = sampler.step(k, x, 0.5 * x, None, gen)
        assert torch.equal(looped, x)


def test_diffusion_for_follows_the_model_config() -> None:
    config = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    for learn_sigma in (True, False):
        d = diffusion_for(config.replace(learn_sigma=learn_sigma))
        assert d.learn_sigma is learn_sigma and d.num_timesteps == T
        assert np.array_equal(d.schedule.betas, GaussianDiffusion().schedule.betas)
