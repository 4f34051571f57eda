"""The FID protocol DiT reports: `sample --npz` writes ADM's sample batch (exact format, sharded over ranks, VAE
decoding), `eval --inception-weights --ref` computes FID in FID's Inception-v3 features (a random-weights file
built here) against a reference batch's stored mu/sigma, its images, or a folder of real images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import fake_supernet_run, make_model
from PIL import Image

from dynasearch.adm_batch import iter_images, to_uint8_nhwc
from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint
from dynasearch.cli import main
from dynasearch.errors import CheckpointError, DataError
from dynasearch.model import get_config
from dynasearch.quality import (
    FeatureStats,
    FidConfig,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    frechet_distance,
    frechet_distance_from_stats,
    load_fid_inception,
    run_fid,
)
from dynasearch.quality.fid import center_crop
from dynasearch.quality.inception import read_inception_weights, resize_like_tf1
from dynasearch.sample_npz import (
    NpzSampleConfig,
    batch_seed,
    gather_shards,
    load_for_sampling,
    plan_sampling,
    rank_batches,
    run_sample_npz,
    sample_shard,
)
from dynasearch.sampling import sample_images

STEPS = ("--steps", "2", "--device", "cpu")


# ------------------------------------------------------------------------------------------------ fixtures
def random_inception(seed: int = 0) -> FIDInceptionV3:
    """FID's Inception-v3 with random weights that keep activations O(1): He-normal convolutions and random
    batch-norm statistics (PyTorch's default init shrinks the features towards zero, where any FD is ~0)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights Inception file with the keys and shapes of weights-inception-2015-12-05-6726825d.pth."""
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_inception().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def net(weights: Path) -> FIDInceptionV3:
    return load_fid_inception(weights)


def _images(n: int, size: int = 16, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    """uint8 (n, size, size, 3) random images."""
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3), dtype=np.uint8)


def _features(net: FIDInceptionV3, images: np.ndarray) -> np.ndarray:
    """Pool features (n, 2048) of uint8 NHWC images, float64."""
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()


@pytest.fixture(scope="module")
def batches(net: FIDInceptionV3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three small image batches and their features: 'a' and 'b' alike (uniform noise), 'dark' different."""
    out = {}
    for name, seed, high in (("a", 1, 256), ("b", 2, 256), ("dark", 3, 96)):
        images = _images(4, seed=seed, high=high)
        out[name] = (images, _features(net, images))
    return out


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _fid(weights: Path, samples: Path, ref: str) -> float:
    return run_fid(FidConfig(inception_weights=weights, ref=ref, samples=samples, device="cpu")).fid


@pytest.fixture
def pixel_run(tmp_path: Path) -> Path:
    """A digits-shaped DiT-N/2 supernet run (8x8x1, 10 classes): grey images."""
    return fake_supernet_run(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ the network
def test_tf1_resize_is_tensorflows_bilinear_without_half_pixel_centres():
    x = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])  # (1, 1, 2, 2)
    out = resize_like_tf1(x, 4)  # TF1: source = dest * in / out, clamped to the last pixel
    row = torch.tensor([0.0, 2.0, 4.0, 4.0])
    assert torch.equal(out[0, 0], torch.stack([row, row + 4, row + 8, row + 8]))


def test_the_weights_file_loads_by_keys_and_gives_2048_features(weights: Path, net: FIDInceptionV3):
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(FIDInceptionV3().state_dict()) and len(state) > 400
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) > 23_000_000
    pool, logits = net(torch.from_numpy(_images(2, size=37)).permute(0, 3, 1, 2).contiguous())
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and (pool >= 0).all()
    assert 0.05 < pool.mean().item() < 100  # O(1) features: FDs below are not ~0 for want of scale
    extractor = InceptionFeatureExtractor(weights)  # the Python API's extractor is the same network
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    as_uint8 = torch.from_numpy(to_uint8_nhwc(grey)).permute(0, 3, 1, 2).contiguous()
    assert torch.allclose(extractor.features(grey), net(as_uint8)[0], atol=1e-5)


def test_a_bad_weights_file_is_one_clear_error(tmp_path: Path, weights: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_inception_weights(tmp_path / "none.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(CheckpointError, match=r"garbage\.pth' is unreadable"):
        read_inception_weights(tmp_path / "garbage.pth")
    torch.save({"x_embedder.proj.weight": torch.zeros(2)}, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="not FID's Inception-v3"):
        read_inception_weights(tmp_path / "dit.pt")
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, tmp_path / "fc10.pth")
    with pytest.raises(CheckpointError, match=r"'fc.weight' has shape \(10, 2048\)"):
        read_inception_weights(tmp_path / "fc10.pth")


# ------------------------------------------------------------------------------------------------ Frechet distance
def test_shifted_features_give_the_squared_norm_of_the_shift():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 64, generator=gen, dtype=torch.float64) @ torch.randn(64, 64, generator=gen,
                                                                                     dtype=torch.float64)
    shift = torch.randn(64, generator=gen, dtype=torch.float64) * 3
    a, b = FeatureStats(64), FeatureStats(64)
    for chunk in feats.split(37):  # streamed in uneven batches
        a.add(chunk)
        b.add(chunk + shift)
    np.testing.assert_allclose(a.mu, feats.mean(0).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a.sigma, np.cov(feats.numpy(), rowvar=False), rtol=1e-9, atol=1e-9)
    fd = frechet_distance_from_stats(a.mu, a.sigma, b.mu, b.sigma)
    assert fd == pytest.approx(float(shift @ shift), rel=1e-6)
    other = torch.randn(300, 64, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    c = FeatureStats(64)
    c.add(other)
    # ADM's formula through symmetric eigenvalues agrees with torchmetrics' FID on the same features
    assert frechet_distance_from_stats(a.mu, a.sigma, c.mu, c.sigma) == pytest.approx(
        frechet_distance(feats, other), rel=1e-6)


def test_a_batch_against_its_own_statistics_has_fd_below_1e_3(tmp_path: Path, weights: Path, batches):
    images, feats = batches["a"]
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    ref = _npz(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    samples = _npz(tmp_path / "samples.npz", arr_0=images)
    assert abs(_fid(weights, samples, str(ref))) < 1e-3
    # the same check can fail: an unlike batch's features are far from those statistics
    dark = batches["dark"][1]
    assert frechet_distance_from_stats(dark.mean(0), np.cov(dark, rowvar=False), mu, sigma) > 1.0


def test_stored_mu_sigma_equal_computing_from_the_reference_images(tmp_path: Path, weights: Path, batches,
                                                                   monkeypatch: pytest.MonkeyPatch):
    import dynasearch.quality.fid as fid_module

    images, feats = batches["b"]
    with_stats = _npz(tmp_path / "stats.npz", arr_0=images, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    images_only = _npz(tmp_path / "images.npz", arr_0=images)
    samples = _npz(tmp_path / "samples.npz", arr_0=batches["a"][0][:3])
    seen: list[int] = []  # 50k samples never sit in memory: the features see the npz feature_batch at a time
    real = fid_module.FeatureStats.add
    monkeypatch.setattr(fid_module.FeatureStats, "add", lambda self, f: (seen.append(len(f)), real(self, f))[1])
    stored = run_fid(FidConfig(inception_weights=weights, ref=str(with_stats), samples=samples, device="cpu",
                               feature_batch=2)).fid
    assert seen == [2, 1]  # the samples only: the stored mu/sigma are used, arr_0 is not read
    computed = _fid(weights, samples, str(images_only))
    assert stored == pytest.approx(computed, rel=1e-6) and stored > 1.0


@pytest.mark.slow
def test_a_folder_of_the_reference_images_gives_the_same_fid(tmp_path: Path, weights: Path, batches):
    images, feats = batches["b"]
    stats = _npz(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    folder = tmp_path / "real" / "class0"  # PNGs at the samples' size: the centre crop is the identity
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    samples = _npz(tmp_path / "samples.npz", arr_0=batches["a"][0])
    assert _fid(weights, samples, f"folder:{tmp_path / 'real'}") == pytest.approx(
        _fid(weights, samples, str(stats)), rel=1e-6)


def test_center_crop_is_adms_preprocessing():
    wide = Image.fromarray(np.arange(40 * 100 * 3, dtype=np.uint8).reshape(40, 100, 3))
    out = center_crop(wide, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # halved once by a box filter (40x100 -> 20x50), bicubic to a short side of 16 (16x40), the middle 16 columns
    ref = np.asarray(wide.resize((50, 20), Image.Resampling.BOX).resize((40, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(out, ref[:, 12:28])


# ------------------------------------------------------------------------------------------------ sample --npz
def test_npz_is_adms_batch_format(pixel_run: Path, tmp_path: Path):
    out = tmp_path / "out" / "samples.npz"
    assert main(["sample", "--checkpoint", str(pixel_run), "--npz", str(out), "--num", "7", "--batch-size", "3",
                 *STEPS]) == 0
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 3)  # NHWC, grey expanded to 3 channels
    assert (images[..., 0] == images[..., 2]).all() and images.std() > 0
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.npz"]  # no shard or temporary file left
    # batch 1 (samples 3..5) is sample_images under its own seed, converted as DiT does
    model = load_checkpoint(pixel_run)
    x = sample_images(model, [3, 4, 5], steps=2, seed=batch_seed(0, 1))
    expected = np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (3, 8, 8, 1)
    assert np.array_equal(images[3:6], np.repeat(expected, 3, axis=3))
    assert [b.shape[0] for b in iter_images(out, 4)] == [4, 3]  # read back batch by batch


def test_two_ranks_write_the_file_one_process_writes(pixel_run: Path, tmp_path: Path):
    one = run_sample_npz(NpzSampleConfig(pixel_run, tmp_path / "one.npz", num=7, steps=2, batch_size=3,
                                         device="cpu", sampler="ddpm"))
    assert one.world == 1 and one.image_shape == (8, 8, 3)
    config = NpzSampleConfig(pixel_run, tmp_path / "two.npz", num=7, steps=2, batch_size=3, device="cpu",
                             sampler="ddpm")
    plan = plan_sampling(config.checkpoint, None, None, config.cfg_scale, config.steps, config.sampler)
    model, vae, shape = load_for_sampling(plan, torch.device("cpu"))
    assert [list(rank_batches(7, 3, r, 2)) for r in (0, 1)] == [[0], [1, 2]]
    shards = [sample_shard(config, plan, model, vae, shape, rank, 2) for rank in (0, 1)]
    assert [np.load(s[0], mmap_mode="r").shape[0] for s in shards] == [3, 4]  # each rank holds only its share
    gather_shards(config.npz, 2)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "run", "two.npz"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_torchrun_two_gloo_processes_write_one_npz(pixel_run: Path, tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    args = ["sample", "--checkpoint", str(pixel_run), "--num", "5", "--batch-size", "2", *STEPS]
    # '--' ends torchrun's own options: without it torchrun takes '--num' for an abbreviation of its '--numa-binding'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dynasearch",
           "--", *args, "--npz", str(tmp_path / "ddp.npz")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and "2 process(es)" in proc.stdout  # rank 0 alone reports
    assert main([*args, "--npz", str(tmp_path / "single.npz")]) == 0
    with np.load(tmp_path / "ddp.npz") as a, np.load(tmp_path / "single.npz") as b:
        assert a["arr_0"].shape == (5, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.npz", "run", "single.npz"]


def _tiny_vae(path: Path, blocks: int = 2) -> Path:
    """A random diffusers AutoencoderKL (4 latent channels, /2**(blocks-1)) saved as a local folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(8,) * blocks, sample_size=32,
    )
    vae.save_pretrained(str(path))
    return path


def test_vae_decodes_latent_samples_into_the_batch(tmp_path: Path):
    vae_dir = _tiny_vae(tmp_path / "vae")
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10))
    ck = save_checkpoint(model, tmp_path / "latent")
    out = tmp_path / "samples.npz"
    assert main(["sample", "--checkpoint", str(ck), "--npz", str(out), "--num", "3", "--vae", str(vae_dir),
                 *STEPS]) == 0
    with np.load(out) as data:
        images = data["arr_0"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8  # 8x8 latents, VAE factor 2
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    z = sample_images(load_checkpoint(ck), [0, 1, 2], steps=2, seed=batch_seed(0, 0))  # (3, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)  # (3, 3, 16, 16)
    assert np.array_equal(images, to_uint8_nhwc(decoded))


def test_imagenet_shaped_dit_s2_with_an_sd_shaped_vae_writes_256px(tmp_path: Path):
    """DiT-S/2 (registry config) on 32x32x4 latents, 1000 classes, a VAE of SD's four-block layout: 256x256x3."""
    vae_dir = _tiny_vae(tmp_path / "vae", blocks=4)
    ck = save_checkpoint(make_model(get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)),
                         tmp_path / "s2")
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(ck), "--npz", str(out), "--num", "2", "--vae", str(vae_dir),
                 "--steps", "1", "--device", "cpu", "--cfg-scale", "1.5"]) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (2, 256, 256, 3) and data["arr_1"].tolist() == [0, 1]


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 64 KiB tmpfs mounted under tmp_path (unmounted afterwards); skipped without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_too_small_is_refused_before_sampling_and_a_full_one_leaves_nothing(
    pixel_run: Path, tiny_fs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    import dynasearch.sample_npz as sample_npz

    (tiny_fs / "keep.txt").write_text("what was there before\n")
    argv = ["sample", "--checkpoint", str(pixel_run), "--npz", str(tiny_fs / "s.npz"), "--num", "2", *STEPS]
    capsys.readouterr()
    assert main(argv) == 2  # 2 images need far less than 64 KiB, but the check keeps a 1 MB margin
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(tiny_fs / "s.npz") in err[0], err
    # without the check the disk fills while 2,000 images are written: one line, and only keep.txt is left
    monkeypatch.setattr(sample_npz, "_check_space", lambda *a: None)
    assert main([*argv[:-6], "--num", "2000", "--batch-size", "500", "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(tiny_fs / "s.npz") in err[0], err
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------ eval
@pytest.mark.slow
def test_eval_of_a_checkpoint_equals_eval_of_its_npz(pixel_run: Path, tmp_path: Path, weights: Path, batches,
                                                     capsys: pytest.CaptureFixture[str]):
    feats = batches["a"][1]
    ref = _npz(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(pixel_run), "--npz", str(npz), "--num", "4", *STEPS]) == 0
    capsys.readouterr()
    fid = ["eval", "--inception-weights", str(weights), "--ref", str(ref), "--device", "cpu", "--json"]
    assert main([*fid, "--samples", str(npz)]) == 0
    from_npz = json.loads(capsys.readouterr().out)
    assert main([*fid, "--checkpoint", str(pixel_run), "--num", "4", "--steps", "2"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert from_npz["fid"] > 0 and from_checkpoint["fid"] == pytest.approx(from_npz["fid"], rel=1e-9)
    assert from_npz["num"] == 4 and from_npz["image_shape"] == [8, 8, 3] and from_npz["reference_images"] is None
    assert from_checkpoint["sampling"]["steps"] == 2 and from_npz["sampling"] is None
    assert main(["eval", "--inception-weights", str(weights), "--ref", str(ref), "--samples", str(npz)]) == 0
    table = capsys.readouterr().out
    assert "FID" in table and f"{from_npz['fid']:.4f}" in table and "stored mu/sigma" in table


def test_reference_problems_name_the_file(tmp_path: Path, weights: Path):
    samples = _npz(tmp_path / "s.npz", arr_0=_images(2))
    cases = {
        "none.npz": "does not exist",
        "keys.npz": "neither mu/sigma nor 'arr_0'",
        "mu64.npz": "2048",
        "float.npz": "uint8",
    }
    _npz(tmp_path / "keys.npz", x=np.zeros(3))
    _npz(tmp_path / "mu64.npz", mu=np.zeros(64), sigma=np.eye(64))
    _npz(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    for name, needle in cases.items():
        with pytest.raises(DataError, match=needle) as info:
            _fid(weights, samples, str(tmp_path / name))
        assert name in str(info.value)
