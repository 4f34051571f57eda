"""One call for every supported pretrained format: dynasearch checkpoints, original DiT / fast-DiT `.pt` files
(raw state dicts and training checkpoints) and diffusers `DiTTransformer2DModel` folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import DiTConfig
from ..model.dit import DiT
from .diffusers import is_diffusers_dir, read_diffusers
from .dit import (
    WEIGHT_CHOICES,
    infer_config_from_state_dict,
    load_dit_state_dict,
    load_pretrained_dit,
    split_weights_choice,
)
from .native import (
    CONFIG_NAME,
    WEIGHT_NAMES,
    load_checkpoint,
    load_weights,
    read_config,
)

__all__ = ["PRETRAINED_FORMATS", "PretrainedWeights", "build_pretrained", "load_pretrained", "read_pretrained"]

PRETRAINED_FORMATS = (
    "dynasearch checkpoint directory (config.json + safetensors)",
    "original DiT .pt / .pth: a raw state dict or a DiT / fast-DiT training checkpoint (EMA weights; "
    "'FILE.pt#model' for the raw ones)",
    "diffusers DiTTransformer2DModel folder (config.json + diffusion_pytorch_model.safetensors), "
    "or a DiTPipeline folder holding one in transformer/",
)


@dataclass(frozen=True)
class PretrainedWeights:
    """A pretrained model's architecture and tensors before a DiT is built (what `--init-from` starts from)."""

    config: DiTConfig
    state: dict[str, torch.Tensor] = field(repr=False)
    kind: str  # "dynasearch", "dit" or "diffusers"
    source: Path  # the file or directory the tensors came from
    doc: dict[str, Any] | None = field(default=None, repr=False)  # a dynasearch checkpoint's config.json


def read_pretrained(path: str | Path, weights: str | None = None, what: str = "pretrained model") -> PretrainedWeights:
    """Config and tensors of any supported format (see PRETRAINED_FORMATS); `what` names the input in errors.

    `weights` ("ema" or "model", or a `#ema` / `#model` suffix of the path) picks the weights of a DiT training
    checkpoint; without it the EMA weights load.
    """
    path, choice = split_weights_choice(path)
    if path.is_dir():
        if choice is not None or weights is not None:
            raise CheckpointError(
                f"{what} '{path}' is a directory: '#{choice or weights}' only picks the weights of a .pt training "
                "checkpoint"
            )
        if is_diffusers_dir(path):
            config, state, source = read_diffusers(path)
            return PretrainedWeights(config, state, "diffusers", source)
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{what} '{path}' is a directory without {CONFIG_NAME} (neither a dynasearch checkpoint nor a "
                "diffusers folder)"
            )
        doc = read_config(path)
        try:
            config = DiTConfig.from_dict(doc["model"])
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{what} '{path}': {exc}") from None
        file = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if file is None:
            raise CheckpointError(f"{what} '{path}' has no weights file ({' or '.join(WEIGHT_NAMES)})")
        return PretrainedWeights(config, load_weights(file), "dynasearch", file, doc)
    if not path.exists():
        raise CheckpointError(f"{what} '{path}' does not exist")
    if path.suffix.lower() not in (".pt", ".pth"):
        raise CheckpointError(f"{what} '{path}' is not a supported format; expected one of: "
                              f"{'; '.join(PRETRAINED_FORMATS)}")
    pick = weights if weights is not None else choice
    if weights is not None and choice is not None and weights != choice:
        raise CheckpointError(f"{what} '{path}': '#{choice}' and weights={weights!r} disagree")
    if pick is not None and pick not in WEIGHT_CHOICES:
        raise CheckpointError(f"{what} '{path}': weights must be one of {', '.join(WEIGHT_CHOICES)}, got {pick!r}")
    state = load_dit_state_dict(path, pick)
    return PretrainedWeights(infer_config_from_state_dict(state, f"DiT checkpoint '{path}'"), state, "dit", path)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", weights: str | None = None, what: str = "pretrained model"
) -> DiT:
    """A DiT from any supported format, in eval mode (see PRETRAINED_FORMATS).

    - a dynasearch checkpoint directory loads as :func:`load_checkpoint` does (supernet or sliced subnet);
    - an original DiT `.pt`: a raw state dict, or a DiT / fast-DiT training checkpoint
      (`{"model", "ema", "opt", "args"}`) whose EMA weights load unless `weights="model"` or the path ends in
      `#model`; unpickled with `weights_only=True`, argparse.Namespace the only class allowed, so no code runs;
    - a diffusers `DiTTransformer2DModel` folder (or a DiTPipeline folder): its config mapped onto ours
      (timestep frequency shift 1, its norm_eps) and its tensors renamed, so the outputs equal diffusers'.

    Token routers are not in DiT's or diffusers' formats: they keep their initialisation, so the loaded supernet
    runs exactly the pretrained model at full width.
    """
    plain, choice = split_weights_choice(path)
    if (plain.is_dir() and choice is None and weights is None and not is_diffusers_dir(plain)
            and (plain / CONFIG_NAME).is_file()):
        return load_checkpoint(plain, device=device)  # its subnet and sliced sizes, as saved
    return build_pretrained(read_pretrained(path, weights, what), path, device)


def build_pretrained(loaded: PretrainedWeights, path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """The DiT of what :func:`read_pretrained` read from `path`, in eval mode."""
    if loaded.kind == "dynasearch":
        return load_checkpoint(loaded.source.parent, device=device)  # its subnet and sliced sizes, as saved
    model = DiT(loaded.config)
    load_pretrained_dit(model, loaded.state, f"{_label(loaded.kind)} '{loaded.source}'")
    return model.to(device).eval()


def _label(kind: str) -> str:
    """How errors name a source of `kind`."""
    return {"dit": "DiT checkpoint", "diffusers": "diffusers weights"}.get(kind, "checkpoint")
