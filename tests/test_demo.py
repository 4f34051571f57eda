"""The one-command demo, end to end in its --quick form."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dynasearch.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, run = tmp_path / "res", tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--run-dir", str(run)]) == 0
    assert (run / "supernet.safetensors").is_file() and (run / "metrics.csv").is_file()
    for name in ("trials.csv", "pareto.csv", "baseline.csv", "best.json", "report.html", "report.md", "pareto.png",
                 "widths.png", "history.png", "samples.png"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "trials.csv")) == 6
    best = json.loads((out / "best.json").read_text())
    assert best["gflops"] <= best["budget_gflops"] and best["budget_gflops"] == pytest.approx(best["full_gflops"] / 2)
    report = json.loads((out / "report.json").read_text())
    assert {m["model"] for m in report["models"]} >= {"full model", "best"}
    assert all(0.0 <= m["class accuracy"] <= 1.0 for m in report["models"])
    assert "report.html" in capsys.readouterr().out
    # a second run refuses to overwrite, with one clear line, and leaves the files alone
    before = (out / "best.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(out), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert (out / "best.json").read_bytes() == before
