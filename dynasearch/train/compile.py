"""``--compile``: torch.compile of each DiT block of the trained model, and the fall-back to eager execution (with one
warning) wherever compilation is unavailable or fails -- the run always trains.

What is compiled, and why per block: a supernet step runs several subnets, each block with its own head count, MLP
width and token ratio, so the whole model's forward would be a new graph almost every step (a guard per block
choice, the recompile limit reached within a few steps, then eager again). Each block's ``forward`` is compiled on
its own instead (``torch.compile(block.forward, dynamic=None)``: PyTorch's automatic dynamic shapes, with a
contiguous input so the first block guards like the others). A graph then depends on the block's choice only, and
every block of the same structure shares it: the MLP width and the number of routed tokens become symbolic after
their first change, the head count stays specialised (a Python branch on it), as does the choice between all tokens
and routed tokens. Counted with the blockwise space (4 head counts, 3 token ratios; torch 2.13 on the CPU,
2026-12-02): with dynamo's eager backend 6 graphs for DiT-XL/2 (28 blocks) over 60 random subnets and 8 for DiT-N/2
over 150; with inductor (which adds shape guards) 17 for DiT-N/2 over 30 (the last at subnet 26). The embedders, the
final layer, the diffusion loss and the optimiser stay eager. Dynamo's per-code-object recompile limit
(``torch._dynamo.config.recompile_limit``, 8 by default) is raised to :data:`RECOMPILE_LIMIT` for the process; a
block whose graphs still exceed it runs eagerly from then on (PyTorch logs this). A fine-tuned subnet has fixed
shapes: a few graphs in all (one per distinct block choice of its timestep buckets' subnets at most).

A failure -- no dynamo on this platform or Python, no C++ compiler for the CPU backend, a graph the backend cannot
compile -- turns compilation off for the rest of the run with one TrainingWarning and repeats the step eagerly (its
randomness derives from ``(seed, step)``, so nothing is lost or drawn twice).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..model.dit import DiT
from .config import TrainingWarning

__all__ = ["RECOMPILE_LIMIT", "BlockCompiler", "compile_unavailable", "is_compile_failure"]

RECOMPILE_LIMIT = 64
"""Compiled graphs dynamo keeps per code object during a --compile run (raised from PyTorch's default 8)."""

R = TypeVar("R")


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None: it can be tried)."""
    try:
        import torch._dynamo as dynamo
    except Exception as exc:  # any import failure means: no compile here
        return f"torch._dynamo cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if not dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this platform or Python version"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception raised by a compiled forward/backward came from torch.compile itself (dynamo, inductor,
    AOT autograd or the C++/Triton compiler), not from the model or the data."""
    if not isinstance(exc, Exception):
        return False
    for cls in type(exc).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx", "triton")):
            return True
    tb = exc.__traceback__
    while tb is not None:  # the innermost frames: raised inside the compiler stack
        tb_next = tb.tb_next
        if tb_next is None:
            filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
            return any(part in filename for part in ("/torch/_dynamo/", "/torch/_inductor/", "/torch/_functorch/"))
        tb = tb_next
    return False


def _first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, at most 200 characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _contiguous_input(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`compiled` called with a contiguous token tensor: the first block's input (the patch embedding's transposed
    view) would otherwise guard on other strides than every later block's and double the graphs."""

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return compiled(x.contiguous(), *args, **kwargs)  # (B, N, D)

    return forward


@dataclass
class BlockCompiler:
    """The blocks of one model compiled for a run (:meth:`enable`), and the fall-back to eager on failure."""

    model: DiT
    active: bool = False
    fallback: str | None = None  # why compilation was turned off (None: never failed)

    def enable(self) -> bool:
        """Compile each block's forward (lazily: the work happens at the first step); False, with one warning, where
        torch.compile is unavailable."""
        reason = compile_unavailable()
        if reason is None:
            try:
                import torch._dynamo as dynamo

                dynamo.config.recompile_limit = max(int(dynamo.config.recompile_limit), RECOMPILE_LIMIT)
                for block in self.model.blocks:
                    block.forward = _contiguous_input(torch.compile(block.forward, dynamic=None))  # an instance
                    # attribute: the class's forward comes back with `del`, the state dict keeps its keys
            except Exception as exc:  # e.g. "torch.compile is not supported on Python 3.x"
                reason = _first_line(exc)
        if reason is not None:
            self.disable(reason)
            return False
        self.active = True
        return True

    def disable(self, reason: str) -> None:
        """Run every block eagerly from now on, with one warning saying why."""
        for block in self.model.blocks:
            if "forward" in vars(block):
                del block.forward
        if self.active:
            try:
                import torch._dynamo as dynamo

                dynamo.reset()  # drop the compiled graphs (and the half-built one)
            except Exception:  # nothing to drop then
                pass
        self.active, self.fallback = False, reason
        warnings.warn(f"--compile: {reason}; training continues without torch.compile", TrainingWarning, stacklevel=2)

    def run(self, passes: Callable[[], R]) -> R:
        """`passes()` (a step's forward and backward passes); if compilation fails in them, the same passes again
        with every block eager (the step's draws derive from (seed, step), so the repeat is the same step)."""
        if not self.active:
            return passes()
        try:
            return passes()
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            self.disable(f"torch.compile failed ({_first_line(exc)})")
        return passes()
