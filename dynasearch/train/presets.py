"""Named sets of training hyper-parameters (``--preset``): DiT's fine-tuning recipe for a pretrained model, where the
defaults are tuned for the tiny digits runs. Explicitly given options override a preset's values; the run's
config.json records the preset's name, its values and the values the run used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import TrainingError

__all__ = ["ADAMW_BETAS", "ADAMW_EPS", "PRESETS", "check_preset", "preset_record", "preset_values"]

ADAMW_BETAS = (0.9, 0.999)
"""AdamW's betas in every run: DiT's (torch's defaults)."""
ADAMW_EPS = 1e-8
"""AdamW's eps in every run: DiT's (torch's default)."""

PRESETS: dict[str, dict[str, Any]] = {
    "dit-finetune": {
        # DiT's train.py (and fast-DiT's): AdamW(lr=1e-4, weight_decay=0), betas (0.9, 0.999), a constant learning
        # rate without warm-up, no gradient clipping, EMA decay 0.9999.
        "lr": 1e-4,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "grad_clip": 0.0,
        "ema_decay": 0.9999,
    },
}
"""Preset name -> the argument values it sets (fields shared by TrainConfig and FinetuneConfig)."""


def check_preset(name: str | None) -> None:
    """Raise TrainingError unless `name` is None or a known preset."""
    if name is not None and name not in PRESETS:
        raise TrainingError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")


def preset_values(name: str | None, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The values preset `name` sets (none for None), each replaced by `explicit`'s where given there."""
    check_preset(name)
    values = dict(PRESETS[name]) if name is not None else {}
    return {**values, **{k: v for k, v in (explicit or {}).items() if k in values}}


def preset_record(name: str | None, used: Mapping[str, Any]) -> dict[str, Any] | None:
    """What config.json records about a run's preset: its name, the values it sets, the AdamW betas and eps every run
    uses, and the options that overrode the preset (given explicitly); None without a preset."""
    if name is None:
        return None
    values = PRESETS[name]
    return {
        "name": name,
        "values": dict(values),
        "adamw_betas": list(ADAMW_BETAS),
        "adamw_eps": ADAMW_EPS,
        "overridden": {k: used[k] for k in values if k in used and used[k] != values[k]},
    }
