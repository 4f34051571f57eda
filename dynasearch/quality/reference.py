"""What a model's samples are compared with: the data it was trained on (from its checkpoint's `data` record, or
given), every image of that data set, and that data set's classifier -- never another data set's.

A checkpoint without a data record is the 8x8 digits if its model has their shape (every checkpoint before data
records were copied into exports); any other unrecorded model, latent models and data no classifier fits are one
clear DataError each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import ACCEPTED, DataRecord, DataSpec, parse_data_spec
from ..errors import DataError
from ..model.config import DiTConfig
from .cache import default_cache_dir, load_classifier
from .classifier import DataClassifier, StatusFn

__all__ = ["REFERENCE_SPLIT", "Reference", "default_extractor", "load_reference", "real_digits", "resolve_data"]

REFERENCE_SPLIT = "train+val"  # FD compares with every image of the data set, as FID compares with a training set
_DIGITS_SHAPE = (1, 10, 8)  # in_channels, num_classes, input_size of an unrecorded (pre-record) digits model
_RECENT_SIZE = 4
_RECENT: dict[tuple[Any, ...], Reference] = {}  # the last references loaded, oldest first


@dataclass
class Reference:
    """The real images a model is scored against and the classifier whose features and predictions score it."""

    data: str  # the data set's name: 'digits', 'mnist', 'folder:PATH', ...
    split: str  # which of its images: REFERENCE_SPLIT
    images: Tensor  # (N, C, S, S) in [-1, 1]
    extractor: DataClassifier
    _features: Tensor | None = field(default=None, repr=False)

    @property
    def num(self) -> int:
        """How many real images."""
        return int(self.images.shape[0])

    def describe(self) -> str:
        """E.g. 'mnist train+val, 5000 images'."""
        return f"{self.data} {self.split}, {self.num} images"

    def features(self) -> Tensor:
        """The real images' features (N, F), computed once."""
        if self._features is None:
            self._features = self.extractor.features(self.images)
        return self._features

    def classifier_val(self) -> int | None:
        """How many validation images the classifier's accuracy was measured on."""
        value = (self.extractor.info.get("dataset") or {}).get("num_val")
        return int(value) if value is not None else None


def _shape(config: DiTConfig) -> str:
    """E.g. '32x32x1, 10 classes'."""
    return f"{config.input_size}x{config.input_size}x{config.in_channels}, {config.num_classes} classes"


def _latent_error(config: DiTConfig, data: str | None) -> DataError:
    """The one error for latent models: their samples need a decoder and Inception features first."""
    trained = f" trained on '{data}'" if data else ""
    return DataError(
        f"model '{config.name}' ({_shape(config)}){trained} generates latents, not images: scoring it needs a VAE "
        "decoder and Inception features: pass --vae DIR --inception-weights FILE --ref REF.npz (in Python: "
        "run_fid, or evaluate_quality with decode= and an InceptionFeatureExtractor)"
    )


def resolve_data(
    doc: dict[str, Any], config: DiTConfig, override: str | DataSpec | DataRecord | None = None,
    source: str = "the model", option: str = "--data SPEC",
) -> DataRecord:
    """The data `config`'s model was trained on: `override` (loaded at the model's size), else the record in its
    checkpoint config `doc`, else the 8x8 digits for a digits-shaped model; otherwise a DataError naming `option`."""
    if isinstance(override, DataRecord):
        return override
    if override is not None:
        spec = parse_data_spec(override) if isinstance(override, str) else override
        return DataRecord(spec, image_size=config.input_size)
    record = DataRecord.from_config(doc)
    if record is not None:
        return record
    if config.in_channels not in (1, 3):
        raise _latent_error(config, None)
    if (config.in_channels, config.num_classes, config.input_size) == _DIGITS_SHAPE:
        return DataRecord(DataSpec("digits"))
    raise DataError(
        f"{source} records no training data and its model ({_shape(config)}) is not the 8x8 digits: pass {option} "
        f"(the data it was trained on: {ACCEPTED})"
    )


def load_reference(
    record: DataRecord, config: DiTConfig, cache_dir: str | Path | None = None, status: StatusFn | None = None,
    option: str = "--data SPEC",
) -> Reference:
    """Load `record`'s data, check it fits `config`'s model, and get its classifier (trained once, then cached on
    disk; the last few references are also kept in memory, so scoring many models loads each data set once)."""
    if config.in_channels not in (1, 3):
        raise _latent_error(config, record.name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = (record, str(cache.resolve()), config.input_size, config.in_channels, config.num_classes)
    if key in _RECENT:
        return _RECENT[key]
    split = record.load()
    if not split.holds_images:
        raise _latent_error(config, split.name)
    got = (split.image_size, split.in_channels, split.num_classes)
    if got != (config.input_size, config.in_channels, config.num_classes):
        raise DataError(
            f"data '{split.name}' ({got[0]}x{got[0]}x{got[1]}, {got[2]} classes) does not fit model '{config.name}' "
            f"({_shape(config)}): pass {option} (the data it was trained on)"
        )
    extractor = load_classifier(split, cache, status=status)
    images = torch.cat([split.val_x, split.train_x], dim=0)  # (N, C, S, S)
    reference = Reference(split.name, REFERENCE_SPLIT, images, extractor)
    if len(_RECENT) >= _RECENT_SIZE:
        del _RECENT[next(iter(_RECENT))]
    _RECENT[key] = reference
    return reference


def real_digits(image_size: int = 8) -> Tensor:
    """Every embedded digit (validation + train, 1797 images) at `image_size`, (N, 1, S, S) in [-1, 1]."""
    split = DataRecord(DataSpec("digits"), image_size=image_size).load()
    return torch.cat([split.val_x, split.train_x], dim=0)  # (N, 1, S, S)


def default_extractor(config: DiTConfig, cache_dir: str | Path | None, status: StatusFn | None) -> DataClassifier:
    """The classifier that scores an unrecorded digits-shaped model's samples (others: a DataError)."""
    return load_reference(resolve_data({}, config, option="data=SPEC"), config, cache_dir, status).extractor
