"""Exponential moving average of a model's weights (the weights a trained supernet is sampled and searched with)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["EMA"]


class EMA:
    """A float32 shadow copy of every tensor of `model.state_dict()`, updated after each optimiser step.

    The decay of update n (1-based) is ``min(decay, (1 + n) / (10 + n))`` when `warmup` is on (the usual
    warm-up of Tensorflow/timm/diffusers): early updates follow the weights closely, so a short run is not
    dominated by the random initialisation (with a plain 0.999 the initial weights still carry 37% of the
    average after 1,000 steps). Integer buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    def decay_at(self, n: int) -> float:
        """The decay used by update `n` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the shadow towards the model's current weights; returns the decay used."""
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        floats_ema, floats_cur = [], []
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                floats_ema.append(shadow)
                floats_cur.append(value.detach().to(shadow.dtype))
            else:
                shadow.copy_(value)
        if floats_ema:
            torch._foreach_lerp_(floats_ema, floats_cur, 1.0 - decay)
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, keyed like the model's state dict."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore the averaged tensors (strict: same keys and shapes) and the update count."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[key].shape):
                raise KeyError(f"EMA state mismatch: '{key}' has shape {tuple(value.shape)}")
            self.shadow[key].copy_(value)
        self.num_updates = int(num_updates)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a copy used for sampling)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
