"""`dynasearch compare`: several checkpoints measured side by side, per seed, against the one data set they share."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import fake_supernet_run

from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint
from dynasearch.cli import main
from dynasearch.cost.flops import closed_form_flops
from dynasearch.errors import ConfigError, DataError
from dynasearch.quality import evaluate_quality, load_reference, resolve_data
from dynasearch.report.compare import (
    CompareConfig,
    CompareEntry,
    compare_models,
    parse_model_spec,
    parse_seeds,
)
from dynasearch.slicing import slice_subnet
from dynasearch.space.search_space import load_space


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A tiny digits supernet and its uniform 0.5 slice, exported as a standalone checkpoint."""
    run = fake_supernet_run(tmp_path / "run")
    supernet = load_checkpoint(run)
    subnet = load_space("blockwise").uniform(supernet.config, 0.5, 0.5, 0.5)
    small = tmp_path / "small"
    save_checkpoint(slice_subnet(supernet, subnet), small,
                    extra={"data": {"spec": "digits", "seed": 0, "val_fraction": 0.1}})
    return {"full": run, "small": small}


def test_each_model_and_seed_is_scored_as_eval_scores_it(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = CompareConfig(models=(CompareEntry("full", models["full"]), CompareEntry("small", models["small"])),
                        seeds=(0, 3), num=20, steps=2, command="test")
    result = compare_models(cfg)
    assert list(result.runs["model"]) == ["full", "full", "small", "small"]
    assert list(result.runs["seed"]) == [0, 3, 0, 3]
    # the same numbers as scoring each model alone with evaluate_quality
    small = load_checkpoint(models["small"])
    reference = load_reference(resolve_data({"data": {"spec": "digits"}}, small.config), small.config)
    alone = evaluate_quality(small, num=20, steps=2, seed=3, reference=reference)
    row = result.runs[(result.runs["model"] == "small") & (result.runs["seed"] == 3)].iloc[0]
    assert row["FD"] == pytest.approx(alone.fd) and row["class accuracy"] == alone.class_accuracy
    assert row["gflops"] * 1e9 == closed_form_flops(small.config)
    summary = result.summary.set_index("model")
    full_fd = result.runs[result.runs["model"] == "full"]["FD"]
    assert summary.loc["full", "FD mean"] == pytest.approx(full_fd.mean())
    assert summary.loc["full", "FD spread"] == pytest.approx(full_fd.max() - full_fd.min()) and full_fd.nunique() == 2
    assert summary.loc["full", "% of largest FLOPs"] == 100 and summary.loc["small", "% of largest FLOPs"] < 50
    assert result.record["reference"].startswith("digits") and result.record["settings"]["seeds"] == [0, 3]


def test_cli_writes_the_tables_and_the_record(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--model", f"full={models['full']}", "--model", str(models["small"]), "--seeds", "0",
            "--num", "10", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    runs = pd.read_csv(out / "compare.csv")
    assert list(runs["model"]) == ["full", "small"] and runs["FD"].gt(0).all()  # a bare PATH is named after its folder
    doc = json.loads((out / "compare.json").read_text())
    assert doc["command"].startswith("dynasearch") and doc["machine"]["cores"] >= 1
    assert [r["model"] for r in doc["summary"]] == ["full", "small"]
    assert len(pd.read_csv(out / "compare-summary.csv")) == 2 and (out / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("spec, message", [
    ("=x", "must be letters"), ("a b=x", "must be letters"), ("a=", "expected NAME=PATH"),
])
def test_bad_model_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_spec(spec)


@pytest.mark.parametrize("seeds, message", [("0,x", "comma-separated"), ("-1", r"\[0, 4294967295\]"),
                                            ("4294967296", "4294967295"), ("1,1", "repeats")])
def test_bad_seeds(seeds: str, message: str, models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=message):
        CompareConfig(models=(CompareEntry("a", models["full"]),), seeds=parse_seeds(seeds))


def test_every_input_is_checked_before_sampling(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    argv = ["compare", "--model", f"a={models['full']}", "--model", f"b={tmp_path / 'missing'}", "--num", "10",
            "--steps", "2", "--out", str(out)]
    assert main(argv) == 2
    assert "--model b: checkpoint" in capsys.readouterr().err and not out.exists()
    # models of two data sets are not compared
    other = fake_supernet_run(tmp_path / "other")
    doc = json.loads((other / "config.json").read_text())
    doc["data"] = {"spec": "mnist", "seed": 0, "val_fraction": 0.1}
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="--model b was trained on other data"):
        compare_models(CompareConfig(models=(CompareEntry("a", models["full"]), CompareEntry("b", other)), num=4))
