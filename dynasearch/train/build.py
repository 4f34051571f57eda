"""The supernet a run trains: from scratch, from a resumed run's config, or from --init-from (a dynasearch checkpoint
or an original DiT state dict), re-ordered by importance when asked."""

from __future__ import annotations

import platform
import warnings
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
from torch import Tensor

from ..checkpoint.dit import infer_config_from_state_dict, load_dit_state_dict
from ..checkpoint.native import check_state_dict, load_weights, read_config
from ..data import DatasetSplit
from ..errors import CheckpointError, ConfigError, TrainingError
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT
from ..slicing import reorder_by_importance
from ..version import __version__
from .config import DEFAULT_MODEL, TrainConfig, TrainingWarning
from .run_dir import CONFIG_NAME, SUPERNET_NAME

__all__ = ["build_model", "load_init_state", "versions"]


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


def build_model(cfg: TrainConfig, split: DatasetSplit, stored_model: dict[str, Any] | None) -> tuple[DiT, dict[str, Any]]:
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
        src = Path(cfg.init_from)
        if src.is_dir():
            doc = read_config(src)
            try:
                base = DiTConfig.from_dict(doc["model"])
            except ConfigError as exc:
                raise CheckpointError(f"--init-from '{src}': {exc}") from None
            if base.is_sliced:
                raise TrainingError(f"--init-from '{src}' is a sliced model; a supernet needs full-width weights")
            weights = next((src / n for n in ("model.safetensors", SUPERNET_NAME) if (src / n).is_file()), None)
            if weights is None:
                raise CheckpointError(f"--init-from '{src}' has no weights file (model.safetensors or {SUPERNET_NAME})")
            state = load_weights(weights)
            kind = "dynasearch"
        elif src.exists():
            state = load_dit_state_dict(src)
            base = infer_config_from_state_dict(state, source=f"--init-from '{src}'")
            kind = "dit"
        else:
            raise CheckpointError(f"--init-from '{src}' does not exist")
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
