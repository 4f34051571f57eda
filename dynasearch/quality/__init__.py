"""Generative quality: Frechet distance in a classifier's feature space and the class accuracy of conditional samples.

:mod:`.features` holds the :class:`FeatureExtractor` protocol, FID's Inception features and the Frechet distance;
:mod:`.classifier` the built-in extractor (a small digit CNN, trained once and cached) and the real images it
compares with; :mod:`.evaluate` the front end (:func:`evaluate_quality`, :func:`evaluate_samples`, `dynasearch eval`).
"""

from .classifier import (
    ClassifierSettings,
    DigitClassifier,
    DigitCNN,
    StatusFn,
    default_cache_dir,
    default_extractor,
    load_cached_classifier,
    load_digit_classifier,
    real_digits,
    train_digit_classifier,
)
from .evaluate import (
    EvalConfig,
    QualityResult,
    evaluate_quality,
    evaluate_samples,
    flops_per_step,
    run_eval,
)
from .features import FeatureExtractor, InceptionFeatureExtractor, frechet_distance

__all__ = [
    "ClassifierSettings",
    "FeatureExtractor",
    "DigitCNN",
    "DigitClassifier",
    "InceptionFeatureExtractor",
    "QualityResult",
    "StatusFn",
    "EvalConfig",
    "default_cache_dir",
    "default_extractor",
    "load_cached_classifier",
    "load_digit_classifier",
    "train_digit_classifier",
    "flops_per_step",
    "frechet_distance",
    "evaluate_quality",
    "evaluate_samples",
    "real_digits",
    "run_eval",
]
