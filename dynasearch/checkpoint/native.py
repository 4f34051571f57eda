"""dynasearch checkpoints: safetensors weights plus a JSON config (model, subnet or schedule), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import disk_full, is_disk_full
from ..errors import CheckpointError, ConfigError, SubnetError
from ..fileio import atomic_output, atomic_write_text, read_json, removed_on_failure
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "INHERITED_SECTIONS",
    "check_state_dict",
    "inherited_sections",
    "load_checkpoint",
    "load_state",
    "load_weights",
    "read_config",
    "read_schedule",
    "save_checkpoint",
    "save_weights",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
SUPERNET_NAME = "supernet.safetensors"  # the EMA weights of a training run directory
WEIGHT_NAMES = ("model.safetensors", SUPERNET_NAME)








def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (temporary file + rename); a full disk is DiskFullError."""
    path = Path(path)
    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata or {})


def save_checkpoint(
    model: DiT,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
    weights_name: str = "model.safetensors",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model.safetensors` and `config.json` into `directory`; returns the directory.

    `state_dict` overrides the weights (e.g. EMA weights); `extra` adds JSON fields to the config file.
    """
    directory = Path(directory)
    with removed_on_failure(directory):  # a new directory whose files could not be written is not left behind
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(directory) from None
            raise CheckpointError(f"checkpoint directory '{directory}' cannot be created: {exc.strerror}") from None
        if not os.access(directory, os.W_OK):
            raise CheckpointError(f"checkpoint directory '{directory}' is not writable")
        _write_checkpoint(model, directory, extra, weights_name, state_dict)
    return directory


def _write_checkpoint(
    model: DiT,
    directory: Path,
    extra: dict[str, Any] | None,
    weights_name: str,
    state_dict: dict[str, torch.Tensor] | None,
) -> None:
    """The weights, then config.json, of :func:`save_checkpoint` into the existing `directory`."""
    config = model.config
    doc: dict[str, Any] = {
        "format": "dynasearch",
        "format_version": FORMAT_VERSION,
        "kind": "sliced" if config.is_sliced else "supernet",
        "model": config.to_dict(),
        "subnet": model.subnet.to_dict(),
    }
    doc.update(extra or {})
    tensors = model.state_dict() if state_dict is None else state_dict
    save_weights(tensors, directory / weights_name, {"format": "dynasearch", "model": config.name})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(doc, indent=2) + "\n")


INHERITED_SECTIONS = ("data",)
"""config.json sections a checkpoint derived from another (an exported subnet or schedule) copies from it."""


def inherited_sections(source: str | Path) -> dict[str, Any]:
    """The INHERITED_SECTIONS of checkpoint `source`'s config.json that it has (e.g. the training data's record)."""
    doc = read_config(source)
    return {key: doc[key] for key in INHERITED_SECTIONS if key in doc}


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint directory, with clear errors."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint '{directory}' does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint '{directory}' is not a directory (expected one holding {CONFIG_NAME})")
    path = directory / CONFIG_NAME
    doc = read_json(path, "checkpoint config", CheckpointError,
                    missing=f"checkpoint '{directory}' has no {CONFIG_NAME}")
    if not isinstance(doc, dict) or "model" not in doc:
        raise CheckpointError(f"checkpoint config '{path}' has no \"model\" section")
    return doc


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weights file '{path}' is corrupt or not a safetensors file ({exc})") from None


def load_checkpoint(
    directory: str | Path, weights_name: str | None = None, device: str | torch.device = "cpu"
) -> DiT:
    """Load a supernet or a sliced model saved by :func:`save_checkpoint` (or a training run directory)."""
    directory = Path(directory)
    doc = read_config(directory)
    try:
        config = DiTConfig.from_dict(doc["model"])
        config.check_memory()
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{directory / CONFIG_NAME}': {exc}") from None
    names = (weights_name,) if weights_name else WEIGHT_NAMES
    weights = next((directory / n for n in names if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"checkpoint '{directory}' has no weights file ({' or '.join(names)})")
    state = load_weights(weights)
    model = DiT(config)
    load_state(model, state, str(weights))
    if doc.get("subnet") and not config.is_sliced:
        try:
            model.set_subnet(Subnet.from_dict(doc["subnet"]))
        except SubnetError as exc:
            raise CheckpointError(f"checkpoint config '{directory / CONFIG_NAME}': {exc}") from None
    return model.to(device).eval()


def read_schedule(doc: dict[str, Any], config: DiTConfig, source: str | Path) -> SubnetSchedule | None:
    """The timestep schedule a checkpoint's config carries (None for static models), checked against `config`."""
    if doc.get("schedule") is None:
        return None
    try:
        schedule = SubnetSchedule.from_dict(doc["schedule"])
        schedule.validate(config)
    except SubnetError as exc:
        raise CheckpointError(f"checkpoint config '{Path(source) / CONFIG_NAME}': schedule: {exc}") from None
    return schedule


def check_state_dict(
    model: DiT, state: dict[str, torch.Tensor], source: str, optional: Callable[[str], bool] = lambda _k: False
) -> None:
    """Raise CheckpointError unless `state` has every tensor of `model` (but `optional` ones) with the right shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    where = (f"model '{model.config.name}' at "
             f"{model.config.input_size}x{model.config.input_size}x{model.config.in_channels}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. '{unexpected[0]}'")
        raise CheckpointError(f"{source} does not fit {where}: {'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source} does not fit {where}: '{key}' has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )


def load_state(model: DiT, state: dict[str, torch.Tensor], source: str, allow_missing_router: bool = False) -> None:
    optional = (lambda k: ".token_router." in k) if allow_missing_router else (lambda _k: False)
    check_state_dict(model, state, f"'{source}'", optional)
    model.load_state_dict(state, strict=not allow_missing_router)






