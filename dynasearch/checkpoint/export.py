"""`dynasearch export`: any pretrained format in, a diffusers DiTTransformer2DModel folder or a dynasearch checkpoint
out, written as one transaction (a temporary folder renamed into place)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .diffusers import (
    DIFFUSERS_TIME_SHIFT,
    DIFFUSERS_WEIGHTS,
    check_export_dir,
    save_diffusers,
    write_folder,
)
from .dit import split_weights_choice
from .native import CONFIG_NAME, FORMAT_VERSION, read_config
from .pretrained import build_pretrained, load_pretrained, read_pretrained

__all__ = ["EXPORT_FORMATS", "ExportConfig", "ExportResult", "export_checkpoint"]

WEIGHTS = "model.safetensors"
EXPORT_FORMATS = ("diffusers", "dynasearch")
"""diffusers: a DiTTransformer2DModel folder; dynasearch: our checkpoint (config.json + model.safetensors)."""


@dataclass(frozen=True)
class ExportConfig:
    """What `dynasearch export` writes: `checkpoint` (any load_pretrained format) as `format` into `out`."""

    checkpoint: str
    out: str
    format: str = "diffusers"
    pad: bool = False  # diffusers: write a narrower subnet zero-padded to full width
    allow_time_shift: bool = False  # diffusers: write a model with DiT's timestep shift 0 anyway
    overwrite: bool = False  # replace an existing non-empty `out`


@dataclass(frozen=True)
class ExportResult:
    """What was written."""

    out: Path
    format: str
    model: str
    weights_bytes: int  # size of the written weights file
    padded: bool  # diffusers: a narrower subnet written zero-padded to full width


def export_checkpoint(cfg: ExportConfig) -> ExportResult:
    """Write `cfg.checkpoint` as `cfg.format` into `cfg.out` (checked before anything is read or written)."""
    if cfg.format not in EXPORT_FORMATS:
        raise CheckpointError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {cfg.format!r}")
    source, _choice = split_weights_choice(cfg.checkpoint)
    out = Path(cfg.out)
    if not source.exists():
        raise CheckpointError(f"--checkpoint '{cfg.checkpoint}' does not exist")
    if source.resolve() == out.resolve() or source.resolve() in out.resolve().parents:
        raise CheckpointError(f"--out '{out}' is (inside) the --checkpoint '{source}' it would be written from")
    check_export_dir(out, cfg.overwrite)
    doc = _dynasearch_doc(source)
    if cfg.format == "dynasearch":
        if doc is not None:
            raise CheckpointError(f"--checkpoint '{source}' is already a dynasearch checkpoint; nothing to convert")
        return _write_dynasearch(cfg, out)
    if doc is not None and doc.get("schedule") is not None:
        raise CheckpointError(
            f"--checkpoint '{source}' is a timestep schedule (a subnet per range of timesteps): diffusers' "
            "DiTTransformer2DModel runs one network at every step; export one of its subnets instead"
        )
    model = load_pretrained(cfg.checkpoint, what="--checkpoint")
    if cfg.allow_time_shift and model.config.time_shift != DIFFUSERS_TIME_SHIFT:
        warnings.warn(
            f"'{source}' embeds timesteps with frequency shift {model.config.time_shift:g}; diffusers runs the "
            f"written model with {DIFFUSERS_TIME_SHIFT:g}, so its outputs differ from this model's",
            UserWarning,
            stacklevel=2,
        )
    padded = any(c.heads < model.config.num_heads or c.mlp_hidden < 4 * model.config.hidden_size
                 for c in model.subnet.blocks)
    save_diffusers(model, out, pad=cfg.pad, allow_time_shift=cfg.allow_time_shift, overwrite=cfg.overwrite)
    return ExportResult(out, "diffusers", model.config.name, (out / DIFFUSERS_WEIGHTS).stat().st_size, padded)


def _dynasearch_doc(source: Path) -> dict[str, Any] | None:
    """The config.json of a dynasearch checkpoint directory (None for other formats)."""
    if not source.is_dir() or not (source / CONFIG_NAME).is_file():
        return None
    try:
        doc = read_config(source)
    except CheckpointError:
        return None  # e.g. a diffusers folder: its config.json has no "model" section; load_pretrained says more
    return doc if doc.get("format") == "dynasearch" or "model" in doc else None


def _write_dynasearch(cfg: ExportConfig, out: Path) -> ExportResult:
    """A DiT .pt or diffusers folder as a dynasearch checkpoint (routers freshly initialised, as with --init-from)."""
    loaded = read_pretrained(cfg.checkpoint, what="--checkpoint")
    model = build_pretrained(loaded, cfg.checkpoint)
    doc = {
        "format": "dynasearch",
        "format_version": FORMAT_VERSION,
        "kind": "supernet",
        "model": model.config.to_dict(),
        "subnet": model.subnet.to_dict(),
        "source": {"format": loaded.kind, "path": os.fspath(cfg.checkpoint)},
    }
    json.dumps(doc)  # fail before writing anything if something is not JSON
    write_folder(out, {WEIGHTS: model.state_dict()}, {CONFIG_NAME: doc})
    return ExportResult(out, "dynasearch", model.config.name, (out / WEIGHTS).stat().st_size, False)
