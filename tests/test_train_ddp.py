"""DDP: `torchrun --nproc_per_node 2 -m dynasearch train-supernet` (gloo on the CPU) computes what one process computes
with the same global batch, and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dynasearch.train import RUN_FILES, TrainConfig, train_supernet

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str) -> list[subprocess.Popen]:
    """Start the two ranks the way torchrun would (env:// rendezvous), without torchrun's agent: no supervisor
    kills the survivor for us, so the test sees what the training code itself does when a peer dies."""
    root = Path(__file__).resolve().parents[1]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "dynasearch", "train-supernet", *ARGS, "--out", str(out), *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_killed_rank_makes_the_other_fail_loudly_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = _launch(out, "--steps", "100000", "--dist-timeout", "15")
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.pt").is_file() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.05)
        assert (out / "train_state.pt").is_file()
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)  # must not hang: a dead peer or --dist-timeout ends it
        survived = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode not in (0, None) and survived < 45, (procs[0].returncode, survived)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: DDP rank 0 of 2: ") and "--resume" in last, err[-2000:]

    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step >= 2 and f"the last good checkpoint (step {step})" in last
    # the same global batch in one process continues the run (DDP resume itself is tested above)
    cfg = TrainConfig(model="DiT-N/2", steps=step + 2, batch_size=16, ckpt_every=2, device="cpu", log_every=1,
                      out=str(out), resume=True)
    result = train_supernet(cfg, progress=False)
    assert (result.start_step, result.step) == (step, step + 2)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step + 2
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, step + 3))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
