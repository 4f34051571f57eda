"""DDP: `torchrun --nproc_per_node 2 -m dynasearch train-supernet` (gloo on the CPU) computes what one process computes
with the same global batch, and only rank 0 writes the run directory."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
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

from dynasearch.data import load_dataset, parse_data_spec
from dynasearch.train.config import TrainConfig
from dynasearch.train.loop import train_supernet
from dynasearch.train.run_dir import RUN_FILES

ARGS = ["--model", "DiT-N/2", "--steps", "3", "--batch-size", "16", "--ckpt-every", "2", "--device", "cpu",
        "--log-every", "1"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]


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


class _Rank:
    """One DDP rank forked from this process (no interpreter start-up), running `dynasearch.cli.main` with its
    stdout and stderr in files; a Popen-like face for the test."""

    def __init__(self, rank: int, port: int, argv: list[str], logs: Path) -> None:
        self.err_path = logs / f"rank{rank}.err"
        env = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        self.proc = mp.get_context("fork").Process(target=self._run, args=(env, argv, logs / f"rank{rank}.out"))
        self.proc.start()

    def _run(self, env: dict[str, str], argv: list[str], out_path: Path) -> None:
        torch.set_num_threads(1)  # an OpenMP pool is not inherited across fork: never wait on its threads
        os.environ.update(env)
        for fd, path in ((1, out_path), (2, self.err_path)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(handle, fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the forked child's stdout until os._exit
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - likewise its stderr
        from dynasearch.cli import main

        code = main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    @property
    def returncode(self) -> int | None:
        """Exit code (negative: killed by that signal), None while running."""
        return self.proc.exitcode

    def poll(self) -> int | None:
        """Like Popen.poll."""
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        """Like Popen.send_signal."""
        os.kill(self.proc.pid, sig)

    def communicate(self, timeout: float = 60) -> tuple[str, str]:
        """Wait (raising TimeoutError past `timeout`); returns ('', stderr)."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise TimeoutError(f"rank still running after {timeout} s")
        return "", self.err_path.read_text()

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.proc.kill()
        self.proc.join(10)


def _launch(out: Path, *extra: str) -> list[_Rank]:
    """Start the two ranks the way torchrun would (env:// rendezvous), without torchrun's agent: no supervisor
    kills the survivor for us, so the test sees what the training code itself does when a peer dies."""
    assert torch.get_num_threads() == 1, "fork needs a single-threaded parent (tests/conftest.py sets it)"
    port = _free_port()
    logs = out.parent / f"logs-{port}"
    logs.mkdir(parents=True)
    argv = ["train-supernet", *ARGS, "--out", str(out), *extra]
    return [_Rank(rank, port, argv, logs) for rank in range(2)]


def _wait_for_checkpoint(out: Path, procs: list[_Rank], after: int = 0) -> int:
    """Block until train_state.pt holds a step > `after` (both ranks still running); returns that step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.err_path.read_text()[-2000:] for p in procs]
        with contextlib.suppress(FileNotFoundError, RuntimeError, EOFError):
            step = torch.load(out / "train_state.pt", weights_only=True)["step"]
            if step > after:
                return step
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint after step {after} within 120 s")


def test_ctrl_c_on_one_rank_stops_both_then_a_killed_rank_fails_the_other_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    load_dataset(parse_data_spec("digits"))  # import scikit-learn here, once, not in every forked rank

    # 1. SIGINT to rank 1 only: the request travels with the step's all-reduce, both ranks stop after the same step,
    #    rank 0 writes that step's checkpoint and says how to resume; both exit 130.
    procs = _launch(out, "--steps", "100000", "--dist-timeout", "15")
    try:
        _wait_for_checkpoint(out, procs)
        procs[1].send_signal(signal.SIGINT)
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [130, 130], [r[1][-2000:] for r in results]
    stopped = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert results[0][1].strip().splitlines()[-1] == (
        f"interrupted (SIGINT) at step {stopped} of 100000; checkpoint saved; "
        f"resume with: dynasearch train-supernet --resume --out {out}"
    )
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, stopped + 1))
    assert "Traceback" not in results[0][1] + results[1][1]
    assert "interrupted" not in results[1][1]  # one message per run, from rank 0

    # 2. Resumed, then rank 1 is SIGKILLed: rank 0 must not hang but fail within seconds, naming the cause.
    procs = _launch(out, "--resume", "--steps", "100000", "--ckpt-every", "1", "--dist-timeout", "15")
    try:
        _wait_for_checkpoint(out, procs, after=stopped)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)  # must not hang: a dead peer or --dist-timeout ends it
        survived = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None) and survived < 45, (procs[0].returncode, survived)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: DDP rank 0 of 2: ") and "--resume" in last, err[-2000:]

    # 3. The last complete checkpoint resumes (the same global batch in one process; DDP resume is tested above).
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert step > stopped and f"the last good checkpoint (step {step})" in last
    cfg = TrainConfig(model="DiT-N/2", steps=step + 2, batch_size=16, ckpt_every=2, device="cpu", log_every=1,
                      out=str(out), resume=True)
    result = train_supernet(cfg, progress=False)
    assert (result.start_step, result.step) == (step, step + 2)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step + 2
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, step + 3))
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)


def test_a_rank_that_never_comes_is_an_error_after_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    start = time.monotonic()
    rank0 = _Rank(0, port, ["train-supernet", *ARGS, "--out", str(out), "--dist-timeout", "3"], logs)
    try:
        _, err = rank0.communicate(timeout=60)
    finally:
        if rank0.poll() is None:
            rank0.kill()
    assert rank0.returncode == 2 and time.monotonic() - start < 30
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith(f"error: DDP rank 0 of 2: joining the process group at 127.0.0.1:{port} failed"), err
    assert "--dist-timeout (3 s)" in err
    assert not out.exists()


def test_a_stalled_rank_fails_the_other_after_the_dist_timeout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    load_dataset(parse_data_spec("digits"))
    procs = _launch(out, "--steps", "100000", "--dist-timeout", "6")
    try:
        _wait_for_checkpoint(out, procs)
        procs[1].send_signal(signal.SIGSTOP)  # alive but stuck: only the timeout can tell
        stalled_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - stalled_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2 and 5 < waited < 40, (procs[0].returncode, waited)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: DDP rank 0 of 2: ") and "Timed out" in err and "--resume" in err, err
