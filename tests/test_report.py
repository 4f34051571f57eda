"""Report: pure data-gathering functions checked on numbers, and every file written from a small real study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dynasearch.checkpoint.native import save_checkpoint
from dynasearch.cli import main
from dynasearch.model import create_supernet
from dynasearch.report.build import ReportConfig, build_report
from dynasearch.report.data import (
    SearchTables,
    history,
    hypervolume_2d,
    pareto_plot_data,
    width_map,
)
from dynasearch.search.config import SearchConfig
from dynasearch.search.run import run_search
from dynasearch.space.search_space import load_space


def test_hypervolume_2d_by_hand() -> None:
    pts = np.array([[1.0, 1.0], [2.0, 0.5], [2.5, 1.5]])  # the third point is dominated
    assert hypervolume_2d(pts, (3.0, 2.0)) == pytest.approx(2.0 * 1.0 + 1.0 * 0.5)
    assert hypervolume_2d(np.zeros((0, 2)), (3.0, 2.0)) == 0.0
    assert hypervolume_2d(np.array([[4.0, 0.1]]), (3.0, 2.0)) == 0.0  # beyond the reference


def _tables() -> SearchTables:
    trials = pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4],
            "state": ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"],
            "gflops": [4.0, 1.0, 2.0, 2.0, 3.0],
            "proxy_loss": [0.10, 0.50, None, 0.30, 0.35],
            "feasible": [False, True, True, True, True],
            "attn_b0": [1.0, 0.25, 0.5, 0.5, 0.75],
            "attn_b1": [1.0, 0.25, 0.5, 0.75, 0.5],
            "mlp_b0": [1.0, 0.25, 0.5, 0.5, 0.5],
            "mlp_b1": [1.0, 0.25, 0.5, 0.5, 0.5],
            "tok_b0": [1.0, 0.5, 1.0, 1.0, 0.75],
            "tok_b1": [1.0, 0.5, 1.0, 0.75, 1.0],
        }
    )
    pareto = trials.iloc[[1, 3]].reset_index(drop=True)
    baseline = pd.DataFrame({"gflops": [1.0, 4.0], "proxy_loss": [0.6, 0.1], "on_front": [True, True],
                             "feasible": [True, False]})
    best = {"budget_gflops": 3.0, "full_gflops": 4.0, "gflops": 2.0, "proxy_loss": 0.30}
    return SearchTables(Path("."), trials, pareto, baseline, best)


def test_pareto_width_and_history_data() -> None:
    t = _tables()
    p = pareto_plot_data(t)
    assert list(p.trials[0]) == [4.0, 1.0, 2.0, 3.0] and list(p.trials[2]) == [False, True, True, True]
    assert p.full == (4.0, 0.1) and p.best == (2.0, 0.3) and p.budget_gflops == 3.0
    assert p.y_label == "proxy loss: eps (epsilon MSE)"  # best.json without a recorded proxy: an eps search
    t.best["settings"] = {"proxy": "teacher"}
    assert pareto_plot_data(t).y_label == "proxy loss: teacher (MSE to the full model)"
    t.best["settings"] = {"proxy": "from-the-future"}
    assert pareto_plot_data(t).y_label == "proxy loss: from-the-future (unknown kind)"
    del t.best["settings"]
    w = width_map(t)
    assert w.attn.tolist() == [[0.25, 0.25], [0.5, 0.75]] and w.tokens.tolist() == [[0.5, 0.5], [1.0, 0.75]]
    h = history(t)
    assert list(h.trial) == [1, 2, 3, 4, 5]
    assert np.allclose(h.best_loss, [np.inf, 0.5, 0.5, 0.3, 0.3])
    ref = (3.0, 0.5 * 1.05)
    assert h.reference == pytest.approx(ref)
    assert h.hypervolume[-1] == pytest.approx(hypervolume_2d(np.array([[1.0, 0.5], [2.0, 0.3], [3.0, 0.35]]), ref))
    assert (np.diff(h.hypervolume) >= 0).all()


def test_report_writes_every_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_supernet("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    run = tmp_path / "run"
    save_checkpoint(model, run, weights_name="supernet.safetensors",
                    extra={"space": load_space("blockwise").to_dict(), "data": {"spec": "digits"}})
    out = tmp_path / "search"
    run_search(SearchConfig(supernet=run, flops="0.6x", out=out, trials=6, proxy_samples=32, export_top=1),
               progress=False)
    result = build_report(ReportConfig(out, samples=True, eval_num=0, steps=2, latency_repeats=2))
    for name in ("pareto.png", "widths.png", "history.png", "samples.png", "report.html", "report.md", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table" in html and "src=\"pareto" not in html
    summary = json.loads((out / "report.json").read_text())
    names = [m["model"] for m in summary["models"]]
    assert names[0] == "full model" and "best" in names
    assert summary["models"][0]["latency ratio"] == 1.0
    assert all(m["gflops"] <= summary["budget_gflops"] + 1e-12 for m in summary["models"][1:])
    assert list(result.models["model"]) == names


def test_report_cli_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope" in err[0]
