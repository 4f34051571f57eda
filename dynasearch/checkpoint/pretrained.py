"""One call for every supported pretrained format: dynasearch checkpoints and original DiT `.pt` files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.dit import DiT
from .dit import infer_config_from_state_dict, load_dit_state_dict, load_pretrained_dit
from .native import CONFIG_NAME, load_checkpoint

__all__ = ["load_pretrained", "PRETRAINED_FORMATS"]

PRETRAINED_FORMATS = ("dynasearch checkpoint directory (config.json + safetensors)", "original DiT .pt / .pth state dict")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """A DiT from any supported format: a dynasearch checkpoint directory, or an original DiT `.pt` state dict.

    Original DiT files load with `weights_only=True` (no code in them ever runs); their token routers keep
    their initialisation, so the loaded supernet runs exactly the pretrained DiT at full width.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"pretrained model '{path}' is a directory without {CONFIG_NAME}")
        return load_checkpoint(path, device=device)
    if not path.exists():
        raise CheckpointError(f"pretrained model '{path}' does not exist")
    if path.suffix.lower() not in (".pt", ".pth"):
        raise CheckpointError(
            f"pretrained model '{path}' is not a supported format; expected one of: {'; '.join(PRETRAINED_FORMATS)}"
        )
    state = load_dit_state_dict(path)
    model = DiT(infer_config_from_state_dict(state, f"DiT checkpoint '{path}'"))
    load_pretrained_dit(model, state, f"DiT checkpoint '{path}'")
    return model.to(device).eval()
