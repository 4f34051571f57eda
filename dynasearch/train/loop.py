"""`dynasearch train-supernet`: sandwich-rule training of a dynamic DiT supernet.

One optimisation step (:func:`sandwich_step`, then one AdamW step):

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

The run directory holds ``supernet.safetensors`` (EMA weights, loadable with ``load_checkpoint(out)``),
``raw.safetensors`` (current weights), ``config.json``, ``train_state.pt`` (optimiser, RNG, step; tensors and
plain Python only) and ``metrics.csv``. A checkpoint is one transaction (all files, then a commit record, then
renames; :func:`~dynasearch.train_files.save_run`): a process killed at any moment leaves the previous or the new
checkpoint whole, never a mix, and ``--resume`` repairs the directory first. Ctrl-C or SIGTERM stop at the end of
the step with a checkpoint (:class:`TrainingInterrupted`); under DDP a dead or stuck rank fails the others after at
most ``--dist-timeout`` seconds.

The pieces live in ``train_config`` (arguments), ``train_files`` (run directory, checkpoint transactions, metrics),
``train_dist`` (DDP and signals), ``train_model`` (the model to train) and ``train_report`` (metrics rows, progress,
summary); this module holds the per-step randomness, the sandwich step and the loop, and re-exports the public API.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.native import read_config
from ..data import load_dataset, parse_data_spec
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import TrainingError
from ..search_space import load_space
from .build import build_model, versions
from .config import (
    DATA_SPLIT_SEED,
    DEFAULT_MODEL,
    TrainConfig,
    TrainingWarning,
    learning_rate,
    load_run_config,
)
from .dist import (
    DistInfo,
    StopSignals,
    TrainingInterrupted,
    average_gradients,
    barrier,
    collective,
    mean_over_ranks,
    setup_distributed,
)
from .ema import EMA
from .progress import Progress, SubnetLoss, TrainResult, check_finite, metrics_row
from .run_dir import (
    METRIC_COLUMNS,
    METRICS_NAME,
    PENDING_DIR,
    RUN_FILES,
    MetricsLog,
    check_resume_args,
    check_run_dir,
    kept_message,
    make_run_dir,
    recover_run_dir,
    restore_run,
    save_run,
)
from .sandwich import EpochOrder, draw_batch, sandwich_step, sandwich_subnets

__all__ = [
    "DEFAULT_MODEL",
    "TrainConfig",
    "TrainResult",
    "TrainBatch",
    "SubnetLoss",
    "TrainingWarning",
    "TrainingInterrupted",
    "train_supernet",
    "recover_run_dir",
    "sandwich_step",
    "sandwich_subnets",
    "draw_batch",
    "step_seed",
    "learning_rate",
    "load_run_config",
    "METRIC_COLUMNS",
    "RUN_FILES",
    "PENDING_DIR",
    "DATA_SPLIT_SEED",
]















# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def train_supernet(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a supernet with the sandwich rule (see the module docstring); DDP when launched by torchrun.

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
    out = Path(cfg.out)

    # -- the run directory: repair a crashed checkpoint (--resume), decide resume / refuse to clobber, on every rank
    repaired = None
    if cfg.resume and ddp.is_main:
        repaired = recover_run_dir(out)
    barrier(ddp)
    resuming = check_run_dir(cfg)
    doc = read_config(out) if resuming else None
    if resuming:
        stored = load_run_config(out)
        check_resume_args(cfg, stored, out)
        if stored.steps != cfg.steps and cfg.lr_schedule == "cosine":
            warnings.warn(
                f"--resume with --steps {cfg.steps} (the run was started for {stored.steps}): the cosine learning "
                "rate is stretched to the new length from here on",
                TrainingWarning,
                stacklevel=3,
            )

    # -- data, search space, model (errors here are user errors, raised before any file is touched)
    split = load_dataset(parse_data_spec(cfg.data), image_size=cfg.image_size, seed=DATA_SPLIT_SEED)
    space = load_space(cfg.space)
    model, init_info = build_model(cfg, split, doc["model"] if doc else None)
    config = model.config
    space.validate_for(config)
    if cfg.batch_size % ddp.world:
        raise TrainingError(f"--batch-size {cfg.batch_size} is not divisible by the {ddp.world} DDP processes")
    diffusion = GaussianDiffusion(learn_sigma=config.learn_sigma)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    ema = EMA(model, cfg.ema_decay)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    train_args = {**cfg.to_dict(), "model": config.name, "reorder": cfg.do_reorder}
    meta = {
        "train": train_args,
        "space": space.to_dict(),
        "data": split.describe(),
        "init": init_info,
        "seeds": {
            "seed": cfg.seed,
            "model_init": cfg.seed,
            "data_split": DATA_SPLIT_SEED,
            "per_step": "sha256('dynasearch:{seed}:{step}:{stream}')[:8], streams: epoch, batch, subnets",
        },
        "distributed": {"world_size": ddp.world, "backend": dist.get_backend() if ddp.enabled else None},
        "device": str(device),
        "versions": versions(),
        "total_steps": cfg.steps,
    }

    # -- resume (all ranks read the checkpoint) or start fresh (rank 0 clears old run files)
    barrier(ddp)
    start = 0
    metrics = MetricsLog(out / METRICS_NAME, enabled=ddp.is_main)
    elapsed = 0.0
    if resuming:
        assert doc is not None
        start = restore_run(out, model, ema, optimizer, doc)
        meta["init"] = doc.get("init", init_info)
        elapsed = metrics.restore(start)
    elif ddp.is_main:
        make_run_dir(out)
    if ddp.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    barrier(ddp)

    order = EpochOrder(int(split.train_x.shape[0]), cfg.seed)
    reporter = Progress(show, start, cfg.steps, cfg.log_every)
    if repaired:
        reporter.note(f"'{out}': {repaired} left by a crash")
    if resuming:
        reporter.note(f"resumed '{out}' at step {start} of {cfg.steps}")
    last_ckpt = start if resuming else None
    t_session = time.perf_counter()
    step = start
    stop = StopSignals()
    try:
        stop.install()
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the step's global batch and subnets (same on every rank), then this rank's shard
            batch = draw_batch(split, diffusion, cfg.seed, step, cfg.batch_size, config.class_dropout_prob, order)
            batch = batch.shard(ddp.rank, ddp.world).to(device)
            subnets = sandwich_subnets(space, config, cfg.seed, step, cfg.sandwich)

            # forward + backward of every subnet, gradients averaged over ranks, one optimiser step, EMA
            optimizer.zero_grad(set_to_none=True)
            losses = sandwich_step(model, diffusion, batch, subnets, cfg.distill, autocast_dtype)
            with collective(ddp, f"step {step}: averaging gradients over the DDP processes", out, last_ckpt):
                average_gradients(params, ddp)
                flags = [float(stop.requested == name) for name in StopSignals.NAMES]  # all ranks stop together
                values = mean_over_ranks([v for r in losses for v in (r.loss, r.gt, r.distill)] + flags, ddp, device)
            stop_by = [name for name, v in zip(StopSignals.NAMES, values[-len(flags) :]) if v > 0]
            del values[-len(flags) :]
            stop_by = stop_by or ([stop.requested] if not ddp.enabled and stop.requested else [])
            stop_now = bool(stop_by)
            for i, r in enumerate(losses):
                r.loss, r.gt, r.distill = values[3 * i : 3 * i + 3]
            check_finite(losses, step, config, out, last_ckpt, metrics)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            if not math.isfinite(grad_norm):
                metrics.flush()
                raise TrainingError(
                    f"step {step}: the gradient norm is {grad_norm} although every subnet's loss is finite; "
                    + kept_message(out, last_ckpt)
                )
            optimizer.step()
            ema.update(model)

            step_seconds = time.perf_counter() - t0
            elapsed += step_seconds
            row = metrics_row(step, losses, lr, grad_norm, step_seconds, elapsed, config, cfg.batch_size, subnets)
            metrics.add(row)
            reporter.update(row)
            if step % cfg.log_every == 0:
                metrics.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now:
                if ddp.is_main:
                    save_run(out, model, ema, optimizer, step, meta, metrics)
                last_ckpt = step
            if stop_now and step < cfg.steps:
                with collective(ddp, f"step {step}: stopping on {stop_by[0]}", out, last_ckpt):
                    barrier(ddp)  # rank 0 has finished writing before any process exits
                raise TrainingInterrupted(step, cfg.steps, out, stop_by[0], ddp.is_main)
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
        model=config.name,
        params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        world_size=ddp.world,
        is_main=ddp.is_main,
        seconds=seconds,
        rows=metrics.rows,
        init=meta["init"],
    )
