"""Training survives being killed: SIGKILL at random moments (and in the middle of checkpoint writes), then `--resume`,
reaches the final step with the same result as an uninterrupted run, and no file is ever half-written. Ctrl-C (SIGINT)
stops `dynasearch train-supernet` at a step boundary with a complete checkpoint and a message saying how to resume.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import dynasearch.train as T
import dynasearch.train.run_dir as TF
from dynasearch.checkpoint.native import load_checkpoint
from dynasearch.train.config import TrainConfig
from dynasearch.train.loop import train_supernet
from dynasearch.train.run_dir import PENDING_DIR, RUN_FILES

pytestmark = pytest.mark.slow

STEPS = 40


def tiny(out: Path, **kw: object) -> TrainConfig:
    """DiT-N/2 on digits, batch 8, one random subnet per step, a checkpoint every 2 steps."""
    base: dict[str, object] = {"model": "DiT-N/2", "steps": STEPS, "batch_size": 8, "sandwich": 1, "ckpt_every": 2,
                               "log_every": 1, "device": "cpu", "out": str(out)}
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _child(cfg: TrainConfig) -> None:
    torch.set_num_threads(1)
    train_supernet(cfg, progress=False)


def _start(cfg: TrainConfig) -> mp.process.BaseProcess:
    """Train in a forked process (no interpreter start-up: the kills land inside training, not in imports)."""
    assert torch.get_num_threads() == 1, "fork needs a single-threaded parent (tests/conftest.py sets it)"
    proc = mp.get_context("fork").Process(target=_child, args=(cfg,), daemon=True)
    proc.start()
    return proc


def _visible_files_load(out: Path) -> None:
    """Every run file a reader can see is whole: safetensors, JSON, the training state and the metrics parse."""
    for path in out.iterdir():
        if path.name.startswith("."):
            continue  # a transaction in progress (ignored by readers, repaired by --resume)
        assert path.name in RUN_FILES, path
        if path.suffix == ".safetensors":
            assert load_file(str(path))
        elif path.suffix == ".json":
            assert json.loads(path.read_text())["model"]["name"] == "DiT-N/2"
        elif path.suffix == ".pt":
            assert isinstance(torch.load(path, weights_only=True)["step"], int)
    if (out / "train_state.pt").is_file() and not (out / PENDING_DIR / "COMMIT").exists():
        # no transaction half-applied: every file is from the same step
        step = torch.load(out / "train_state.pt", weights_only=True)["step"]
        assert json.loads((out / "config.json").read_text())["step"] == step
        load_checkpoint(out)


def _rows(out: Path) -> int:
    """Steps recorded in metrics.csv so far (0 before the first flush)."""
    try:
        return max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_then_resume_reaches_the_uninterrupted_result(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    train_supernet(tiny(reference), progress=False)

    out = tmp_path / "run"
    rng = random.Random(8)
    kills = ["random", "mid-write", "random", "mid-write", "random"]
    # kill points by progress (steps in metrics.csv), not wall time, so a fast or a busy machine sees the same plan
    targets = sorted(rng.sample(range(2, STEPS - 2), len(kills)))
    states: list[str] = []
    for how, target in zip(kills, targets, strict=True):
        proc = _start(tiny(out, resume=True))
        deadline = time.monotonic() + 60
        while proc.is_alive() and _rows(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside the next step
        while how == "mid-write" and proc.is_alive() and time.monotonic() < deadline:
            if (out / PENDING_DIR).is_dir():  # the next checkpoint has begun
                break
            time.sleep(0.0005)
        assert proc.is_alive(), f"training ended before kill {len(states) + 1} (step {target})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        pending = out / PENDING_DIR
        states.append("commit" if (pending / "COMMIT").exists() else "pending" if pending.exists() else "clean")
        _visible_files_load(out)

    assert len(states) == len(kills)
    assert "pending" in states or "commit" in states, f"no kill landed inside a checkpoint write: {states}"
    proc = _start(tiny(out, resume=True))
    proc.join(120)
    assert proc.exitcode == 0

    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)  # no temporary or pending files remain
    _visible_files_load(out)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == STEPS
    a, b = pd.read_csv(reference / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    assert b["step"].tolist() == list(range(1, STEPS + 1))
    assert b["subnets"].tolist() == a["subnets"].tolist()
    for col in ("loss_max", "loss_min", "loss_random", "grad_norm"):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), rel=1e-4, abs=1e-6), col
    for name in ("raw.safetensors", "supernet.safetensors"):
        ra, rb = load_file(str(reference / name)), load_file(str(out / name))
        assert max((ra[k] - rb[k]).abs().max().item() for k in ra) < 1e-5, name


@pytest.mark.parametrize("committed", [False, True], ids=["before-commit", "after-commit"])
def test_a_checkpoint_cut_short_is_discarded_or_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          committed: bool) -> None:
    """A crash before the COMMIT record keeps the previous checkpoint; one after it finishes the new one."""
    out = tmp_path / "run"
    train_supernet(tiny(out, steps=2), progress=False)
    before = {n: (out / n).read_bytes() for n in RUN_FILES if n != "metrics.csv"}

    def crash(path: Path, text: str) -> None:
        raise SystemExit("killed")  # stands in for SIGKILL (no cleanup code runs for either)

    if committed:
        monkeypatch.setattr(TF, "apply_pending", lambda _out: (_ for _ in ()).throw(SystemExit("killed")))
    else:
        original = TF.atomic_write_text
        monkeypatch.setattr(TF, "atomic_write_text",
                            lambda p, t: crash(p, t) if Path(p).name == "COMMIT" else original(p, t))
    with pytest.raises(SystemExit):
        train_supernet(tiny(out, steps=4, resume=True), progress=False)
    monkeypatch.undo()
    assert (out / PENDING_DIR).is_dir()
    assert {n: (out / n).read_bytes() for n in before} == before  # the step-2 checkpoint is untouched

    recovered = T.recover_run_dir(out)
    assert recovered == ("completed an interrupted checkpoint" if committed else "discarded an unfinished checkpoint")
    assert not (out / PENDING_DIR).exists()
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step == (4 if committed else 2)
    assert json.loads((out / "config.json").read_text())["step"] == step
    result = train_supernet(tiny(out, steps=4, resume=True), progress=False)
    assert (result.start_step, result.step) == (step, 4)
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynasearch", "train-supernet", *args]


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ("--model", "DiT-N/2", "--steps", "100000", "--batch-size", "8", "--sandwich", "1", "--ckpt-every", "1000",
            "--log-every", "1", "--device", "cpu", "--out", str(out))
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        seen = 0
        assert proc.stdout is not None
        for line in proc.stdout:  # "step N/100000 | ..." lines (stdout is not a terminal)
            if line.startswith("step "):
                seen += 1
                if seen == 3:
                    proc.send_signal(signal.SIGINT)
                    break
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step >= 3 and last == (
        f"interrupted (SIGINT) at step {step} of 100000; checkpoint saved; "
        f"resume with: dynasearch train-supernet --resume --out {out}"
    )
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, step + 1))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    _visible_files_load(out)

    stored = T.load_run_config(out)
    result = train_supernet(stored.replace(steps=step + 2, resume=True), progress=False)
    assert (result.start_step, result.step) == (step, step + 2)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step + 2
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, step + 3))
