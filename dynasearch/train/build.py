"""What a run trains, and with what: the supernet (from scratch, from a resumed run's config, or from --init-from -- a
dynasearch checkpoint or an original DiT state dict -- re-ordered by importance when asked), its data, search space,
diffusion, optimiser, EMA, precision, loss scaler and compiled blocks (:class:`TrainSetup`), and what config.json
records about the run."""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
import torch.distributed as dist
from torch import Tensor

from ..checkpoint.native import CONFIG_NAME, check_state_dict
from ..checkpoint.pretrained import read_pretrained
from ..data import DatasetSplit, load_dataset, parse_data_spec
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import ConfigError, TrainingError
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT
from ..slicing import reorder_by_importance
from ..space import SearchSpace, load_space
from ..version import __version__
from .compile import BlockCompiler
from .config import (
    DATA_SPLIT_SEED,
    DEFAULT_MODEL,
    RunArgs,
    TrainConfig,
    TrainingWarning,
)
from .dist import DistInfo
from .ema import EMA
from .precision import LossScaler, autocast_dtype, check_precision, make_scaler, resolve_precision
from .presets import ADAMW_BETAS, ADAMW_EPS, preset_record

__all__ = [
    "TrainSetup",
    "build_model",
    "build_setup",
    "load_init_state",
    "make_setup",
    "run_arguments",
    "run_meta",
    "run_record",
    "versions",
]


@dataclass
class TrainSetup:
    """What a run trains and with what, the same on every rank: data, search space, model, diffusion, optimiser, EMA."""

    split: DatasetSplit
    space: SearchSpace | None  # None: a fine-tuned subnet (no search space)
    model: DiT  # on the run's device, in training mode
    diffusion: GaussianDiffusion
    params: list[torch.nn.Parameter]  # the trained parameters
    optimizer: torch.optim.Optimizer
    ema: EMA
    autocast_dtype: torch.dtype | None  # the precision's (None: fp32, no autocast)
    init: dict[str, Any]  # how the weights were initialised (build_model's record)
    precision: str = "fp32"  # fp32 | bf16 | fp16, resolved for the device
    scaler: LossScaler | None = None  # fp16's loss scaling (None otherwise)
    compiler: BlockCompiler | None = None  # the compiled blocks (None: --compile not asked for)

    @property
    def config(self) -> DiTConfig:
        """The trained model's config."""
        return self.model.config


def build_setup(
    cfg: TrainConfig, ddp: DistInfo, device: torch.device, stored_model: dict[str, Any] | None
) -> TrainSetup:
    """Load the data and the search space, build the model (see :func:`build_model`), its optimiser and EMA; every
    error here is a user error, raised before any file is touched."""
    split = load_dataset(parse_data_spec(cfg.data), image_size=cfg.image_size, seed=DATA_SPLIT_SEED)
    space = load_space(cfg.space)
    model, init = build_model(cfg, split, stored_model)
    space.validate_for(model.config)
    return make_setup(cfg, ddp, device, split, model, init, space)


def make_setup(
    cfg: RunArgs,
    ddp: DistInfo,
    device: torch.device,
    split: DatasetSplit,
    model: DiT,
    init: dict[str, Any],
    space: SearchSpace | None = None,
) -> TrainSetup:
    """What trains `model` on `split`: its diffusion, AdamW over every trainable parameter, the EMA, the precision
    (autocast dtype and fp16's loss scaler), activation checkpointing and compiled blocks when asked (the model moves
    to `device`, in training mode)."""
    if cfg.batch_size % ddp.world:
        raise TrainingError(f"--batch-size {cfg.batch_size} is not divisible by the {ddp.world} DDP processes")
    model.config.check_batch(cfg.batch_size // ddp.world, "--batch-size")
    precision = resolve_precision(cfg.precision, device)
    check_precision(precision, device)
    diffusion = diffusion_for(model.config)
    model.to(device).train()
    model.grad_checkpoint = cfg.grad_checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    ema = EMA(model, cfg.ema_decay)
    compiler = BlockCompiler(model) if cfg.compile else None
    if compiler is not None:
        compiler.enable()
    return TrainSetup(split, space, model, diffusion, params, optimizer, ema, autocast_dtype(precision), init,
                      precision, make_scaler(precision, device), compiler)


def run_arguments(cfg: RunArgs, setup: TrainSetup, section: dict[str, Any]) -> dict[str, Any]:
    """A run's arguments section of config.json: `section` (the arguments, resolved) with the precision used and,
    under a preset, what it set (:func:`~dynasearch.train.presets.preset_record`)."""
    record = preset_record(cfg.preset, cfg.to_dict())
    return {**section, "precision": setup.precision, **({"preset_values": record} if record else {})}


def run_meta(
    cfg: TrainConfig, setup: TrainSetup, ddp: DistInfo, device: torch.device, resumed: dict[str, Any] | None
) -> dict[str, Any]:
    """What config.json records about the run besides the model: arguments, space, data, how the weights were
    initialised (as the `resumed` run's config.json says, if any), seeds, DDP, device, package versions."""
    init = resumed.get("init", setup.init) if resumed is not None else setup.init
    return {
        "train": run_arguments(cfg, setup, {**cfg.to_dict(), "model": setup.config.name, "reorder": cfg.do_reorder}),
        "space": setup.space.to_dict(),
        "data": setup.split.describe(),
        "init": init,
        "seeds": {
            "seed": cfg.seed,
            "model_init": cfg.seed,
            "data_split": DATA_SPLIT_SEED,
            "per_step": "sha256('dynasearch:{seed}:{step}:{stream}')[:8], streams: epoch, batch, subnets",
        },
        **run_record(cfg, ddp, device),
    }


def run_record(cfg: RunArgs, ddp: DistInfo, device: torch.device) -> dict[str, Any]:
    """What config.json records about any run's processes: DDP, device, package versions, total steps."""
    return {
        "distributed": {"world_size": ddp.world, "backend": dist.get_backend() if ddp.enabled else None},
        "device": str(device),
        "versions": versions(),
        "total_steps": cfg.steps,
    }


def load_init_state(model: DiT, state: dict[str, Tensor], source: str) -> dict[str, list[str]]:
    """Copy an init state dict into `model`: routers may be missing, a label table of another class count is
    re-initialised (with a warning), any other missing key or shape mismatch is a CheckpointError."""
    expected = model.state_dict()
    table = "y_embedder.embedding_table.weight"
    state = dict(state)
    reinit: list[str] = []
    if table in state and table in expected and state[table].shape != expected[table].shape:
        got, want = tuple(state[table].shape), tuple(expected[table].shape)
        warnings.warn(
            f"{source}: label table {table} has shape {got} but the data needs {want} "
            f"({model.config.num_classes} classes + null); re-initialising it",
            TrainingWarning,
            stacklevel=3,
        )
        del state[table]
        reinit.append(table)
    check_state_dict(model, state, f"--init-from '{source}'", lambda k: ".token_router." in k or k in reinit)
    model.load_state_dict(state, strict=False)
    return {"reinitialised": reinit, "kept_init": [k for k in expected if k not in state]}


def build_model(
    cfg: TrainConfig, split: DatasetSplit, stored_model: dict[str, Any] | None
) -> tuple[DiT, dict[str, Any]]:
    """The supernet to train: from a resumed run's config, from scratch, or from --init-from (then re-ordered)."""
    data_fields = {"input_size": split.image_size, "in_channels": split.in_channels, "num_classes": split.num_classes}
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    if stored_model is not None:
        try:
            config = DiTConfig.from_dict(stored_model)
        except ConfigError as exc:
            raise TrainingError(f"--resume: model section of '{cfg.out}/{CONFIG_NAME}' is invalid: {exc}") from None
        return DiT(config), {"kind": "resume"}
    if cfg.init_from is None:
        config = get_config(cfg.model or DEFAULT_MODEL, **data_fields)
        info: dict[str, Any] = {"kind": "scratch"}
        model = DiT(config)
    else:
        # any format of load_pretrained: dynasearch, DiT / fast-DiT .pt[#ema|#model], diffusers
        src = Path(cfg.init_from)
        loaded = read_pretrained(src, what="--init-from")
        base, state, kind = loaded.config, loaded.state, loaded.kind
        if base.is_sliced:
            raise TrainingError(f"--init-from '{src}' is a sliced model; a supernet needs full-width weights")
        if cfg.model is not None and cfg.model != base.name:
            raise TrainingError(f"--init-from '{src}' holds a {base.name} but --model is {cfg.model}")
        try:
            config = base.supernet().replace(**data_fields)
        except ConfigError as exc:
            raise TrainingError(f"--init-from '{src}' cannot be used with this data: {exc}") from None
        model = DiT(config)
        info = {"kind": kind, "from": str(src), **load_init_state(model, state, str(src))}
    if cfg.do_reorder:
        reorder_by_importance(model)
    info["reordered"] = cfg.do_reorder
    return model, info


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on (recorded in config.json)."""
    return {
        "dynasearch": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": getattr(safetensors, "__version__", "?"),
        "python": platform.python_version(),
    }
