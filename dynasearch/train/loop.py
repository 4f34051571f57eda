"""The training loop of `dynasearch train-supernet`: open the run directory, build what is trained, resume, then one
step after another -- the sandwich step, the ranks' agreed losses and stop requests, the optimiser step, logging and
checkpoints.

The run directory holds ``supernet.safetensors`` (EMA weights, loadable with ``load_checkpoint(out)``),
``raw.safetensors`` (current weights), ``config.json``, ``train_state.pt`` (optimiser, RNG, step; tensors and
plain Python only) and ``metrics.csv``. A checkpoint is one transaction (all files, then a commit record, then
renames; :func:`~dynasearch.train.run_dir.save_run`): a process killed at any moment leaves the previous or the new
checkpoint whole, never a mix, and ``--resume`` repairs the directory first. Ctrl-C or SIGTERM stop at the end of
the step with a checkpoint (:class:`TrainingInterrupted`); under DDP a signal on any rank stops every rank after the
same step, and a dead or stuck rank fails the others after at most ``--dist-timeout`` seconds.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ..checkpoint.native import read_config
from ..model.subnet import Subnet
from .build import TrainSetup, build_setup, run_meta
from .config import TrainConfig, TrainingWarning, learning_rate, load_run_config
from .dist import (
    DistInfo,
    StepSync,
    StopSignals,
    TrainingInterrupted,
    average_gradients,
    barrier,
    broadcast_weights,
    collective,
    setup_distributed,
)
from .metrics import MetricsLog, SubnetLoss, check_finite, check_grad_norm, metrics_row
from .progress import Progress
from .result import TrainResult
from .run_dir import (
    METRICS_NAME,
    check_resume_args,
    check_run_dir,
    make_run_dir,
    recover_run_dir,
    restore_run,
    save_run,
)
from .sandwich import EpochOrder, draw_batch, sandwich_step, sandwich_subnets

__all__ = ["train_supernet", "open_run_dir", "resume_or_start"]


def train_supernet(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a supernet with the sandwich rule (see :mod:`dynasearch.train.sandwich`); DDP when launched by torchrun.

    Raises TrainingError (existing run directory, non-finite loss, inconsistent resume), DataError (bad data),
    CheckpointError (bad --init-from) or SearchSpaceError (bad --space) -- all before writing anything, except the
    non-finite loss, which keeps the last good checkpoint.
    """
    ddp, device = setup_distributed(cfg)
    try:
        return _train(cfg, ddp, device, progress and ddp.is_main)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ddp: DistInfo, device: torch.device, show: bool) -> TrainResult:
    """The body of :func:`train_supernet` on one rank (the process group is set up by the caller)."""
    # -- setup: the run directory decides fresh or resumed; data, space and model (user errors before any write)
    out = Path(cfg.out)
    repaired, doc = open_run_dir(cfg, ddp)
    setup = build_setup(cfg, ddp, device, doc["model"] if doc is not None else None)
    meta = run_meta(cfg, setup, ddp, device, doc)
    metrics = MetricsLog(out / METRICS_NAME, enabled=ddp.is_main)

    # -- resume (every rank reads the checkpoint) or start fresh (rank 0 clears old run files)
    start, elapsed = resume_or_start(out, ddp, setup, doc, metrics)

    # -- the steps: sandwich, agree over the ranks, optimiser step, log, checkpoint, stop when asked
    order = EpochOrder(int(setup.split.train_x.shape[0]), cfg.seed)
    reporter = Progress(show, start, cfg.steps, cfg.log_every)
    if repaired:
        reporter.note(f"'{out}': {repaired} left by a crash")
    if doc is not None:
        reporter.note(f"resumed '{out}' at step {start} of {cfg.steps}")
    last_ckpt = start if doc is not None else None
    t_session = time.perf_counter()
    step = start
    stop = StopSignals()
    try:
        stop.install()
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = set_learning_rate(setup.optimizer, cfg, step)
            subnets, losses = forward_backward(cfg, setup, order, ddp, device, step)
            with collective(ddp, f"step {step}: averaging gradients over the DDP processes", out, last_ckpt):
                average_gradients(setup.params, ddp)
                synced = StepSync.local(losses, stop.requested).all_reduce(ddp, device)  # all ranks stop together
            check_finite(synced.losses, step, setup.config, out, last_ckpt, metrics)
            grad_norm = optimizer_step(cfg, setup, step, out, last_ckpt, metrics)

            step_seconds = time.perf_counter() - t0
            elapsed += step_seconds
            row = metrics_row(
                step, synced.losses, lr, grad_norm, step_seconds, elapsed, setup.config, cfg.batch_size, subnets
            )
            log_step(row, metrics, reporter, cfg.log_every)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or synced.stop_by:
                last_ckpt = checkpoint(out, ddp, setup, step, meta, metrics)
            if synced.stop_by and step < cfg.steps:
                stop_every_rank(cfg, ddp, step, synced.stop_by[0])
    finally:
        stop.uninstall()
        reporter.close()
    seconds = time.perf_counter() - t_session
    if start >= cfg.steps:
        reporter.note(f"'{out}' is already at step {start} (--steps {cfg.steps}); nothing to do")
    barrier(ddp)
    return TrainResult(
        out=out,
        step=max(step, start),
        start_step=start,
        total_steps=cfg.steps,
        model=setup.config.name,
        params=sum(p.numel() for p in setup.model.parameters()),
        device=str(device),
        world_size=ddp.world,
        is_main=ddp.is_main,
        seconds=seconds,
        rows=metrics.rows,
        init=meta["init"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Setup and resume
# ---------------------------------------------------------------------------------------------------------------------
def open_run_dir(cfg: TrainConfig, ddp: DistInfo) -> tuple[str | None, dict[str, Any] | None]:
    """Repair a checkpoint a crash interrupted (--resume, rank 0), then decide on every rank whether the run resumes
    and refuse to clobber another run. Returns what the repair did and the resumed run's config.json (None: fresh)."""
    out = Path(cfg.out)
    repaired = recover_run_dir(out) if cfg.resume and ddp.is_main else None
    barrier(ddp)
    if not check_run_dir(cfg):
        return repaired, None
    doc = read_config(out)
    stored = load_run_config(out)
    check_resume_args(cfg, stored, out)
    if stored.steps != cfg.steps and cfg.lr_schedule == "cosine":
        warnings.warn(
            f"--resume with --steps {cfg.steps} (the run was started for {stored.steps}): the cosine learning "
            "rate is stretched to the new length from here on",
            TrainingWarning,
            stacklevel=4,  # the caller of train_supernet
        )
    return repaired, doc


def resume_or_start(
    out: Path, ddp: DistInfo, setup: TrainSetup, doc: dict[str, Any] | None, metrics: MetricsLog
) -> tuple[int, float]:
    """Resume from the checkpoint in `out` (every rank reads it; `doc` is its config.json) or start fresh (rank 0
    clears old run files), then give every rank rank 0's weights. Returns the step and the elapsed step time reached."""
    barrier(ddp)
    start, elapsed = 0, 0.0
    if doc is not None:
        start = restore_run(out, setup.model, setup.ema, setup.optimizer, doc)
        elapsed = metrics.restore(start)
    elif ddp.is_main:
        make_run_dir(out)
    broadcast_weights(setup.model, ddp)
    barrier(ddp)
    return start, elapsed


# ---------------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------------
def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Set and return the learning rate of `step`."""
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def forward_backward(
    cfg: TrainConfig, setup: TrainSetup, order: EpochOrder, ddp: DistInfo, device: torch.device, step: int
) -> tuple[list[tuple[str, Subnet]], list[SubnetLoss]]:
    """The step's global batch and subnets (the same on every rank), then the sandwich step on this rank's shard:
    gradients accumulate in `.grad`. Returns the subnets and this rank's losses."""
    batch = draw_batch(
        setup.split, setup.diffusion, cfg.seed, step, cfg.batch_size, setup.config.class_dropout_prob, order
    )
    batch = batch.shard(ddp.rank, ddp.world).to(device)
    subnets = sandwich_subnets(setup.space, setup.config, cfg.seed, step, cfg.sandwich)
    setup.optimizer.zero_grad(set_to_none=True)
    losses = sandwich_step(setup.model, setup.diffusion, batch, subnets, cfg.distill, setup.autocast_dtype)
    return subnets, losses


def optimizer_step(
    cfg: TrainConfig, setup: TrainSetup, step: int, out: Path, last_ckpt: int | None, metrics: MetricsLog
) -> float:
    """Clip the (averaged) gradients, check their norm, take the AdamW step and update the EMA; returns the norm
    before clipping."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
    check_grad_norm(grad_norm, step, out, last_ckpt, metrics)
    setup.optimizer.step()
    setup.ema.update(setup.model)
    return grad_norm


def log_step(row: dict[str, Any], metrics: MetricsLog, reporter: Progress, log_every: int) -> None:
    """Record a finished step's row, show it, and append metrics.csv every `log_every` steps."""
    metrics.add(row)
    reporter.update(row)
    if row["step"] % log_every == 0:
        metrics.flush()


def checkpoint(
    out: Path, ddp: DistInfo, setup: TrainSetup, step: int, meta: dict[str, Any], metrics: MetricsLog
) -> int:
    """Write the checkpoint of `step` (rank 0: metrics.csv up to the step, then the transaction); returns `step`."""
    if ddp.is_main:
        metrics.flush()
        save_run(out, setup.model, setup.ema, setup.optimizer, step, meta)
    return step


def stop_every_rank(cfg: TrainConfig, ddp: DistInfo, step: int, signal_name: str) -> NoReturn:
    """Stop after the checkpoint of `step`: wait until rank 0 has written it, then raise TrainingInterrupted."""
    out = Path(cfg.out)
    with collective(ddp, f"step {step}: stopping on {signal_name}", out, step):
        barrier(ddp)  # rank 0 has finished writing before any process exits
    raise TrainingInterrupted(step, cfg.steps, out, signal_name, ddp.is_main)
