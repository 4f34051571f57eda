"""Feature spaces and the distance between them: the :class:`FeatureExtractor` protocol, FID's Inception features
from a local weights file, and the Frechet distance between two feature sets.

The Frechet distance is torchmetrics' `FrechetInceptionDistance` fed with our features (an identity feature module):
float64 moment accumulation and the trace of the matrix square root from the eigenvalues of sigma1 @ sigma2, which
stays real and finite for singular covariances (dead ReLU units) where `scipy.linalg.sqrtm` needs an epsilon offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ..errors import DataError
from .inception import load_fid_inception

__all__ = ["FeatureExtractor", "InceptionFeatureExtractor", "frechet_distance"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metric needs from a feature network. Images are (N, C, H, W) floats in [-1, 1].

    `features` returns (N, F) float features (e.g. a classifier's penultimate layer); `predict` returns (N,) class
    ids in the generative model's label space, or None when the extractor cannot classify (class accuracy is then
    not reported). `accuracy` is the extractor's own recorded held-out accuracy, if known.
    """

    name: str
    num_features: int
    accuracy: float | None

    def features(self, images: Tensor) -> Tensor: ...

    def predict(self, images: Tensor) -> Tensor | None: ...


class InceptionFeatureExtractor:
    """FID's Inception-v3 features (2048-d pool) from a local weights file, for users with real image data.

    The network is :class:`~dynasearch.quality.inception.FIDInceptionV3` (torch-fidelity's "inception-v3-compat",
    defined in plain PyTorch) loaded from `weights_path` (`weights-inception-2015-12-05-6726825d.pth`, read with
    `weights_only=True`); nothing is downloaded. Class accuracy needs `label_map`: for each of the network's 1008
    logits, the model's class id (or -1); without it `predict` returns None and no class accuracy is reported.
    """

    name = "inception-v3"
    num_features = 2048
    accuracy = None

    def __init__(self, weights_path: str | Path, label_map: Sequence[int] | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> None:
        self.net = load_fid_inception(weights_path, device)
        self.label_map = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long)
        self.batch_size = batch_size

    def _run(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pool features (N, 2048) and logits (N, 1008) of images in [-1, 1], batch by batch."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"Inception features need (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
        x = (127.5 * images.detach().float().cpu() + 128.0).clamp(0, 255).to(torch.uint8)  # (N, C, H, W), as DiT
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W)
        device = next(self.net.parameters()).device
        feats, logits = [], []
        with torch.no_grad():
            for chunk in x.split(self.batch_size):
                f, lg = self.net(chunk.to(device))
                feats.append(f.float().cpu())  # (B, 2048)
                logits.append(lg.float().cpu())  # (B, 1008)
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: Tensor) -> Tensor:
        """(N, 2048) pool features."""
        return self._run(images)[0]

    def predict(self, images: Tensor) -> Tensor | None:
        """Model class ids through `label_map`, or None without one."""
        if self.label_map is None:
            return None
        return self.label_map[self._run(images)[1].argmax(dim=1)]


class _Identity(nn.Module):
    """Feature 'network' for torchmetrics' FID when the features are already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        """The features as given, (N, F)."""
        return x


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F), via torchmetrics' FID."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise DataError(f"feature sets {tuple(features_a.shape)} and {tuple(features_b.shape)} do not match")
    if len(features_a) < 2 or len(features_b) < 2:
        raise DataError("the Frechet distance needs at least 2 samples in each set")
    for name, feats in (("first", features_a), ("second", features_b)):
        if not torch.isfinite(feats).all():
            raise DataError(f"the {name} feature set has non-finite values")
    metric = FrechetInceptionDistance(feature=_Identity(int(features_a.shape[1])), reset_real_features=True)
    metric.update(features_a.detach().cpu().double(), real=True)
    metric.update(features_b.detach().cpu().double(), real=False)
    return float(metric.compute())
