"""The search's quality proxy: a subnet scored on a fixed, timestep-stratified validation set, in one of four kinds.

Every trial is scored on the same (image, timestep, noise, label) quadruples, so trials are comparable and reruns
reproducible. Per-sample values are kept so that losses can be split by timestep (a mean over quadruples splits
over timestep buckets). The kinds (``--proxy``), all one subnet forward per quadruple:

* ``eps``: the epsilon MSE against the true noise. Each quadruple's irreducible error (the noise no model can
  predict from x_t) is in every subnet's score, and it dominates the differences between subnets.
* ``teacher``: the MSE between the subnet's and the full model's epsilon predictions (the in-place distillation
  target of supernet training; OFA, BigNAS). The full model's predictions are computed once and cached in the
  proxy set, so the irreducible term is gone and the full model scores exactly 0.
* ``teacher-norm``: ``teacher`` with each quadruple's error divided by the full model's mean epsilon MSE in that
  quadruple's timestep bin (:data:`NORM_BINS` equal bins of [0, T)): the gap to the teacher in units of how hard
  that noise level is, so that no range of timesteps dominates the mean. This scale comes from the cached teacher
  at no extra cost; the alternative, the variance at t, is 1 at every t for the epsilon target and so says nothing.
* ``teacher-sample``: short deterministic DDIM runs (:data:`SAMPLE_STEPS` steps, no guidance) of the subnet and of
  the full model from the same seeded noise and labels; the MSE between their final samples (the output-level
  comparison of LD-Pruner, Castells et al. 2024, and a cheap stand-in for AutoDiffusion's FID of generated
  samples, Li et al. 2023). It sees errors compound along the sampler. ``proxy_samples // SAMPLE_STEPS``
  trajectories keep the cost at one forward per quadruple; whole trajectories cannot be split by timestep bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..data import DataRecord, DatasetSplit, load_dataset
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import SearchError
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from ..sampling import sample_images

__all__ = [
    "DEFAULT_PROXY",
    "NORM_BINS",
    "PROXY_KINDS",
    "PROXY_LABELS",
    "SAMPLE_STEPS",
    "SPLITTABLE_PROXIES",
    "ProxyEvaluator",
    "ProxySet",
    "attach_teacher",
    "build_proxy_set",
    "check_proxy_kind",
    "dataset_from_run_config",
    "timestep_bins",
]

PROXY_KINDS = ("eps", "teacher", "teacher-norm", "teacher-sample")
DEFAULT_PROXY = "teacher"  # best against fine-tuned loss on mnist (results/mnist/bench); eps until 2026-12-02
PROXY_LABELS = {  # what each kind's number is, for axis labels and tables
    "eps": "epsilon MSE",
    "teacher": "MSE to the full model",
    "teacher-norm": "MSE to the full model / its own error",
    "teacher-sample": "MSE to the full model's 8-step samples",
}
SPLITTABLE_PROXIES = ("eps", "teacher", "teacher-norm")  # per-quadruple values: they split over timestep buckets
NORM_BINS = 10  # timestep bins of teacher-norm's scale
SAMPLE_STEPS = 8  # DDIM steps of each teacher-sample trajectory


def check_proxy_kind(kind: str) -> str:
    """`kind` if it is a proxy kind, else SearchError naming the choices."""
    if kind not in PROXY_KINDS:
        raise SearchError(f"--proxy must be one of {', '.join(PROXY_KINDS)}, got '{kind}'")
    return kind


@dataclass(frozen=True)
class ProxySet:
    """Fixed validation quadruples (clean x0, noised x_t, timesteps t, noise, labels y) and the teacher's cache.

    `teacher` and `norm` (teacher, teacher-norm) hold the full model's epsilon predictions and each quadruple's
    timestep-bin scale; `teacher_samples` (teacher-sample) the full model's short DDIM samples.
    """

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor
    seed: int
    teacher: torch.Tensor | None = None  # (num, C, H, W)
    norm: torch.Tensor | None = None  # (num,)
    teacher_samples: torch.Tensor | None = None  # (num // SAMPLE_STEPS, C, H, W)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def subset(self, index: torch.Tensor) -> ProxySet:
        """The quadruples at `index` (e.g. one timestep bucket's), in that order, with their teacher values.

        Trajectories are not quadruples: the subset has no `teacher_samples`.
        """
        def pick(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v[index]

        return ProxySet(self.x0[index], self.x_t[index], self.t[index], self.noise[index], self.y[index], self.seed,
                        pick(self.teacher), pick(self.norm), None)

    def to(self, device: torch.device | str) -> ProxySet:
        """The same set on another device."""
        def move(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v.to(device)

        return ProxySet(
            self.x0.to(device), self.x_t.to(device), self.t.to(device), self.noise.to(device), self.y.to(device),
            self.seed, move(self.teacher), move(self.norm), move(self.teacher_samples),
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


def timestep_bins(t: torch.Tensor, num_timesteps: int, bins: int = NORM_BINS) -> torch.Tensor:
    """The equal-width timestep bin (0..bins-1) of every timestep in `t` (num,), for timesteps in [0, T)."""
    return (t.long() * bins // num_timesteps).clamp(0, bins - 1)


def _predict(model: DiT, proxy: ProxySet, subnet: Subnet | None, batch_size: int) -> torch.Tensor:
    """The model's epsilon prediction (num, C, H, W) of every quadruple under `subnet`, in batches."""
    c, out = model.config.in_channels, []
    for start in range(0, len(proxy), batch_size):
        sl = slice(start, start + batch_size)
        pred = model(proxy.x_t[sl], proxy.t[sl], proxy.y[sl], subnet=subnet, label_dropout=False)  # (b, C_out, H, W)
        out.append(pred[:, :c].float())
    return torch.cat(out)


def _trajectories(model: DiT, proxy: ProxySet, subnet: Subnet | None) -> torch.Tensor:
    """Final samples (n, C, H, W) of len(proxy) // SAMPLE_STEPS short DDIM runs seeded by the proxy set's seed."""
    n = len(proxy) // SAMPLE_STEPS
    if n < 1:
        raise SearchError(f"--proxy teacher-sample needs --proxy-samples of at least {SAMPLE_STEPS} "
                          f"({SAMPLE_STEPS} forwards per trajectory), got {len(proxy)}")
    device = next(model.parameters()).device
    return sample_images(model, num=n, cfg_scale=1.0, steps=SAMPLE_STEPS, seed=proxy.seed, subnet=subnet,
                         device=device).to(device)


@torch.no_grad()
def attach_teacher(proxy: ProxySet, model: DiT, kind: str, batch_size: int = 512) -> ProxySet:
    """`proxy` with what `kind` compares against, computed once with the full model (unchanged when cached or eps)."""
    check_proxy_kind(kind)
    full = Subnet.full(model.config)
    if kind in ("teacher", "teacher-norm") and (proxy.teacher is None or proxy.norm is None):
        was_training = model.training
        model.eval()
        teacher = _predict(model, proxy, full, batch_size)  # (num, C, H, W)
        model.train(was_training)
        error = ((teacher - proxy.noise) ** 2).flatten(1).mean(dim=1)  # (num,) the full model's own epsilon MSE
        bins = timestep_bins(proxy.t, diffusion_for(model.config).num_timesteps)  # (num,)
        total = torch.zeros(NORM_BINS, dtype=error.dtype, device=error.device).index_add_(0, bins, error)
        count = torch.bincount(bins, minlength=NORM_BINS).to(error.dtype)
        scale = (total / count.clamp(min=1)).clamp(min=1e-12)  # (NORM_BINS,) mean teacher error per bin
        proxy = replace(proxy, teacher=teacher, norm=scale[bins])
    if kind == "teacher-sample" and proxy.teacher_samples is None:
        proxy = replace(proxy, teacher_samples=_trajectories(model, proxy, full))
    return proxy


class ProxyEvaluator:
    """Scores subnets of one supernet by one proxy kind on a fixed proxy set (no gradients, eval mode).

    The teacher's cache is computed once here when `proxy` lacks it (:func:`attach_teacher`); `self.proxy` holds
    it, so other evaluators and worker processes can reuse it.
    """

    def __init__(self, model: DiT, proxy: ProxySet, batch_size: int = 512, kind: str = "eps") -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.kind = check_proxy_kind(kind)
        self.batch_size = batch_size
        self.in_channels = model.config.in_channels
        self.proxy = attach_teacher(proxy.to(self.device), model, kind, batch_size)

    @torch.no_grad()
    def per_sample(self, subnet: Subnet | None = None) -> torch.Tensor:
        """The proxy value of every quadruple (num,), or of every trajectory for teacher-sample, under `subnet`
        (the model's active subnet when None)."""
        p = self.proxy
        if self.kind == "teacher-sample":
            assert p.teacher_samples is not None
            return ((_trajectories(self.model, p, subnet) - p.teacher_samples) ** 2).flatten(1).mean(dim=1).cpu()
        target = p.noise if self.kind == "eps" else p.teacher
        assert target is not None
        out = []
        for start in range(0, len(p), self.batch_size):
            sl = slice(start, start + self.batch_size)
            pred = self.model(p.x_t[sl], p.t[sl], p.y[sl], subnet=subnet, label_dropout=False)  # (b, C_out, H, W)
            err = (pred[:, : self.in_channels].float() - target[sl]) ** 2  # (b, C, H, W)
            out.append(err.flatten(1).mean(dim=1))  # (b,)
        values = torch.cat(out)
        if self.kind == "teacher-norm":
            assert p.norm is not None
            values = values / p.norm
        return values.cpu()

    def __call__(self, subnet: Subnet | None = None) -> float:
        """Mean proxy value over the proxy set."""
        return float(self.per_sample(subnet).mean())

    def restricted(self, index: torch.Tensor) -> ProxyEvaluator:
        """An evaluator of the same model and kind on the quadruples at `index` only (e.g. one timestep bucket)."""
        if self.kind not in SPLITTABLE_PROXIES:
            raise SearchError(f"--proxy {self.kind} scores whole sampling trajectories and cannot be split by "
                              f"timestep bucket; use one of {', '.join(SPLITTABLE_PROXIES)}")
        return ProxyEvaluator(self.model, self.proxy.subset(index.to(self.proxy.t.device)), self.batch_size, self.kind)

    def schedule_losses(self, schedule: SubnetSchedule) -> list[float]:
        """Mean proxy value of each timestep bucket's quadruples under that bucket's subnet (nan if it has none)."""
        bucket = schedule.buckets.bucket_index(self.proxy.t)  # (num,)
        losses = []
        for k, subnet in enumerate(schedule.subnets):
            index = (bucket == k).nonzero().flatten()
            losses.append(float(self.restricted(index).per_sample(subnet).mean()) if len(index) else float("nan"))
        return losses


def dataset_from_run_config(doc: dict[str, Any]) -> DatasetSplit:
    """Rebuild the data split a supernet was trained with, from its run's config.json (digits if unrecorded)."""
    record = DataRecord.from_config(doc)
    return record.load() if record is not None else load_dataset("digits")
