"""Checkpoints: our safetensors + JSON format, original DiT / fast-DiT `.pt` files, diffusers DiTTransformer2DModel
folders, and `load_pretrained` / `save_diffusers` / `export_checkpoint` over them."""

from .diffusers import read_diffusers, save_diffusers
from .dit import WEIGHT_CHOICES, infer_config_from_state_dict, load_dit_state_dict, load_pretrained_dit
from .export import EXPORT_FORMATS, ExportConfig, ExportResult, export_checkpoint
from .native import (
    CONFIG_NAME,
    FORMAT_VERSION,
    check_state_dict,
    load_checkpoint,
    load_state,
    load_weights,
    read_config,
    read_schedule,
    save_checkpoint,
    save_weights,
)
from .pretrained import PRETRAINED_FORMATS, PretrainedWeights, load_pretrained, read_pretrained

__all__ = [
    "CONFIG_NAME",
    "EXPORT_FORMATS",
    "FORMAT_VERSION",
    "PRETRAINED_FORMATS",
    "WEIGHT_CHOICES",
    "ExportConfig",
    "ExportResult",
    "PretrainedWeights",
    "check_state_dict",
    "export_checkpoint",
    "infer_config_from_state_dict",
    "load_checkpoint",
    "load_dit_state_dict",
    "load_pretrained",
    "load_pretrained_dit",
    "load_state",
    "load_weights",
    "read_config",
    "read_diffusers",
    "read_pretrained",
    "read_schedule",
    "save_checkpoint",
    "save_diffusers",
    "save_weights",
]
