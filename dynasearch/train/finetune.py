"""`dynasearch finetune`: train every weight of an exported subnet on its supernet's data, optionally distilling the
supernet's full model, in the supernet training loop (:func:`~dynasearch.train.loop.run_steps`).

One step (:func:`finetune_step`) draws the same seeded batch as supernet training (:func:`draw_batch`: indices,
timesteps, noise and label dropout from ``(seed, step)``) and minimises ``(1 - w) * L + w * D``: L the diffusion
loss of the supernet (epsilon MSE + the learned-variance bound), D the MSE between the subnet's epsilon and the
teacher's full-width epsilon on the same x_t, t, y (the sandwich rule's in-place distillation, here from a fixed
teacher). A timestep-dynamic checkpoint runs each sample through its timestep bucket's subnet, as its sampler does.
What the model is, its data and its teacher come from :mod:`dynasearch.train.finetune_source`.

The output directory is a sliced checkpoint (``model.safetensors``: the EMA weights; ``config.json``: the input's
model, subnet, data, search and schedule sections plus a ``finetune`` section) and a run directory
(``raw.safetensors``, ``train_state.pt``, ``metrics.csv``): checkpoints are transactions, Ctrl-C stops at a step
boundary with a checkpoint, ``--resume`` continues bit-identically -- all as in `train-supernet`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from rich.table import Table
from torch import Tensor

from ..cost.flops import closed_form_flops
from ..diffusion.gaussian import GaussianDiffusion
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from .build import TrainSetup, make_setup, run_arguments, run_record
from .config import RunKind
from .dist import DistInfo
from .finetune_config import FINETUNE_RUN, FinetuneConfig
from .finetune_source import FinetuneSource, load_source, stored_arguments
from .loop import StepJob, open_run_dir, run_distributed, run_steps
from .metrics import StepDone, SubnetLoss
from .precision import LossScaler
from .result import TrainResult
from .run_dir import RAW_NAME
from .sandwich import EpochOrder, TrainBatch, draw_batch, forward_output

__all__ = ["FINETUNE_COLUMNS", "FinetuneJob", "FinetuneResult", "finetune", "finetune_step", "step_groups"]

FINETUNE_COLUMNS = (
    "step",
    "loss",  # the objective: (1 - w) * loss_gt + w * distill
    "loss_gt",  # diffusion loss (epsilon MSE + VB) of the subnet
    "distill",  # MSE between the subnet's epsilon and the teacher's (empty without a teacher)
    "lr",
    "grad_norm",  # total gradient norm before clipping
    "step_seconds",
    "elapsed_seconds",  # cumulated step time since the start of the run (across resumes)
    "gflops",  # closed-form forward GFLOPs of the subnet for the global batch
    "teacher_gflops",  # ... of the teacher (0 without one)
)
"""The columns of a fine-tuning run's metrics.csv, in order."""


def step_groups(t: Tensor, schedule: SubnetSchedule | None) -> list[tuple[Tensor | None, Subnet | None]]:
    """The (sample indices, subnet) each part of a batch runs: all samples under the model's own subnet (None,
    None) without a schedule, else every non-empty timestep bucket's samples under that bucket's subnet."""
    if schedule is None:
        return [(None, None)]
    bucket = schedule.buckets.bucket_index(t)  # (B,)
    groups: list[tuple[Tensor | None, Subnet | None]] = []
    for k, subnet in enumerate(schedule.subnets):
        index = (bucket == k).nonzero().flatten()
        if len(index):
            groups.append((index, subnet))
    return groups


def finetune_step(
    model: DiT,
    diffusion: GaussianDiffusion,
    batch: TrainBatch,
    weight: float = 0.0,
    teacher: DiT | None = None,
    schedule: SubnetSchedule | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: LossScaler | None = None,
) -> SubnetLoss:
    """Forward and backward the subnet on `batch` (gradients accumulate in `.grad`, no optimiser step) on
    ``(1 - weight) * diffusion loss + weight * MSE(epsilon, teacher's full-width epsilon)``.

    With a `schedule` each sample runs its timestep bucket's subnet (one pass per bucket, weighted by its share of
    the batch). Without a `teacher` the objective is the diffusion loss alone (`weight` must be 0); with one and
    ``weight == 0`` the distillation term is measured but not trained on. Labels are used as given; a `scaler`
    (fp16) multiplies the back-propagated objective by its loss scale.
    """
    if teacher is None and weight:
        raise ValueError(f"distillation weight {weight} needs a teacher")
    start = time.perf_counter()
    n, c = batch.x0.shape[0], batch.x0.shape[1]
    full = Subnet.full(teacher.config) if teacher is not None else None
    totals = torch.zeros(3, device=batch.x0.device)  # objective, diffusion loss, distillation: sums / n
    for index, subnet in step_groups(batch.t, schedule):
        part = batch if index is None else TrainBatch(*(v[index] for v in (batch.x0, batch.y, batch.t, batch.noise,
                                                                            batch.x_t)))
        output = forward_output(model, part.x_t, part.t, part.y, subnet, autocast_dtype)  # (b, C_out, H, W)
        gt = diffusion.loss_from_output(output, part.x0, part.x_t, part.t, part.noise)["loss"]  # (b,)
        kd = torch.zeros_like(gt)
        if teacher is not None:
            with torch.no_grad():
                target = forward_output(teacher, part.x_t, part.t, part.y, full, autocast_dtype)[:, :c]
            kd = ((output[:, :c] - target) ** 2).flatten(1).mean(dim=1)  # (b,)
        objective = (1.0 - weight) * gt + weight * kd if weight else gt
        part_loss = objective.sum() / n
        (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
        totals += torch.stack([objective.sum(), gt.sum(), kd.sum()]).detach() / n
    values = totals.tolist()  # one sync per step
    trained = schedule.union() if schedule is not None else model.subnet
    return SubnetLoss("subnet", trained, values[0], values[1], values[2], time.perf_counter() - start)


@dataclass
class FinetuneResult(TrainResult):
    """What a fine-tuning run did: a :class:`TrainResult` with its teacher, distillation weight and data."""

    TITLE: ClassVar[str] = "fine-tuning"
    LOSS_COLUMNS: ClassVar[tuple[str, ...]] = ("loss", "loss_gt", "distill")

    teacher: str | None = None
    distill_weight: float = 0.0
    data: str = ""

    def add_cost_rows(self, table: Table) -> None:
        """The step's median time against the subnet's forward FLOPs, the teacher, the weight and the data."""
        rows = self.rows[min(3, max(0, len(self.rows) - 1)) :]
        if rows:
            sec = statistics.median(r["step_seconds"] for r in rows)
            table.add_row("step", f"{sec * 1e3:.1f} ms for {statistics.median(r['gflops'] for r in rows):.3f} fwd "
                                  "GFLOPs of the subnet (global batch)")
        table.add_row("teacher", f"{self.teacher} (distillation weight {self.distill_weight:g})" if self.teacher
                      else "none (no distillation)")
        table.add_row("data", self.data)

    def weights_text(self) -> str:
        """Where the run's weights are."""
        return f"{self.out / FINETUNE_RUN.weights} (EMA), {self.out / RAW_NAME}"


@dataclass
class FinetuneJob(StepJob):
    """Fine-tuning one exported subnet (or timestep schedule) as the training loop drives it."""

    kind: ClassVar[RunKind[Any]] = FINETUNE_RUN
    columns: ClassVar[Sequence[str]] = FINETUNE_COLUMNS
    label: ClassVar[str] = "finetune"
    result_type: ClassVar[type[TrainResult]] = FinetuneResult

    cfg: FinetuneConfig
    setup: TrainSetup
    source: FinetuneSource
    teacher: DiT | None = None
    _gflops: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    def forward_backward(
        self, order: EpochOrder, ddp: DistInfo, device: torch.device, step: int
    ) -> tuple[list[tuple[str, Subnet]], list[SubnetLoss]]:
        """The step's global batch (the same on every rank), then :func:`finetune_step` on this rank's shard."""
        cfg, setup, schedule = self.cfg, self.setup, self.source.schedule
        batch = draw_batch(setup.split, setup.diffusion, cfg.seed, step, cfg.batch_size,
                           setup.config.class_dropout_prob, order)
        self._gflops = self.step_gflops(batch.t)
        shard = batch.shard(ddp.rank, ddp.world).to(device)
        setup.optimizer.zero_grad(set_to_none=True)
        loss = finetune_step(setup.model, setup.diffusion, shard, self.source.distill_weight, self.teacher, schedule,
                             setup.autocast_dtype, setup.scaler)
        return [("subnet", loss.subnet)], [loss]

    def step_gflops(self, t: Tensor) -> tuple[float, float]:
        """Closed-form forward GFLOPs of the subnet (each bucket's for its samples) and of the teacher for the
        global batch of timesteps `t`."""
        config = self.setup.config
        student = sum(closed_form_flops(config, subnet, batch=len(t) if index is None else len(index))
                      for index, subnet in step_groups(t, self.source.schedule))
        teacher = closed_form_flops(self.teacher.config, batch=len(t)) if self.teacher is not None else 0
        return student / 1e9, teacher / 1e9

    def metrics_row(self, done: StepDone) -> dict[str, Any]:
        """One step's row of FINETUNE_COLUMNS (the distillation is NaN, an empty cell, without a teacher)."""
        (r,) = done.losses
        return {
            **done.shared_row(),
            "loss": r.loss,
            "loss_gt": r.gt,
            "distill": r.distill if self.teacher is not None else math.nan,
            "gflops": self._gflops[0],
            "teacher_gflops": self._gflops[1],
        }

    def describe(self, row: dict[str, Any]) -> str:
        """The objective, and its two terms."""
        info = f"{row['loss']:.4f} (diffusion {row['loss_gt']:.4f}"
        return info + (f", distill {row['distill']:.4f})" if not math.isnan(row["distill"]) else ")")


def finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Fine-tune an exported subnet (see the module docstring); DDP when launched by torchrun.

    Raises CheckpointError (missing, corrupt or supernet --checkpoint, bad --teacher), DataError (its data),
    TrainingError (existing output directory, inconsistent resume, non-finite loss) -- all before writing anything,
    except the non-finite loss, which keeps the last good checkpoint.
    """
    return run_distributed(cfg, progress, _finetune)


def _finetune(cfg: FinetuneConfig, ddp: DistInfo, device: torch.device, show: bool) -> FinetuneResult:
    """The body of :func:`finetune` on one rank (the process group is set up by the caller)."""
    # -- the run directory decides fresh or resumed; the model, its data and teacher (user errors before any write)
    repaired, doc = open_run_dir(cfg, ddp, FINETUNE_RUN)
    if doc is not None:
        cfg = stored_arguments(cfg, doc)
    source = load_source(cfg, doc)
    init = {"kind": "finetune", "from": cfg.checkpoint}
    setup = make_setup(cfg, ddp, device, source.split, source.model, init)
    teacher = source.teacher.to(device) if source.teacher is not None else None
    meta = {
        **source.record,
        FINETUNE_RUN.section: run_arguments(cfg, setup, source.resolved(cfg)),
        "init": init,
        "seeds": {
            "seed": cfg.seed,
            "per_step": "sha256('dynasearch:{seed}:{step}:{stream}')[:8], streams: epoch, batch",
        },
        **run_record(cfg, ddp, device),
    }
    result = run_steps(FinetuneJob(cfg, setup, source, teacher), ddp, device, show, meta, doc, repaired)
    return dataclasses.replace(  # type: ignore[return-value]
        result, teacher=source.teacher_path, distill_weight=source.distill_weight,
        data=f"{source.split.name}, {len(source.split.train_x)} training images ({source.data_from})",
    )
