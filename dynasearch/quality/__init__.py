"""Generative quality: Frechet distance in a classifier's feature space and the class accuracy of conditional samples.

:mod:`.features` holds the :class:`FeatureExtractor` protocol, FID's Inception features and the Frechet distance;
:mod:`.classifier` the built-in extractor (a small CNN of one labelled image data set), :mod:`.cache` trains it
once per data set and keeps it; :mod:`.reference` picks the data a model was trained on and its real images;
:mod:`.evaluate` is the front end (:func:`evaluate_quality`, :func:`evaluate_samples`, `dynasearch eval`).
The FID protocol of ADM and DiT: :mod:`.inception` (FID's Inception-v3 from a local weights file), :mod:`.fid_stats`
(feature statistics, their Frechet distance, reference batches) and :mod:`.fid` (`eval --inception-weights`).
"""

from .cache import (
    classifier_digest,
    default_cache_dir,
    load_cached_classifier,
    load_classifier,
    load_digit_classifier,
    train_digit_classifier,
)
from .classifier import (
    ClassifierSettings,
    DataClassifier,
    DigitClassifier,
    DigitCNN,
    ImageCNN,
    StatusFn,
    train_classifier,
)
from .evaluate import (
    EvalConfig,
    QualityResult,
    evaluate_quality,
    evaluate_samples,
    run_eval,
)
from .features import FeatureExtractor, InceptionFeatureExtractor, frechet_distance
from .fid import FidConfig, FidResult, run_fid
from .fid_stats import FeatureStats, frechet_distance_from_stats, parse_reference
from .inception import FIDInceptionV3, load_fid_inception
from .reference import (
    Reference,
    default_extractor,
    load_reference,
    real_digits,
    resolve_data,
)

__all__ = [
    "ClassifierSettings",
    "DataClassifier",
    "DigitCNN",
    "DigitClassifier",
    "EvalConfig",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureStats",
    "FidConfig",
    "FidResult",
    "ImageCNN",
    "InceptionFeatureExtractor",
    "QualityResult",
    "Reference",
    "StatusFn",
    "classifier_digest",
    "default_cache_dir",
    "default_extractor",
    "evaluate_quality",
    "evaluate_samples",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_cached_classifier",
    "load_classifier",
    "load_digit_classifier",
    "load_fid_inception",
    "load_reference",
    "parse_reference",
    "real_digits",
    "resolve_data",
    "run_eval",
    "run_fid",
    "train_classifier",
    "train_digit_classifier",
]
