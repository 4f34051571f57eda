"""The training loop of `dynasearch train-supernet`: open the run directory, build what is trained, resume, then one
step after another -- the sandwich step, the ranks' agreed losses and stop requests, the optimiser step, logging and
checkpoints. :func:`run_steps` drives any :class:`StepJob` (`dynasearch finetune` is another) through the same loop.

The run directory holds ``supernet.safetensors`` (EMA weights, loadable with ``load_checkpoint(out)``),
``raw.safetensors`` (current weights), ``config.json``, ``train_state.pt`` (optimiser, RNG, step, fp16's loss scale;
tensors and plain Python only), ``metrics.csv`` and, with ``--log tensorboard``, ``tensorboard/`` (the same
scalars). A checkpoint is one transaction (all files, then a commit record, then renames;
:func:`~dynasearch.train.run_dir.save_run`): a process killed at any moment leaves the previous or the new checkpoint
whole, never a mix, and ``--resume`` repairs the directory first. Ctrl-C or SIGTERM stop at the end of the step
with a checkpoint (:class:`TrainingInterrupted`); under DDP a signal on any rank stops every rank after the
same step, and a dead or stuck rank fails the others after at most ``--dist-timeout`` seconds.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

import torch
import torch.distributed as dist

from ..checkpoint.native import read_config
from ..model.subnet import Subnet
from .build import TrainSetup, build_setup, run_meta
from .config import (
    SUPERNET_RUN,
    RunArgs,
    RunKind,
    TrainConfig,
    TrainingWarning,
    learning_rate,
    load_run_config,
)
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
from .metrics import (
    METRIC_COLUMNS,
    MetricsLog,
    RowSink,
    StepDone,
    SubnetLoss,
    check_finite,
    check_grad_norm,
    metrics_row,
)
from .precision import SCALER_COLUMNS, tf32_mode
from .progress import Progress, sandwich_info
from .result import TrainResult
from .run_dir import (
    METRICS_NAME,
    check_resume_args,
    check_run_dir,
    make_run_dir,
    recover_run_dir,
    restore_previous_run,
    restore_run,
    save_run,
)
from .sandwich import EpochOrder, draw_batch, sandwich_step, sandwich_subnets
from .tensorboard_log import TENSORBOARD_DIR, TensorBoardSink

__all__ = [
    "SandwichJob",
    "StepJob",
    "open_run_dir",
    "resume_or_start",
    "run_distributed",
    "run_steps",
    "train_supernet",
]

C = TypeVar("C", bound=RunArgs)
R = TypeVar("R")


class StepJob:
    """One kind of training run as :func:`run_steps` drives it: its arguments and what it trains, its run directory,
    what a step does and what its metrics rows, display and result are (the loop around them is the same)."""

    kind: ClassVar[RunKind[Any]] = SUPERNET_RUN
    columns: ClassVar[Sequence[str]] = METRIC_COLUMNS
    label: ClassVar[str] = "train"  # the progress bar's
    result_type: ClassVar[type[TrainResult]] = TrainResult
    cfg: RunArgs
    setup: TrainSetup

    def forward_backward(
        self, order: EpochOrder, ddp: DistInfo, device: torch.device, step: int
    ) -> tuple[list[tuple[str, Subnet]], list[SubnetLoss]]:
        """The step's forward and backward passes on this rank's shard (gradients in `.grad`): its subnets, and
        this rank's losses."""
        raise NotImplementedError

    def metrics_row(self, done: StepDone) -> dict[str, Any]:
        """The finished step's metrics row (the ranks' agreed losses)."""
        raise NotImplementedError

    def describe(self, row: dict[str, Any]) -> str:
        """What the live display shows of a metrics row."""
        raise NotImplementedError


@dataclass
class SandwichJob(StepJob):
    """Supernet training: the sandwich step over the space's largest, smallest and random subnets."""

    cfg: TrainConfig
    setup: TrainSetup

    def forward_backward(
        self, order: EpochOrder, ddp: DistInfo, device: torch.device, step: int
    ) -> tuple[list[tuple[str, Subnet]], list[SubnetLoss]]:
        """See :func:`forward_backward`."""
        return forward_backward(self.cfg, self.setup, order, ddp, device, step)

    def metrics_row(self, done: StepDone) -> dict[str, Any]:
        """See :func:`~dynasearch.train.metrics.metrics_row`."""
        return metrics_row(done, self.setup.config, self.cfg.batch_size)

    def describe(self, row: dict[str, Any]) -> str:
        """The largest, smallest and random subnets' losses."""
        return sandwich_info(row)


def train_supernet(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a supernet with the sandwich rule (see :mod:`dynasearch.train.sandwich`); DDP when launched by torchrun.

    Raises TrainingError (existing run directory, non-finite loss, inconsistent resume), DataError (bad data),
    CheckpointError (bad --init-from) or SearchSpaceError (bad --space) -- all before writing anything, except the
    non-finite loss, which keeps the last good checkpoint.
    """
    return run_distributed(cfg, progress, _train)


def run_distributed(cfg: C, progress: bool, body: Callable[[C, DistInfo, torch.device, bool], R]) -> R:
    """Run `body(cfg, ddp, device, show)` inside the process group torchrun describes (none without torchrun), with
    TF32 on CUDA as `cfg.tf32` says; `show` is `progress` on rank 0 only."""
    ddp, device = setup_distributed(cfg)
    try:
        with tf32_mode(cfg.tf32, device):
            return body(cfg, ddp, device, progress and ddp.is_main)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ddp: DistInfo, device: torch.device, show: bool) -> TrainResult:
    """The body of :func:`train_supernet` on one rank (the process group is set up by the caller)."""
    # a fresh --out that fails before its first checkpoint (e.g. a NaN row of latents read at step 1) is removed
    # again: nothing to resume, and nothing left that a rerun would have to --overwrite
    out = Path(cfg.out)
    new_dir = not out.exists()
    try:
        return _train_in(cfg, ddp, device, show)
    except BaseException:
        if new_dir and ddp.is_main and out.is_dir() and not (out / SUPERNET_RUN.weights).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_in(cfg: TrainConfig, ddp: DistInfo, device: torch.device, show: bool) -> TrainResult:
    """:func:`_train` without the clean-up."""
    # -- setup: the run directory decides fresh or resumed; data, space and model (user errors before any write)
    repaired, doc = open_run_dir(cfg, ddp)
    if doc is not None and cfg.precision is None:  # a resume keeps the run's precision
        cfg = cfg.replace(precision=doc[SUPERNET_RUN.section].get("precision"))
    setup = build_setup(cfg, ddp, device, doc["model"] if doc is not None else None)
    meta = run_meta(cfg, setup, ddp, device, doc)
    return run_steps(SandwichJob(cfg, setup), ddp, device, show, meta, doc, repaired)


def run_steps(
    job: StepJob,
    ddp: DistInfo,
    device: torch.device,
    show: bool,
    meta: dict[str, Any],
    doc: dict[str, Any] | None,
    repaired: str | None,
) -> TrainResult:
    """Resume the run (`doc`: its config.json; None: start fresh), then train to `job.cfg.steps`: the job's step,
    the ranks' agreement, the optimiser step, logging, checkpoints (config.json = `meta`), a stop when asked."""
    cfg, setup, kind = job.cfg, job.setup, job.kind
    out = Path(cfg.out)
    columns = (*job.columns, *(SCALER_COLUMNS if setup.scaler is not None else ()))
    metrics = MetricsLog(out / METRICS_NAME, enabled=ddp.is_main, columns=columns)

    # -- resume (every rank reads the checkpoint) or start fresh (rank 0 clears old run files)
    start, elapsed = resume_or_start(out, ddp, setup, doc, metrics, kind)
    metrics.sink = make_sink(cfg, out, columns, start, ddp)

    # -- the steps: the job's passes, agree over the ranks, optimiser step, log, checkpoint, stop when asked
    order = EpochOrder(int(setup.split.train_x.shape[0]), cfg.seed)
    reporter = Progress(show, start, cfg.steps, cfg.log_every, job.describe, job.label)
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
            passes = functools.partial(job.forward_backward, order, ddp, device, step)
            subnets, losses = setup.compiler.run(passes) if setup.compiler is not None else passes()
            with collective(ddp, f"step {step}: averaging gradients over the DDP processes", out, last_ckpt):
                average_gradients(setup.params, ddp)
                synced = StepSync.local(losses, stop.requested).all_reduce(ddp, device)  # all ranks stop together
            check_finite(synced.losses, step, setup.config, out, last_ckpt, metrics)
            grad_norm = optimizer_step(cfg, setup, step, out, last_ckpt, metrics)

            step_seconds = time.perf_counter() - t0
            elapsed += step_seconds
            row = job.metrics_row(StepDone(step, synced.losses, lr, grad_norm, step_seconds, elapsed, subnets))
            row.update(setup.scaler.row() if setup.scaler is not None else {})
            log_step(row, metrics, reporter, cfg.log_every)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or synced.stop_by:
                last_ckpt = checkpoint(out, ddp, setup, step, meta, metrics, kind)
            if synced.stop_by and step < cfg.steps:
                stop_every_rank(cfg, ddp, step, synced.stop_by[0], kind)
    except BaseException:  # before the first checkpoint an --overwrite is undone: the replaced run comes back
        if last_ckpt is None and ddp.is_main:
            if metrics.sink is not None:
                metrics.sink.close()  # its event file goes with the new run's files
            restore_previous_run(out, kind)
        raise
    finally:
        stop.uninstall()
        reporter.close()
        if metrics.sink is not None:
            metrics.sink.close()
    seconds = time.perf_counter() - t_session
    if start >= cfg.steps:
        reporter.note(f"'{out}' is already at step {start} (--steps {cfg.steps}); nothing to do")
    barrier(ddp)
    return job.result_type(
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
        precision=setup.precision,
        skipped_steps=setup.scaler.skipped if setup.scaler is not None else 0,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Setup and resume
# ---------------------------------------------------------------------------------------------------------------------
def open_run_dir(
    cfg: RunArgs, ddp: DistInfo, kind: RunKind[Any] = SUPERNET_RUN
) -> tuple[str | None, dict[str, Any] | None]:
    """Repair a checkpoint a crash interrupted (--resume, rank 0), then decide on every rank whether the run resumes
    and refuse to clobber another run. Returns what the repair did and the resumed run's config.json (None: fresh)."""
    out = Path(cfg.out)
    repaired = recover_run_dir(out) if cfg.resume and ddp.is_main else None
    barrier(ddp)
    if not check_run_dir(cfg, kind):
        return repaired, None
    doc = read_config(out)
    stored = load_run_config(out, kind)
    check_resume_args(cfg, stored, out, kind)
    if stored.steps != cfg.steps and cfg.lr_schedule == "cosine":
        warnings.warn(
            f"--resume with --steps {cfg.steps} (the run was started for {stored.steps}): the cosine learning "
            "rate is stretched to the new length from here on",
            TrainingWarning,
            stacklevel=5,  # the caller of train_supernet
        )
    return repaired, doc


def resume_or_start(
    out: Path,
    ddp: DistInfo,
    setup: TrainSetup,
    doc: dict[str, Any] | None,
    metrics: MetricsLog,
    kind: RunKind[Any] = SUPERNET_RUN,
) -> tuple[int, float]:
    """Resume from the checkpoint in `out` (every rank reads it; `doc` is its config.json) or start fresh (rank 0
    clears old run files), then give every rank rank 0's weights. Returns the step and the elapsed step time reached."""
    barrier(ddp)
    start, elapsed = 0, 0.0
    if doc is not None:
        start = restore_run(out, setup.model, setup.ema, setup.optimizer, doc, kind, setup.scaler)
        elapsed = metrics.restore(start)
    elif ddp.is_main:
        make_run_dir(out, kind)
    broadcast_weights(setup.model, ddp)
    barrier(ddp)
    return start, elapsed


def make_sink(cfg: RunArgs, out: Path, columns: Sequence[str], start: int, ddp: DistInfo) -> RowSink | None:
    """Where metrics rows go besides metrics.csv: TensorBoard events under ``--log tensorboard`` (rank 0 only; a
    resumed run drops the events written past its checkpoint)."""
    if cfg.log != "tensorboard" or not ddp.is_main:
        return None
    return TensorBoardSink(out / TENSORBOARD_DIR, columns, purge_step=start + 1 if start else None)


# ---------------------------------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------------------------------
def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: RunArgs, step: int) -> float:
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
    losses = sandwich_step(setup.model, setup.diffusion, batch, subnets, cfg.distill, setup.autocast_dtype,
                           setup.scaler)
    return subnets, losses


def optimizer_step(
    cfg: RunArgs, setup: TrainSetup, step: int, out: Path, last_ckpt: int | None, metrics: MetricsLog
) -> float:
    """Clip the (averaged) gradients, check their norm, take the AdamW step and update the EMA; returns the norm
    before clipping. Under fp16 the gradients are unscaled first, and a step whose gradients hold an inf or NaN is
    skipped (no AdamW step, no EMA update; the loss scale shrinks and the skip is counted) instead of stopping."""
    scaler = setup.scaler
    if scaler is not None:
        scaler.unscale_(setup.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
    if scaler is not None:
        if not scaler.step(setup.optimizer):
            return grad_norm
    else:
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
    out: Path,
    ddp: DistInfo,
    setup: TrainSetup,
    step: int,
    meta: dict[str, Any],
    metrics: MetricsLog,
    kind: RunKind[Any] = SUPERNET_RUN,
) -> int:
    """Write the checkpoint of `step` (rank 0: metrics.csv up to the step, then the transaction); returns `step`."""
    if ddp.is_main:
        metrics.flush()
        save_run(out, setup.model, setup.ema, setup.optimizer, step, meta, kind, setup.scaler)
    return step


def stop_every_rank(
    cfg: RunArgs, ddp: DistInfo, step: int, signal_name: str, kind: RunKind[Any] = SUPERNET_RUN
) -> NoReturn:
    """Stop after the checkpoint of `step`: wait until rank 0 has written it, then raise TrainingInterrupted."""
    out = Path(cfg.out)
    with collective(ddp, f"step {step}: stopping on {signal_name}", out, step):
        barrier(ddp)  # rank 0 has finished writing before any process exits
    raise TrainingInterrupted(step, cfg.steps, out, signal_name, ddp.is_main, kind.command)
