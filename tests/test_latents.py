"""`latents:DIR` and `dynasearch extract-latents`: both layouts read lazily (a memory map whose pages are given back,
only the rows asked for read, under DDP only the rank's share of a batch), the extraction equal to encoding by hand
with a tiny random diffusers VAE, resumable, and train-supernet + search end to end on latents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynasearch.cli import main
from dynasearch.data import LatentRows, load_dataset
from dynasearch.data import latents as latents_mod
from dynasearch.data.latents import FeatureFiles, NpyRows
from dynasearch.errors import ConfigError, DataError
from dynasearch.train.sandwich import draw_batch

ROOT = Path(__file__).resolve().parents[1]


def _write_npy_layout(root: Path, n: int = 40, c: int = 4, s: int = 8, classes: int = 4, seed: int = 0,
                      meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """latents.npy (n, c, s, s) float16 and labels.npy; returns both arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, s, s)).astype(np.float16)
    y = (np.arange(n) % classes).astype(np.int64)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "latents.npy", x)
    np.save(root / "labels.npy", y)
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta))
    return x, y


class _Spy:
    """Records the source rows every read of a row source asks for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.calls: list[list[int]] = []
        original = cls.read

        def read(obj, rows):
            self.calls.append([int(r) for r in rows])
            return original(obj, rows)

        monkeypatch.setattr(cls, "read", read)

    @property
    def rows(self) -> list[int]:
        return [r for call in self.calls for r in call]


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def test_latents_dir_is_read_lazily_from_a_memory_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _write_npy_layout(tmp_path / "lat", n=50)
    spy = _Spy(monkeypatch, NpyRows)
    split = load_dataset(f"latents:{tmp_path / 'lat'}", val_fraction=0.2)
    assert spy.calls == []  # loading and splitting read no latent row
    assert isinstance(split.train_x, LatentRows) and isinstance(split.val_x, LatentRows)
    assert isinstance(split.train_x.source.array, np.memmap)
    assert split.train_x.shape == (40, 4, 8, 8) and split.val_x.shape == (10, 4, 8, 8) and len(split.val_x) == 10
    assert (split.in_channels, split.image_size, split.num_classes, split.holds_images) == (4, 8, 4, False)
    assert split.describe()["num_train"] == 40 and split.spec == f"latents:{tmp_path / 'lat'}"
    train_idx = [i for i in range(50) if i not in split.val_indices]
    idx = torch.tensor([5, 0, 39, 5])
    rows = split.train_x[idx]
    assert rows.dtype == torch.float32 and rows.shape == (4, 4, 8, 8)
    expected = torch.from_numpy(x[[train_idx[i] for i in idx.tolist()]].astype(np.float32))
    assert torch.equal(rows, expected)
    assert spy.rows == [train_idx[i] for i in idx.tolist()]  # only the rows asked for
    assert torch.equal(split.train_y, torch.from_numpy(y[train_idx]))
    assert torch.equal(split.val_x[2], torch.from_numpy(x[split.val_indices[2]].astype(np.float32)))
    assert torch.equal(split.val_x[-1:], torch.from_numpy(x[split.val_indices[-1:]].astype(np.float32)))
    with pytest.raises(IndexError):
        split.val_x[torch.tensor([10])]


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_reading_leaves_none_of_the_file_resident(tmp_path: Path) -> None:
    """After reading every row the process holds (almost) none of the file's pages: no process holds the set."""
    _write_npy_layout(tmp_path / "lat", n=2048, s=16)  # 4 MiB
    split = load_dataset(f"latents:{tmp_path / 'lat'}")
    total = torch.zeros(())
    for start in range(0, len(split.train_x), 256):
        total += split.train_x[torch.arange(start, min(start + 256, len(split.train_x)))].sum()
    assert torch.isfinite(total)

    def mapped_kib() -> int:
        rss, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(tmp_path / "lat" / "latents.npy"))
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
        return rss

    assert mapped_kib() <= 64, mapped_kib()  # of 4096 KiB read
    split.train_x.source.array[:].sum()  # the check can fail: touching the map without release makes pages resident
    assert mapped_kib() > 1024


def test_fast_dit_per_sample_files_read_like_the_npy_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _write_npy_layout(tmp_path / "npy", n=24, classes=3)
    for folder in ("features", "imagenet256"):
        feats = tmp_path / folder / (f"{folder}_features" if folder != "features" else "features")
        labs = feats.parent / (feats.name.replace("features", "labels"))
        feats.mkdir(parents=True)
        labs.mkdir()
        for i in range(24):  # fast-DiT's shapes: (1, C, H, W) float32 and (1,) int64, numbered files
            np.save(feats / f"{i}.npy", x[i : i + 1].astype(np.float32))
            np.save(labs / f"{i}.npy", y[i : i + 1])
    a = load_dataset(f"latents:{tmp_path / 'npy'}")
    spy = _Spy(monkeypatch, FeatureFiles)
    for folder in ("features", "imagenet256"):
        b = load_dataset(f"latents:{tmp_path / folder}")
        assert isinstance(b.train_x, LatentRows) and isinstance(b.train_x.source, FeatureFiles)
        assert b.val_indices == a.val_indices and torch.equal(b.train_y, a.train_y)  # numeric order 0, 1, ..., 10
        assert torch.equal(b.train_x[torch.arange(len(b.train_x))], a.train_x[torch.arange(len(a.train_x))])
        assert torch.equal(b.val_x[torch.tensor([1])], a.val_x[torch.tensor([1])])
        assert (b.num_classes, b.in_channels, b.image_size) == (3, 4, 8)
    train_rows = [i for i in range(24) if i not in a.val_indices]
    assert sorted(spy.rows) == sorted([*train_rows, a.val_indices[1]] * 2)  # the rows asked for, no others


def test_meta_json_is_optional_and_gives_the_classes(tmp_path: Path) -> None:
    _write_npy_layout(tmp_path / "a", n=20, classes=2, meta={"class_names": ["cat", "dog", "eel"], "flip": False})
    assert load_dataset(f"latents:{tmp_path / 'a'}").num_classes == 3  # more classes than the labels use
    _write_npy_layout(tmp_path / "b", n=20, classes=2)
    assert load_dataset(f"latents:{tmp_path / 'b'}").num_classes == 2
    _write_npy_layout(tmp_path / "c", n=20, classes=4, meta={"num_classes": 2})
    with pytest.raises(DataError, match="label at index 2 is 2"):
        load_dataset(f"latents:{tmp_path / 'c'}")


@pytest.mark.parametrize("damage, needle", [
    ("nan", "row 3 has non-finite values"),
    ("labels_short", "holds 20 latents but"),
    ("garbage", "not a readable .npy array"),
    ("unfinished", "unfinished extraction"),
    ("3d", "expected 4 dims"),
])
def test_bad_latent_directories_are_one_data_error(tmp_path: Path, damage: str, needle: str) -> None:
    root = tmp_path / "lat"
    x, y = _write_npy_layout(root, n=20)
    if damage == "nan":
        x = x.copy()
        x[3, 0, 0, 0] = np.nan
        np.save(root / "latents.npy", x)
    elif damage == "labels_short":
        np.save(root / "labels.npy", y[:-1])
    elif damage == "garbage":
        (root / "latents.npy").write_bytes(b"not an array at all")
    elif damage == "unfinished":
        np.save(root / "progress.npy", np.zeros(20, dtype=np.uint8))
    elif damage == "3d":
        np.save(root / "latents.npy", x[:, 0])
    with pytest.raises(DataError, match=needle):
        split = load_dataset(f"latents:{root}", val_fraction=0.5)
        torch.cat([split.train_x[torch.arange(10)], split.val_x[torch.arange(10)]])


def test_each_ddp_rank_reads_only_its_share_of_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynasearch.diffusion.gaussian import GaussianDiffusion

    _write_npy_layout(tmp_path / "lat", n=64)
    split = load_dataset(f"latents:{tmp_path / 'lat'}")
    diffusion = GaussianDiffusion(num_timesteps=100)
    whole = draw_batch(split, diffusion, seed=0, step=3, batch_size=16, label_dropout=0.1)
    spy = _Spy(monkeypatch, NpyRows)
    for rank in range(2):
        spy.calls.clear()
        monkeypatch.setattr(latents_mod, "_rank_world", lambda r=rank: (r, 2))
        batch = draw_batch(split, diffusion, seed=0, step=3, batch_size=16, label_dropout=0.1)
        shard, expected = batch.shard(rank, 2), whole.shard(rank, 2)
        for name in ("x0", "y", "t", "noise", "x_t"):
            assert torch.equal(getattr(shard, name), getattr(expected, name)), name
        assert len(spy.rows) == 8  # of 16
        assert torch.equal(batch.x0[8 * (1 - rank) : 8 * (2 - rank)], torch.zeros(8, 4, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# Extraction (a tiny random diffusers VAE built here)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random AutoencoderKL (down-sampling factor 2, 4 latent channels) saved as a diffusers folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 3 and 2 random RGB images of different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    rng = np.random.default_rng(0)
    sizes = {"ant": [(20, 24), (40, 33), (16, 16)], "bee": [(50, 18), (17, 31)]}
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _adm_by_hand(path: Path, size: int, flip: bool) -> torch.Tensor:
    """ADM's centre crop and [-1, 1] scaling, written out again: (1, 3, S, S)."""
    img = Image.open(path).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top : top + size, left : left + size]
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1) / 255.0 * 2 - 1)[None]


def _extract(image_dir: Path, vae_dir: Path, out: Path, *extra: str) -> int:
    return main(["extract-latents", "--data", f"folder:{image_dir}", "--vae", str(vae_dir), "--image-size", "8",
                 "--device", "cpu", "--out", str(out), *extra])


def test_extraction_equals_encoding_by_hand(image_dir: Path, vae_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from dynasearch.data.extract import row_seed

    assert _extract(image_dir, vae_dir, tmp_path / "lat", "--flip", "--batch-size", "3", "--seed", "7") == 0
    latents = np.load(tmp_path / "lat" / "latents.npy", mmap_mode="r")
    labels = np.load(tmp_path / "lat" / "labels.npy")
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert latents.shape == (10, 4, 4, 4) and latents.dtype == np.float16
    assert labels.tolist() == [0, 0, 0, 1, 1] * 2
    assert meta["class_names"] == ["ant", "bee"] and meta["flip"] is True and meta["scaling_factor"] == 0.5
    assert meta["image_size"] == 8 and meta["vae"] == str(vae_dir.resolve()) and meta["num_images"] == 5
    assert not (tmp_path / "lat" / "progress.npy").exists()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    files = sorted(image_dir.glob("*/*.png"))
    for row in range(10):
        x = _adm_by_hand(files[row % 5], 8, flip=row >= 5)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(row_seed(7, row))) * 0.5
        assert torch.allclose(torch.from_numpy(latents[row].astype(np.float32)), z[0], atol=2e-3, rtol=2e-3), row
    assert not np.array_equal(latents[0], latents[5])  # the mirror image is another latent
    split = load_dataset(f"latents:{tmp_path / 'lat'}", val_fraction=0.2)
    assert (split.num_classes, split.in_channels, split.image_size, len(split.train_x)) == (2, 4, 4, 8)


def test_an_interrupted_extraction_resumes_to_the_same_file(image_dir: Path, vae_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from dynasearch.data import extract

    assert _extract(image_dir, vae_dir, tmp_path / "whole", "--batch-size", "5") == 0
    calls = {"n": 0}
    original = extract.encode_rows

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(extract, "encode_rows", interrupted)
    capsys.readouterr()
    assert _extract(image_dir, vae_dir, tmp_path / "part", "--batch-size", "2") == 130
    assert "2 of 5 rows written" in capsys.readouterr().err
    assert np.load(tmp_path / "part" / "progress.npy").tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(DataError, match="unfinished extraction"):
        load_dataset(f"latents:{tmp_path / 'part'}")
    monkeypatch.setattr(extract, "encode_rows", original)
    with pytest.raises(ConfigError, match="another seed"):  # a resume must be the same extraction
        extract.extract_latents(extract.ExtractConfig(data=f"folder:{image_dir}", vae=str(vae_dir),
                                                      out=str(tmp_path / "part"), image_size=8, device="cpu",
                                                      seed=1), progress=False)
    assert _extract(image_dir, vae_dir, tmp_path / "part", "--batch-size", "4") == 0
    assert "(2 already there)" in capsys.readouterr().out
    for name in ("latents.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert _extract(image_dir, vae_dir, tmp_path / "part") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _extract(image_dir, vae_dir, tmp_path / "part", "--dtype", "float32") == 2
    assert "another dtype" in capsys.readouterr().err
    assert _extract(image_dir, vae_dir, tmp_path / "part", "--dtype", "float32", "--overwrite") == 0
    assert np.load(tmp_path / "part" / "latents.npy").dtype == np.float32


def test_a_broken_image_is_one_error_that_keeps_the_rows_written(image_dir: Path, vae_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    images = tmp_path / "imgs"
    shutil.copytree(image_dir, images)
    good = (images / "bee" / "1.png").read_bytes()
    (images / "bee" / "1.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert _extract(images, vae_dir, tmp_path / "lat", "--batch-size", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(images / "bee" / "1.png") in err[0], err
    assert np.load(tmp_path / "lat" / "progress.npy").tolist() == [1, 1, 1, 1, 0]
    (images / "bee" / "1.png").write_bytes(good)  # mended in place: the same listing, so the same command resumes
    assert _extract(images, vae_dir, tmp_path / "lat", "--batch-size", "2") == 0
    assert _extract(image_dir, vae_dir, tmp_path / "ref") == 0
    assert (tmp_path / "lat" / "latents.npy").read_bytes() == (tmp_path / "ref" / "latents.npy").read_bytes()


@pytest.mark.slow
def test_two_torchrun_ranks_extract_what_one_process_does(image_dir: Path, vae_dir: Path, tmp_path: Path) -> None:
    assert _extract(image_dir, vae_dir, tmp_path / "one") == 0
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dynasearch",
           "extract-latents", "--data", f"folder:{image_dir}", "--vae", str(vae_dir), "--image-size", "8",
           "--device", "cpu", "--batch-size", "2", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("latents.npy", "labels.npy", "meta.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------------------
# End to end on latents
# ---------------------------------------------------------------------------------------------------------------------
def test_train_supernet_and_search_run_on_latents(tmp_path: Path) -> None:
    _write_npy_layout(tmp_path / "lat", n=64, classes=4, meta={"class_names": list("abcd")})
    run = tmp_path / "run"
    assert main(["train-supernet", "--data", f"latents:{tmp_path / 'lat'}", "--model", "DiT-N/2", "--steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--sandwich", "0", "--out", str(run)]) == 0
    doc = json.loads((run / "config.json").read_text())
    assert doc["data"]["spec"] == f"latents:{tmp_path / 'lat'}"
    assert (doc["model"]["in_channels"], doc["model"]["input_size"], doc["model"]["num_classes"]) == (4, 8, 4)
    assert main(["search", "--supernet", str(run), "--flops", "0.6x", "--trials", "2", "--proxy-samples", "8",
                 "--export-top", "0", "--out", str(tmp_path / "search")]) == 0
    trials = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3


@pytest.mark.slow
def test_two_torchrun_ranks_train_on_latents_as_one_process_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _write_npy_layout(tmp_path / "lat", n=64, classes=4)
    args = ["train-supernet", "--data", f"latents:{tmp_path / 'lat'}", "--model", "DiT-N/2", "--steps", "2",
            "--batch-size", "8", "--device", "cpu", "--sandwich", "0"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dynasearch",
           *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    a, b = load_file(str(tmp_path / "ddp" / "raw.safetensors")), load_file(str(tmp_path / "single" / "raw.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
