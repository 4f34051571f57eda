"""The quality metric: the cached digit classifier, the Frechet distance, evaluate_quality and `dynasearch eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model

from dynasearch.checkpoint.native import save_checkpoint
from dynasearch.cli import main
from dynasearch.errors import CheckpointError, DataError
from dynasearch.model import get_config
from dynasearch.quality import (
    ClassifierSettings,
    DigitClassifier,
    FeatureExtractor,
    InceptionFeatureExtractor,
    QualityResult,
    default_cache_dir,
    evaluate_quality,
    frechet_distance,
    load_cached_classifier,
    load_digit_classifier,
    real_digits,
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dynasearch-cache")


@pytest.fixture(scope="session")
def classifier(cache_dir: Path) -> DigitClassifier:
    """Trained once per test session (a few seconds) into a temporary cache."""
    return load_digit_classifier(cache_dir)


@pytest.fixture
def use_cache(cache_dir: Path, classifier, monkeypatch) -> Path:
    monkeypatch.setenv("DYNASEARCH_CACHE", str(cache_dir))
    return cache_dir


# ------------------------------------------------------------------------------------------------ classifier + cache
def test_classifier_is_accurate_and_recorded(classifier: DigitClassifier, cache_dir: Path):
    assert isinstance(classifier, FeatureExtractor)
    assert classifier.accuracy is not None and classifier.accuracy >= 0.95
    meta = json.loads((cache_dir / "digits-cnn-v1.json").read_text())
    assert meta["val_accuracy"] == classifier.accuracy
    assert meta["dataset"]["num_val"] == 180 and meta["settings"]["seed"] == 0
    feats = classifier.features(torch.zeros(3, 1, 8, 8))
    assert feats.shape == (3, classifier.num_features) == (3, 64)
    assert classifier.predict(torch.zeros(3, 1, 16, 16)).shape == (3,)  # other sizes are resized to 8x8


def test_cache_is_reused_not_retrained(classifier: DigitClassifier, cache_dir: Path):
    weights = cache_dir / "digits-cnn-v1.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = load_digit_classifier(cache_dir)
    assert classifier.trained_now and not again.trained_now
    assert weights.stat().st_mtime_ns == stamp
    for key, value in classifier.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key])


def test_stale_or_corrupt_cache_is_ignored(classifier: DigitClassifier, cache_dir: Path, tmp_path: Path):
    settings = ClassifierSettings()
    assert load_cached_classifier(cache_dir, settings) is not None
    assert load_cached_classifier(cache_dir, ClassifierSettings(epochs=3)) is None  # other settings: retrain
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("digits-cnn-v1.safetensors", "digits-cnn-v1.json"):
        (copy / name).write_bytes((cache_dir / name).read_bytes())
    (copy / "digits-cnn-v1.safetensors").write_bytes(b"garbage")  # weights no longer match the recorded digest
    assert load_cached_classifier(copy, settings) is None
    (copy / "digits-cnn-v1.json").write_text("{not json")
    assert load_cached_classifier(copy, settings) is None


def test_default_cache_dir_honours_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DYNASEARCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DYNASEARCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dynasearch"


# ------------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_known_values():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 8, generator=gen, dtype=torch.float64) + 0.5
    assert frechet_distance(a, b) == pytest.approx(8 * 0.25, rel=0.05)  # ||mu1 - mu2||^2, same covariance
    assert abs(frechet_distance(a, a)) < 1e-6
    scaled = a * 2.0  # N(0, 4I) vs N(0, I): tr(4I + I - 2 * 2I) = 8
    assert frechet_distance(a, scaled) == pytest.approx(8.0, rel=0.05)


def test_frechet_distance_singular_covariance_is_finite():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.relu(torch.randn(300, 32, generator=gen)), torch.relu(torch.randn(300, 32, generator=gen))
    a[:, :10] = 0.0  # dead units: rank-deficient covariances
    b[:, :10] = 0.0
    fd = frechet_distance(a, b)
    assert fd == fd and 0.0 <= fd < 1.0


def test_frechet_distance_bad_inputs():
    with pytest.raises(DataError):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(DataError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(DataError):
        frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))


def test_real_vs_real_is_near_zero_and_noise_is_far(classifier: DigitClassifier):
    real = real_digits()
    assert real.shape == (1797, 1, 8, 8)
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    half_a, half_b = real[perm[:898]], real[perm[898:]]
    same = frechet_distance(classifier.features(half_a), classifier.features(half_b))
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    far = frechet_distance(classifier.features(real), classifier.features(noise))
    assert 0.0 <= same < 10.0  # measured about 3.6 (finite-sample bias of two ~900-image halves)
    assert far > 100.0 and far > 20 * same  # measured about 228
    assert (classifier.predict(half_a) == classifier.predict(half_a)).all()


# ------------------------------------------------------------------------------------------------ evaluate_quality
def test_evaluate_quality_on_a_tiny_model(tiny_model, use_cache: Path):
    result = evaluate_quality(tiny_model, num=20, steps=2, seed=0)
    assert isinstance(result, QualityResult)
    assert result.num == 20 and result.num_real == 1797 and result.extractor == "digits-cnn"
    assert result.fd > 0 and 0.0 <= result.class_accuracy <= 1.0
    assert result.classifier_accuracy >= 0.95
    assert len(result.per_class_accuracy) == 10
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["steps"] == 2 and doc["cfg_scale"] == 4.0 and doc["model"] == "DiT-N/2"
    again = evaluate_quality(tiny_model, num=20, steps=2, seed=0)
    assert again.fd == result.fd and again.class_accuracy == result.class_accuracy


def test_custom_extractor_plugs_in(tiny_model):
    class Pixels:
        name, num_features, accuracy = "pixels", 64, None

        def features(self, images):
            return images.flatten(1)

        def predict(self, images):
            return None

    assert isinstance(Pixels(), FeatureExtractor)
    real = torch.rand(50, 1, 8, 8) * 2 - 1
    result = evaluate_quality(tiny_model, num=10, steps=2, extractor=Pixels(), real_images=real)
    assert result.extractor == "pixels" and result.class_accuracy is None and result.fd > 0
    with pytest.raises(DataError, match="real images"):
        evaluate_quality(tiny_model, num=10, steps=2, extractor=Pixels())


def test_latent_model_needs_its_own_extractor(tmp_path: Path):
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10))
    with pytest.raises(DataError, match="1-channel"):
        evaluate_quality(model, num=4, steps=2, cache_dir=tmp_path)


def test_inception_hook_needs_local_weights(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        InceptionFeatureExtractor(tmp_path / "pt_inception.pth")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_eval_json_and_table(tiny_model, tmp_path: Path, use_cache: Path, capsys):
    ck = save_checkpoint(tiny_model, tmp_path / "ck")
    args = ["eval", "--checkpoint", str(ck), "--num", "20", "--steps", "2", "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num"] == 20 and doc["fd"] > 0 and 0 <= doc["class_accuracy"] <= 1
    assert main(args) == 0
    assert "Frechet distance" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "1"], "--num"),
        (["--steps", "0"], "--steps"),
        (["--checkpoint", "MISSING"], "does not exist"),
        (["--subnet", "MISSING"], "does not exist"),
    ],
)
def test_cli_eval_bad_inputs(tiny_model, tmp_path: Path, use_cache: Path, capsys, args, message):
    ck = save_checkpoint(tiny_model, tmp_path / "ck")
    args = [str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    code = main(["eval", "--checkpoint", str(ck)] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and message in err
