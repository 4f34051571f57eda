"""Sample files: PNG image grids, `.npz` latent files, and decoding latents with a local diffusers VAE.

`grid_array` tiles images (upscaled by nearest neighbour, so pixel art stays sharp) and `save_grid` writes it as
a PNG; `save_latents` writes the `.npz` layout `load_dataset("npz:PATH")` reads. Every file is written atomically,
and `check_writable` tells before minutes of sampling whether it can be. Latent models (4 channels) are decoded
with a diffusers AutoencoderKL folder: diffusers is an optional extra, imported only when a VAE is loaded.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .device import resolve_device
from .errors import CheckpointError, ConfigError, DynasearchError
from .fileio import atomic_write_bytes

__all__ = [
    "check_vae_folder", "check_writable", "decode_latents", "grid_array", "load_vae", "save_grid", "save_latents",
]

_GRID_CELL_PX = 64  # small images are upscaled (nearest neighbour) to at least this many pixels per side
_GRID_PAD_PX = 2
_GRID_PAD_VALUE = 128  # mid grey: distinct from both the black background and the white ink of digits


# ---------------------------------------------------------------------------------------------------------- files
def grid_array(images: Tensor, nrow: int, scale: int | None = None, pad: int = _GRID_PAD_PX) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] (C = 1 or 3) tiled `nrow` per row into a uint8 (H', W') or (H', W', 3) array.

    Each image is upscaled by an integer factor with nearest neighbour (default: to at least 64 pixels per side,
    so 8x8 pixel art stays sharp); cells are separated by `pad` grey pixels.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"an image grid needs (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ConfigError("an image grid needs at least one image")
    if nrow < 1:
        raise ConfigError(f"images per row must be at least 1, got {nrow}")
    b, c, h, w = images.shape
    scale = max(1, math.ceil(_GRID_CELL_PX / max(h, w))) if scale is None else int(scale)
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    arr = arr.repeat(scale, axis=2).repeat(scale, axis=3)  # (B, C, h*s, w*s) nearest neighbour
    hs, ws = h * scale, w * scale
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = np.full((c, pad + rows * (hs + pad), pad + cols * (ws + pad)), _GRID_PAD_VALUE, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = pad + r * (hs + pad), pad + k * (ws + pad)
        grid[:, top : top + hs, left : left + ws] = arr[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: Tensor, path: str | Path, nrow: int, scale: int | None = None) -> Path:
    """Write `grid_array(images, nrow, scale)` as a PNG (atomically); returns the path."""
    path = Path(path)
    grid = grid_array(images, nrow, scale)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    _write(path, buffer.getvalue())
    return path


def save_latents(latents: Tensor, labels: Sequence[int], path: str | Path, num_classes: int) -> Path:
    """Write latents as an `.npz` with x (N, C, H, W) float32, y (N,) int64 and num_classes (atomically).

    The layout is the one `load_dataset("npz:PATH")` reads; no pickled objects (allow_pickle is never needed).
    """
    path = Path(path)
    x = latents.detach().float().cpu().numpy()
    y = np.asarray(list(labels), dtype=np.int64)
    if x.ndim != 4 or len(x) != len(y):
        raise ConfigError(f"latents {x.shape} and {len(y)} labels do not match")
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y, num_classes=np.int64(num_classes))
    _write(path, buffer.getvalue())
    return path


def check_writable(path: Path) -> None:
    """Raise ConfigError now if `path` cannot be written later (its nearest existing parent is not a writable dir)."""
    if path.is_dir():
        raise ConfigError(f"cannot write '{path}': it is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write '{path}': '{parent}' is not a directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write '{path}': '{parent}' is not writable")


def _write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (parents created); an OSError becomes a one-line ConfigError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write '{path}': {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------- VAE
def check_vae_folder(path: Path) -> None:
    """Raise CheckpointError unless `path` looks like a diffusers AutoencoderKL folder."""
    if not path.exists():
        raise CheckpointError(f"VAE folder '{path}' does not exist")
    if not path.is_dir():
        raise CheckpointError(f"VAE path '{path}' is not a folder (expected a diffusers AutoencoderKL folder)")
    config_file = path / "config.json"
    if not config_file.is_file() and (path / "vae" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is a pipeline folder; pass its VAE sub-folder '{path / 'vae'}'")
    try:
        doc = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"VAE folder '{path}' has no config.json (not a diffusers AutoencoderKL folder)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"VAE config '{config_file}' cannot be read: {exc}") from None
    kind = doc.get("_class_name") if isinstance(doc, dict) else None
    if kind != "AutoencoderKL":
        raise CheckpointError(f"'{path}' holds a {kind or 'non-diffusers'} config, not a diffusers AutoencoderKL")
    if not any(path.glob("diffusion_pytorch_model*")):
        raise CheckpointError(f"VAE folder '{path}' has no weights (diffusion_pytorch_model.safetensors)")


def _import_autoencoder() -> Any:
    """diffusers' AutoencoderKL class (the optional extra, imported here only); DynasearchError without it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DynasearchError(
            "decoding latents with --vae needs the optional 'diffusers' package (pip install diffusers)"
        ) from None
    return AutoencoderKL


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A diffusers AutoencoderKL from a local folder (never downloads), in eval mode on `device`."""
    path = Path(path)
    check_vae_folder(path)
    autoencoder = _import_autoencoder()
    try:
        vae = autoencoder.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds; each means "not a usable VAE folder"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"VAE folder '{path}' cannot be loaded: {first}") from None
    return vae.to(resolve_device(device)).eval()


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor, batch_size: int = 16) -> Tensor:
    """Images (B, 3, H*8, W*8) in [-1, 1] decoded from DiT latents (divided by the VAE's scaling factor first)."""
    scaling = float(getattr(getattr(vae, "config", None), "scaling_factor", None) or 0.18215)
    param = next(vae.parameters())
    images = []
    for chunk in latents.split(batch_size):
        out = vae.decode(chunk.to(device=param.device, dtype=param.dtype) / scaling).sample
        images.append(out.float().cpu().clamp(-1.0, 1.0))
    return torch.cat(images, dim=0)
