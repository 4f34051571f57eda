"""ADM's batch format: the `.npz` files of guided-diffusion's evaluator (`arr_0`: uint8 images N x H x W x 3, a
class-conditional sample batch's labels as `arr_1`; a reference batch adds its data set's Inception statistics
`mu` (2048,) and `sigma` (2048, 2048)), read and written batch by batch.

Nothing here holds a whole image array: :func:`iter_images` reads `arr_0` in batches from the zip member (stored or
deflated), :class:`NpyShard` appends batches to a `.npy` file, and :func:`write_batch_npz` streams shards into one
`.npz` (zip64, stored, as `np.savez` writes it) through a temporary file renamed into place.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from .errors import DataError
from .fileio import atomic_output

__all__ = ["IMAGES_KEY", "LABELS_KEY", "ArrayInfo", "NpyShard", "array_info", "check_images", "iter_images",
           "npz_keys", "read_array", "to_uint8_nhwc", "write_batch_npz"]

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
_CHUNK_BYTES = 64 << 20  # what one read or copy holds at most


@dataclass(frozen=True)
class ArrayInfo:
    """The header of one array in an npz: its shape and dtype (nothing of its data is read)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        """Rows (images) in the array."""
        return int(self.shape[0]) if self.shape else 0


def to_uint8_nhwc(images: np.ndarray | object) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] (numpy or torch) -> uint8 (N, H, W, 3): DiT's `clamp(127.5 x + 128, 0, 255)`
    truncated (the same as rounding (x + 1) * 127.5), one channel repeated to three as ADM's evaluator needs."""
    x = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"images for an ADM batch must be (N, 1 or 3, H, W), got shape {x.shape}")
    out = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)  # (N, C, H, W)
    if out.shape[1] == 1:
        out = np.repeat(out, 3, axis=1)  # (N, 3, H, W)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))  # (N, H, W, 3)


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The npz as a zip file; DataError naming it if it is missing or not an npz."""
    if not path.exists():
        raise DataError(f"npz file '{path}' does not exist")
    if not path.is_file():
        raise DataError(f"npz path '{path}' is not a file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"'{path}' is not an npz file ({exc})") from None


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an npz (DataError if it is no npz)."""
    with _open_zip(Path(path)) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def _read_header(handle: IO[bytes], where: str) -> ArrayInfo:
    """Parse a .npy header from `handle` (left at the first data byte)."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
        raise DataError(f"{where} is not a readable array ({exc})") from None
    if fortran or dtype.hasobject:
        raise DataError(f"{where} is {'Fortran-ordered' if fortran else 'an object array'}; expected a plain array")
    return ArrayInfo(tuple(int(v) for v in shape), dtype)


def array_info(path: str | Path, key: str) -> ArrayInfo:
    """Shape and dtype of array `key` in the npz at `path`, from its header alone (DataError if absent)."""
    path = Path(path)
    with _open_zip(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise DataError(f"npz file '{path}' has no array '{key}' (it holds: {', '.join(npz_keys(path)) or 'none'})")
        with zf.open(f"{key}.npy") as handle:
            return _read_header(handle, f"'{key}' in '{path}'")


def read_array(path: str | Path, key: str) -> np.ndarray:
    """Array `key` of an npz, whole (for small arrays such as mu, sigma, labels); never unpickles."""
    path = Path(path)
    array_info(path, key)
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data[key])
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"'{key}' in '{path}' cannot be read ({exc})") from None


def check_images(info: ArrayInfo, where: str, minimum: int = 1) -> None:
    """Raise DataError unless `info` is an ADM image array: uint8 (N, H, W, 1 or 3) with N >= minimum."""
    if info.dtype != np.uint8 or len(info.shape) != 4 or info.shape[3] not in (1, 3):
        raise DataError(f"{where} must hold uint8 images (N, H, W, 3) as ADM's batches do, got {info.dtype} "
                        f"{info.shape}")
    if info.count < minimum:
        raise DataError(f"{where} holds {info.count} images; at least {minimum} are needed")


def iter_images(path: str | Path, batch_size: int, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """uint8 (b, H, W, C) batches of `key` in the npz at `path`, read from the zip member one batch at a time."""
    path = Path(path)
    info = array_info(path, key)
    check_images(info, f"'{key}' in '{path}'")
    row = int(np.prod(info.shape[1:]))
    with _open_zip(path) as zf, zf.open(f"{key}.npy") as handle:
        _read_header(handle, f"'{key}' in '{path}'")
        for start in range(0, info.count, batch_size):
            n = min(batch_size, info.count - start)
            data = handle.read(n * row)
            if len(data) != n * row:
                raise DataError(f"'{key}' in '{path}' is truncated at image {start + len(data) // max(row, 1)}")
            yield np.frombuffer(data, dtype=np.uint8).reshape(n, *info.shape[1:])


class NpyShard:
    """A `.npy` file of known shape written batch after batch (one rank's share of a sample batch)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.written = 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 - kept open across append() calls, closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        try:
            np.lib.format.write_array_header_2_0(self._handle, header)
        except BaseException:
            self.discard()
            raise

    def append(self, rows: np.ndarray) -> None:
        """Write the next rows (their shape past the first axis and dtype must match)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.written + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} do not fit shard {self.shape} at row {self.written}")
        self._handle.write(rows.tobytes())
        self.written += len(rows)

    def discard(self) -> None:
        """Close and delete the file (a failed shard)."""
        self._handle.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush and close; ValueError if fewer rows were written than the header announces."""
        self._handle.close()
        if self.written != self.shape[0]:
            raise ValueError(f"shard '{self.path}' got {self.written} of {self.shape[0]} rows")


def _copy_npy_data(src: Path, out: IO[bytes]) -> None:
    """Copy the data bytes of the .npy file `src` (after its header) into `out`, in chunks."""
    with open(src, "rb") as handle:
        _read_header(handle, f"shard '{src}'")
        while chunk := handle.read(_CHUNK_BYTES):
            out.write(chunk)


def write_batch_npz(path: str | Path, arrays: dict[str, Sequence[Path]]) -> Path:
    """Write an npz whose array `name` is the concatenation (first axis) of the `.npy` shards `arrays[name]`, streamed
    (no array is held in memory), through a temporary file renamed onto `path`."""
    path = Path(path)
    infos = {name: [_shard_info(s) for s in shards] for name, shards in arrays.items()}
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, shards in arrays.items():
            first = infos[name][0]
            rows = sum(info.count for info in infos[name])
            if any(info.shape[1:] != first.shape[1:] or info.dtype != first.dtype for info in infos[name]):
                raise ValueError(f"the shards of '{name}' differ in shape or dtype")
            header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                      "shape": (rows, *first.shape[1:])}
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for shard in shards:
                    _copy_npy_data(shard, member)
    return path


def _shard_info(path: Path) -> ArrayInfo:
    """The header of a `.npy` shard."""
    with open(path, "rb") as handle:
        return _read_header(handle, f"shard '{path}'")
