"""The quality metric's front end: :class:`QualityResult`, scoring samples (:func:`evaluate_samples`), generating
and scoring a model's samples (:func:`evaluate_quality`), and `dynasearch eval` (:class:`EvalConfig`,
:func:`run_eval`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint.native import load_checkpoint, read_config
from ..checks import check_memory, check_seed
from ..cost.flops import flops_per_step
from ..data import DataRecord, DataSpec, parse_data_spec
from ..device import resolve_device
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import CheckpointError, ConfigError, DataError
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from ..sampling import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    SAMPLE_BYTES,
    SAMPLERS,
    ProgressFn,
    checkpoint_subnet,
    cycle_labels,
    sample_images,
)
from .classifier import StatusFn
from .features import FeatureExtractor, frechet_distance
from .reference import Reference, load_reference, resolve_data

__all__ = ["EvalConfig", "QualityResult", "evaluate_quality", "evaluate_samples", "run_eval"]


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
    reference: str | None = None  # the real images' data set ('mnist', ...; None: given by the caller)
    reference_split: str | None = None  # which of its images ('train+val')
    classifier_val: int | None = None  # validation images the classifier's accuracy was measured on
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
    real_features: Tensor | None = None,
) -> QualityResult:
    """The metric for samples already generated: FD to `real_images` and class accuracy against `labels`
    (`real_features`: the real images' features, if already computed)."""
    labels_t = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels, dtype=torch.long).cpu()
    if len(labels_t) != len(samples):
        raise DataError(f"{len(samples)} samples but {len(labels_t)} labels")
    real = real_features if real_features is not None else extractor.features(real_images)
    fd = frechet_distance(real, extractor.features(samples))
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
    data: str | DataSpec | DataRecord | None = None,
    reference: Reference | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 250,
    progress: ProgressFn | None = None,
    cache_dir: str | Path | None = None,
    status: StatusFn | None = None,
    diffusion: GaussianDiffusion | None = None,
) -> QualityResult:
    """Generate `num` class-conditional samples (labels cycling over the classes) and score them.

    Without an `extractor` the samples are scored against `reference` (see :func:`load_reference`), else against
    the data the model was trained on, `data` (a spec such as 'mnist' or a checkpoint's :class:`DataRecord`;
    None: the 8x8 digits, for digits-shaped models only): FD to every image of that set in its classifier's feature
    space, class accuracy by that classifier. A custom `extractor` needs its `real_images`. `decode` maps samples to
    images first (e.g. a VAE decoder for latent models).
    """
    config = model.config
    if extractor is None:
        if reference is None:
            record = resolve_data({}, config, data, source=f"model '{config.name}'", option="data=SPEC")
            reference = load_reference(record, config, cache_dir, status, option="data=SPEC")
        extractor = reference.extractor
        if real_images is None:
            real_images = reference.images
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
    ours = reference is not None and real_images is reference.images and extractor is reference.extractor
    real_features = reference.features() if ours and reference is not None else None
    result = evaluate_samples(images, labels, real_images, extractor, config.num_classes, real_features)
    if ours and reference is not None:
        result.reference, result.reference_split = reference.data, reference.split
        result.classifier_val = reference.classifier_val()
    result.steps, result.cfg_scale, result.sampler, result.seed = steps, float(cfg_scale), sampler, seed
    result.subnet = subnet.to_dict() if subnet is not None else None
    result.extra["gflops_per_step"] = flops_per_step(config, subnet if subnet is not None else model.subnet, steps,
                                                     diffusion) / 1e9
    result.model = config.name
    result.sample_seconds = round(seconds, 3)
    return result


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
    data: str | None = None  # the training data's spec, overriding the checkpoint's record

    def __post_init__(self) -> None:
        if self.num < 2:
            raise ConfigError(f"--num must be at least 2 for a Frechet distance, got {self.num}")
        check_seed(self.seed, "--seed", ConfigError)
        check_memory(self.num * SAMPLE_BYTES, f"--num {self.num}", ConfigError)
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.data is not None:
            try:
                parse_data_spec(self.data)
            except DataError as exc:
                raise DataError(f"--data: {exc}") from None


def run_eval(config: EvalConfig, progress: ProgressFn | None = None, status: StatusFn | None = None) -> QualityResult:
    """Load a checkpoint (and subnet), check every input, find the data it was trained on and that data's
    classifier (trained once), then evaluate its generative quality against that data."""
    doc = read_config(config.checkpoint)
    try:
        model_config = DiTConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{config.checkpoint}': {exc}") from None
    diffusion = diffusion_for(model_config)
    subnet = checkpoint_subnet(config.checkpoint, doc, model_config, config.subnet_file)
    device = resolve_device(config.device)
    model = load_checkpoint(config.checkpoint, device=device)
    record = resolve_data(doc, model_config, config.data, source=f"checkpoint '{config.checkpoint}'")
    reference = load_reference(record, model_config, status=status)
    result = evaluate_quality(
        model, num=config.num, cfg_scale=config.cfg_scale, steps=config.steps, seed=config.seed, subnet=subnet,
        sampler=config.sampler, device=device, batch_size=config.batch_size, progress=progress, status=status,
        diffusion=diffusion, reference=reference,
    )
    result.extra["data_from"] = "--data" if config.data is not None else (
        "checkpoint" if DataRecord.from_config(doc) is not None else "default (digits-shaped, unrecorded)")
    result.extra["checkpoint"] = str(config.checkpoint)
    if config.subnet_file is not None:
        result.extra["subnet_file"] = str(config.subnet_file)
    return result
