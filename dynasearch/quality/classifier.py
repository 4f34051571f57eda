"""The built-in feature extractor: a small classifier of the model's own data set, trained once and cached.

Today that is the embedded digits set: a small CNN trained on the digits train split (seed-fixed, seconds on CPU)
and cached (`~/.cache/dynasearch/`, or `$DYNASEARCH_CACHE`) as safetensors + JSON with its validation accuracy.
:func:`default_extractor` picks the classifier for a model and :func:`real_digits` gives the real images it is
compared with; a classifier for another data set (mnist, folder:, npz:) is added here, next to the digits one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint.native import load_weights, save_weights
from ..data import load_dataset
from ..errors import CheckpointError, DataError
from ..fileio import atomic_write_text
from ..model.config import DiTConfig

__all__ = [
    "ClassifierSettings",
    "DigitCNN",
    "DigitClassifier",
    "StatusFn",
    "default_cache_dir",
    "default_extractor",
    "load_cached_classifier",
    "load_digit_classifier",
    "real_digits",
    "train_digit_classifier",
]

StatusFn = Callable[[str], None]

_CLASSIFIER_VERSION = 1
_CLASSIFIER_STEM = f"digits-cnn-v{_CLASSIFIER_VERSION}"


@dataclass(frozen=True)
class ClassifierSettings:
    """How the digit classifier is trained; the cache is valid only for the settings it was trained with."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    num_features: int = 64


class DigitCNN(nn.Module):
    """Three 3x3 convolutions and two poolings on 8x8 digits, a `num_features` penultimate layer, 10 logits."""

    def __init__(self, width: int = 16, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2w, 2, 2)
            nn.Flatten(), nn.Linear(8 * width, num_features), nn.ReLU(),  # (N, F)
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 10) of (N, 1, 8, 8) images in [-1, 1]."""
        return self.head(self.body(x))


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1..1 pixels in each direction (background fill): cheap augmentation."""
    n, _, h, w = x.shape
    crops = F.pad(x, (1, 1, 1, 1), value=-1.0).unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 3, 3, H, W)
    i = torch.randint(0, 3, (n,), generator=generator)
    j = torch.randint(0, 3, (n,), generator=generator)
    return crops[torch.arange(n), :, i, j]  # (N, C, H, W)


class DigitClassifier:
    """The built-in :class:`FeatureExtractor` for digits: a trained :class:`DigitCNN` plus its recorded accuracy.

    Any (N, 1, H, W) input is resized to 8x8 (antialiased bilinear) first, so models trained on digits at other
    sizes are scored too.
    """

    name = "digits-cnn"
    image_size = 8

    def __init__(self, net: DigitCNN, accuracy: float | None, info: dict[str, Any] | None = None) -> None:
        self.net = net.eval()
        self.accuracy = accuracy
        self.info = dict(info or {})
        self.trained_now = False  # True when this instance was trained rather than loaded from the cache
        self.num_features = int(net.head.in_features)

    def _prepare(self, images: Tensor) -> Tensor:
        """(N, 1, 8, 8) float CPU images in [-1, 1], resized where needed."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise DataError(f"the digit classifier scores (N, 1, H, W) images, got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)  # (N, 1, 8, 8)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features (N, num_features)."""
        x = self._prepare(images)
        if not len(x):
            return x.new_zeros(0, self.num_features)
        return torch.cat([self.net.body(chunk) for chunk in x.split(1024)])  # (N, F)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class ids (N,)."""
        x = self._prepare(images)
        if not len(x):
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([self.net(chunk).argmax(dim=1) for chunk in x.split(1024)])  # (N,)


def _fit(net: DigitCNN, x: Tensor, y: Tensor, s: ClassifierSettings, generator: torch.Generator) -> None:
    """AdamW with a one-cycle schedule over `s.epochs` shuffled epochs of randomly shifted images."""
    n = int(x.shape[0])
    per_epoch = math.ceil(n / s.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.max_lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.max_lr, total_steps=s.epochs * per_epoch)
    net.train()
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=generator)
        for b in range(0, n, s.batch_size):
            idx = perm[b : b + s.batch_size]
            loss = F.cross_entropy(net(_random_shift(x[idx], generator)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def train_digit_classifier(settings: ClassifierSettings | None = None) -> DigitClassifier:
    """Train the digit CNN on the digits train split (seed-fixed; a few seconds on CPU); accuracy on the val split."""
    s = settings or ClassifierSettings()
    data = load_dataset("digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = DigitCNN(s.width, s.num_features, data.num_classes)
    generator = torch.Generator().manual_seed(s.seed)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster than two on a busy 2-core box
    try:
        _fit(net, data.train_x, data.train_y, s, generator)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        val_acc = float((net(data.val_x).argmax(dim=1) == data.val_y).double().mean())
        train_acc = float((net(data.train_x).argmax(dim=1) == data.train_y).double().mean())
    info = {
        "version": _CLASSIFIER_VERSION,
        "settings": asdict(s),
        "val_accuracy": val_acc,
        "train_accuracy": train_acc,
        "dataset": data.describe(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
    }
    classifier = DigitClassifier(net, val_acc, info)
    classifier.trained_now = True
    return classifier


def default_cache_dir() -> Path:
    """`$DYNASEARCH_CACHE` if set, else `~/.cache/dynasearch`."""
    env = os.environ.get("DYNASEARCH_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynasearch"


def _cache_files(cache: Path) -> tuple[Path, Path]:
    """The weights and the JSON record of the digit classifier in a cache directory."""
    return cache / f"{_CLASSIFIER_STEM}.safetensors", cache / f"{_CLASSIFIER_STEM}.json"


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_cached_classifier(cache: Path, settings: ClassifierSettings) -> DigitClassifier | None:
    """The cached classifier if its files are complete, consistent and from the same settings; else None."""
    weights, meta = _cache_files(cache)
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("version") != _CLASSIFIER_VERSION or info.get("settings") != asdict(settings):
            return None
        if info.get("weights_sha256") != _digest(weights):
            return None
        net = DigitCNN(settings.width, settings.num_features)
        net.load_state_dict(load_weights(weights))
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError, CheckpointError):
        return None
    return DigitClassifier(net, float(info["val_accuracy"]), info)


def load_digit_classifier(cache_dir: str | Path | None = None, retrain: bool = False) -> DigitClassifier:
    """The cached digit classifier, trained (and cached, atomically) on first use or when the cache is stale.

    A missing, corrupt or out-of-date cache is simply retrained; an unwritable cache directory still returns the
    freshly trained classifier (it is then trained again next time).
    """
    settings = ClassifierSettings()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not retrain:
        cached = load_cached_classifier(cache, settings)
        if cached is not None:
            return cached
    classifier = train_digit_classifier(settings)
    weights, meta = _cache_files(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_weights(classifier.net.state_dict(), weights, {"format": "dynasearch", "model": _CLASSIFIER_STEM})
        classifier.info["weights_sha256"] = _digest(weights)
        atomic_write_text(meta, json.dumps(classifier.info, indent=2) + "\n")
        classifier.info["cache"] = str(cache)
    except OSError:
        classifier.info["cache"] = None
    return classifier


def real_digits(image_size: int = 8) -> Tensor:
    """Every embedded digit (validation + train, 1797 images) at `image_size`, (N, 1, S, S) in [-1, 1]."""
    data = load_dataset("digits", image_size=image_size)
    return torch.cat([data.val_x, data.train_x], dim=0)  # (N, 1, S, S)


def default_extractor(config: DiTConfig, cache_dir: str | Path | None, status: StatusFn | None) -> DigitClassifier:
    """The built-in classifier that scores `config`'s samples (today: digit models only), from the cache or trained."""
    if config.in_channels != 1 or config.num_classes != 10:
        raise DataError(
            f"the built-in digit classifier scores 1-channel, 10-class digit models; model '{config.name}' has "
            f"{config.in_channels} channel(s) and {config.num_classes} classes; evaluate_quality() takes any "
            "FeatureExtractor with real images"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if status is not None and load_cached_classifier(cache, ClassifierSettings()) is None:
        status(f"training the digit classifier once (cached in {cache})")
    return load_digit_classifier(cache)
