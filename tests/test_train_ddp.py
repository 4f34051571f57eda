"""DDP: `torchrun --nproc_per_node 2 -m dynasearch train-supernet` (gloo on the CPU) computes what one process computes
with the same global batch, and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dynasearch.train import TrainConfig, train_supernet

ARGS = ["--model", "DiT-N/2", "--steps", "3", "--batch-size", "16", "--ckpt-every", "2", "--device", "cpu",
        "--log-every", "1"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dynasearch", "train-supernet", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=root)


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    proc = _torchrun(ddp_out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = TrainConfig(model="DiT-N/2", steps=3, batch_size=16, ckpt_every=2, device="cpu", log_every=1,
                      out=str(single_out))
    train_supernet(cfg, progress=False)

    assert sorted(p.name for p in ddp_out.iterdir()) == sorted(p.name for p in single_out.iterdir())
    for name in ("raw.safetensors", "supernet.safetensors"):
        a, b = load_file(str(ddp_out / name)), load_file(str(single_out / name))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, (name, worst)
        moved = max((a[k] - load_file(str(single_out / "raw.safetensors"))[k]).abs().max().item() for k in a)
        assert name == "raw.safetensors" or moved > 0
    m_ddp, m_one = pd.read_csv(ddp_out / "metrics.csv"), pd.read_csv(single_out / "metrics.csv")
    assert m_ddp["subnets"].tolist() == m_one["subnets"].tolist()
    for col in ("loss_max", "loss_min", "loss_random", "distill_min", "grad_norm"):
        assert m_ddp[col].tolist() == pytest.approx(m_one[col].tolist(), rel=1e-4), col
    doc = json.loads((ddp_out / "config.json").read_text())
    assert doc["distributed"] == {"world_size": 2, "backend": "gloo"} and doc["step"] == 3
    state = torch.load(ddp_out / "train_state.pt", weights_only=True)
    assert state["step"] == 3

    # Resume under DDP continues the same run.
    proc = _torchrun(ddp_out, "--resume", "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pd.read_csv(ddp_out / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
