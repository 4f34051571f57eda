"""The dynamic DiT: configs and registry, head layout, dynamic layers, blocks and model, subnets, rates, schedules."""

from .config import DIT_CONFIGS, DiTConfig, get_config, model_names
from .dit import (
    DiT,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
)
from .layers import (
    Attention,
    DynaLinear,
    DynaQKVLinear,
    Mlp,
    TokenRouter,
    modulate,
)
from .rates import round_to_nearest, tokens_kept

__all__ = [
    "DIT_CONFIGS",
    "Attention",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "DynaLinear",
    "DynaQKVLinear",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "TokenRouter",
    "create_supernet",
    "get_2d_sincos_pos_embed",
    "get_config",
    "model_names",
    "modulate",
    "round_to_nearest",
    "tokens_kept",
]


def create_supernet(name: str, **overrides: object) -> DiT:
    """Build the registry model `name` as a supernet (e.g. input_size=32, in_channels=4, num_classes=1000)."""
    return DiT(get_config(name, **overrides))
