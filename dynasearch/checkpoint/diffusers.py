"""diffusers' `DiTTransformer2DModel` folders, both ways: its config.json and tensors mapped onto our DiT and back.

Read with the safetensors library alone (diffusers need not be installed). The two models compute the same
function once three things line up: diffusers' sinusoidal timestep features use a frequency shift of 1 (DiT: 0),
its LayerNorm before each MLP uses `norm_eps` (1e-5 by default; DiT: 1e-6), and every diffusers block holds its
own copy of the timestep and label embedders (DiT has one). The first two are DiTConfig fields (`time_shift`,
`mlp_norm_eps`); the embedders must be equal in every block to load, and are copied into every block on export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import check_new_dir, disk_full, is_disk_full
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text, read_json, replaced_on_success
from ..model.config import DIT_CONFIGS, DiTConfig
from ..model.dit import DiT, get_2d_sincos_pos_embed
from .dit import safe_torch_load

__all__ = [
    "DIFFUSERS_WEIGHTS",
    "config_from_diffusers",
    "diffusers_config",
    "is_diffusers_dir",
    "read_diffusers",
    "save_diffusers",
    "state_from_diffusers",
    "state_to_diffusers",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the second: DiT folders written before diffusers 0.28
_DEFAULTS: dict[str, Any] = {  # DiTTransformer2DModel's constructor defaults, for keys a config.json leaves out
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
_REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False}
DIFFUSERS_TIME_SHIFT = 1.0  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(256, True, downscale_freq_shift=1)
_EMBEDDERS = {  # ours -> the name inside each diffusers block's norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}
_LABELS = "y_embedder.embedding_table.weight"


# --- reading ----------------------------------------------------------------------------------------------------
def is_diffusers_dir(path: Path) -> bool:
    """Whether `path` is a diffusers model folder (config.json with `_class_name`) or a pipeline (model_index.json)."""
    if (path / "model_index.json").is_file():
        return True
    try:
        doc = read_json(path / "config.json", "config")
    except Exception:  # unreadable: not recognisably diffusers; the dynasearch reader names the problem
        return False
    return isinstance(doc, dict) and "_class_name" in doc


def read_diffusers(path: str | Path) -> tuple[DiTConfig, dict[str, torch.Tensor], Path]:
    """Our config and state dict (without token routers) of a diffusers DiT folder, and the weights file read."""
    path = Path(path)
    if (path / "model_index.json").is_file():  # a DiTPipeline: the transformer is in its own folder
        if not (path / "transformer" / "config.json").is_file():
            raise CheckpointError(f"diffusers pipeline '{path}' has no transformer/config.json")
        path = path / "transformer"
    doc = read_json(path / "config.json", "diffusers config", CheckpointError)
    config = config_from_diffusers(doc, path / "config.json")
    tensors, source = _read_tensors(path)
    return config, state_from_diffusers(tensors, config, f"diffusers weights '{source}'"), source


def config_from_diffusers(doc: Any, source: str | Path = "diffusers config") -> DiTConfig:
    """Our DiTConfig for a DiTTransformer2DModel config.json (its fields; missing ones take diffusers' defaults)."""
    where = f"diffusers config '{source}'"
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    cls = doc.get("_class_name")
    if cls not in _CLASSES:
        raise CheckpointError(f"{where} describes a {cls}, not a DiTTransformer2DModel")
    cfg = {**_DEFAULTS, **doc}
    if cls == "Transformer2DModel" and doc.get("patch_size") is None:
        raise CheckpointError(f"{where} describes a Transformer2DModel without patch_size, not a DiT")
    for key, want in _REQUIRED.items():
        if cfg[key] != want:
            raise CheckpointError(f"{where}: {key} is {cfg[key]!r}; dynasearch's DiT needs {want!r}")
    for key in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
        if doc.get(key) is not None:
            raise CheckpointError(f"{where}: {key} {doc[key]!r} has no counterpart in dynasearch's DiT")
    ints = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
            "num_embeds_ada_norm")
    for key in ints:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    in_ch = cfg["in_channels"]
    out_ch = in_ch if cfg["out_channels"] is None else cfg["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{where}: out_channels {out_ch!r} is neither in_channels {in_ch} nor twice it")
    heads, depth, patch = cfg["num_attention_heads"], cfg["num_layers"], cfg["patch_size"]
    hidden = heads * cfg["attention_head_dim"]
    name = next((n for n, f in DIT_CONFIGS.items()
                 if (f["depth"], f["hidden_size"], f["num_heads"], f["patch_size"]) == (depth, hidden, heads, patch)),
                "custom")
    try:
        config = DiTConfig(
            name=name, input_size=cfg["sample_size"], patch_size=patch, in_channels=in_ch, hidden_size=hidden,
            depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=cfg["num_embeds_ada_norm"],
            class_dropout_prob=0.1, learn_sigma=out_ch == 2 * in_ch, time_shift=DIFFUSERS_TIME_SHIFT,
            mlp_norm_eps=float(cfg["norm_eps"]) if isinstance(cfg["norm_eps"], (int, float)) else cfg["norm_eps"],
        )
        config.check_memory()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return config


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a diffusers model folder: one safetensors file, a sharded index, or a legacy .bin."""
    single, index = path / DIFFUSERS_WEIGHTS, path / f"{DIFFUSERS_WEIGHTS}.index.json"
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        doc = read_json(index, "diffusers weight index", CheckpointError)
        shards = sorted(set(doc.get("weight_map", {}).values())) if isinstance(doc, dict) else []
        if not shards or not all(isinstance(s, str) and "/" not in s for s in shards):
            raise CheckpointError(f"diffusers weight index '{index}' has no valid weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(_load_safetensors(path / shard))
        return tensors, index
    legacy = path / "diffusion_pytorch_model.bin"
    if legacy.is_file():
        obj = safe_torch_load(legacy, "diffusers weights")
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"diffusers weights '{legacy}' are not a state dict of tensors")
        return obj, legacy
    raise CheckpointError(f"diffusers folder '{path}' has no weights ({DIFFUSERS_WEIGHTS})")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with one-line errors."""
    if not file.is_file():
        raise CheckpointError(f"diffusers weights '{file}' do not exist")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"diffusers weights '{file}' are corrupt or not a safetensors file ({exc})") from None


def state_from_diffusers(tensors: dict[str, torch.Tensor], config: DiTConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict (no token routers) of a DiTTransformer2DModel's tensors; names what is missing or extra."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"{source} lack the tensor '{key}' of a DiTTransformer2DModel")
        used.add(key)
        return tensors[key]

    state: dict[str, torch.Tensor] = {}
    for ours, theirs in (("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
                         ("final_layer.linear", "proj_out_2")):
        for part in ("weight", "bias"):
            state[f"{ours}.{part}"] = take(f"{theirs}.{part}")
    for i in range(config.depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            state[f"{b}attn.qkv.{part}"] = torch.cat([take(f"{t}attn1.to_{x}.{part}") for x in "qkv"])
            state[f"{b}attn.proj.{part}"] = take(f"{t}attn1.to_out.0.{part}")
            state[f"{b}mlp.fc1.{part}"] = take(f"{t}ff.net.0.proj.{part}")
            state[f"{b}mlp.fc2.{part}"] = take(f"{t}ff.net.2.{part}")
            state[f"{b}adaLN_modulation.1.{part}"] = take(f"{t}norm1.linear.{part}")
        shared = {f"{ours}.{part}": f"{theirs}.{part}"
                  for ours, theirs in _EMBEDDERS.items() for part in ("weight", "bias")}
        shared[_LABELS] = "class_embedder.embedding_table.weight"
        for ours, theirs in shared.items():
            value = take(f"{t}norm1.emb.{theirs}")
            if i == 0:
                state[ours] = value
            elif value.shape != state[ours].shape or not torch.equal(value, state[ours]):
                raise CheckpointError(
                    f"{source}: block {i}'s '{t}norm1.emb.{theirs}' differs from block 0's; dynasearch's DiT shares "
                    "one timestep and label embedder, so only folders whose blocks all hold the same ones load"
                )
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{source} hold {len(extra)} tensor(s) dynasearch's DiT has no counterpart for, e.g. "
                              f"'{extra[0]}'")
    pos = get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)  # diffusers' PatchEmbed computes the same
    state["pos_embed"] = torch.from_numpy(pos).float().unsqueeze(0)  # (1, N, D)
    return state


# --- writing ----------------------------------------------------------------------------------------------------
def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel config.json of a (full-width) model `config`."""
    try:
        import diffusers  # optional: only to record the version the folder is meant for

        version = str(diffusers.__version__)
    except ImportError:
        version = "0.28.0"  # the first release with DiTTransformer2DModel
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": version,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": config.head_dim,
        "dropout": 0.0,
        "in_channels": config.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": config.mlp_norm_eps,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": config.num_heads,
        "num_embeds_ada_norm": config.num_classes,
        "num_layers": config.depth,
        "out_channels": config.out_channels,
        "patch_size": config.patch_size,
        "sample_size": config.input_size,
        "upcast_attention": False,
    }


def export_problem(model: DiT, pad: bool, allow_time_shift: bool) -> str | None:
    """Why `model` (running its active subnet) cannot be written as a DiTTransformer2DModel; None when it can."""
    config, subnet = model.config, model.subnet
    full_mlp = 4 * config.hidden_size
    for i, choice in enumerate(subnet.blocks):
        if choice.token_ratio < 1.0:
            return (f"block {i} runs token ratio {choice.token_ratio:g}: diffusers' DiTTransformer2DModel has no "
                    "token selection (export a subnet with token ratio 1 in every block)")
        if choice.mlp_hidden > full_mlp:
            return f"block {i} has an MLP {choice.mlp_hidden} wide: diffusers' DiT MLP is 4 x {config.hidden_size}"
    if config.qk_norm:
        return "it normalises queries and keys (qk_norm): diffusers' DiTTransformer2DModel does not"
    narrower = [i for i, c in enumerate(subnet.blocks) if c.heads < config.num_heads or c.mlp_hidden < full_mlp]
    if narrower and not pad:
        i = narrower[0]
        c = subnet.blocks[i]
        return (f"block {i} runs {c.heads} of {config.num_heads} heads and an MLP {c.mlp_hidden} of {full_mlp} wide: "
                "diffusers' DiTTransformer2DModel has no narrower attention or MLP; pass --pad (Python: pad=True) to "
                "write it zero-padded to the full width (the same outputs, the full model's size and speed)")
    if config.time_shift != DIFFUSERS_TIME_SHIFT and not allow_time_shift:
        return (f"its timestep features use frequency shift {config.time_shift:g} (DiT's) but diffusers' "
                f"DiTTransformer2DModel always uses {DIFFUSERS_TIME_SHIFT:g}, so its outputs would differ; pass "
                "--allow-time-shift (Python: allow_time_shift=True) to write it anyway, as diffusers' own DiT "
                "conversion does")
    return None


def state_to_diffusers(model: DiT) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel tensors of `model`'s active subnet, narrower blocks zero-padded to the full width.

    Zero rows of q, k, v and fc1 and zero columns of the output projection and fc2 add exactly nothing (GELU(0) = 0;
    a head of zero values attends to zeros), so the padded model computes the subnet's function.
    """
    config = model.config
    heads_full, mlp_full, d = config.num_heads, 4 * config.hidden_size, config.head_dim
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.detach().to("cpu").clone().contiguous()  # a copy per key: safetensors refuses shared memory

    sd = dict(model.state_dict())
    for ours, theirs in (("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
                         ("final_layer.linear", "proj_out_2")):
        for part in ("weight", "bias"):
            put(f"{theirs}.{part}", sd[f"{ours}.{part}"])
    labels = sd[_LABELS]  # (classes [+1], D)
    if labels.shape[0] == config.num_classes:  # no null class (class_dropout_prob 0): diffusers always has one
        labels = torch.cat([labels, torch.zeros_like(labels[:1])])
    for i, (block, choice) in enumerate(zip(model.blocks, model.subnet.blocks, strict=True)):
        t = f"transformer_blocks.{i}."
        h, m = choice.heads, choice.mlp_hidden
        qkv_w, qkv_b = block.attn.qkv.active_parameters(h)  # (3*h*d, D), (3*h*d,)
        for j, x in enumerate("qkv"):
            put(f"{t}attn1.to_{x}.weight", _pad_rows(qkv_w[j * h * d:(j + 1) * h * d], heads_full * d))
            put(f"{t}attn1.to_{x}.bias", _pad_rows(qkv_b[j * h * d:(j + 1) * h * d], heads_full * d))
        proj_w, proj_b = block.attn.proj.active_parameters(in_features=h * d)  # (D, h*d), (D,)
        put(f"{t}attn1.to_out.0.weight", F.pad(proj_w, (0, (heads_full - h) * d)))  # (D, H*d)
        put(f"{t}attn1.to_out.0.bias", proj_b)
        fc1_w, fc1_b = block.mlp.fc1.active_parameters(out_features=m)  # (m, D), (m,)
        put(f"{t}ff.net.0.proj.weight", _pad_rows(fc1_w, mlp_full))
        put(f"{t}ff.net.0.proj.bias", _pad_rows(fc1_b, mlp_full))
        fc2_w, fc2_b = block.mlp.fc2.active_parameters(in_features=m)  # (D, m), (D,)
        put(f"{t}ff.net.2.weight", F.pad(fc2_w, (0, mlp_full - m)))  # (D, 4D)
        put(f"{t}ff.net.2.bias", fc2_b)
        for part in ("weight", "bias"):
            put(f"{t}norm1.linear.{part}", sd[f"blocks.{i}.adaLN_modulation.1.{part}"])
            for ours, theirs in _EMBEDDERS.items():
                put(f"{t}norm1.emb.{theirs}.{part}", sd[f"{ours}.{part}"])
        put(f"{t}norm1.emb.class_embedder.embedding_table.weight", labels)
    return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` (r, ...) with zero rows appended up to `rows`."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def save_diffusers(
    model: DiT, directory: str | Path, *, pad: bool = False, allow_time_shift: bool = False, overwrite: bool = False
) -> Path:
    """Write `model` (its active subnet) as a diffusers DiTTransformer2DModel folder; returns the directory.

    `DiTTransformer2DModel.from_pretrained(directory)` then computes the same outputs. A subnet narrower than
    the full model needs `pad=True` (written zero-padded to full width); token ratios below 1, qk_norm and a
    timestep frequency shift other than diffusers' 1 (unless `allow_time_shift`) are refused. The folder appears
    whole or not at all; an existing non-empty `directory` is replaced only with `overwrite=True`.
    """
    directory = Path(directory)
    problem = export_problem(model, pad, allow_time_shift)
    if problem is not None:
        raise CheckpointError(f"model '{model.config.name}' cannot be written as a diffusers DiTTransformer2DModel: "
                              f"{problem}")
    check_export_dir(directory, overwrite)
    doc = diffusers_config(model.config)
    doc["_dynasearch"] = {"model": model.config.name, "subnet": model.subnet.to_dict(),
                          "time_shift": model.config.time_shift}
    tensors = state_to_diffusers(model)
    write_folder(directory, {DIFFUSERS_WEIGHTS: tensors}, {"config.json": doc})
    return directory


def check_export_dir(directory: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse an output that is a file, not writable, or a non-empty directory without `overwrite`."""
    check_new_dir(directory, f"{option}", CheckpointError)
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{option} '{directory}' exists and is not empty; pass --overwrite to replace it")


def write_folder(directory: Path, weights: dict[str, dict[str, torch.Tensor]], docs: dict[str, Any]) -> None:
    """Write safetensors files and JSON documents into a temporary sibling of `directory`, then rename it there."""
    parent = directory.parent
    top_new = next((p for p in [*reversed(directory.parents), directory] if not p.exists()), None)
    tmp = parent / f".{directory.name}.tmp-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, tensors in weights.items():
            plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(plain, str(tmp / name), metadata={"format": "pt"})
        for name, doc in docs.items():
            atomic_write_text(tmp / name, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        with replaced_on_success([directory] if directory.exists() else []):
            os.replace(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if top_new is not None and top_new != directory and top_new.exists():
            shutil.rmtree(top_new, ignore_errors=True)  # parents this call created, now empty
        if is_disk_full(exc):
            raise disk_full(directory) from None
        if isinstance(exc, OSError):
            raise CheckpointError(f"--out '{directory}' cannot be written: {exc.strerror or exc}") from None
        raise
