"""Datasets: the embedded digits and mnist, a folder of class sub-folders, an npz, or VAE latents on disk; a fixed
stratified val split.

:mod:`.loaders` loads each kind; :mod:`.latents` reads `latents:DIR` lazily (:class:`LatentRows`); :mod:`.extract`
writes such a directory from a folder of images with a VAE; :mod:`.dataset` parses specs, splits and batches the
data, and reads back what a checkpoint says it was trained on (:class:`DataRecord`).
"""

from .dataset import (
    ACCEPTED,
    EMBEDDED,
    DataRecord,
    DatasetSplit,
    DataSpec,
    iterate_batches,
    load_dataset,
    parse_data_spec,
    split_indices,
)
from .latents import LatentRows, load_latents, read_batch
from .loaders import load_digits, load_mnist

__all__ = [
    "ACCEPTED",
    "EMBEDDED",
    "DataRecord",
    "DataSpec",
    "DatasetSplit",
    "LatentRows",
    "iterate_batches",
    "load_dataset",
    "load_digits",
    "load_latents",
    "load_mnist",
    "parse_data_spec",
    "read_batch",
    "split_indices",
]
