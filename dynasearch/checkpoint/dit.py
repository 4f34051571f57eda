"""Original DiT checkpoints: raw `.pt` state dicts and DiT / fast-DiT training checkpoints, read with
`weights_only=True` (argparse.Namespace the one class allowed), their config inferred from the tensors."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..model.config import DIT_CONFIGS, DiTConfig
from ..model.dit import DiT
from .native import load_state

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy format: a pickle (protocol 2+)


WEIGHT_CHOICES = ("ema", "model")
"""The weights of a DiT / fast-DiT training checkpoint one may pick (`path.pt#ema`, `path.pt#model`)."""

_ALLOWED_GLOBALS = (argparse.Namespace,)
"""The one class a checkpoint may hold besides tensors and plain containers: the `args` of DiT's train.py."""

_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's wrappers of the saved module


def safe_torch_load(path: Path, what: str = "DiT checkpoint") -> Any:
    """`torch.load(weights_only=True)` with argparse.Namespace (and nothing else) allowed: no code in it ever runs.

    Any other object is refused with one line naming the file and the object.
    """
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if not magic.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError(f"{what} '{path}' is corrupt or not a PyTorch file (neither a zip nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(_ALLOWED_GLOBALS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        refused = found is not None or "WeightsUnpickler error" in str(exc)
        if not refused:  # not an object the safe unpickler turned away: a broken file
            raise CheckpointError(f"{what} '{path}' is corrupt or not a PyTorch file ({_first_line(exc)})") from None
        detail = f"the object '{found.group(1)}'" if found else "pickled objects other than tensors"
        raise CheckpointError(
            f"{what} '{path}' was refused: it holds {detail}; only tensors, plain containers and "
            "argparse.Namespace are loaded, and no code in a checkpoint is ever run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{what} '{path}' is corrupt or not a PyTorch file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def split_weights_choice(path: str | Path) -> tuple[Path, str | None]:
    """`path` without a trailing `#ema` / `#model` (which weights of a training checkpoint to use) and that choice.

    A file whose own name holds the `#` is taken as it is; an unknown choice after an existing file is an error.
    """
    text = str(path)
    if "#" not in text or Path(text).exists():
        return Path(text), None
    base, _, choice = text.rpartition("#")
    if choice in WEIGHT_CHOICES:
        return Path(base), choice
    if Path(base).exists():
        raise CheckpointError(
            f"pretrained model '{text}': unknown weights '#{choice}'; use "
            f"{' or '.join('#' + c for c in WEIGHT_CHOICES)}"
        )
    return Path(text), None


def load_dit_state_dict(path: str | Path, weights: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of an original DiT `.pt`: a raw state dict or a DiT / fast-DiT training checkpoint.

    Training checkpoints (`{"model", "ema", "opt", "args": argparse.Namespace}`) give their EMA weights, as DiT's
    sampler uses, unless `weights` is "model" (or the path ends in `#model`). Unpickled with `weights_only=True`
    and argparse.Namespace as the only class allowed: no code in the file ever runs.
    """
    path, suffix_choice = split_weights_choice(path)
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"DiT checkpoint '{path}': weights must be one of {', '.join(WEIGHT_CHOICES)}, got "
                              f"{weights!r}")
    if weights is not None and suffix_choice is not None and weights != suffix_choice:
        raise CheckpointError(f"DiT checkpoint '{path}': '#{suffix_choice}' and weights={weights!r} disagree")
    choice = weights or suffix_choice
    obj = safe_torch_load(path)
    training = isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in WEIGHT_CHOICES)
    if training:
        picked = choice or next(k for k in WEIGHT_CHOICES if isinstance(obj.get(k), dict))
        if not isinstance(obj.get(picked), dict):
            held = ", ".join(f"'{k}'" for k in obj if isinstance(k, str)) or "no named entries"
            raise CheckpointError(f"DiT checkpoint '{path}' has no '{picked}' weights (it holds {held})")
        obj = obj[picked]
    elif choice is not None:
        raise CheckpointError(
            f"DiT checkpoint '{path}' is a plain state dict, not a training checkpoint: '#{choice}' picks nothing"
        )
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"DiT checkpoint '{path}' is not a state dict of tensors")
    return {_unwrapped(str(k)): v for k, v in obj.items()}


def _unwrapped(key: str) -> str:
    """A state-dict key without DDP's `module.` or torch.compile's `_orig_mod.` prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


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
        (n for n, f in DIT_CONFIGS.items()
         if (f["depth"], f["hidden_size"], f["patch_size"]) == (depth, hidden, patch)),
        None,
    )
    if name is None:
        raise CheckpointError(
            f"{source}: no registry model has depth {depth}, width {hidden} and patch {patch}"
        )
    grid = round(pos.shape[1] ** 0.5)
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
