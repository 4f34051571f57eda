"""Datasets: the embedded digits and mnist, a folder of class sub-folders, or an npz; a fixed stratified val split.

:mod:`.loaders` loads each kind; :mod:`.dataset` parses specs, splits and batches the data, and reads back what a
checkpoint says it was trained on (:class:`DataRecord`).
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
from .loaders import load_digits, load_mnist

__all__ = [
    "ACCEPTED",
    "EMBEDDED",
    "DataRecord",
    "DataSpec",
    "DatasetSplit",
    "iterate_batches",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "parse_data_spec",
    "split_indices",
]
