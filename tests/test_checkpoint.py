"""Tests for dynasearch.checkpoint: round trips of supernets (active subnet restored) and sliced models, the config
file, atomic writes, one clear CheckpointError naming the path for every broken checkpoint, and the safe import of
original DiT `.pt` files (weights_only: pickled code is refused and never runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_inputs
from safetensors.torch import load_file, save_file

from dynasearch.checkpoint.dit import (
    infer_config_from_state_dict,
    load_dit_state_dict,
    load_pretrained_dit,
)
from dynasearch.checkpoint.native import (
    FORMAT_VERSION,
    load_checkpoint,
    load_weights,
    read_config,
    save_checkpoint,
    save_weights,
)
from dynasearch.checkpoint.pretrained import load_pretrained
from dynasearch.errors import CheckpointError, DynasearchError
from dynasearch.fileio import atomic_write_bytes
from dynasearch.model import DiT, get_config
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.slicing import slice_subnet

SUBNET = Subnet((BlockChoice(3, 64, 0.5), BlockChoice(2, 96, 0.75)))  # of DiT-N/2 (4 heads, MLP 128, groups of 32)




def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def outputs(model: DiT, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(*model_inputs(model.config, batch=3, seed=seed))


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------
def test_supernet_round_trip_restores_the_active_subnet(tiny_model, tmp_path) -> None:
    tiny_model.set_subnet(SUBNET)
    directory = save_checkpoint(tiny_model, tmp_path / "ckpt", extra={"step": 7})
    assert directory == tmp_path / "ckpt"
    assert listing(directory) == {"config.json", "model.safetensors"}  # no temporary files left behind
    loaded = load_checkpoint(directory)
    assert isinstance(loaded, DiT) and not loaded.training
    assert loaded.config == tiny_model.config and not loaded.config.is_sliced
    assert loaded.subnet == SUBNET
    expected = outputs(tiny_model)
    assert torch.equal(outputs(loaded), expected)
    loaded.set_subnet(Subnet.full(loaded.config))  # and the full model's weights came back too
    tiny_model.set_subnet(Subnet.full(tiny_model.config))
    full = outputs(tiny_model)
    assert torch.equal(outputs(loaded), full) and not torch.allclose(full, expected)


def test_config_json_content(tiny_model, tmp_path) -> None:
    tiny_model.set_subnet(SUBNET)
    save_checkpoint(tiny_model, tmp_path, extra={"step": 7, "note": "x"})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["format"] == "dynasearch" and doc["format_version"] == FORMAT_VERSION == 1
    assert doc["kind"] == "supernet"
    assert doc["model"] == tiny_model.config.to_dict()
    assert doc["model"]["name"] == "DiT-N/2" and doc["model"]["block_heads"] is None
    assert doc["subnet"] == SUBNET.to_dict()
    assert doc["step"] == 7 and doc["note"] == "x"
    assert read_config(tmp_path) == doc
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in tiny_model.state_dict().items())


def test_sliced_model_round_trip(tiny_model, tmp_path) -> None:
    small = slice_subnet(tiny_model, SUBNET)
    save_checkpoint(small, tmp_path / "s")
    doc = read_config(tmp_path / "s")
    assert doc["kind"] == "sliced" and doc["model"]["block_heads"] == [3, 2]
    loaded = load_checkpoint(tmp_path / "s")
    assert loaded.config == small.config and loaded.config.is_sliced
    assert loaded.blocks[0].attn.qkv.weight.shape == (3 * 3 * 8, 32)
    assert torch.equal(outputs(loaded), outputs(small))
    with torch.no_grad():
        assert torch.allclose(outputs(loaded), tiny_model(*model_inputs(tiny_model.config, 3, 0), subnet=SUBNET),
                              atol=1e-5)


def test_state_dict_override_and_weights_name(tiny_model, tmp_path) -> None:
    ema = {k: v + 1.0 if v.is_floating_point() and k != "pos_embed" else v for k, v in tiny_model.state_dict().items()}
    save_checkpoint(tiny_model, tmp_path, weights_name="supernet.safetensors", state_dict=ema)
    assert listing(tmp_path) == {"config.json", "supernet.safetensors"}
    loaded = load_checkpoint(tmp_path)  # found under its other standard name
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])


def test_overwrite_is_atomic_and_leaves_no_temp_files(tiny_model, tmp_path) -> None:
    save_checkpoint(tiny_model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(AttributeError):  # a failing write (not a tensor) ...
        save_weights({"w": "not a tensor"}, tmp_path / "model.safetensors")  # type: ignore[dict-item]
    assert (tmp_path / "model.safetensors").read_bytes() == before  # ... leaves the old file intact
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "config.json", "text, not bytes")  # type: ignore[arg-type]
    assert listing(tmp_path) == {"config.json", "model.safetensors"}  # and no temporary file behind
    assert load_checkpoint(tmp_path).config == tiny_model.config
    atomic_write_bytes(tmp_path / "blob", b"abc")
    assert (tmp_path / "blob").read_bytes() == b"abc"
    assert listing(tmp_path) == {"config.json", "model.safetensors", "blob"}


# ---------------------------------------------------------------------------------------------------------------------
# Broken checkpoints: one CheckpointError naming the path
# ---------------------------------------------------------------------------------------------------------------------
def _other_model():
    return make_model(get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=20), seed=3)


def _break(kind: str, root: Path, tiny_model: DiT) -> tuple[Path, list[str]]:
    """Make a broken checkpoint of `kind` under root; returns (directory, strings the message must contain)."""
    ckpt = root / "ckpt"
    weights = ckpt / "model.safetensors"
    config = ckpt / "config.json"
    if kind == "missing_dir":
        return root / "nope", [str(root / "nope")]
    if kind == "a_file":
        (root / "file").write_text("x")
        return root / "file", [str(root / "file")]
    save_checkpoint(tiny_model, ckpt)
    if kind == "no_config":
        config.unlink()
        return ckpt, [str(ckpt), "config.json"]
    if kind == "invalid_json":
        config.write_text('{"model": {"name": ')
        return ckpt, [str(config), "JSON"]
    if kind == "not_an_object":
        config.write_text("[1, 2]")
        return ckpt, [str(config)]
    if kind == "unknown_key":
        doc = json.loads(config.read_text())
        doc["model"]["wings"] = 2
        config.write_text(json.dumps(doc))
        return ckpt, [str(config), "wings"]
    if kind == "bad_value":
        doc = json.loads(config.read_text())
        doc["model"]["depth"] = 0
        config.write_text(json.dumps(doc))
        return ckpt, [str(config), "depth"]
    if kind == "bad_subnet":
        doc = json.loads(config.read_text())
        doc["subnet"]["blocks"][0]["heads"] = 9
        config.write_text(json.dumps(doc))
        return ckpt, [str(config), "9"]
    if kind == "missing_weights":
        weights.unlink()
        return ckpt, [str(ckpt), "model.safetensors"]
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return ckpt, [str(weights)]
    if kind == "garbage":
        weights.write_bytes(os.urandom(4096))
        return ckpt, [str(weights)]
    if kind == "empty_weights":
        weights.write_bytes(b"")
        return ckpt, [str(weights)]
    if kind == "other_model":
        save_file(_other_model().state_dict(), str(weights))
        return ckpt, [str(weights), "y_embedder.embedding_table.weight", "(21, 32)", "(11, 32)"]
    if kind == "missing_tensor":
        state = tiny_model.state_dict()
        del state["blocks.1.mlp.fc2.bias"]
        save_file(state, str(weights))
        return ckpt, [str(weights), "blocks.1.mlp.fc2.bias"]
    if kind == "extra_tensor":
        save_file({**tiny_model.state_dict(), "blocks.9.attn.qkv.weight": torch.zeros(3)}, str(weights))
        return ckpt, [str(weights), "blocks.9.attn.qkv.weight"]
    raise AssertionError(kind)


BROKEN = [
    "missing_dir", "a_file", "no_config", "invalid_json", "not_an_object", "unknown_key", "bad_value", "bad_subnet",
    "missing_weights", "truncated", "garbage", "empty_weights", "other_model", "missing_tensor", "extra_tensor",
]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_checkpoint_is_one_clear_error(kind: str, tiny_model, tmp_path) -> None:
    directory, needles = _break(kind, tmp_path, tiny_model)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert isinstance(info.value, DynasearchError)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # loading never writes


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
def test_load_weights_errors_name_the_file(kind: str, tiny_model, tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    if kind != "missing":
        save_weights(tiny_model.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"w\.safetensors"):
        load_weights(path)


def test_save_into_an_unwritable_place(tiny_model, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=str(blocker / "sub")):
        save_checkpoint(tiny_model, blocker / "sub")


# ---------------------------------------------------------------------------------------------------------------------
# Original DiT `.pt` checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def _original_state(model: DiT) -> dict[str, torch.Tensor]:
    """The state dict the original DiT code saves: no token routers."""
    state = {k: v.clone() for k, v in model.state_dict().items() if ".token_router." not in k}
    assert len(state) < len(model.state_dict())
    return state


@pytest.mark.parametrize("layout", ["plain", "training", "model_only", "ddp"])
def test_original_dit_checkpoint_imports_exactly(tiny_model, tmp_path, layout: str) -> None:
    state = _original_state(tiny_model)
    decoy = {k: torch.zeros_like(v) for k, v in state.items()}
    obj = {
        "plain": state,
        "training": {"model": decoy, "ema": state, "opt": {"lr": torch.tensor(1e-4)}, "args": {"x": torch.tensor(1)}},
        "model_only": {"model": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "dit.pt"
    torch.save(obj, path)
    loaded_state = load_dit_state_dict(path)
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)  # the EMA weights, not the decoy
    config = infer_config_from_state_dict(loaded_state, str(path))
    assert config == tiny_model.config
    model = DiT(config).eval()
    missing = load_pretrained_dit(model, loaded_state, str(path))
    assert missing and all(".token_router." in k for k in missing)
    assert len(missing) == 4 * config.depth
    assert torch.equal(outputs(model), outputs(tiny_model))


def test_original_dit_import_of_a_registry_config(tmp_path) -> None:
    """DiT-T/4 at 16x16x4, 1000 classes, learn_sigma=False: every inferred field comes from the tensors."""
    source = make_model(get_config("DiT-T/4", input_size=16, in_channels=4, num_classes=1000, learn_sigma=False), 2)
    torch.save({"ema": _original_state(source)}, tmp_path / "t.pt")
    state = load_dit_state_dict(tmp_path / "t.pt")
    config = infer_config_from_state_dict(state)
    assert config == source.config
    model = DiT(config).eval()
    load_pretrained_dit(model, state)
    assert torch.equal(outputs(model), outputs(source))


def test_load_pretrained_reads_every_supported_format(tmp_path) -> None:
    """One call for an original DiT .pt (registry DiT-T/4 at 16x16x4) and for a dynasearch checkpoint directory."""
    source = make_model(get_config("DiT-T/4", input_size=16, in_channels=4, num_classes=1000, learn_sigma=False), 3)
    torch.save({"ema": _original_state(source)}, tmp_path / "dit.pt")
    from_pt = load_pretrained(tmp_path / "dit.pt")
    assert from_pt.config == source.config and not from_pt.training
    assert torch.equal(outputs(from_pt), outputs(source))
    save_checkpoint(source, tmp_path / "ours")
    from_dir = load_pretrained(tmp_path / "ours")
    assert torch.equal(outputs(from_dir), outputs(source))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.pt", "does not exist"),
        (lambda d: d, "directory without config.json"),
        (lambda d: (d / "w.bin").write_bytes(b"x") and d / "w.bin", "not a supported format"),
        (lambda d: (d / "bad.pt").write_bytes(b"not a torch file") and d / "bad.pt", "corrupt or not a PyTorch file"),
    ],
)
def test_load_pretrained_names_the_file_and_what_is_wrong(tmp_path, make, message) -> None:
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_pretrained(path)
    assert str(path) in str(info.value)


def test_original_dit_state_of_unknown_shape_is_refused(tiny_model) -> None:
    state = _original_state(tiny_model)
    with pytest.raises(CheckpointError, match=r"x_embedder\.proj\.weight"):
        infer_config_from_state_dict({k: v for k, v in state.items() if k != "x_embedder.proj.weight"}, "src.pt")
    deeper = {**state, "blocks.2.attn.qkv.bias": state["blocks.1.attn.qkv.bias"]}
    with pytest.raises(CheckpointError, match="depth 3"):
        infer_config_from_state_dict(deeper, "src.pt")
    model = DiT(tiny_model.config)
    broken = {**state, "blocks.0.mlp.fc1.weight": torch.zeros(7, 32)}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        load_pretrained_dit(model, broken, "src.pt")


class _Payload:
    """Pickles to `os.system("touch <marker>")`: unpickling it with an unsafe loader runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("where", ["top", "inside_state", "inside_training_dict"])
def test_pickled_code_is_refused_and_never_runs(tiny_model, tmp_path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    state = _original_state(tiny_model)
    obj = {
        "top": payload,
        "inside_state": {**state, "blocks.0.attn.qkv.weight": payload},
        "inside_training_dict": {"model": state, "ema": state, "opt": payload},
    }[where]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_dit_state_dict(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path) -> None:
    """Guard for the test above: an unsafe loader really runs the payload (so 'never created' means something)."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_tensors", "truncated"])
def test_bad_dit_pt_files(tiny_model, tmp_path, kind: str) -> None:
    path = tmp_path / "x.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 not a torch file" * 10)
    elif kind == "not_tensors":
        torch.save({"a": 1, "b": [2]}, path)
    elif kind == "truncated":
        torch.save(_original_state(tiny_model), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_dit_state_dict(path)
    assert str(path) in str(info.value)
