"""Shared fixtures: tiny configs and tiny models with every parameter re-randomised.

DiT zero-initialises the adaLN modulation and the output layer, so a freshly built model predicts zeros and
hides almost every bug; the model fixtures here re-randomise all trainable parameters after construction.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # the package is not installed in the test venv
    sys.path.insert(0, str(_ROOT))

from dynasearch.model import DiT, DiTConfig, get_config  # noqa: E402


@pytest.fixture(autouse=True)
def _default_sigint():
    """Every test starts with Python's own Ctrl-C handler, as an interactive run does.

    A test runner started in the background (`cmd &`, nohup) inherits SIGINT ignored; the Ctrl-C tests check that a
    search restores the handler it found, so they need a known one.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every trainable parameter (in place) with std 1/sqrt(fan_in) for matrices, 0.1 for vectors.

    Non-trainable parameters (the fixed sin-cos pos_embed) are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel() if "embedding_table" not in name else p.shape[1]
                std = 1.0 / fan_in**0.5
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_model(config: DiTConfig, seed: int = 0) -> DiT:
    """A model of `config` in eval mode with randomised (non-zero) weights."""
    torch.manual_seed(seed)
    model = DiT(config)
    randomize_(model, seed)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def torch_single_thread():
    """Run the suite with one intra-op thread (restored afterwards).

    The test models are tiny: a second thread gains nothing, and on a shared 2-core machine every OpenMP parallel
    region waits for a descheduled thread (thread oversubscription made the model tests ~7x slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> DiTConfig:
    """DiT-N/2 on 8x8x1 inputs: depth 2, hidden 32, 4 heads, MLP 128 (groups of 32), 16 tokens."""
    return get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)


@pytest.fixture
def tiny_model(tiny_config: DiTConfig) -> DiT:
    """DiT-N/2 (tiny_config) with every trainable parameter non-zero, in eval mode."""
    return make_model(tiny_config, seed=0)


@pytest.fixture
def small_config() -> DiTConfig:
    """DiT-T/2 on 8x8x4 inputs: depth 6, hidden 128, 8 heads, MLP 512 (groups of 64), 16 tokens."""
    return get_config("DiT-T/2", input_size=8, in_channels=4, num_classes=10)


@pytest.fixture
def small_model(small_config: DiTConfig) -> DiT:
    """DiT-T/2 (small_config) with every trainable parameter non-zero, in eval mode."""
    return make_model(small_config, seed=1)


def model_inputs(config: DiTConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents, fractional timesteps and labels for `config`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.rand(batch, generator=gen) * 999.0
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    return x, t, y


@pytest.fixture
def inputs_for():
    """Factory fixture: inputs_for(config, batch=2, seed=0) -> (x, t, y)."""
    return model_inputs


def fake_supernet_run(path: Path, name: str = "DiT-N/2", space: str = "blockwise", seed: int = 0) -> Path:
    """A supernet run directory as train-supernet writes it (digits, 8x8x1, 10 classes), random non-zero weights."""
    from dynasearch.checkpoint.native import save_checkpoint
    from dynasearch.model import create_supernet
    from dynasearch.space.search_space import load_space

    torch.manual_seed(seed)
    model = create_supernet(name, input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    extra = {"space": load_space(space).to_dict(), "data": {"spec": "digits", "seed": 0, "val_fraction": 0.1}}
    save_checkpoint(model, path, weights_name="supernet.safetensors", extra=extra)
    return path
