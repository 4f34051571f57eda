"""Original DiT checkpoints: `.pt` state dicts read with `weights_only=True`, their config inferred from the tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.config import DIT_CONFIGS, DiTConfig
from ..model.dit import DiT
from .native import load_state

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2+)


def load_dit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an original DiT `.pt` checkpoint, unpickled with `weights_only=True` (no code ever runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DiT checkpoint '{path}' does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if not (magic.startswith(_ZIP_MAGIC) or magic.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(f"DiT checkpoint '{path}' is corrupt or not a PyTorch file (neither a zip nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        detail = f" ({detail.rstrip('.')})" if detail else ""
        raise CheckpointError(
            f"DiT checkpoint '{path}' was refused: it holds pickled objects other than tensors{detail}; "
            "only plain state dicts are loaded, and no code in them is ever run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"DiT checkpoint '{path}' is corrupt or not a PyTorch file ({exc})") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # a DiT training checkpoint: prefer the EMA weights, as DiT's sampler does
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"DiT checkpoint '{path}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_config_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> DiTConfig:
    """The DiTConfig of an original-layout DiT state dict (heads from the registry entry of the same shape)."""
    try:
        proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
        table = state["y_embedder.embedding_table.weight"]  # (classes [+1], D)
        pos = state["pos_embed"]  # (1, N, D)
        final = state["final_layer.linear.weight"]  # (p*p*C_out, D)
    except KeyError as exc:
        raise CheckpointError(f"{source} is not in the DiT layout: no '{exc.args[0]}'") from None
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    name = next(
        (n for n, f in DIT_CONFIGS.items() if (f["depth"], f["hidden_size"], f["patch_size"]) == (depth, hidden, patch)),
        None,
    )
    if name is None:
        raise CheckpointError(
            f"{source}: no registry model has depth {depth}, width {hidden} and patch {patch}"
        )
    grid = int(round(pos.shape[1] ** 0.5))
    out_channels = final.shape[0] // (patch * patch)
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return DiTConfig(
        name=name,
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=DIT_CONFIGS[name]["num_heads"],
        mlp_ratio=mlp_hidden / hidden,
        num_classes=table.shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


def load_pretrained_dit(model: DiT, state: dict[str, torch.Tensor], source: str = "state dict") -> list[str]:
    """Load an original-layout DiT state dict into a supernet; token routers keep their initialisation.

    Returns the names of the parameters that were not in the state dict (the routers).
    """
    load_state(model, state, source, allow_missing_router=True)
    return [k for k in model.state_dict() if k not in state]
