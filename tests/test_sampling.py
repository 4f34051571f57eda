"""Sampling: shapes, determinism under a seed, classifier-free guidance, subnets and sliced models, grids, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model

from dynasearch.checkpoint.native import save_checkpoint
from dynasearch.cli import main
from dynasearch.data import load_dataset
from dynasearch.diffusion.gaussian import GaussianDiffusion
from dynasearch.diffusion.samplers import make_sampler, sample
from dynasearch.errors import CheckpointError, ConfigError, DynasearchError, SubnetError
from dynasearch.images import grid_array, load_vae, save_grid, save_latents
from dynasearch.model import get_config
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.sampling import cycle_labels, parse_labels, repeat_labels, sample_images
from dynasearch.slicing import slice_subnet

STEPS = 3


class CallLog:
    """Forward hook recording the batch size and labels of every model call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        x, _t, y = args[:3]
        self.calls.append((int(x.shape[0]), [int(v) for v in y]))

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def half_subnet(tiny_config) -> Subnet:
    """Half the heads and MLP width, and half the tokens, in every block."""
    return Subnet.uniform(tiny_config, 0.5, 0.5, 0.5)


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_model) -> Path:
    return save_checkpoint(tiny_model, tmp_path / "ck")


# ------------------------------------------------------------------------------------------------ sample_images
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_shapes_range_and_determinism(tiny_model, sampler):
    a = sample_images(tiny_model, num=6, steps=STEPS, sampler=sampler, seed=3)
    b = sample_images(tiny_model, num=6, steps=STEPS, sampler=sampler, seed=3)
    c = sample_images(tiny_model, num=6, steps=STEPS, sampler=sampler, seed=4)
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sampling_leaves_global_rng_and_mode_alone(tiny_model):
    tiny_model.train()
    state = torch.get_rng_state()
    sample_images(tiny_model, num=2, steps=2)
    assert torch.equal(state, torch.get_rng_state())
    assert tiny_model.training
    tiny_model.eval()


def test_labels_cycle_and_guidance_uses_null_class(tiny_model):
    log = CallLog(tiny_model)
    try:
        sample_images(tiny_model, num=13, steps=2, cfg_scale=4.0)
    finally:
        log.close()
    assert cycle_labels(10, 13) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert len(log.calls) == 2
    for batch, labels in log.calls:  # guidance: [conditional | null class] in one call of 2B
        assert batch == 26
        assert labels == cycle_labels(10, 13) + [10] * 13


def test_cfg_scale_one_is_the_plain_path(tiny_model, tiny_config):
    labels = [3, 1, 4, 1, 5]
    log = CallLog(tiny_model)
    try:
        plain = sample_images(tiny_model, labels, cfg_scale=1.0, steps=STEPS, seed=7)
    finally:
        log.close()
    assert [b for b, _ in log.calls] == [5] * STEPS  # one un-doubled call per step, no null class
    assert all(y == labels for _, y in log.calls)

    # The same sampler through the diffusion API directly: identical.
    diffusion = GaussianDiffusion(learn_sigma=tiny_config.learn_sigma)
    ddim = make_sampler(diffusion, "ddim", STEPS)
    direct = sample(
        ddim, lambda x, t, y: tiny_model(x, t, y, label_dropout=False), (5, 1, 8, 8), torch.tensor(labels),
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(plain, direct.clamp(-1, 1))

    # Guidance at scale 1 computed the long way (conditional and null halves) agrees with the plain path.
    def guided_at_one(x, t, y):
        both = tiny_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                          label_dropout=False)
        cond, uncond = both.chunk(2)
        eps = uncond[:, :1] + 1.0 * (cond[:, :1] - uncond[:, :1])
        return torch.cat([eps, cond[:, 1:]], dim=1)

    long_way = sample(ddim, guided_at_one, (5, 1, 8, 8), torch.tensor(labels),
                      generator=torch.Generator().manual_seed(7))
    assert torch.allclose(plain, long_way.clamp(-1, 1), atol=1e-5)


def test_supernet_subnet_matches_sliced_model(tiny_model, half_subnet):
    small = slice_subnet(tiny_model, half_subnet).eval()
    via_supernet = sample_images(tiny_model, num=5, steps=STEPS, seed=1, subnet=half_subnet)
    via_sliced = sample_images(small, num=5, steps=STEPS, seed=1)
    full = sample_images(tiny_model, num=5, steps=STEPS, seed=1)
    assert torch.allclose(via_supernet, via_sliced, atol=1e-4)
    assert not torch.allclose(via_supernet, full, atol=1e-3)


def test_batches_cover_every_label(tiny_model):
    out = sample_images(tiny_model, num=7, steps=2, batch_size=3)
    assert out.shape == (7, 1, 8, 8)


def test_bad_arguments(tiny_model, tiny_config):
    with pytest.raises(ConfigError, match="outside"):
        sample_images(tiny_model, [0, 10], steps=2)
    with pytest.raises(ConfigError, match="does not match"):
        sample_images(tiny_model, [0, 1], num=3, steps=2)
    with pytest.raises(ConfigError, match="steps"):
        sample_images(tiny_model, num=2, steps=0)
    with pytest.raises(ConfigError, match="sampler"):
        sample_images(tiny_model, num=2, steps=2, sampler="euler")
    bad = Subnet(tuple(BlockChoice(4, 128) for _ in range(tiny_config.depth + 1)))
    with pytest.raises(SubnetError):
        sample_images(tiny_model, num=2, steps=2, subnet=bad)
    with pytest.raises(ConfigError, match=r"cuda|CUDA"):  # CUDA missing here, or the model is not on it
        sample_images(tiny_model, num=2, steps=2, device="cuda")


def test_no_null_class_needs_cfg_one(tiny_config):
    model = make_model(tiny_config.replace(class_dropout_prob=0.0))
    with pytest.raises(ConfigError, match="null class"):
        sample_images(model, num=2, steps=2, cfg_scale=4.0)
    assert sample_images(model, num=2, steps=2, cfg_scale=1.0).shape == (2, 1, 8, 8)


def test_latent_models_are_not_clipped():
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10))
    out = sample_images(model, num=3, steps=STEPS, cfg_scale=1.0)
    assert out.shape == (3, 4, 8, 8)
    assert out.abs().max() > 1.0  # random weights: latents wander outside [-1, 1], and are kept as they are


# ------------------------------------------------------------------------------------------------ labels, grids
def test_parse_labels():
    assert parse_labels("0,1,2") == (0, 1, 2)
    assert parse_labels(" 0-3, 7 ") == (0, 1, 2, 3, 7)
    for bad in ("", "a", "-1", "1.5", "3-1", "1,,2"):
        with pytest.raises(ConfigError):
            parse_labels(bad)


def test_grid_layout_one_row_per_class():
    classes, per_label = [0, 1, 2], 4
    labels = repeat_labels(classes, per_label)
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    values = torch.tensor([-1.0, 0.0, 1.0])  # one grey level per class
    images = values[torch.tensor(labels)].view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    grid = grid_array(images, nrow=per_label, scale=1, pad=1)
    assert grid.shape == (1 + 3 * 9, 1 + 4 * 9)
    for row, value in enumerate((0, 128, 255)):
        for col in range(per_label):
            top, left = 1 + row * 9, 1 + col * 9
            assert (grid[top : top + 8, left : left + 8] == value).all()
    # Default: 8x8 pixel art is upscaled by nearest neighbour to 64x64 cells.
    big = grid_array(images, nrow=per_label)
    assert big.shape == (2 + 3 * 66, 2 + 4 * 66)
    cell = big[2 : 2 + 64, 2 : 2 + 64]
    assert (cell == 0).all()


def test_save_grid_png(tmp_path: Path):
    from PIL import Image

    gray = torch.rand(5, 1, 8, 8) * 2 - 1
    path = save_grid(gray, tmp_path / "sub" / "g.png", nrow=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (2 + 3 * 66, 2 + 2 * 66)
    rgb = torch.rand(2, 3, 16, 16) * 2 - 1
    with Image.open(save_grid(rgb, tmp_path / "rgb.png", nrow=2)) as img:
        assert img.mode == "RGB" and img.size == (2 + 2 * 66, 2 + 66)
    with pytest.raises(ConfigError):
        save_grid(torch.zeros(2, 4, 8, 8), tmp_path / "latent.png", nrow=2)


def test_save_latents_is_a_dataset(tmp_path: Path):
    latents = torch.randn(6, 4, 8, 8) * 3
    path = save_latents(latents, [0, 1, 2, 0, 1, 2], tmp_path / "lat.npz", num_classes=5)
    with np.load(path, allow_pickle=False) as archive:
        assert archive["x"].dtype == np.float32 and archive["y"].tolist() == [0, 1, 2, 0, 1, 2]
    data = load_dataset(f"npz:{path}", val_fraction=0.5)
    assert data.num_classes == 5 and data.in_channels == 4
    assert torch.equal(torch.cat([data.train_x, data.val_x]).sort(dim=0).values, latents.sort(dim=0).values)


def test_vae_folder_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_vae(tmp_path)
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="not a diffusers AutoencoderKL"):
        load_vae(other)


def test_vae_needs_diffusers(tmp_path: Path):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("diffusers is installed here")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(DynasearchError, match="diffusers"):
        load_vae(vae)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_sample_writes_a_grid(checkpoint: Path, tmp_path: Path, half_subnet, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(checkpoint), "--labels", "0,1,2", "--per-label", "4",
                 "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as img:
        assert img.size == (2 + 4 * 66, 2 + 3 * 66)  # one row per label
    assert str(out) in capsys.readouterr().out

    subnet_file = tmp_path / "half.json"
    half_subnet.save(subnet_file)
    out2 = tmp_path / "sub.png"
    assert main(["sample", "--checkpoint", str(checkpoint), "--subnet", str(subnet_file), "--num", "5",
                 "--steps", "2", "--sampler", "ddpm", "--seed", "2", "--out", str(out2)]) == 0
    assert out2.is_file()


def test_cli_sample_latent_model_writes_npz(tmp_path: Path, capsys):
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10))
    ck = save_checkpoint(model, tmp_path / "latent")
    out = tmp_path / "lat.png"
    assert main(["sample", "--checkpoint", str(ck), "--num", "3", "--steps", "2", "--out", str(out)]) == 0
    assert not out.exists() and (tmp_path / "lat.npz").is_file()
    assert "--vae" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "0,10"], "outside"),
        (["--labels", "one"], "cannot parse"),
        (["--labels", "1", "--num", "3"], "not both"),
        (["--steps", "0"], "--steps"),
        (["--steps", "5000"], "steps"),
        (["--out", "grid.jpg"], ".png"),
        (["--vae", "VAE"], "4-channel"),
        (["--subnet", "SUBNET"], "does not fit"),
        (["--checkpoint", "MISSING"], "does not exist"),
    ],
)
def test_cli_sample_bad_inputs(checkpoint: Path, tmp_path: Path, tiny_config, capsys, args, message):
    subnet_file = tmp_path / "deep.json"
    Subnet(tuple(BlockChoice(4, 128) for _ in range(tiny_config.depth + 1))).save(subnet_file)
    args = [
        {"SUBNET": str(subnet_file), "MISSING": str(tmp_path / "nope"), "VAE": str(tmp_path)}.get(a, a) for a in args
    ]
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    base = ["sample", "--checkpoint", str(checkpoint), "--out", str(out)]
    code = main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and message in err
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("where, message", [("file/grid.png", "'{tmp}/file' is not a directory"),
                                            ("adir.png", "it is a directory")])
def test_cli_sample_unwritable_out_fails_before_sampling(checkpoint: Path, tmp_path: Path, capsys, monkeypatch,
                                                         where, message):
    import dynasearch.sampling as sampling

    (tmp_path / "file").write_bytes(b"a file, not a directory")
    (tmp_path / "adir.png").mkdir()
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: pytest.fail("sampled before checking --out"))
    assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and message.format(tmp=tmp_path) in err


def test_file_writers_stay_importable_from_sampling():
    import dynasearch.images as images
    import dynasearch.sampling as sampling

    for name in ("grid_array", "save_grid", "save_latents", "load_vae", "decode_latents"):
        assert getattr(sampling, name) is getattr(images, name) and name in sampling.__all__
