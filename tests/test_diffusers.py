"""diffusers' DiTTransformer2DModel both ways, against diffusers itself: a tiny random diffusers model loads with
outputs equal to diffusers' forward (1e-5 relative), our export loads back in diffusers with equal outputs (full
width, a uniform and a per-block subnet zero-padded), what cannot be represented is refused with one line, and the
folder is written whole or not at all. Nothing is downloaded: every diffusers model is built here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_inputs, randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from dynasearch import save_diffusers  # noqa: E402
from dynasearch.checkpoint.diffusers import DIFFUSERS_WEIGHTS  # noqa: E402
from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint  # noqa: E402
from dynasearch.checkpoint.pretrained import load_pretrained, read_pretrained  # noqa: E402
from dynasearch.cli import main  # noqa: E402
from dynasearch.errors import CheckpointError, DynasearchError  # noqa: E402
from dynasearch.model import DiT, DiTConfig, get_config  # noqa: E402
from dynasearch.model.subnet import BlockChoice, Subnet  # noqa: E402
from dynasearch.slicing import slice_subnet  # noqa: E402

TINY = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}


def _random_diffusers(seed: int = 0, tie: bool = True, **config: object) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel with every parameter random; `tie`: every block holds block 0's embedders (as
    diffusers' conversion of DiT's weights writes them)."""
    torch.manual_seed(seed)
    model = randomize_(DiTTransformer2DModel(**{**TINY, **config}).eval(), seed)
    with torch.no_grad():
        if tie:
            first = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return model


def _inputs(config: DiTConfig, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, integer timesteps over [0, 1000) and labels (the last one the null class)."""
    x, _t, _y = model_inputs(config, batch=batch, seed=3)
    t = torch.linspace(0, 999, batch).long()
    y = torch.arange(batch) % (config.num_classes + 1)
    return x, t, y


def _theirs(model: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def _ours(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x, t, y)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def _exportable(config: DiTConfig, seed: int = 0) -> DiT:
    """A random model of `config` with diffusers' numerics (timestep shift 1, MLP LayerNorm eps 1e-5)."""
    return make_model(config.replace(time_shift=1.0, mlp_norm_eps=1e-5), seed=seed)


def _from_pretrained(path: Path) -> DiTTransformer2DModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DiTTransformer2DModel.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("config", [{}, {"out_channels": None}, {"norm_eps": 1e-3}, {"num_attention_heads": 4}])
def test_a_diffusers_folder_loads_with_diffusers_outputs(tmp_path: Path, config: dict) -> None:
    theirs = _random_diffusers(**config)
    theirs.save_pretrained(str(tmp_path / "dit"))
    ours = load_pretrained(tmp_path / "dit")
    c = ours.config
    assert (c.depth, c.num_heads, c.head_dim, c.num_classes, c.input_size) == (
        2, config.get("num_attention_heads", 2), 8, 10, 8
    )
    assert c.learn_sigma == (config.get("out_channels", 8) == 8)
    assert (c.time_shift, c.mlp_norm_eps) == (1.0, config.get("norm_eps", 1e-5))
    x, t, y = _inputs(c)
    want = _theirs(theirs, x, t, y)
    assert want.abs().max() > 0.1
    assert _rel(_ours(ours, x, t, y), want) <= 1e-5


def test_the_numerics_matter_so_the_test_above_means_something(tmp_path: Path) -> None:
    """With DiT's shift 0 or DiT's eps 1e-6 the same weights give other outputs (diffusers' default eps 1e-5 moves
    these outputs by only ~4e-6 relative, so the eps is checked at 1e-3)."""
    theirs = _random_diffusers(norm_eps=1e-3)
    theirs.save_pretrained(str(tmp_path / "dit"))
    ours = load_pretrained(tmp_path / "dit")
    x, t, y = _inputs(ours.config)
    want = _theirs(theirs, x, t, y)
    for change in ({"time_shift": 0.0}, {"mlp_norm_eps": 1e-6}):
        other = DiT(ours.config.replace(**change))
        other.load_state_dict(ours.state_dict())
        assert _rel(_ours(other, x, t, y), want) > 1e-4, change


def test_a_dit_pipeline_folder_loads_its_transformer(tmp_path: Path) -> None:
    theirs = _random_diffusers(seed=1)
    theirs.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]})
    )
    ours = load_pretrained(tmp_path / "pipe")
    x, t, y = _inputs(ours.config)
    assert _rel(_ours(ours, x, t, y), _theirs(theirs, x, t, y)) <= 1e-5
    assert read_pretrained(tmp_path / "pipe").kind == "diffusers"


def test_blocks_with_their_own_embedders_are_refused(tmp_path: Path) -> None:
    _random_diffusers(tie=False).save_pretrained(str(tmp_path / "dit"))
    with pytest.raises(
        CheckpointError,
        match=r"block 1's 'transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight' differs from block 0's",
    ) as info:
        load_pretrained(tmp_path / "dit")
    assert str(tmp_path / "dit") in str(info.value) and "\n" not in str(info.value)


def test_our_model_exports_to_diffusers_with_equal_outputs(tmp_path: Path, tiny_config: DiTConfig) -> None:
    ours = _exportable(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10), seed=2)
    out = save_diffusers(ours, tmp_path / "exp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", DIFFUSERS_WEIGHTS]
    theirs = _from_pretrained(out)
    x, t, y = _inputs(ours.config)
    want = _ours(ours, x, t, y)
    assert want.abs().max() > 0.1
    assert _rel(_theirs(theirs, x, t, y), want) <= 1e-5
    back = load_pretrained(out)  # and back: the same config (but the name's registry match) and function
    assert back.config == ours.config
    assert _rel(_ours(back, x, t, y), want) <= 1e-6
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


@pytest.mark.parametrize("kind", ["uniform", "per_block"])
def test_a_sliced_subnet_exports_zero_padded_with_equal_outputs(tmp_path: Path, kind: str) -> None:
    supernet = _exportable(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10), seed=3)
    sub = (Subnet.uniform(supernet.config, attn_rate=0.5, mlp_rate=0.5) if kind == "uniform"
           else Subnet((BlockChoice(3, 64, 1.0), BlockChoice(1, 96, 1.0))))
    small = slice_subnet(supernet, sub)
    save_checkpoint(small, tmp_path / "sub")
    with pytest.raises(CheckpointError, match=r"no narrower attention or MLP; pass --pad") as info:
        save_diffusers(small, tmp_path / "exp")
    assert "\n" not in str(info.value) and not (tmp_path / "exp").exists()
    save_diffusers(load_checkpoint(tmp_path / "sub"), tmp_path / "exp", pad=True)
    theirs = _from_pretrained(tmp_path / "exp")
    x, t, y = _inputs(small.config)
    assert _rel(_theirs(theirs, x, t, y), _ours(small, x, t, y)) <= 1e-5
    supernet.set_subnet(sub)  # a supernet running the subnet exports the same thing
    save_diffusers(supernet, tmp_path / "exp2", pad=True)
    assert _rel(_theirs(_from_pretrained(tmp_path / "exp2"), x, t, y), _ours(small, x, t, y)) <= 1e-5


def test_what_diffusers_cannot_run_is_refused_with_one_line(tmp_path: Path, tiny_config: DiTConfig) -> None:
    config = get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    tokens = _exportable(config)
    tokens.set_subnet(Subnet((BlockChoice(4, 128, 1.0), BlockChoice(4, 128, 0.5))))
    born_dit = make_model(config, seed=1)  # DiT's timestep shift 0
    cases = [(tokens, {}, "block 1 runs token ratio 0.5"),
             (born_dit, {}, "frequency shift 0 .* --allow-time-shift"),
             (_exportable(config.replace(qk_norm=True)), {}, "qk_norm")]
    for model, kwargs, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            save_diffusers(model, tmp_path / "exp", **kwargs)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "exp").exists()
    save_diffusers(born_dit, tmp_path / "exp", allow_time_shift=True)  # written on request; diffusers loads it
    x, t, y = _inputs(config)
    assert _theirs(_from_pretrained(tmp_path / "exp"), x, t, y).shape == (3, 8, 8, 8)


def test_the_folder_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dynasearch.checkpoint.diffusers as module

    model = _exportable(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n")
    with pytest.raises(CheckpointError, match="exists and is not empty; pass --overwrite"):
        save_diffusers(model, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]

    def full_disk(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_file", full_disk)
    with pytest.raises(DynasearchError, match="no space left"):
        save_diffusers(model, tmp_path / "busy", overwrite=True)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]  # the old folder is kept
    with pytest.raises(DynasearchError, match="no space left"):
        save_diffusers(model, tmp_path / "new" / "deep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # neither a half folder nor its parents
    monkeypatch.undo()
    save_diffusers(model, tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["config.json", DIFFUSERS_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_export_command_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dynasearch export`: ours -> diffusers -> ours, each step with equal outputs."""
    ours = _exportable(get_config("DiT-N/4", input_size=8, in_channels=4, num_classes=10), seed=5)
    save_checkpoint(ours, tmp_path / "ours")
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote diffusers DiTTransformer2DModel folder" in capsys.readouterr().out
    x, t, y = _inputs(ours.config)
    want = _ours(ours, x, t, y)
    assert _rel(_theirs(_from_pretrained(tmp_path / "hf"), x, t, y), want) <= 1e-5
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--format", "dynasearch",
                 "--out", str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["source"]["format"] == "diffusers"
    assert _rel(_ours(back, x, t, y), want) <= 1e-6
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"), "--overwrite"]) == 0


def test_a_registry_model_round_trips_through_diffusers(tmp_path: Path) -> None:
    """DiT-S/8 (12 blocks, width 384, 6 heads) at 16x16x4 with 1000 classes: diffusers -> ours -> diffusers."""
    theirs = _random_diffusers(seed=7, num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16,
                               patch_size=8, num_embeds_ada_norm=1000)
    theirs.save_pretrained(str(tmp_path / "s8"))
    ours = load_pretrained(tmp_path / "s8")
    assert ours.config.name == "DiT-S/8" and ours.config.num_classes == 1000
    x, t, y = _inputs(ours.config, batch=2)
    want = _theirs(theirs, x, t, y)
    assert _rel(_ours(ours, x, t, y), want) <= 1e-5
    save_diffusers(ours, tmp_path / "again")
    assert _rel(_theirs(_from_pretrained(tmp_path / "again"), x, t, y), want) <= 1e-5
