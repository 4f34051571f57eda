"""The search's quality proxy: a subnet's denoising loss on a fixed, timestep-stratified validation set.

Every trial is scored on the same (image, timestep, noise, label) quadruples, so trials are comparable and
reruns reproducible. The loss is the epsilon MSE (the term that drives sample quality); per-sample values are
kept so that losses can be split by timestep (a sum over timesteps splits over timestep buckets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import DatasetSplit, load_dataset
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import SearchError
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet

__all__ = ["ProxySet", "ProxyEvaluator", "build_proxy_set", "dataset_from_run_config"]


@dataclass(frozen=True)
class ProxySet:
    """Fixed validation quadruples: clean images x0, noised x_t, timesteps t, noise and labels y."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def subset(self, index: torch.Tensor) -> ProxySet:
        """The quadruples at `index` (e.g. one timestep bucket's), in that order."""
        return ProxySet(self.x0[index], self.x_t[index], self.t[index], self.noise[index], self.y[index], self.seed)

    def to(self, device: torch.device | str) -> ProxySet:
        """The same set on another device."""
        return ProxySet(
            self.x0.to(device), self.x_t.to(device), self.t.to(device), self.noise.to(device), self.y.to(device), self.seed
        )


def build_proxy_set(
    images: torch.Tensor, labels: torch.Tensor, diffusion: GaussianDiffusion, num: int = 512, seed: int = 0
) -> ProxySet:
    """`num` quadruples cycling over the validation images, timesteps evenly spread over [0, T), seeded noise."""
    if len(images) == 0:
        raise SearchError("the validation split is empty: the quality proxy needs validation images")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    idx = order[torch.arange(num) % len(images)]  # (num,)
    x0 = images[idx].float()  # (num, C, H, W)
    y = labels[idx].long()  # (num,)
    t = diffusion.stratified_timesteps(num)  # (num,) ascending
    t = t[torch.randperm(num, generator=gen)]  # decouple timestep from image order
    noise = torch.randn(x0.shape, generator=gen)  # (num, C, H, W)
    x_t = diffusion.q_sample(x0, t, noise)  # (num, C, H, W)
    return ProxySet(x0=x0, x_t=x_t, t=t, noise=noise, y=y, seed=seed)


class ProxyEvaluator:
    """Scores subnets of one supernet by their epsilon MSE on a fixed proxy set (no gradients, eval mode)."""

    def __init__(self, model: DiT, proxy: ProxySet, batch_size: int = 512) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.proxy = proxy.to(self.device)
        self.batch_size = batch_size
        self.in_channels = model.config.in_channels

    @torch.no_grad()
    def per_sample(self, subnet: Subnet | None = None) -> torch.Tensor:
        """Epsilon MSE of every proxy quadruple (num,) under `subnet` (the model's active subnet when None)."""
        p, c = self.proxy, self.in_channels
        out = []
        for start in range(0, len(p), self.batch_size):
            sl = slice(start, start + self.batch_size)
            pred = self.model(p.x_t[sl], p.t[sl], p.y[sl], subnet=subnet, label_dropout=False)  # (b, C_out, H, W)
            err = (pred[:, :c].float() - p.noise[sl]) ** 2  # (b, C, H, W)
            out.append(err.flatten(1).mean(dim=1))  # (b,)
        return torch.cat(out).cpu()

    def __call__(self, subnet: Subnet | None = None) -> float:
        """Mean epsilon MSE over the proxy set."""
        return float(self.per_sample(subnet).mean())

    def restricted(self, index: torch.Tensor) -> ProxyEvaluator:
        """An evaluator of the same model on the quadruples at `index` only (e.g. one timestep bucket)."""
        return ProxyEvaluator(self.model, self.proxy.subset(index.to(self.proxy.t.device)), self.batch_size)

    def schedule_losses(self, schedule: SubnetSchedule) -> list[float]:
        """Mean epsilon MSE of each timestep bucket's quadruples under that bucket's subnet (nan if it has none)."""
        bucket = schedule.buckets.bucket_index(self.proxy.t)  # (num,)
        losses = []
        for k, subnet in enumerate(schedule.subnets):
            index = (bucket == k).nonzero().flatten()
            losses.append(float(self.restricted(index).per_sample(subnet).mean()) if len(index) else float("nan"))
        return losses


def dataset_from_run_config(doc: dict[str, Any]) -> DatasetSplit:
    """Rebuild the data split a supernet was trained with, from its run's config.json (digits if unrecorded)."""
    data = doc.get("data") or {}
    train = doc.get("train") or doc.get("training") or {}
    spec = data.get("spec") or train.get("data") or "digits"
    image_size = data.get("image_size", train.get("image_size"))
    val_fraction = data.get("val_fraction", train.get("val_fraction", 0.1))
    seed = data.get("seed", train.get("seed", 0))
    return load_dataset(spec, image_size=image_size, val_fraction=val_fraction, seed=seed)
