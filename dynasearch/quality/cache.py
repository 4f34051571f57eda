"""The classifier cache: each data set's classifier is trained once and kept under `~/.cache/dynasearch/` (or
`$DYNASEARCH_CACHE`) as safetensors + JSON, named by a digest of its data and training settings.

The JSON records the digest, the settings, the data set's summary and the classifier's validation accuracy; a
cache entry whose digest, version or weights do not match is ignored and retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from ..checkpoint.native import load_weights, save_weights
from ..data import DatasetSplit, load_dataset
from ..errors import CheckpointError
from ..fileio import atomic_write_text
from .classifier import (
    CLASSIFIER_VERSION,
    ClassifierSettings,
    DataClassifier,
    ImageCNN,
    StatusFn,
    check_classifiable,
    classifier_size,
    extractor_name,
    train_classifier,
)

__all__ = [
    "cache_files",
    "classifier_digest",
    "default_cache_dir",
    "load_cached_classifier",
    "load_classifier",
    "load_digit_classifier",
    "train_digit_classifier",
]


def default_cache_dir() -> Path:
    """`$DYNASEARCH_CACHE` if set, else `~/.cache/dynasearch`."""
    env = os.environ.get("DYNASEARCH_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynasearch"


def classifier_digest(split: DatasetSplit, settings: ClassifierSettings) -> str:
    """SHA-256 of everything the classifier depends on: version, settings, size, and the split's images and labels."""
    h = hashlib.sha256()
    meta = {"version": CLASSIFIER_VERSION, "settings": asdict(settings), "size": classifier_size(split.image_size),
            "num_classes": split.num_classes}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for tensor in (split.train_x, split.train_y, split.val_x, split.val_y):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_files(cache: Path, split: DatasetSplit, digest: str) -> tuple[Path, Path]:
    """The weights and the JSON record of `split`'s classifier in a cache directory."""
    stem = f"{extractor_name(split)}-v{CLASSIFIER_VERSION}-{digest[:16]}"
    return cache / f"{stem}.safetensors", cache / f"{stem}.json"


def _sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_cached_classifier(
    cache: Path, split: DatasetSplit, settings: ClassifierSettings | None = None
) -> DataClassifier | None:
    """`split`'s cached classifier if its files are complete and match the data, settings and weights; else None."""
    s = settings or ClassifierSettings()
    digest = classifier_digest(split, s)
    weights, meta = cache_files(Path(cache), split, digest)
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("version") != CLASSIFIER_VERSION or info.get("digest") != digest:
            return None
        if info.get("settings") != asdict(s) or info.get("weights_sha256") != _sha256(weights):
            return None
        net = ImageCNN(s.width, s.num_features, split.num_classes, split.in_channels, classifier_size(split.image_size))
        net.load_state_dict(load_weights(weights))
        accuracy = float(info["val_accuracy"])
    except (OSError, ValueError, TypeError, RuntimeError, KeyError, AttributeError, CheckpointError):
        return None
    return DataClassifier(net, accuracy, info, name=extractor_name(split))


def load_classifier(
    split: DatasetSplit,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    status: StatusFn | None = None,
    settings: ClassifierSettings | None = None,
) -> DataClassifier:
    """`split`'s classifier from the cache, else trained (its validation accuracy printed through `status`) and
    cached atomically. A corrupt or stale entry is retrained; an unwritable cache still returns the classifier."""
    s = settings or ClassifierSettings()
    check_classifiable(split)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not retrain:
        cached = load_cached_classifier(cache, split, s)
        if cached is not None:
            return cached
    if status is not None:
        status(f"training the {extractor_name(split)} classifier once on {len(split.train_x)} '{split.name}' "
               f"train images (cached in {cache})")
    classifier = train_classifier(split, s)
    digest = classifier_digest(split, s)
    classifier.info["digest"] = digest
    weights, meta = cache_files(cache, split, digest)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_weights(classifier.net.state_dict(), weights, {"format": "dynasearch", "model": classifier.name})
        classifier.info["weights_sha256"] = _sha256(weights)
        atomic_write_text(meta, json.dumps(classifier.info, indent=2) + "\n")
        classifier.info["cache"] = str(cache)
    except (OSError, CheckpointError):
        classifier.info["cache"] = None
    if status is not None:
        status(f"{classifier.name}: validation accuracy {classifier.accuracy:.1%} on {len(split.val_x)} "
               f"'{split.name}' val images ({classifier.info['train_seconds']:.0f} s)")
    return classifier


def train_digit_classifier(settings: ClassifierSettings | None = None) -> DataClassifier:
    """The digit CNN trained on the 8x8 digits' train split (seconds on CPU), not cached."""
    return train_classifier(load_dataset("digits"), settings)


def load_digit_classifier(cache_dir: str | Path | None = None, retrain: bool = False) -> DataClassifier:
    """The 8x8 digits' classifier, from the cache or trained (and cached) on first use."""
    return load_classifier(load_dataset("digits"), cache_dir, retrain)
