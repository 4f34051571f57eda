"""The built-in feature extractor: a small CNN classifier of a labelled image data set, trained on its train split.

One architecture for every data set, sized by it (:class:`ImageCNN`: input channels, image size, classes); at 8x8
it is exactly the digit CNN the committed digits results were measured with, trained with the same settings
(:class:`ClassifierSettings`), so the digits numbers are unchanged. :mod:`.cache` trains it once per data set and
keeps it; :mod:`.reference` decides which data set a model is scored against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..data import DatasetSplit
from ..errors import DataError

__all__ = [
    "CLASSIFIER_VERSION",
    "MAX_CLASSIFIER_SIZE",
    "MIN_CLASSIFIER_SIZE",
    "ClassifierSettings",
    "DataClassifier",
    "DigitCNN",
    "DigitClassifier",
    "ImageCNN",
    "StatusFn",
    "check_classifiable",
    "classifier_size",
    "extractor_name",
    "train_classifier",
]

StatusFn = Callable[[str], None]

CLASSIFIER_VERSION = 2  # 2: one architecture for every data set (identical to version 1 at 8x8x1)
MIN_CLASSIFIER_SIZE = 8  # smaller images: no built-in extractor fits
MAX_CLASSIFIER_SIZE = 64  # larger images are scored at 64x64 (training stays CPU-cheap)


@dataclass(frozen=True)
class ClassifierSettings:
    """How a classifier is trained; a cached one is valid only for the settings (and data) it was trained with."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    max_lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    num_features: int = 64


def classifier_size(image_size: int) -> int:
    """The resolution the classifier of `image_size` images works at: the same, at most MAX_CLASSIFIER_SIZE."""
    return min(image_size, MAX_CLASSIFIER_SIZE)


def extractor_name(split: DatasetSplit) -> str:
    """'digits-cnn', 'mnist-cnn', 'folder-cnn' or 'npz-cnn': the extractor's name in results."""
    kind = (split.spec or split.name).split(":", 1)[0]
    return f"{kind}-cnn"


class ImageCNN(nn.Module):
    """3x3 convolutions, halving the resolution until it is below 4 (8x8: two poolings to 2x2), a `num_features`
    penultimate layer, `num_classes` logits. Channels: width, then 2*width doubling every second pooling."""

    def __init__(
        self, width: int = 16, num_features: int = 64, num_classes: int = 10, in_channels: int = 1, image_size: int = 8
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        channels, size, stage = width, image_size, 0
        while size >= 4:
            out = 2 * width * 2 ** (stage // 2)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # (N, out, size/2, size/2)
            channels, size, stage = out, size // 2, stage + 1
        layers += [nn.Flatten(), nn.Linear(channels * size * size, num_features), nn.ReLU()]  # (N, F)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of (N, C, S, S) images in [-1, 1]."""
        return self.head(self.body(x))


DigitCNN = ImageCNN  # the 8x8x1 digit CNN is ImageCNN's default


def _random_shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each image by -1..1 pixels in each direction (background fill): cheap augmentation."""
    n, _, h, w = x.shape
    crops = F.pad(x, (1, 1, 1, 1), value=-1.0).unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 3, 3, H, W)
    i = torch.randint(0, 3, (n,), generator=generator)
    j = torch.randint(0, 3, (n,), generator=generator)
    return crops[torch.arange(n), :, i, j]  # (N, C, H, W)


class DataClassifier:
    """The built-in :class:`FeatureExtractor`: a trained :class:`ImageCNN` of one data set plus its recorded accuracy.

    Inputs of another size are resized to the network's (antialiased bilinear) first.
    """

    def __init__(self, net: ImageCNN, accuracy: float | None, info: dict[str, Any] | None = None,
                 name: str = "digits-cnn") -> None:
        self.net = net.eval()
        self.accuracy = accuracy
        self.info = dict(info or {})
        self.name = name
        self.trained_now = False  # True when this instance was trained rather than loaded from the cache
        self.num_features = int(net.head.in_features)
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def _prepare(self, images: Tensor) -> Tensor:
        """(N, C, S, S) float CPU images in [-1, 1] at the network's size."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise DataError(f"the {self.name} classifier scores (N, {self.in_channels}, H, W) images, got shape "
                            f"{tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)  # (N, C, S, S)
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


DigitClassifier = DataClassifier  # the digits' classifier is a DataClassifier like any other


def _fit(net: ImageCNN, x: Tensor, y: Tensor, s: ClassifierSettings, generator: torch.Generator) -> None:
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


@torch.no_grad()
def _accuracy(classifier: DataClassifier, x: Tensor, y: Tensor) -> float:
    """Fraction of `x` the classifier labels `y`."""
    return float((classifier.predict(x) == y).double().mean())


def check_classifiable(split: DatasetSplit) -> None:
    """Raise DataError unless the built-in classifier fits `split`: labelled images of at least 8x8, 2+ classes."""
    if not split.holds_images:
        raise DataError(f"data '{split.name}' holds {split.in_channels}-channel values, not 1- or 3-channel images "
                        "in [-1, 1]: the built-in classifier scores images only")
    if split.image_size < MIN_CLASSIFIER_SIZE:
        raise DataError(f"data '{split.name}' has {split.image_size}x{split.image_size} images: the built-in "
                        f"classifier needs at least {MIN_CLASSIFIER_SIZE}x{MIN_CLASSIFIER_SIZE}")
    if split.num_classes < 2 or len(torch.unique(split.train_y)) < 2:
        raise DataError(f"data '{split.name}' has fewer than 2 classes in its train split: a classifier's features "
                        "need at least 2")
    if not len(split.val_x):
        raise DataError(f"data '{split.name}' has no validation images to measure its classifier on")


def train_classifier(split: DatasetSplit, settings: ClassifierSettings | None = None) -> DataClassifier:
    """Train the data set's CNN on its train split (seed-fixed, one CPU thread); accuracy on its val split."""
    s = settings or ClassifierSettings()
    check_classifiable(split)
    size = classifier_size(split.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = ImageCNN(s.width, s.num_features, split.num_classes, split.in_channels, size)
    classifier = DataClassifier(net, None, name=extractor_name(split))
    train_x = classifier._prepare(split.train_x)  # (N, C, S, S) at the classifier's size
    generator = torch.Generator().manual_seed(s.seed)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two on a busy 2-core box
    try:
        _fit(net, train_x, split.train_y, s, generator)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    classifier.accuracy = _accuracy(classifier, split.val_x, split.val_y)
    classifier.info = {
        "version": CLASSIFIER_VERSION,
        "name": classifier.name,
        "settings": asdict(s),
        "architecture": {"in_channels": split.in_channels, "image_size": size, "num_classes": split.num_classes},
        "val_accuracy": classifier.accuracy,
        "train_accuracy": _accuracy(classifier, split.train_x, split.train_y),
        "dataset": split.describe(),
        "train_seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
    }
    classifier.trained_now = True
    return classifier
