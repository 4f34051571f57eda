"""`latents:DIR`: VAE latents read from disk row by row, never held whole by any process.

Two layouts are read. The one `dynasearch extract-latents` writes: ``latents.npy`` (N, C, H, W) float16/float32,
``labels.npy`` (N,) integers and an optional ``meta.json`` (VAE, scaling factor, class names, flip, image size).
And fast-DiT's: one ``.npy`` per sample in ``features/`` ((1, C, H, W) or (C, H, W)) with the same file name in
``labels/`` ((1,) or ()); the ``imagenet256_features/`` + ``imagenet256_labels/`` pair its script writes is found
too. Labels are loaded whole (8 bytes a sample); the latents stay on disk.

:class:`LatentRows` is the lazy array a :class:`~dynasearch.data.DatasetSplit` holds for them: it has a shape, a
length and a dtype like a tensor, `subset` gives a view of some rows without reading anything, and indexing it
with an index tensor reads just those rows as a float32 tensor. ``latents.npy`` is memory-mapped (numpy checks its
header, shape and dtype; ``NpyRows.array`` is the np.memmap), but rows are read with plain file reads at their
offsets, one per run of consecutive rows, not through the mapping: a page fault on a mapping makes the kernel map its
read-ahead too (about 1.6 MB a row read on the 6.18 kernel measured, 400 MB for a batch of 256 random rows), a read
into a buffer holds just the rows. So a process's resident set holds the rows of one batch however long it trains.
Values are checked when read: a non-finite row is a DataError naming the file and row.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import DataError
from ..fileio import read_json

__all__ = [
    "LABELS_NAME", "LATENTS_NAME", "META_NAME", "PLAN_NAME", "PROGRESS_NAME", "FeatureFiles", "LatentRows",
    "NpyRows", "load_latents", "read_batch", "take_rows",
]

LATENTS_NAME = "latents.npy"
LABELS_NAME = "labels.npy"
META_NAME = "meta.json"
PROGRESS_NAME = "progress.npy"  # present only while an extraction is unfinished (uint8 (N,): 1 = row written)
PLAN_NAME = "extract.json"  # what an unfinished extraction was started with (a resume must match it)
_FEATURE_DIRS = re.compile(r"^(?:(?P<prefix>.+)_)?features$")


class RowSource(Protocol):
    """Where rows of an (N, C, H, W) array live: its shape, a name for messages, and a reader of given rows."""

    shape: tuple[int, int, int, int]
    name: str

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (n,) of the array as (n, C, H, W) float32."""
        ...


def _check_finite(values: np.ndarray, rows: np.ndarray, name: str) -> None:
    """Raise DataError naming the first row of `values` (n, ...) holding a NaN or an infinity."""
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)  # (n,)
    if not finite.all():
        i = int(np.argmin(finite))
        raise DataError(f"latents '{name}': row {int(rows[i])} has non-finite values")


class NpyRows:
    """Rows of an ``.npy`` file, memory-mapped for its layout but read with plain file reads (see the module)."""

    def __init__(self, path: Path) -> None:
        """Map `path` read-only (DataError if it is not a 4-d real-valued .npy array)."""
        self.path, self.name = path, str(path)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"latents file '{path}' is not a readable .npy array: {first}") from None
        if not isinstance(array, np.ndarray):
            with contextlib.suppress(AttributeError):
                array.close()
            raise DataError(f"latents file '{path}' is an .npz archive, not an .npy array")
        if array.ndim != 4:
            raise DataError(f"latents file '{path}' has shape {array.shape}, expected 4 dims (N, C, H, W)")
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"latents file '{path}' has dtype {array.dtype}, expected float16 or float32")
        if array.shape[2] != array.shape[3]:
            raise DataError(f"latents file '{path}' holds {array.shape[2]}x{array.shape[3]} latents; square needed")
        self.array = array
        self.shape = tuple(int(v) for v in array.shape)  # type: ignore[assignment]
        self._row_bytes = int(np.prod(self.shape[1:])) * array.dtype.itemsize
        self._offset = int(getattr(array, "offset", 0))
        self._direct = isinstance(array, np.memmap) and array.flags.c_contiguous  # rows lie one after another

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` as (n, C, H, W) float32 (a copy), read run by run of consecutive rows."""
        try:
            raw = self._read_direct(rows) if self._direct else np.asarray(self.array[rows])
        except OSError as exc:
            raise DataError(f"latents file '{self.path}' cannot be read: {exc}") from None
        values = raw.astype(np.float32, copy=False)  # (n, C, H, W)
        _check_finite(values, rows, self.name)
        return values

    def _read_direct(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` in the file's dtype, read into a buffer with one read per run of consecutive sorted rows."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]  # (n,) ascending
        buffer = np.empty((len(rows), *self.shape[1:]), dtype=self.array.dtype)  # rows in ascending order
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        with open(self.path, "rb", buffering=0) as handle:
            for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                view = memoryview(buffer[start:end]).cast("B")
                handle.seek(self._offset + int(ordered[start]) * self._row_bytes)
                if handle.readinto(view) != len(view):
                    raise DataError(f"latents file '{self.path}' is shorter than its header says (truncated)")
        out = np.empty_like(buffer)
        out[order] = buffer
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its path (a spawned process maps the file again)."""
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Map the file again."""
        self.__init__(state["path"])  # type: ignore[misc]


class FeatureFiles:
    """fast-DiT's per-sample files: row i is `features/<stems[i]>.npy`, (1, C, H, W) or (C, H, W)."""

    def __init__(self, folder: Path, stems: Sequence[str]) -> None:
        """Rows of the files `folder/<stem>.npy`; the first one fixes the shape (DataError if it is not 3-d/4-d)."""
        self.folder, self.name, self.stems = folder, str(folder), np.asarray(stems)
        first = self._load(0)
        if first.shape[1] != first.shape[2]:
            raise DataError(f"feature file '{self._file(0)}' holds {first.shape[1]}x{first.shape[2]} latents; "
                            "square needed")
        self.shape = (len(self.stems), *first.shape)  # type: ignore[assignment]

    def _file(self, row: int) -> Path:
        """The file of `row`."""
        return self.folder / f"{self.stems[row]}.npy"

    def _load(self, row: int) -> np.ndarray:
        """The (C, H, W) array of `row` (DataError naming the file if it is unreadable or of another shape)."""
        file = self._file(row)
        try:
            value = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"feature file '{file}' is not a readable .npy array: {first}") from None
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise DataError(f"feature file '{file}' does not hold a float array")
        if value.ndim == 4 and value.shape[0] == 1:
            value = value[0]
        expected = getattr(self, "shape", None)
        if value.ndim != 3 or (expected is not None and value.shape != tuple(expected[1:])):
            want = f"{tuple(expected[1:])}" if expected is not None else "(C, H, W) or (1, C, H, W)"
            raise DataError(f"feature file '{file}' has shape {value.shape}, expected {want}")
        return value

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` as (n, C, H, W) float32, one file each."""
        if len(rows) == 0:
            return np.zeros((0, *self.shape[1:]), dtype=np.float32)
        values = np.stack([self._load(int(r)) for r in rows]).astype(np.float32, copy=False)  # (n, C, H, W)
        _check_finite(values, rows, self.name)
        return values


class LatentRows:
    """A lazy (N, C, H, W) float32 array: rows `rows` of a source on disk, read only when indexed."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, source: RowSource, rows: np.ndarray | None = None) -> None:
        """All rows of `source` (rows None) or the given source rows, in that order."""
        self.source = source
        self.rows = np.arange(source.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> torch.Size:
        """(N, C, H, W) of this view."""
        return torch.Size((len(self.rows), *self.source.shape[1:]))

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def dim(self) -> int:
        """Always 4."""
        return 4

    def numel(self) -> int:
        """Number of values (no row is read)."""
        return int(np.prod(self.shape))

    def subset(self, index: Tensor | np.ndarray | Sequence[int]) -> LatentRows:
        """A view of rows `index` of this view (nothing is read)."""
        return LatentRows(self.source, self.rows[_positions(index, len(self))])

    def __getitem__(self, index: Tensor | np.ndarray | Sequence[int] | slice | int) -> Tensor:
        """Rows `index` (an index tensor, array, list, slice or int) read from disk as a float32 tensor."""
        single = isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.dim() == 0)
        positions = _positions(index, len(self))
        values = torch.from_numpy(self.source.read(self.rows[positions]))  # (n, C, H, W)
        return values[0] if single else values

    def __repr__(self) -> str:
        """E.g. LatentRows(1000 of 'x/latents.npy', (4, 32, 32))."""
        return f"LatentRows({len(self)} of '{self.source.name}', {tuple(self.source.shape[1:])})"


def _positions(index: Any, n: int) -> np.ndarray:
    """`index` (tensor, array, list, slice, int; negatives count from the end) as int64 positions in [0, n)."""
    if isinstance(index, slice):
        return np.arange(n, dtype=np.int64)[index]
    if isinstance(index, Tensor):
        if index.dtype == torch.bool:
            raise DataError("latent rows cannot be indexed with a boolean mask")
        index = index.detach().cpu().numpy()
    positions = np.asarray(index, dtype=np.int64).reshape(-1)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        bad = positions[(positions < -n) | (positions >= n)][0]
        raise IndexError(f"row {int(bad)} is out of range for {n} latent rows")
    return np.where(positions < 0, positions + n, positions)


def take_rows(x: Tensor | LatentRows, index: Tensor) -> Tensor | LatentRows:
    """Rows `index` of `x`: a tensor's are copied, a lazy array's stay on disk (a view)."""
    return x.subset(index) if isinstance(x, LatentRows) else x[index]


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group ((0, 1) without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def read_batch(x: Tensor | LatentRows, index: Tensor) -> Tensor:
    """The rows `index` (B,) of `x` as (B, C, H, W) float32. Rows on disk under DDP are read only for this rank's
    contiguous share of the batch (what `TrainBatch.shard(rank, world)` keeps); the other ranks' rows are zeros."""
    if not isinstance(x, LatentRows):
        return x[index]
    rank, world = _rank_world()
    if world <= 1 or len(index) % world:
        return x[index]
    n = len(index) // world
    out = torch.zeros((len(index), *x.shape[1:]), dtype=torch.float32)  # (B, C, H, W)
    out[rank * n : (rank + 1) * n] = x[index[rank * n : (rank + 1) * n]]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading a latents directory
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Loaded:
    """What a latents directory holds: its lazy rows, labels, class count and meta.json (empty when absent)."""

    x: LatentRows
    y: np.ndarray
    num_classes: int | None
    meta: dict[str, Any]


def _labels(path: Path, n: int, what: str) -> np.ndarray:
    """The (n,) int64 labels of `path` (DataError if unreadable, not 1-d integers, of another length, negative)."""
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"labels file '{path}' is not a readable .npy array: {first}") from None
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        shape = getattr(y, "shape", "?")
        raise DataError(f"labels file '{path}' holds {shape} {getattr(y, 'dtype', '')}, expected (N,) integers")
    if len(y) != n:
        raise DataError(f"{what} holds {n} latents but '{path}' has {len(y)} labels")
    return _non_negative(y.astype(np.int64), str(path))


def _non_negative(y: np.ndarray, name: str) -> np.ndarray:
    """`y` itself; DataError naming the first negative label."""
    if len(y) and y.min() < 0:
        i = int(np.argmax(y < 0))
        raise DataError(f"labels '{name}': label at index {i} is {int(y[i])}, labels must be >= 0")
    return y


def _meta(root: Path) -> tuple[dict[str, Any], int | None]:
    """meta.json of `root` ({} when absent) and the class count it gives (num_classes or len(class_names))."""
    path = root / META_NAME
    if not path.exists():
        return {}, None
    doc = read_json(path, "latents meta file", DataError)
    if not isinstance(doc, dict):
        raise DataError(f"latents meta file '{path}' is not a JSON object")
    names, count = doc.get("class_names"), doc.get("num_classes")
    if names is not None and (not isinstance(names, list) or not all(isinstance(v, str) for v in names)):
        raise DataError(f"latents meta file '{path}': class_names must be a list of strings")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise DataError(f"latents meta file '{path}': num_classes must be a positive integer, got {count!r}")
    if names is not None and count is not None and len(names) != count:
        raise DataError(f"latents meta file '{path}': {len(names)} class_names but num_classes {count}")
    return doc, count if count is not None else (len(names) if names else None)


def _load_npy_layout(root: Path) -> _Loaded:
    """latents.npy + labels.npy (+ meta.json) of `root`."""
    if (root / PROGRESS_NAME).exists():
        raise DataError(f"latents directory '{root}' holds an unfinished extraction ({PROGRESS_NAME} is there): "
                        "rerun the same dynasearch extract-latents command to finish it")
    latents, labels = root / LATENTS_NAME, root / LABELS_NAME
    if not latents.is_file():
        raise DataError(f"latents directory '{root}' has {LABELS_NAME} but no {LATENTS_NAME}")
    if not labels.is_file():
        raise DataError(f"latents directory '{root}' has {LATENTS_NAME} but no {LABELS_NAME}")
    source = NpyRows(latents)
    y = _labels(labels, source.shape[0], f"'{latents}'")
    meta, num_classes = _meta(root)
    return _Loaded(LatentRows(source), y, num_classes, meta)


def _stem_order(stems: list[str]) -> list[str]:
    """File stems in numeric order when all are integers (0, 1, 2, ..., 10), else sorted as text."""
    if stems and all(s.isdigit() for s in stems):
        return sorted(stems, key=int)
    return sorted(stems)


def _feature_pair(root: Path) -> tuple[Path, Path] | None:
    """fast-DiT's (features, labels) folders under `root`, None when there are none (DataError if ambiguous)."""
    pairs = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _FEATURE_DIRS.match(sub.name)
        if match:
            labels = root / (f"{match['prefix']}_labels" if match["prefix"] else "labels")
            pairs.append((sub, labels))
    if len(pairs) > 1:
        names = ", ".join(f"'{p.name}'" for p, _ in pairs)
        raise DataError(f"latents directory '{root}' has several feature folders ({names}); point at one's parent")
    if not pairs:
        return None
    features, labels = pairs[0]
    if not labels.is_dir():
        raise DataError(f"latents directory '{root}' has '{features.name}/' but no '{labels.name}/' folder")
    return features, labels


def _load_feature_layout(root: Path, features: Path, labels: Path) -> _Loaded:
    """fast-DiT's per-sample features/ + labels/ files (paired by file name)."""
    feats = {p.stem for p in features.iterdir() if p.suffix == ".npy"}
    labs = {p.stem for p in labels.iterdir() if p.suffix == ".npy"}
    if not feats:
        raise DataError(f"feature folder '{features}' holds no .npy files")
    for missing, have, there in ((feats - labs, features, labels), (labs - feats, labels, features)):
        if missing:
            name = _stem_order(list(missing))[0]
            raise DataError(f"'{have / (name + '.npy')}' has no counterpart in '{there}' "
                            f"({len(missing)} unpaired file(s))")
    stems = _stem_order(list(feats))
    y = np.empty(len(stems), dtype=np.int64)
    for i, stem in enumerate(stems):
        file = labels / f"{stem}.npy"
        try:
            value = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"label file '{file}' is not a readable .npy array: {first}") from None
        if not isinstance(value, np.ndarray) or value.size != 1 or not np.issubdtype(value.dtype, np.integer):
            raise DataError(f"label file '{file}' does not hold one integer label")
        y[i] = int(value.reshape(()))
    meta, num_classes = _meta(root)
    return _Loaded(LatentRows(FeatureFiles(features, stems)), _non_negative(y, str(labels)), num_classes, meta)


def load_latents(root: str, image_size: int | None) -> tuple[LatentRows, Tensor, int, str]:
    """The lazy latents, (N,) int64 labels, class count and name of a `latents:DIR` directory (either layout)."""
    path = Path(root)
    if not path.exists():
        raise DataError(f"latents directory '{root}' does not exist")
    if not path.is_dir():
        raise DataError(f"latents directory '{root}' is a file, not a directory")
    if any((path / name).exists() for name in (LATENTS_NAME, LABELS_NAME, PROGRESS_NAME)):
        loaded = _load_npy_layout(path)
    else:
        pair = _feature_pair(path)
        if pair is None:
            raise DataError(f"latents directory '{root}' holds neither {LATENTS_NAME} + {LABELS_NAME} nor fast-DiT's "
                            "features/ + labels/ folders")
        loaded = _load_feature_layout(path, *pair)
    x = loaded.x
    if len(x) == 0:
        raise DataError(f"latents directory '{root}' holds no samples")
    size = int(x.shape[2])
    if image_size is not None and image_size != size:
        raise DataError(f"latents directory '{root}' holds {size}x{size} latents, not the requested image_size "
                        f"{image_size} (latent models take the latent size)")
    num_classes = loaded.num_classes if loaded.num_classes is not None else int(loaded.y.max()) + 1
    return x, torch.from_numpy(loaded.y), num_classes, f"latents:{root}"
