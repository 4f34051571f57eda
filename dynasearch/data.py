"""Datasets: sklearn digits, a folder of class sub-folders, or an npz of latents; fixed val split."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import Tensor

from dynasearch.errors import DataError

__all__ = ["DataSpec", "DatasetSplit", "parse_data_spec", "load_dataset", "iterate_batches"]

_ACCEPTED = "digits, folder:PATH, npz:PATH"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_DEFAULT_FOLDER_SIZE = 32


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source: kind is 'digits', 'folder' or 'npz'; path is set for the latter two."""

    kind: str
    path: str | None = None

    def __str__(self) -> str:
        """The spec in the textual form parse_data_spec accepts."""
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


@dataclass
class DatasetSplit:
    """Train/val tensors (N, C, H, W) float32 and int64 labels plus what is needed to reproduce them."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    val_indices: list[int] = field(default_factory=list)
    seed: int = 0
    val_fraction: float = 0.1

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary; val_digest is a short hash of val_indices."""
        digest = hashlib.sha256(",".join(map(str, self.val_indices)).encode()).hexdigest()[:16]
        return {
            "name": self.name,
            "num_train": int(self.train_x.shape[0]),
            "num_val": int(self.val_x.shape[0]),
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_digest": digest,
        }


def parse_data_spec(text: str) -> DataSpec:
    """Parse 'digits', 'folder:PATH' or 'npz:PATH'; anything else raises DataError."""
    value = text.strip()
    if value == "digits":
        return DataSpec("digits")
    for kind in ("folder", "npz"):
        prefix = kind + ":"
        if value.startswith(prefix) and value[len(prefix):].strip():
            return DataSpec(kind, value[len(prefix):].strip())
    raise DataError(f"data spec {text!r} is not one of: {_ACCEPTED}")


def _load_digits(image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """sklearn's bundled 8x8 digits scaled to [-1, 1]; other sizes use antialiased bilinear resize."""
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32)).view(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    x = x / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if image_size is not None and image_size != 8:
        size = (image_size, image_size)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1.0, 1.0)  # (N, 1, S, S)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))  # (N,)
    return x.contiguous(), y, 10, "digits"


def _load_image(path: Path, size: int) -> np.ndarray:
    """One image as RGB, shorter side resized to size and centre-cropped, as (3, S, S) float32 in [-1, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32)  # (S, S, 3)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"image '{path}' cannot be read: {exc}") from None
    return arr.transpose(2, 0, 1) / 127.5 - 1.0  # (3, S, S)


def _load_folder(root: str, image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """Images under root/<class>/ (sorted class names -> label ids), RGB at image_size (default 32)."""
    path = Path(root)
    if not path.exists():
        raise DataError(f"data path '{root}' does not exist")
    if not path.is_dir():
        raise DataError(f"data path '{root}' is not a directory")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data path '{root}' has no class sub-folders")
    size = _DEFAULT_FOLDER_SIZE if image_size is None else image_size
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_dir in enumerate(classes):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not files:
            accepted = ", ".join(sorted(_IMAGE_SUFFIXES))
            raise DataError(f"class folder '{class_dir}' has no images ({accepted})")
        for file in files:
            images.append(_load_image(file, size))
            labels.append(label)
    x = torch.from_numpy(np.stack(images))  # (N, 3, S, S)
    y = torch.tensor(labels, dtype=torch.int64)  # (N,)
    return x, y, len(classes), f"folder:{root}"


def _load_npz(file: str, image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """Arrays x (N, C, H, W) and y (N,) from an npz, values kept as they are (latents)."""
    path = Path(file)
    if not path.exists():
        raise DataError(f"npz file '{file}' does not exist")
    if not path.is_file():
        raise DataError(f"npz file '{file}' is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"npz file '{file}' is not a valid .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"npz file '{file}' is a single .npy array, not an .npz archive with 'x' and 'y'")
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            have = ", ".join(archive.files)
            raise DataError(f"npz file '{file}' lacks key(s) {', '.join(missing)} (has: {have})")
        try:
            xa, ya = archive["x"], archive["y"]
            stored_classes = archive["num_classes"] if "num_classes" in archive.files else None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"npz file '{file}' cannot be read: {exc}") from None
    if xa.ndim != 4:
        raise DataError(f"npz file '{file}': x has shape {xa.shape}, expected 4 dims (N, C, H, W)")
    if xa.shape[2] != xa.shape[3]:
        raise DataError(f"npz file '{file}': x has H={xa.shape[2]} != W={xa.shape[3]}, square samples needed")
    if not (np.issubdtype(xa.dtype, np.floating) or np.issubdtype(xa.dtype, np.integer)):
        raise DataError(f"npz file '{file}': x has dtype {xa.dtype}, expected a real number type")
    if ya.ndim != 1 or not np.issubdtype(ya.dtype, np.integer):
        raise DataError(f"npz file '{file}': y has shape {ya.shape} dtype {ya.dtype}, expected (N,) integers")
    if len(xa) != len(ya):
        raise DataError(f"npz file '{file}': x has {len(xa)} samples but y has {len(ya)} labels")
    if len(xa) == 0:
        raise DataError(f"npz file '{file}' holds no samples")
    if (ya < 0).any():
        i = int(np.argmax(ya < 0))
        raise DataError(f"npz file '{file}': label at index {i} is {int(ya[i])}, labels must be >= 0")
    finite = np.isfinite(xa.reshape(len(xa), -1)).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(f"npz file '{file}': x has non-finite values in sample {i}")
    if image_size is not None and image_size != xa.shape[2]:
        size = f"{xa.shape[2]}x{xa.shape[3]}"
        raise DataError(f"npz file '{file}' holds {size} samples, not the requested image_size {image_size}")
    if stored_classes is not None:
        if stored_classes.size != 1 or not np.issubdtype(stored_classes.dtype, np.integer):
            got = stored_classes.tolist()
            raise DataError(f"npz file '{file}': num_classes must be a single integer, got {got!r}")
        num_classes = int(stored_classes.reshape(()))
    else:
        num_classes = int(ya.max()) + 1
    x = torch.from_numpy(np.ascontiguousarray(xa, dtype=np.float32))  # (N, C, H, W)
    y = torch.from_numpy(ya.astype(np.int64))  # (N,)
    return x, y, num_classes, f"npz:{file}"


def _check_labels(y: Tensor, num_classes: int, name: str) -> None:
    """Raise DataError naming the first label outside [0, num_classes)."""
    if num_classes < 1:
        raise DataError(f"dataset '{name}' has num_classes {num_classes}, must be at least 1")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(torch.nonzero(bad)[0, 0])
        raise DataError(f"dataset '{name}': label at index {i} is {int(y[i])}, outside [0, {num_classes})")


def _split_indices(y: Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified, seed-fixed split into (train, val) original indices, both sorted.

    A torch.Generator(seed) permutation orders the samples; each sample gets the key
    (rank within its class + 0.5) / class size, and the n_val smallest keys (ties in permutation
    order) form the val set, so every class contributes close to val_fraction of its samples.
    n_val = round(N * val_fraction), at least 1 and at most N - 1 when N >= 2.
    """
    n = int(y.shape[0])
    if n < 2:
        return list(range(n)), []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).numpy()  # (N,)
    labels = y.numpy()[perm]  # (N,) labels in permutation order
    rank = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.float64)
    for c in np.unique(labels):
        where = np.nonzero(labels == c)[0]
        rank[where] = np.arange(len(where))
        counts[where] = len(where)
    order = np.argsort((rank + 0.5) / counts, kind="stable")
    val = sorted(int(i) for i in perm[order[:n_val]])
    train = sorted(int(i) for i in perm[order[n_val:]])
    return train, val


def load_dataset(
    spec: DataSpec | str, image_size: int | None = None, val_fraction: float = 0.1, seed: int = 0
) -> DatasetSplit:
    """Load a dataset and split off a seed-fixed, stratified validation set."""
    data_spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size {image_size} must be a positive integer")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} must be strictly between 0 and 1")
    if data_spec.kind == "digits":
        x, y, num_classes, name = _load_digits(image_size)
    elif data_spec.kind == "folder" and data_spec.path:
        x, y, num_classes, name = _load_folder(data_spec.path, image_size)
    elif data_spec.kind == "npz" and data_spec.path:
        x, y, num_classes, name = _load_npz(data_spec.path, image_size)
    else:
        raise DataError(f"data spec '{data_spec}' is not one of: {_ACCEPTED}")
    _check_labels(y, num_classes, name)
    train_idx, val_idx = _split_indices(y, val_fraction, seed)
    tr, va = torch.tensor(train_idx, dtype=torch.long), torch.tensor(val_idx, dtype=torch.long)
    return DatasetSplit(
        train_x=x[tr],  # (N_train, C, H, W)
        train_y=y[tr],  # (N_train,)
        val_x=x[va],  # (N_val, C, H, W)
        val_y=y[va],  # (N_val,)
        num_classes=num_classes,
        in_channels=int(x.shape[1]),
        image_size=int(x.shape[2]),
        name=name,
        val_indices=val_idx,
        seed=seed,
        val_fraction=val_fraction,
    )


def iterate_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled (x, y) batches of exactly batch_size.

    Each epoch is a torch.randperm drawn from generator; a short tail is carried into the next
    epoch's permutation instead of being dropped, so every batch has batch_size samples (even when
    batch_size > N). Given the generator's state the sequence of batches is fully deterministic.
    """
    n = int(x.shape[0])
    if n == 0 or int(y.shape[0]) != n:
        raise DataError(f"cannot iterate batches over {n} samples with {int(y.shape[0])} labels")
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size} must be at least 1")
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            perm = torch.randperm(n, generator=generator, device=generator.device).cpu()  # (N,)
            pending = torch.cat([pending, perm])
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield x[idx.to(x.device)], y[idx.to(y.device)]  # (B, C, H, W), (B,)
