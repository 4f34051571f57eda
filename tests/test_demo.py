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



def test_demo_overwrite_replaces_the_outputs_as_a_swap(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite: a run failing after training keeps every previous file; a finished one replaces them, leaving
    no moved-aside copy behind."""
    import dynasearch.demo as demo
    from dynasearch.errors import SearchError

    out, run = tmp_path / "res", tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--run-dir", str(run)]) == 0
    (out / "notes.txt").write_text("from the first run\n")
    snapshot = {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}

    def fail(*_a: object, **_k: object) -> None:
        raise SearchError("the search stage failed")

    with monkeypatch.context() as m:
        m.setattr(demo, "run_search", fail)
        assert main(["demo", "--quick", "--overwrite", "--out", str(out), "--run-dir", str(run)]) == 2
    assert {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == snapshot
    assert main(["demo", "--quick", "--overwrite", "--out", str(out), "--run-dir", str(run)]) == 0
    assert not (out / "notes.txt").exists() and (out / "report.html").is_file()  # the new run's files only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "run"]
    capsys.readouterr()
