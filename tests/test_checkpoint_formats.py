"""Every DiT checkpoint format `load_pretrained` and `--init-from` read: the raw state dict, DiT's and fast-DiT's
training checkpoints (EMA weights by default, `#model` / `weights="model"` for the raw ones; argparse.Namespace the
one class allowed), and what is refused with one line: any other pickled object (whose code never runs), corrupt
files, missing tensors, a weights choice that picks nothing. Also the two config fields diffusers needs."""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_inputs

from dynasearch.checkpoint.dit import load_dit_state_dict
from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint
from dynasearch.checkpoint.pretrained import load_pretrained, read_pretrained
from dynasearch.errors import CheckpointError, ConfigError
from dynasearch.model import DiT, DiTConfig, get_config
from dynasearch.model.dit import TimestepEmbedder

MARKER_ENV = "DYNASEARCH_FORMATS_PWNED"


class _Payload:
    """Unpickling this runs code: it creates the file named by $DYNASEARCH_FORMATS_PWNED."""

    def __reduce__(self) -> tuple:
        code = f"import os; open(os.environ.get('{MARKER_ENV}', os.devnull), 'w').close()"
        return (exec, (code,))


class _Thing:
    """A harmless object of a class that is not argparse.Namespace: still refused."""

    def __init__(self) -> None:
        self.value = 3


def _raw(model: DiT) -> dict[str, torch.Tensor]:
    """The state dict DiT's code saves: no token routers."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".token_router." not in k}


def _outputs(model: DiT) -> torch.Tensor:
    x, t, y = model_inputs(model.config, batch=3, seed=5)
    with torch.no_grad():
        return model.eval()(x, t, y)


def _dit_args(**extra: object) -> argparse.Namespace:
    """The `args` DiT's train.py stores in its checkpoints."""
    return argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-N/2", image_size=256,
                              num_classes=10, epochs=1400, global_batch_size=256, global_seed=0, vae="ema",
                              num_workers=4, log_every=100, ckpt_every=50_000, **extra)


def _opt_state(model: DiT) -> dict:
    """A real AdamW state dict after one step (tensors, ints, floats, tuples, bools, None)."""
    model = copy.deepcopy(model)  # the step must not move the weights the test compares with
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad][:3], lr=1e-4, weight_decay=0)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


@pytest.fixture
def pair(tiny_config: DiTConfig) -> tuple[DiT, DiT]:
    """Two different DiT-N/2 models: the raw training weights and their EMA."""
    return make_model(tiny_config, seed=1), make_model(tiny_config, seed=2)


@pytest.fixture(autouse=True)
def _marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "PWNED"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    return marker


def test_raw_state_dict_loads_exactly(tiny_model: DiT, tmp_path: Path) -> None:
    torch.save(_raw(tiny_model), tmp_path / "raw.pt")
    loaded = load_pretrained(tmp_path / "raw.pt")
    assert loaded.config == tiny_model.config and not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(tiny_model))
    assert read_pretrained(tmp_path / "raw.pt").kind == "dit"


def test_dit_training_checkpoint_gives_ema_by_default_and_model_on_request(
    pair: tuple[DiT, DiT], tmp_path: Path
) -> None:
    raw, ema = pair
    path = tmp_path / "0400000.pt"
    torch.save({"model": _raw(raw), "ema": _raw(ema), "opt": _opt_state(raw), "args": _dit_args()}, path)
    want_raw, want_ema = _outputs(raw), _outputs(ema)
    assert not torch.allclose(want_raw, want_ema)
    assert torch.equal(_outputs(load_pretrained(path)), want_ema)
    assert torch.equal(_outputs(load_pretrained(f"{path}#ema")), want_ema)
    assert torch.equal(_outputs(load_pretrained(f"{path}#model")), want_raw)
    assert torch.equal(_outputs(load_pretrained(path, weights="model")), want_raw)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for the call only
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # so a plain weights_only load still refuses it


def test_fast_dit_checkpoint_with_wrapped_keys(pair: tuple[DiT, DiT], tmp_path: Path) -> None:
    """fast-DiT's layout: the same dict, the raw weights of a DDP / torch.compile wrapper (prefixed keys)."""
    raw, ema = pair
    args = _dit_args(feature_path="features", mixed_precision="fp16")
    wrapped = {f"module._orig_mod.{k}": v for k, v in _raw(raw).items()}
    path = tmp_path / "fast.pt"
    torch.save({"model": wrapped, "ema": _raw(ema), "opt": _opt_state(raw), "args": args}, path)
    assert torch.equal(_outputs(load_pretrained(path)), _outputs(ema))
    state = load_dit_state_dict(f"{path}#model")
    assert set(state) == set(_raw(raw))
    assert torch.equal(_outputs(load_pretrained(f"{path}#model")), _outputs(raw))


def test_a_checkpoint_of_only_model_weights_loads_them(pair: tuple[DiT, DiT], tmp_path: Path) -> None:
    raw, _ema = pair
    torch.save({"model": _raw(raw), "args": _dit_args()}, tmp_path / "m.pt")
    assert torch.equal(_outputs(load_pretrained(tmp_path / "m.pt")), _outputs(raw))
    with pytest.raises(CheckpointError, match=r"has no 'ema' weights \(it holds 'model', 'args'\)") as info:
        load_pretrained(f"{tmp_path / 'm.pt'}#ema")
    assert str(tmp_path / "m.pt") in str(info.value)


@pytest.mark.parametrize("where", ["top", "in_args", "in_opt", "beside_the_state", "harmless_class"])
def test_any_other_object_is_refused_naming_it_and_no_code_runs(
    tiny_model: DiT, tmp_path: Path, _marker: Path, where: str
) -> None:
    state = _raw(tiny_model)
    evil: object = _Thing() if where == "harmless_class" else _Payload()
    obj = {
        "top": evil,
        "in_args": {"model": state, "ema": state, "args": _dit_args(hook=evil)},
        "in_opt": {"model": state, "ema": state, "opt": {"state": {}, "param_groups": [{"x": evil}]},
                   "args": _dit_args()},
        "beside_the_state": {**state, "extra": evil},
        "harmless_class": {"model": state, "ema": state, "args": evil},
    }[where]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    name = f"{__name__}._Thing" if where == "harmless_class" else "exec"
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "refused" in message and f"'{name}'" in message, message
    assert not _marker.exists(), "the pickled code ran"
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_the_payload_is_live(tmp_path: Path, _marker: Path) -> None:
    """Guard: an unsafe load really runs it (so 'never ran' above means something)."""
    torch.save({"x": _Payload()}, tmp_path / "e.pt")
    torch.load(tmp_path / "e.pt", weights_only=False)
    assert _marker.exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "not_tensors", "empty_dict"])
def test_corrupt_files_are_one_line_naming_the_file(tiny_model: DiT, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 not a torch file" * 10)
    elif kind == "truncated":
        torch.save({"model": _raw(tiny_model), "ema": _raw(tiny_model), "args": _dit_args()}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_tensors":
        torch.save({"ema": {"a": 1}, "args": _dit_args()}, path)
    else:
        torch.save({}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_misshapen_tensors_are_named(tiny_model: DiT, tmp_path: Path) -> None:
    state = _raw(tiny_model)
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.weight"}
    torch.save({"model": state, "ema": missing, "args": _dit_args()}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\) e.g. 'blocks.1.mlp.fc2.weight'") as info:
        load_pretrained(tmp_path / "m.pt")
    assert str(tmp_path / "m.pt") in str(info.value)
    # the other is whole
    assert torch.equal(_outputs(load_pretrained(f"{tmp_path / 'm.pt'}#model")), _outputs(tiny_model))
    bent = {**state, "blocks.0.attn.proj.weight": torch.zeros(32, 16)}
    torch.save({"ema": bent}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.proj.weight' has shape \(32, 16\), expected \(32, 32\)"):
        load_pretrained(tmp_path / "s.pt")


def test_weights_choices_that_pick_nothing_are_refused(tiny_model: DiT, tmp_path: Path) -> None:
    torch.save(_raw(tiny_model), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="plain state dict, not a training checkpoint: '#model' picks nothing"):
        load_pretrained(f"{tmp_path / 'raw.pt'}#model")
    with pytest.raises(CheckpointError, match="unknown weights '#latest'; use #ema or #model"):
        load_pretrained(f"{tmp_path / 'raw.pt'}#latest")
    with pytest.raises(CheckpointError, match="weights must be one of ema, model, got 'best'"):
        load_pretrained(tmp_path / "raw.pt", weights="best")
    save_checkpoint(tiny_model, tmp_path / "ours")
    with pytest.raises(CheckpointError, match="is a directory: '#model' only picks"):
        load_pretrained(f"{tmp_path / 'ours'}#model")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(f"{tmp_path / 'nothing.pt'}#model")


def test_a_file_whose_name_holds_a_hash_is_read_as_named(tiny_model: DiT, tmp_path: Path) -> None:
    torch.save(_raw(tiny_model), tmp_path / "run#3.pt")
    assert torch.equal(_outputs(load_pretrained(tmp_path / "run#3.pt")), _outputs(tiny_model))


def test_init_from_a_training_checkpoint_takes_the_chosen_weights(pair: tuple[DiT, DiT], tmp_path: Path) -> None:
    from dynasearch.train import TrainConfig, train_supernet

    raw, ema = pair
    ckpt = tmp_path / "dit.pt"
    torch.save({"model": _raw(raw), "ema": _raw(ema), "opt": _opt_state(raw), "args": _dit_args()}, ckpt)
    for source, want in ((str(ckpt), ema), (f"{ckpt}#model", raw)):
        out = tmp_path / f"run-{len(source)}"
        cfg = TrainConfig(model=None, steps=1, batch_size=8, lr=1e-9, warmup_steps=0, sandwich=0, device="cpu",
                          out=str(out), init_from=source, reorder=False, log_every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_supernet(cfg, progress=False)
        doc = json.loads((out / "config.json").read_text())
        assert doc["init"]["kind"] == "dit" and doc["init"]["from"] == source
        from safetensors.torch import load_file

        trained = load_file(str(out / "raw.safetensors"))
        for key, value in _raw(want).items():
            torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0, msg=key)  # lr 1e-9: barely moved


# --- the config fields diffusers needs ---------------------------------------------------------------------------
def test_time_shift_and_mlp_norm_eps_default_to_dit_and_are_written_only_when_set(
    tiny_model: DiT, tmp_path: Path
) -> None:
    config = tiny_model.config
    assert (config.time_shift, config.mlp_norm_eps) == (0.0, 1e-6)
    # older files stay as they were
    assert "time_shift" not in config.to_dict() and "mlp_norm_eps" not in config.to_dict()
    assert DiTConfig.from_dict(config.to_dict()) == config
    other = config.replace(time_shift=1.0, mlp_norm_eps=1e-5)
    assert other.to_dict()["time_shift"] == 1.0 and other.to_dict()["mlp_norm_eps"] == 1e-5
    model = make_model(other, seed=4)
    save_checkpoint(model, tmp_path / "c")
    back = load_checkpoint(tmp_path / "c")
    assert back.config == other and back.blocks[1].norm2.eps == 1e-5 and back.t_embedder.freq_shift == 1.0
    assert torch.equal(_outputs(back), _outputs(model))
    assert not torch.allclose(_outputs(model), _outputs(make_model(config, seed=4)))  # the fields change the function


def test_sliced_blocks_keep_the_mlp_norm_eps(tiny_config: DiTConfig) -> None:
    from dynasearch.model.subnet import Subnet
    from dynasearch.slicing import slice_subnet

    model = make_model(tiny_config.replace(mlp_norm_eps=1e-5, time_shift=1.0), seed=3)
    sub = Subnet.uniform(model.config, attn_rate=0.5, mlp_rate=0.5)
    small = slice_subnet(model, sub)
    assert all(b.norm2.eps == 1e-5 for b in small.blocks) and small.config.mlp_norm_eps == 1e-5
    model.set_subnet(sub)
    torch.testing.assert_close(_outputs(small), _outputs(model), rtol=1e-5, atol=1e-6)


def test_timestep_features_with_a_frequency_shift() -> None:
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    for shift in (0.0, 1.0):
        emb = TimestepEmbedder.timestep_embedding(t, 256, shift=shift)
        k = torch.arange(128, dtype=torch.float64)
        freqs = torch.exp(-math.log(10000.0) * k / (128 - shift))
        args = t.double()[:, None] * freqs[None]
        want = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        torch.testing.assert_close(emb.double(), want, rtol=0, atol=1e-4)
    assert not torch.allclose(TimestepEmbedder.timestep_embedding(t, 256, shift=1.0),
                              TimestepEmbedder.timestep_embedding(t, 256))


@pytest.mark.parametrize("key, value", [("time_shift", float("nan")), ("time_shift", -1.0), ("time_shift", 128.0),
                                        ("mlp_norm_eps", 0.0), ("mlp_norm_eps", float("inf")), ("mlp_norm_eps", True)])
def test_bad_values_of_the_new_fields_are_named(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        get_config("DiT-N/2", **{key: value})


def test_an_older_config_json_without_the_fields_loads(tiny_model: DiT, tmp_path: Path) -> None:
    save_checkpoint(tiny_model, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "time_shift" not in doc["model"]
    assert load_checkpoint(tmp_path / "old").config == tiny_model.config
