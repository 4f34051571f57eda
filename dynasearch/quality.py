"""Generative quality: Frechet distance in a classifier's feature space and the class accuracy of conditional samples.

For the embedded digits set the features come from a small CNN trained once on the digits train split and cached
(`~/.cache/dynasearch/`, or `$DYNASEARCH_CACHE`) as safetensors + JSON with its validation accuracy. Anything that
implements :class:`FeatureExtractor` can replace it: :class:`InceptionFeatureExtractor` gives the usual FID features
for users who have the Inception weights file locally (nothing is ever downloaded).

The Frechet distance is torchmetrics' `FrechetInceptionDistance` fed with our features (an identity feature module):
float64 moment accumulation and the trace of the matrix square root from the eigenvalues of sigma1 @ sigma2, which
stays real and finite for singular covariances (dead ReLU units) where `scipy.linalg.sqrtm` needs an epsilon offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint.native import load_checkpoint, load_weights, read_config, save_weights
from .cost.flops import mean_flops
from .device import resolve_device
from .diffusion.factory import diffusion_for
from .diffusion.gaussian import GaussianDiffusion
from .errors import CheckpointError, ConfigError, DataError, DynasearchError
from .fileio import atomic_write_text
from .model.config import DiTConfig
from .model.dit import DiT
from .model.schedule import SubnetSchedule
from .model.subnet import Subnet
from .sampling import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    SAMPLERS,
    ProgressFn,
    checkpoint_subnet,
    cycle_labels,
    sample_images,
)

__all__ = [
    "FeatureExtractor",
    "DigitCNN",
    "DigitClassifier",
    "InceptionFeatureExtractor",
    "QualityResult",
    "EvalConfig",
    "default_cache_dir",
    "load_digit_classifier",
    "train_digit_classifier",
    "frechet_distance",
    "evaluate_quality",
    "evaluate_samples",
    "real_digits",
    "run_eval",
]

StatusFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------- interface
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


# ---------------------------------------------------------------------------------------------------------- digits CNN
_CLASSIFIER_VERSION = 1
_CLASSIFIER_STEM = f"digits-cnn-v{_CLASSIFIER_VERSION}"


@dataclass(frozen=True)
class _TrainSettings:
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
        if images.dim() != 4 or images.shape[1] != 1:
            raise DataError(f"the digit classifier scores (N, 1, H, W) images, got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
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


def _fit(net: DigitCNN, x: Tensor, y: Tensor, s: _TrainSettings, generator: torch.Generator) -> None:
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


def train_digit_classifier(settings: _TrainSettings | None = None) -> DigitClassifier:
    """Train the digit CNN on the digits train split (seed-fixed; a few seconds on CPU); accuracy on the val split."""
    from .data import load_dataset

    s = settings or _TrainSettings()
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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cached(cache: Path, settings: _TrainSettings) -> DigitClassifier | None:
    """The cached classifier if its files are complete, consistent and from the same settings; else None."""
    weights, meta = cache / f"{_CLASSIFIER_STEM}.safetensors", cache / f"{_CLASSIFIER_STEM}.json"
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
    settings = _TrainSettings()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not retrain:
        cached = _load_cached(cache, settings)
        if cached is not None:
            return cached
    classifier = train_digit_classifier(settings)
    weights, meta = cache / f"{_CLASSIFIER_STEM}.safetensors", cache / f"{_CLASSIFIER_STEM}.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_weights(classifier.net.state_dict(), weights, {"format": "dynasearch", "model": _CLASSIFIER_STEM})
        classifier.info["weights_sha256"] = _digest(weights)
        atomic_write_text(meta, json.dumps(classifier.info, indent=2) + "\n")
        classifier.info["cache"] = str(cache)
    except OSError:
        classifier.info["cache"] = None
    return classifier


# ---------------------------------------------------------------------------------------------------------- Inception
class InceptionFeatureExtractor:
    """FID's Inception-v3 features (2048-d pool) from a local weights file, for users with real image data.

    Uses torch-fidelity's `FeatureExtractorInceptionV3` (the network torchmetrics' FID wraps; `pip install
    torch-fidelity`) loaded from `weights_path` (`weights-inception-2015-12-05-6726825d.pth`); nothing is downloaded.
    Class accuracy needs `label_map`: for each of the network's 1008 logits, the model's class id (or -1); without
    it `predict` returns None and no class accuracy is reported.
    """

    name = "inception-v3"
    num_features = 2048
    accuracy = None

    def __init__(self, weights_path: str | Path, label_map: Sequence[int] | None = None, batch_size: int = 64) -> None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"Inception weights file '{path}' does not exist; fetch it yourself "
                "(weights-inception-2015-12-05-6726825d.pth from torch-fidelity's releases) and pass its path"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import (
                FeatureExtractorInceptionV3,
            )
        except ImportError:
            raise DynasearchError(
                "Inception features need the optional 'torch-fidelity' package (pip install torch-fidelity)"
            ) from None
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=str(path)
            )
        except Exception as exc:  # noqa: BLE001 - a bad file surfaces as many error types
            raise CheckpointError(f"Inception weights file '{path}' cannot be loaded: {exc}") from None
        self.net = net.eval()
        self.label_map = None if label_map is None else torch.as_tensor(list(label_map), dtype=torch.long)
        self.batch_size = batch_size

    def _run(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"Inception features need (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        device = next(self.net.parameters()).device
        feats, logits = [], []
        with torch.no_grad():
            for chunk in x.split(self.batch_size):
                f, lg = self.net(chunk.to(device))
                feats.append(f.reshape(len(chunk), -1).float().cpu())
                logits.append(lg.reshape(len(chunk), -1).float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: Tensor) -> Tensor:
        """(N, 2048) pool features."""
        return self._run(images)[0]

    def predict(self, images: Tensor) -> Tensor | None:
        """Model class ids through `label_map`, or None without one."""
        if self.label_map is None:
            return None
        return self.label_map[self._run(images)[1].argmax(dim=1)]


# ---------------------------------------------------------------------------------------------------------- metric
class _Identity(nn.Module):
    """Feature 'network' for torchmetrics' FID when the features are already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
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
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise DynasearchError(
            "the quality metric needs the 'torchmetrics' package (pip install torchmetrics)"
        ) from None
    metric = FrechetInceptionDistance(feature=_Identity(int(features_a.shape[1])), reset_real_features=True)
    metric.update(features_a.detach().cpu().double(), real=True)
    metric.update(features_b.detach().cpu().double(), real=False)
    return float(metric.compute())


@dataclass
class QualityResult:
    """Frechet distance to real data and class accuracy of class-conditional samples (None if not measurable)."""

    fd: float
    class_accuracy: float | None
    num: int
    classifier_accuracy: float | None
    extractor: str
    num_real: int
    per_class_accuracy: list[float | None] | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    seed: int | None = None
    subnet: dict[str, Any] | None = None
    model: str | None = None
    sample_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def evaluate_samples(
    samples: Tensor,
    labels: Sequence[int] | Tensor,
    real_images: Tensor,
    extractor: FeatureExtractor,
    num_classes: int | None = None,
) -> QualityResult:
    """The metric for samples already generated: FD to `real_images` and class accuracy against `labels`."""
    labels_t = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels, dtype=torch.long).cpu()
    if len(labels_t) != len(samples):
        raise DataError(f"{len(samples)} samples but {len(labels_t)} labels")
    fd = frechet_distance(extractor.features(real_images), extractor.features(samples))
    predicted = extractor.predict(samples)
    accuracy = per_class = None
    if predicted is not None:
        correct = (predicted.cpu().long() == labels_t).double()  # (N,)
        accuracy = float(correct.mean())
        k = int(num_classes if num_classes is not None else int(labels_t.max()) + 1)
        per_class = [float(correct[labels_t == c].mean()) if (labels_t == c).any() else None for c in range(k)]
    return QualityResult(
        fd=fd, class_accuracy=accuracy, num=len(samples), classifier_accuracy=extractor.accuracy,
        extractor=extractor.name, num_real=len(real_images), per_class_accuracy=per_class,
    )


def real_digits(image_size: int = 8) -> Tensor:
    """Every embedded digit (validation + train, 1797 images) at `image_size`, (N, 1, S, S) in [-1, 1]."""
    from .data import load_dataset

    data = load_dataset("digits", image_size=image_size)
    return torch.cat([data.val_x, data.train_x], dim=0)


def _default_extractor(config: DiTConfig, cache_dir: str | Path | None, status: StatusFn | None) -> DigitClassifier:
    if config.in_channels != 1 or config.num_classes != 10:
        raise DataError(
            f"the built-in digit classifier scores 1-channel, 10-class digit models; model '{config.name}' has "
            f"{config.in_channels} channel(s) and {config.num_classes} classes; evaluate_quality() takes any "
            "FeatureExtractor with real images"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if status is not None and _load_cached(cache, _TrainSettings()) is None:
        status(f"training the digit classifier once (cached in {cache})")
    return load_digit_classifier(cache)


def _mean_flops(
    model: DiT, subnet: Subnet | SubnetSchedule | None, steps: int, diffusion: GaussianDiffusion | None
) -> float:
    """Closed-form FLOPs per denoising step (batch 1, without guidance), averaged over the sampler's timesteps."""
    from .cost.flops import closed_form_flops

    if isinstance(subnet, SubnetSchedule):
        diffusion = diffusion if diffusion is not None else diffusion_for(model.config)
        return mean_flops(subnet, model.config, diffusion.timestep_schedule(steps))
    return float(closed_form_flops(model.config, subnet if subnet is not None else model.subnet))


def evaluate_quality(
    model: DiT,
    num: int = 1000,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    subnet: Subnet | SubnetSchedule | None = None,
    sampler: str = "ddim",
    extractor: FeatureExtractor | None = None,
    real_images: Tensor | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 250,
    progress: ProgressFn | None = None,
    cache_dir: str | Path | None = None,
    status: StatusFn | None = None,
    diffusion: GaussianDiffusion | None = None,
) -> QualityResult:
    """Generate `num` class-conditional samples (labels cycling over the classes) and score them.

    FD is measured against `real_images` (default: all 1797 real digits at the model's size) in the feature space of
    `extractor` (default: the cached digit CNN); class accuracy is the extractor's prediction against the requested
    labels. `decode` maps samples to images first (e.g. a VAE decoder for latent models).
    """
    config = model.config
    if extractor is None:
        extractor = _default_extractor(config, cache_dir, status)
        if real_images is None:
            real_images = real_digits(config.input_size)
    elif real_images is None:
        raise DataError("a custom feature extractor needs the real images to compare against")
    if not isinstance(extractor, FeatureExtractor):
        raise ConfigError(f"{type(extractor).__name__} does not implement FeatureExtractor (features, predict, ...)")
    if num < 2:
        raise ConfigError(f"the quality metric needs at least 2 samples, got {num}")
    labels = cycle_labels(config.num_classes, num)
    start = time.perf_counter()
    samples = sample_images(
        model, labels, cfg_scale=cfg_scale, steps=steps, sampler=sampler, seed=seed, subnet=subnet,
        device=device, progress=progress, batch_size=batch_size, diffusion=diffusion,
    )
    seconds = time.perf_counter() - start
    images = decode(samples) if decode is not None else samples
    result = evaluate_samples(images, labels, real_images, extractor, config.num_classes)
    result.steps, result.cfg_scale, result.sampler, result.seed = steps, float(cfg_scale), sampler, seed
    result.subnet = subnet.to_dict() if subnet is not None else None
    result.extra["gflops_per_step"] = _mean_flops(model, subnet, steps, diffusion) / 1e9
    result.model = config.name
    result.sample_seconds = round(seconds, 3)
    return result


# ---------------------------------------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class EvalConfig:
    """Everything `dynasearch eval` needs; validated on construction (ConfigError)."""

    checkpoint: Path
    subnet_file: Path | None = None
    num: int = 1000
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    seed: int = 0
    sampler: str = "ddim"
    device: str = "auto"
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.num < 2:
            raise ConfigError(f"--num must be at least 2 for a Frechet distance, got {self.num}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")


def run_eval(config: EvalConfig, progress: ProgressFn | None = None, status: StatusFn | None = None) -> QualityResult:
    """Load a checkpoint (and subnet), check every input, then evaluate its generative quality."""
    doc = read_config(config.checkpoint)
    try:
        model_config = DiTConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{config.checkpoint}': {exc}") from None
    diffusion = diffusion_for(model_config, doc)  # invalid diffusion settings fail here, before any work
    subnet = checkpoint_subnet(config.checkpoint, doc, model_config, config.subnet_file)
    device = resolve_device(config.device)
    model = load_checkpoint(config.checkpoint, device=device)
    result = evaluate_quality(
        model, num=config.num, cfg_scale=config.cfg_scale, steps=config.steps, seed=config.seed, subnet=subnet,
        sampler=config.sampler, device=device, batch_size=config.batch_size, progress=progress, status=status,
        diffusion=diffusion,
    )
    result.extra["checkpoint"] = str(config.checkpoint)
    if config.subnet_file is not None:
        result.extra["subnet_file"] = str(config.subnet_file)
    return result
