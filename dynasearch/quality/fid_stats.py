"""FID's statistics: the mean and covariance of Inception features accumulated batch by batch, the Frechet distance
between two such Gaussians, and the references they come from (an ADM reference batch's stored `mu`/`sigma`, its
`arr_0` images, or a folder of real images).

Means and covariances are float64 and the covariance is the unbiased one (`np.cov`, as ADM's evaluator computes
it). The distance is ADM's ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``, with ``tr sqrt(S1 S2)`` taken as
the sum of the singular values of ``L1^T L2`` for any factors ``S = L L^T`` (S1 S2 has the eigenvalues of
``(L1^T L2)(L1^T L2)^T``; the factors come from the eigendecompositions, their rank only): real, finite and
accurate for singular covariances too (fewer samples than features), where `scipy.linalg.sqrtm` of the product needs
an epsilon offset and the square roots of the product's eigenvalues turn round-off of 1e-8 into errors of 1e-4 per
feature (a batch's FD to itself came out -0.025 that way, 4e-10 this way, at a trace of 2e4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..adm_batch import IMAGES_KEY, array_info, check_images, npz_keys, read_array
from ..data.loaders import IMAGE_SUFFIXES
from ..errors import DataError
from .inception import FID_FEATURES

__all__ = ["FeatureStats", "ReferenceSpec", "folder_images", "frechet_distance_from_stats", "parse_reference"]


class FeatureStats:
    """Running mean and covariance of (N, F) features, accumulated in float64 around the first batch's mean."""

    def __init__(self, num_features: int = FID_FEATURES) -> None:
        self.num_features = num_features
        self.count = 0
        self._shift: Tensor | None = None  # (F,)
        self._sum = torch.zeros(num_features, dtype=torch.float64)  # (F,)
        self._outer = torch.zeros(num_features, num_features, dtype=torch.float64)  # (F, F)

    def add(self, features: Tensor) -> None:
        """Accumulate a batch of features (b, F)."""
        x = features.detach().to("cpu", torch.float64)  # (b, F)
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise DataError(f"features {tuple(x.shape)} do not have {self.num_features} columns")
        if not torch.isfinite(x).all():
            raise DataError("the features hold non-finite values")
        if self._shift is None:
            self._shift = x.mean(dim=0)
        d = x - self._shift  # (b, F)
        self._sum += d.sum(dim=0)
        self._outer += d.T @ d
        self.count += int(x.shape[0])

    @property
    def mu(self) -> np.ndarray:
        """The mean (F,)."""
        if self._shift is None:
            raise DataError("no features were accumulated")
        return (self._shift + self._sum / self.count).numpy()

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (F, F) (ddof 1, as np.cov)."""
        if self.count < 2:
            raise DataError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self._sum / self.count  # (F,)
        return ((self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)).numpy()


def _factor(matrix: Tensor) -> Tensor:
    """L (F, r) with L L^T = the symmetric PSD `matrix`, its eigen-directions below round-off (an eigenvalue under
    F * eps * the largest) left out: r is the numerical rank (fewer samples than features: fewer columns)."""
    values, vectors = torch.linalg.eigh(matrix)
    keep = values > values.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    return vectors[:, keep] * values[keep].sqrt()


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    m1, m2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise DataError(f"statistics of different sizes: mu {tuple(m1.shape)} / {tuple(m2.shape)}, sigma "
                        f"{tuple(s1.shape)} / {tuple(s2.shape)}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    cross = torch.linalg.svdvals(_factor(s1).T @ _factor(s2)).sum()  # tr sqrt(S1 S2): the nuclear norm of L1^T L2
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * cross)


@dataclass(frozen=True)
class ReferenceSpec:
    """A checked `--ref`: an ADM reference batch (`stored`: it has mu/sigma; else its arr_0 images) or a folder."""

    text: str
    kind: str  # "npz" | "folder"
    path: Path
    stored: bool = False  # npz with mu and sigma
    count: int = 0  # images (arr_0, or the folder's files); 0 when the stored statistics are used

    def describe(self) -> str:
        """E.g. "'VIRTUAL_imagenet256_labeled.npz' (its stored mu/sigma)"."""
        if self.stored:
            return f"'{self.path}' (its stored mu/sigma)"
        return f"'{self.path}' ({self.count} images{' in arr_0' if self.kind == 'npz' else ''})"


def folder_images(root: Path) -> list[Path]:
    """Every image file under `root` (any depth, hidden entries skipped), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _check_stats(path: Path) -> None:
    """Raise DataError unless the npz's mu (F,) and sigma (F, F) are finite float arrays of FID's feature size."""
    keys = npz_keys(path)
    if "sigma" not in keys or "mu" not in keys:
        have = "mu" if "mu" in keys else "sigma"
        raise DataError(f"reference batch '{path}' has '{have}' but not '{'sigma' if have == 'mu' else 'mu'}'")
    mu, sigma = array_info(path, "mu"), array_info(path, "sigma")
    if mu.shape != (FID_FEATURES,) or sigma.shape != (FID_FEATURES, FID_FEATURES):
        raise DataError(f"reference batch '{path}': mu {mu.shape} and sigma {sigma.shape} are not statistics of "
                        f"FID's {FID_FEATURES} Inception features (expected ({FID_FEATURES},) and "
                        f"({FID_FEATURES}, {FID_FEATURES}))")
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise DataError(f"reference batch '{path}': mu and sigma must be float arrays, got {mu.dtype}, {sigma.dtype}")
    if not (np.isfinite(read_array(path, "mu")).all() and np.isfinite(read_array(path, "sigma")).all()):
        raise DataError(f"reference batch '{path}': mu or sigma holds non-finite values")


def parse_reference(text: str | Path) -> ReferenceSpec:
    """Check a `--ref` value: `folder:PATH` (real images, at least 2) or an ADM reference batch npz (stored mu/sigma
    preferred, else arr_0 images); every problem is one DataError naming it."""
    raw = str(text)
    if raw.startswith("folder:"):
        root = Path(raw[len("folder:"):]).expanduser()
        if not root.exists():
            raise DataError(f"--ref folder '{root}' does not exist")
        if not root.is_dir():
            raise DataError(f"--ref folder '{root}' is not a directory")
        count = len(folder_images(root))
        if count < 2:
            raise DataError(f"--ref folder '{root}' holds {count} images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "FID needs at least 2")
        return ReferenceSpec(raw, "folder", root, count=count)
    path = Path(raw.removeprefix("npz:")).expanduser()
    if not path.exists():
        raise DataError(f"--ref '{path}' does not exist (give an ADM reference batch .npz or folder:PATH)")
    if path.is_dir():
        raise DataError(f"--ref '{path}' is a directory: give folder:{path} for its real images, or an ADM reference "
                        "batch .npz")
    keys = npz_keys(path)
    if "mu" in keys or "sigma" in keys:
        _check_stats(path)
        return ReferenceSpec(raw, "npz", path, stored=True)
    if IMAGES_KEY not in keys:
        raise DataError(f"--ref '{path}' holds neither mu/sigma nor '{IMAGES_KEY}' images (it holds: "
                        f"{', '.join(keys) or 'nothing'}); expected ADM's reference batch layout")
    info = array_info(path, IMAGES_KEY)
    check_images(info, f"'{IMAGES_KEY}' of --ref '{path}'", minimum=2)
    return ReferenceSpec(raw, "npz", path, count=info.count)
