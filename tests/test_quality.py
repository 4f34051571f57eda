"""The quality metric: each data set's cached classifier (digits, mnist, npz/folder images), the reference a model is
scored against, the Frechet distance, evaluate_quality and `dynasearch eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_supernet_run, make_model

from dynasearch.checkpoint.native import load_checkpoint, read_config, save_checkpoint
from dynasearch.cli import main
from dynasearch.data import DataRecord, DataSpec, load_dataset
from dynasearch.errors import CheckpointError, DataError
from dynasearch.model import get_config
from dynasearch.model.schedule import SubnetSchedule, TimestepBuckets
from dynasearch.model.subnet import Subnet
from dynasearch.quality import (
    ClassifierSettings,
    DataClassifier,
    DigitClassifier,
    FeatureExtractor,
    ImageCNN,
    InceptionFeatureExtractor,
    QualityResult,
    classifier_digest,
    default_cache_dir,
    evaluate_quality,
    frechet_distance,
    load_cached_classifier,
    load_classifier,
    load_digit_classifier,
    load_reference,
    real_digits,
    resolve_data,
)
from dynasearch.quality.cache import cache_files
from dynasearch.report.build import ReportConfig, build_report
from dynasearch.search.timestep import export_schedule


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dynasearch-cache")


@pytest.fixture(scope="session")
def classifier(cache_dir: Path) -> DigitClassifier:
    """Trained once per test session (a few seconds) into a temporary cache."""
    return load_digit_classifier(cache_dir)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def _digits_files(cache_dir: Path, digits, settings: ClassifierSettings | None = None) -> tuple[Path, Path]:
    return cache_files(cache_dir, digits, classifier_digest(digits, settings or ClassifierSettings()))


@pytest.fixture
def use_cache(cache_dir: Path, classifier, monkeypatch) -> Path:
    monkeypatch.setenv("DYNASEARCH_CACHE", str(cache_dir))
    return cache_dir


# ------------------------------------------------------------------------------------------------ classifier + cache
def test_classifier_is_accurate_and_recorded(classifier: DigitClassifier, cache_dir: Path, digits):
    assert isinstance(classifier, FeatureExtractor) and isinstance(classifier, DataClassifier)
    assert classifier.accuracy is not None and classifier.accuracy >= 0.95
    weights, meta_file = _digits_files(cache_dir, digits)
    assert weights.name.startswith("digits-cnn-v2-") and weights.is_file()
    meta = json.loads(meta_file.read_text())
    assert meta["val_accuracy"] == classifier.accuracy
    assert meta["dataset"]["num_val"] == 180 and meta["settings"]["seed"] == 0
    assert meta["digest"] == classifier_digest(digits, ClassifierSettings())
    feats = classifier.features(torch.zeros(3, 1, 8, 8))
    assert feats.shape == (3, classifier.num_features) == (3, 64)
    assert classifier.predict(torch.zeros(3, 1, 16, 16)).shape == (3,)  # other sizes are resized to 8x8


# The 8x8 digit CNN before the classifier was generalised (version 1): its parameters, and its numbers on this
# machine (val accuracy 179/180, FD between two halves of the real digits 3.5134, real vs noise 231.60).
_V1_SHAPES = {
    "body.0.weight": (16, 1, 3, 3), "body.0.bias": (16,), "body.2.weight": (32, 16, 3, 3), "body.2.bias": (32,),
    "body.5.weight": (32, 32, 3, 3), "body.5.bias": (32,), "body.9.weight": (64, 128), "body.9.bias": (64,),
    "head.weight": (10, 64), "head.bias": (10,),
}


def test_the_generic_classifier_is_the_old_digit_cnn_at_8x8(classifier: DigitClassifier):
    shapes = {k: tuple(v.shape) for k, v in classifier.net.state_dict().items()}
    assert shapes == _V1_SHAPES  # same layers in the same order: same initialisation, same training
    assert classifier.accuracy == pytest.approx(179 / 180)
    real = real_digits()
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    same = frechet_distance(classifier.features(real[perm[:898]]), classifier.features(real[perm[898:]]))
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    far = frechet_distance(classifier.features(real), classifier.features(noise))
    # the classifier's training is deterministic per machine, not across CPUs' float kernels: real-vs-real FD
    # 3.5134 on a 2-core Intel Xeon, 3.5818 on a 2-core AMD EPYC (torch 2.13 CPU)
    assert same == pytest.approx(3.55, abs=0.15)
    assert far == pytest.approx(231.60, rel=0.03)


def test_image_cnn_is_sized_by_the_data():
    for channels, size, classes, pools, flat in ((1, 8, 10, 2, 2), (1, 32, 10, 4, 2), (3, 28, 5, 3, 3)):
        net = ImageCNN(16, 64, classes, channels, size)
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.body) == pools
        assert net(torch.zeros(2, channels, size, size)).shape == (2, classes)
        assert net.body[-2].in_features == net.body[-6].out_channels * flat * flat


def test_cache_is_reused_not_retrained(classifier: DigitClassifier, cache_dir: Path, digits):
    weights = _digits_files(cache_dir, digits)[0]
    stamp = weights.stat().st_mtime_ns
    again = load_digit_classifier(cache_dir)
    assert classifier.trained_now and not again.trained_now
    assert weights.stat().st_mtime_ns == stamp
    for key, value in classifier.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key])


def test_stale_or_corrupt_cache_is_ignored(classifier: DigitClassifier, cache_dir: Path, tmp_path: Path, digits):
    settings = ClassifierSettings()
    assert load_cached_classifier(cache_dir, digits, settings) is not None
    assert load_cached_classifier(cache_dir, digits, ClassifierSettings(epochs=3)) is None  # other settings: retrain
    other_split = load_dataset("digits", seed=1)  # other data: another digest, another file
    assert classifier_digest(other_split, settings) != classifier_digest(digits, settings)
    assert load_cached_classifier(cache_dir, other_split, settings) is None
    copy = tmp_path / "copy"
    copy.mkdir()
    weights, meta = _digits_files(cache_dir, digits)
    for path in (weights, meta):
        (copy / path.name).write_bytes(path.read_bytes())
    assert load_cached_classifier(copy, digits, settings) is not None
    (copy / weights.name).write_bytes(b"garbage")  # weights no longer match the recorded digest
    assert load_cached_classifier(copy, digits, settings) is None
    (copy / meta.name).write_text("{not json")
    assert load_cached_classifier(copy, digits, settings) is None


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
    assert (result.reference, result.reference_split, result.classifier_val) == ("digits", "train+val", 180)
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
    with pytest.raises(DataError, match="latents, not images: scoring it needs a VAE decoder and Inception"):
        evaluate_quality(model, num=4, steps=2, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any classifier is trained


def test_inception_hook_needs_local_weights(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        InceptionFeatureExtractor(tmp_path / "pt_inception.pth")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_eval_json_and_table(tiny_model, tmp_path: Path, use_cache: Path, capsys):
    ck = save_checkpoint(tiny_model, tmp_path / "ck")
    args = ["eval", "--checkpoint", str(ck), "--num", "20", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num"] == 20 and doc["fd"] > 0 and 0 <= doc["class_accuracy"] <= 1
    # a checkpoint from before data records (none in its config.json), digits-shaped: scored against the digits
    assert (doc["reference"], doc["num_real"], doc["extractor"]) == ("digits", 1797, "digits-cnn")
    assert doc["extra"]["data_from"].startswith("default") and doc["classifier_accuracy"] >= 0.95
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "Frechet distance" in table and "digits train+val, 1797 images" in table and "digits val (180" in table


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
    code = main(["eval", "--checkpoint", str(ck), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and message in err


# ------------------------------------------------------------------------------------------------ the reference
def _npz_images(
    path: Path, size: int = 8, classes: int = 4, num: int = 120, channels: int = 1, scale: float = 1.0
) -> str:
    """Labelled noisy images in [-1, 1] (scale > 1: values outside, like latents): class c (< 16) is a bright square
    in cell c of a 4x4 grid."""
    gen = np.random.default_rng(0)
    y = np.arange(num) % classes
    x = gen.uniform(-1.0, -0.6, (num, channels, size, size)).astype(np.float32)
    cell = max(1, size // 4)
    for i, c in enumerate(y):
        x[i, :, (c // 4) * cell : (c // 4 + 1) * cell, (c % 4) * cell : (c % 4 + 1) * cell] = 0.9
    np.savez(path, x=x * scale, y=y)
    return f"npz:{path}"


def _checkpoint(path: Path, config, data: dict | None) -> Path:
    return save_checkpoint(make_model(config), path, extra={"data": data} if data is not None else None)


def test_resolve_data_reads_the_record_else_digits_else_asks(tiny_config):
    digits_record = DataRecord(DataSpec("digits"))
    assert resolve_data({}, tiny_config) == digits_record  # an unrecorded digits-shaped checkpoint: the digits
    doc = {"data": load_dataset("mnist").describe()}
    assert resolve_data(doc, tiny_config) == DataRecord(DataSpec("mnist"), image_size=32)  # the record wins
    assert resolve_data(doc, tiny_config, "digits") == DataRecord(DataSpec("digits"), image_size=8)  # --data wins
    big = get_config("DiT-N/2", input_size=16, in_channels=1, num_classes=10)
    with pytest.raises(DataError, match=r"records no training data .*\(16x16x1, 10 classes\).* pass --data SPEC"):
        resolve_data({}, big, source="checkpoint 'x'")
    latent = get_config("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    with pytest.raises(DataError, match="latents"):
        resolve_data({}, latent)


def test_load_reference_refuses_what_no_classifier_fits(tiny_config, tmp_path: Path):
    rgb = get_config("DiT-N/2", input_size=8, in_channels=3, num_classes=10)
    with pytest.raises(DataError, match=r"data 'digits' \(8x8x1, 10 classes\) does not fit model 'DiT-N/2' \(8x8x3"):
        load_reference(DataRecord(DataSpec("digits")), rgb, tmp_path)
    lat = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=4)
    wide = _npz_images(tmp_path / "wide.npz", scale=3.0)  # one channel but values far outside [-1, 1]
    with pytest.raises(DataError, match=f"trained on '{wide}' generates latents"):
        load_reference(DataRecord(DataSpec("npz", wide[4:])), lat, tmp_path)
    tiny = get_config("DiT-N/2", input_size=4, in_channels=1, num_classes=4)
    small = _npz_images(tmp_path / "small.npz", size=4)
    with pytest.raises(DataError, match="needs at least 8x8"):
        load_reference(DataRecord(DataSpec("npz", small[4:])), tiny, tmp_path)
    one = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=1)
    single = _npz_images(tmp_path / "single.npz", classes=1)
    with pytest.raises(DataError, match="fewer than 2 classes"):
        load_reference(DataRecord(DataSpec("npz", single[4:])), one, tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))  # nothing trained, nothing cached


def test_eval_scores_against_the_recorded_data_not_the_digits(tmp_path: Path, monkeypatch, capsys):
    """A digits-shaped model trained on an npz of images is scored against that npz, by that npz's classifier."""
    monkeypatch.setenv("DYNASEARCH_CACHE", str(tmp_path / "cache"))
    spec = _npz_images(tmp_path / "bands.npz", classes=10, num=200)
    split = load_dataset(spec)
    ck = _checkpoint(tmp_path / "ck", get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10),
                     split.describe())
    args = ["eval", "--checkpoint", str(ck), "--num", "10", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert (doc["reference"], doc["reference_split"], doc["num_real"]) == (spec, "train+val", 200)
    assert doc["extractor"] == "npz-cnn" and doc["classifier_val"] == 20 and doc["extra"]["data_from"] == "checkpoint"
    meta = next((tmp_path / "cache").glob("npz-cnn-v2-*.json"))
    assert json.loads(meta.read_text())["val_accuracy"] == doc["classifier_accuracy"] >= 0.9  # squares are easy
    assert "training the npz-cnn classifier once" in err and "validation accuracy" in err
    assert main(args) == 0  # the cached classifier: no training message, the reference in the table
    out, err = capsys.readouterr()
    assert "training" not in err and "reference" in out and "200 images" in out and "(20 images)" in out


def test_eval_data_option_overrides_and_an_unrecorded_model_needs_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("DYNASEARCH_CACHE", str(tmp_path / "cache"))
    ck = _checkpoint(tmp_path / "ck", get_config("DiT-N/2", input_size=16, in_channels=1, num_classes=3), None)
    args = ["eval", "--checkpoint", str(ck), "--num", "6", "--steps", "2", "--device", "cpu", "--json"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(ck) in err and "--data SPEC" in err
    spec = _npz_images(tmp_path / "sixteen.npz", size=16, classes=3, num=60)
    assert main([*args, "--data", spec]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reference"] == spec and doc["num_real"] == 60 and doc["extra"]["data_from"] == "--data"
    assert main([*args, "--data", "cifar"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "cifar" in err


def test_exported_subnets_and_the_report_score_against_the_supernets_data(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DYNASEARCH_CACHE", str(tmp_path / "cache"))
    spec = _npz_images(tmp_path / "bands.npz", classes=10, num=200)
    run = fake_supernet_run(tmp_path / "run")
    doc = read_config(run)
    doc["data"] = load_dataset(spec).describe()
    (run / "config.json").write_text(json.dumps(doc))
    out = tmp_path / "search"
    assert main(["search", "--supernet", str(run), "--flops", "0.5x", "--trials", "2", "--proxy-samples", "8",
                 "--export-top", "1", "--out", str(out)]) == 0
    exported = sorted(p for p in (out / "subnets").iterdir() if (p / "config.json").is_file())
    assert exported and all(read_config(p)["data"] == doc["data"] for p in exported)
    result = build_report(ReportConfig(out, samples=False, eval_num=6, steps=2, latency_repeats=1))
    assert result.models["FD"].notna().all() and len(result.models) == 1 + len(exported)
    assert any(f"against {spec} train+val, 200 images, in npz-cnn features" in n for n in result.notes)


def test_export_schedule_carries_the_supernets_data(tmp_path: Path):
    run = fake_supernet_run(tmp_path / "run")
    model = load_checkpoint(run)
    full = Subnet.full(model.config)
    schedule = SubnetSchedule(TimestepBuckets.equal(2, 1000), [full, full])
    export_schedule(model, schedule, tmp_path / "sched", list(range(0, 1000, 100)), {"method": "test"}, run)
    assert read_config(tmp_path / "sched")["data"] == read_config(run)["data"]
    export_schedule(model, schedule, tmp_path / "bare", list(range(0, 1000, 100)), {"method": "test"})
    assert "data" not in read_config(tmp_path / "bare")


# ------------------------------------------------------------------------------------------------ mnist
@pytest.fixture(scope="session")
def mnist_classifier(cache_dir: Path) -> tuple[DataClassifier, list[str]]:
    """The mnist classifier, trained once per test session (about 2 minutes on a busy 2-core CPU)."""
    messages: list[str] = []
    return load_classifier(load_dataset("mnist"), cache_dir, status=messages.append), messages


@pytest.mark.slow
def test_mnist_classifier_reaches_97_percent(mnist_classifier, cache_dir: Path):
    classifier, messages = mnist_classifier
    assert classifier.name == "mnist-cnn" and classifier.image_size == 32 and classifier.in_channels == 1
    assert classifier.accuracy >= 0.97  # measured 0.992 (496 of 500 val digits)
    meta = json.loads(next(cache_dir.glob("mnist-cnn-v2-*.json")).read_text())
    assert meta["val_accuracy"] == classifier.accuracy and meta["dataset"]["num_val"] == 500
    assert any("validation accuracy" in m and "500 'mnist' val images" in m for m in messages)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in classifier.net.body) == 4  # 32 -> 2


@pytest.mark.slow
def test_eval_of_an_mnist_model_reports_the_mnist_reference(mnist_classifier, cache_dir: Path, tmp_path: Path,
                                                            monkeypatch, capsys):
    monkeypatch.setenv("DYNASEARCH_CACHE", str(cache_dir))
    ck = _checkpoint(tmp_path / "ck", get_config("DiT-N/4", input_size=32, in_channels=1, num_classes=10),
                     load_dataset("mnist").describe())
    args = ["eval", "--checkpoint", str(ck), "--num", "10", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert (doc["reference"], doc["num_real"], doc["extractor"]) == ("mnist", 5000, "mnist-cnn")
    assert doc["classifier_accuracy"] == mnist_classifier[0].accuracy >= 0.97 and "training" not in err
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "mnist train+val, 5000 images" in table and "mnist val (500 images)" in table
