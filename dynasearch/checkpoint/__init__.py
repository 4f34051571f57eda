"""Checkpoints: our safetensors + JSON format, original DiT `.pt` state dicts, and `load_pretrained` for both."""

from .dit import infer_config_from_state_dict, load_dit_state_dict, load_pretrained_dit
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
from .pretrained import PRETRAINED_FORMATS, load_pretrained

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "PRETRAINED_FORMATS",
    "check_state_dict",
    "infer_config_from_state_dict",
    "load_checkpoint",
    "load_dit_state_dict",
    "load_pretrained",
    "load_pretrained_dit",
    "load_state",
    "load_weights",
    "read_config",
    "read_schedule",
    "save_checkpoint",
    "save_weights",
]
