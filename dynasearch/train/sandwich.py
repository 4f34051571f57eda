"""The sandwich rule: one training step's batch, subnets and forward/backward passes, every draw seeded by
``(seed, step)``.

One optimisation step (:func:`sandwich_step`, then one AdamW step in the loop):

1. the largest subnet of the search space on the ground-truth diffusion loss (epsilon MSE + variational bound);
2. the smallest subnet and ``sandwich`` random subnets (per-block heads, MLP width and token ratio drawn from the
   search space), each on the ground-truth loss plus ``distill`` x MSE(student epsilon, detached teacher epsilon);
3. each subnet does its own forward and backward (gradients accumulate, activation memory stays that of one
   subnet); then one optimiser step with gradient clipping, then the EMA update.

Every random draw of a step -- the batch indices, timesteps, noise, label dropout and subnets -- derives from
``(seed, step)`` (:func:`step_seed`), never from a global RNG. So ``--resume`` replays exactly the sequence an
uninterrupted run would have seen, and under DDP every rank builds the same *global* batch and takes its shard:
K ranks with a global batch B compute what one process with batch B computes (gradients are averaged by hand,
without a DDP wrapper, so parameters a subnet does not use simply contribute zeros).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import DatasetSplit, read_batch
from ..diffusion.gaussian import GaussianDiffusion
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..space import SearchSpace
from .metrics import SubnetLoss
from .precision import LossScaler

__all__ = [
    "EpochOrder",
    "TrainBatch",
    "draw_batch",
    "forward_output",
    "sandwich_step",
    "sandwich_subnets",
    "step_seed",
]

# ---------------------------------------------------------------------------------------------------------------------
# Per-step randomness: everything derives from (seed, step)
# ---------------------------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for one random stream ('batch', 'subnets', 'epoch') of one step; stable across platforms."""
    digest = hashlib.sha256(f"dynasearch:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sandwich_subnets(
    space: SearchSpace, config: DiTConfig, seed: int, step: int, n_random: int
) -> list[tuple[str, Subnet]]:
    """The step's subnets: ('max', largest), ('min', smallest), ('random-1', ...), ... ('random-N', ...)."""
    rng = random.Random(step_seed(seed, step, "subnets"))
    subnets = [("max", space.largest(config)), ("min", space.smallest(config))]
    subnets += [(f"random-{i + 1}", space.sample(config, rng)) for i in range(n_random)]
    return subnets


class EpochOrder:
    """Sample positions step*B .. step*B+B-1 of an endless sequence of per-epoch permutations seeded by
    (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        """The permutation of `epoch` (cached; only the last few epochs are kept)."""
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, "epoch"))
            self._cache[epoch] = torch.randperm(self.n, generator=gen)
        return self._cache[epoch]

    def indices(self, step: int, batch: int) -> Tensor:
        """Dataset indices of the `batch` samples of optimiser step `step` (1-based)."""
        start = (step - 1) * batch
        parts, pos = [], start
        while pos < start + batch:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + batch - pos)
            parts.append(self._perm(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)  # (B,)


@dataclass
class TrainBatch:
    """One step's inputs: clean samples, labels (label dropout applied), timesteps, noise and the noised samples."""

    x0: Tensor  # (B, C, H, W)
    y: Tensor  # (B,) long; dropped labels are the null class
    t: Tensor  # (B,) long
    noise: Tensor  # (B, C, H, W)
    x_t: Tensor  # (B, C, H, W)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """This rank's contiguous slice of the global batch."""
        n = self.x0.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        return TrainBatch(self.x0[sl], self.y[sl], self.t[sl], self.noise[sl], self.x_t[sl])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch on `device`."""
        return TrainBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def draw_batch(
    split: DatasetSplit,
    diffusion: GaussianDiffusion,
    seed: int,
    step: int,
    batch_size: int,
    label_dropout: float,
    order: EpochOrder | None = None,
) -> TrainBatch:
    """The GLOBAL batch of `step`: indices, timesteps, noise and label dropout all drawn from (seed, step), on the CPU.
    Latents read from disk (`latents:DIR`) under DDP: only this rank's shard of x0 is read, the rest is zeros."""
    order = order or EpochOrder(int(split.train_x.shape[0]), seed)
    idx = order.indices(step, batch_size)  # (B,)
    x0 = read_batch(split.train_x, idx)  # (B, C, H, W)
    gen = torch.Generator().manual_seed(step_seed(seed, step, "batch"))
    t = diffusion.sample_timesteps(batch_size, gen, "cpu")  # (B,)
    noise = torch.randn(x0.shape, generator=gen)  # (B, C, H, W)
    drop = torch.rand(batch_size, generator=gen) < label_dropout  # (B,)
    y = torch.where(drop, torch.full_like(split.train_y[idx], split.num_classes), split.train_y[idx])  # (B,)
    x_t = diffusion.q_sample(x0, t, noise)  # (B, C, H, W)
    return TrainBatch(x0, y, t, noise, x_t)


# ---------------------------------------------------------------------------------------------------------------------
# The sandwich step
# ---------------------------------------------------------------------------------------------------------------------
def forward_output(
    model: DiT,
    x_t: Tensor,
    t: Tensor,
    y: Tensor,
    subnet: Subnet | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """The model's float32 output (B, C_out, H, W) under `subnet` (None: its own), labels as given (no dropout), in
    `autocast_dtype` when set."""
    autocast = (
        torch.autocast(device_type=x_t.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        output = model(x_t, t, y, subnet=subnet, label_dropout=False)  # (B, C_out, H, W)
    return output.float()


def sandwich_step(
    model: DiT,
    diffusion: GaussianDiffusion,
    batch: TrainBatch,
    subnets: Sequence[tuple[str, Subnet]],
    distill: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: LossScaler | None = None,
) -> list[SubnetLoss]:
    """Forward and backward every subnet in turn on the same batch; gradients accumulate in `.grad` (multiplied by
    fp16's loss scale when a `scaler` is given).

    The first subnet is the teacher (the largest, trained on the ground-truth loss); every later one is trained on
    the ground-truth loss plus ``distill`` x MSE(its epsilon, the teacher's detached epsilon). Labels are used as
    given (label dropout was applied once for the step), so the model's own label dropout is off. No optimiser
    step is taken.
    """
    c = batch.x0.shape[1]
    teacher_eps: Tensor | None = None
    results: list[SubnetLoss] = []
    for name, subnet in subnets:
        start = time.perf_counter()
        output = forward_output(model, batch.x_t, batch.t, batch.y, subnet, autocast_dtype)  # (B, C_out, H, W)
        gt = diffusion.loss_from_output(output, batch.x0, batch.x_t, batch.t, batch.noise)["loss"].mean()
        eps = output[:, :c]  # (B, C, H, W)
        if teacher_eps is None:
            objective, kd = gt, torch.zeros((), device=gt.device)
            teacher_eps = eps.detach()
        else:
            kd = F.mse_loss(eps if distill > 0 else eps.detach(), teacher_eps)  # logged even when not trained on
            objective = gt + distill * kd if distill > 0 else gt
        (scaler.scale(objective) if scaler is not None else objective).backward()
        values = torch.stack([objective.detach(), gt.detach(), kd.detach()]).tolist()  # one sync per subnet
        results.append(SubnetLoss(name, subnet, values[0], values[1], values[2], time.perf_counter() - start))
    return results
