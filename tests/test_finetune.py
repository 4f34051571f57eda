"""Tests for dynasearch.train.finetune (`dynasearch finetune`): the objective and its distillation term, the
timestep-dynamic case, that training lowers the loss, bit-identical resume, Ctrl-C, the output as a sliced checkpoint
that sample/eval/flops accept, a real registry config, and clear errors."""

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
from conftest import randomize_
from safetensors.torch import load_file

import dynasearch.train.finetune as F
from dynasearch.checkpoint.native import load_checkpoint, read_config, save_checkpoint
from dynasearch.cli import main
from dynasearch.data import load_dataset
from dynasearch.diffusion.factory import diffusion_for
from dynasearch.errors import CheckpointError, TrainingError
from dynasearch.model import create_supernet
from dynasearch.model.schedule import SubnetSchedule, TimestepBuckets
from dynasearch.model.subnet import Subnet
from dynasearch.search.proxy import ProxyEvaluator, build_proxy_set
from dynasearch.slicing import slice_schedule, slice_subnet
from dynasearch.train.config import TrainConfig
from dynasearch.train.finetune import FINETUNE_COLUMNS, finetune, finetune_step, step_groups
from dynasearch.train.finetune_config import FinetuneConfig
from dynasearch.train.loop import train_supernet
from dynasearch.train.run_dir import PENDING_DIR
from dynasearch.train.sandwich import draw_batch


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a briefly trained DiT-N/2 supernet on the digits, and subnets cut from it as a search exports them
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def supernet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-step DiT-N/2 supernet run on the digits (its config.json records the data)."""
    out = tmp_path_factory.mktemp("finetune") / "supernet"
    train_supernet(TrainConfig(model="DiT-N/2", steps=40, batch_size=32, sandwich=1, device="cpu", out=str(out)),
                   progress=False)
    return out


def export(supernet: Path, directory: Path, rates: tuple[float, float, float] = (0.5, 0.5, 0.75)) -> Path:
    """A uniform subnet sliced out of `supernet` and saved as `search` exports it (naming its supernet)."""
    model = load_checkpoint(supernet)
    small = slice_subnet(model, Subnet.uniform(model.config, *rates))
    data = read_config(supernet)["data"]
    return save_checkpoint(small, directory, extra={"search": {"source_supernet": str(supernet)}, "data": data})


@pytest.fixture(scope="module")
def subnet_dir(supernet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(supernet, tmp_path_factory.mktemp("export") / "best")


def cfg(checkpoint: Path, out: Path, **kw) -> FinetuneConfig:
    """A few-second fine-tuning run on the CPU."""
    base = {"checkpoint": str(checkpoint), "steps": 6, "batch_size": 16, "ckpt_every": 3, "log_every": 1,
            "device": "cpu", "out": str(out)}
    base.update(kw)
    return FinetuneConfig(**base)


def proxy_loss(model_dir: Path, num: int = 256) -> float:
    """The epsilon MSE of a checkpoint on fixed validation quadruples of the digits."""
    model = load_checkpoint(model_dir)
    split = load_dataset("digits")
    proxy = build_proxy_set(split.val_x, split.val_y, diffusion_for(model.config), num=num, seed=7)
    return ProxyEvaluator(model, proxy)()


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------
def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_objective_mixes_the_diffusion_loss_and_the_teachers_prediction(tiny_model) -> None:
    teacher = tiny_model.train()
    student = randomize_(slice_subnet(teacher, Subnet.uniform(teacher.config, 0.5, 0.5, 1.0)), seed=3).train()
    split = load_dataset("digits")
    diffusion = diffusion_for(student.config)
    batch = draw_batch(split, diffusion, seed=0, step=1, batch_size=8, label_dropout=0.1)
    c = batch.x0.shape[1]

    # by hand: the diffusion loss and the MSE to the teacher's full-width epsilon
    out = student(batch.x_t, batch.t, batch.y, label_dropout=False)
    gt = diffusion.loss_from_output(out, batch.x0, batch.x_t, batch.t, batch.noise)["loss"].mean().item()
    with torch.no_grad():
        target = teacher(batch.x_t, batch.t, batch.y, subnet=Subnet.full(teacher.config), label_dropout=False)[:, :c]
    kd = torch.mean((out[:, :c] - target) ** 2).item()
    assert kd > 1e-3 and gt > 1e-3

    grads = {}
    for w in (0.0, 0.3, 1.0):
        student.zero_grad(set_to_none=True)
        r = finetune_step(student, diffusion, batch, weight=w, teacher=teacher)
        assert (r.gt, r.distill) == pytest.approx((gt, kd), rel=1e-5)
        assert r.loss == pytest.approx((1 - w) * gt + w * kd, rel=1e-5)
        grads[w] = _grads(student)
    assert not any(p.grad is not None for p in teacher.parameters())  # the teacher is not trained
    # the gradient is linear in w: g(0.3) = 0.7 g(0) + 0.3 g(1), and the two terms pull differently
    for name, g in grads[0.3].items():
        torch.testing.assert_close(g, 0.7 * grads[0.0][name] + 0.3 * grads[1.0][name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(grads[0.0][n], grads[1.0][n], atol=1e-6) for n in grads[0.0])

    # no teacher: the diffusion loss alone, no distillation term
    student.zero_grad(set_to_none=True)
    alone = finetune_step(student, diffusion, batch)
    assert (alone.loss, alone.gt, alone.distill) == pytest.approx((gt, gt, 0.0), rel=1e-5)
    for name, g in _grads(student).items():
        torch.testing.assert_close(g, grads[0.0][name])
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune_step(student, diffusion, batch, weight=0.5)


def test_a_schedule_runs_each_sample_through_its_buckets_subnet(tiny_model) -> None:
    model = tiny_model
    cfg_ = model.config
    schedule = SubnetSchedule(TimestepBuckets.equal(2), (Subnet.uniform(cfg_, 0.5, 0.5, 1.0), Subnet.full(cfg_)))
    small = slice_schedule(model, schedule).train()
    split = load_dataset("digits")
    diffusion = diffusion_for(small.config)
    batch = draw_batch(split, diffusion, seed=0, step=3, batch_size=16, label_dropout=0.0)

    groups = step_groups(batch.t, schedule)
    assert sorted(int(i) for index, _ in groups for i in index) == list(range(16))  # every sample once
    for index, subnet in groups:
        k = schedule.subnets.index(subnet)
        assert all(schedule.buckets.bucket_of(int(t)) == k for t in batch.t[index])
    assert step_groups(batch.t, None) == [(None, None)]

    r = finetune_step(small, diffusion, batch, schedule=schedule)
    want = 0.0
    for index, subnet in groups:  # the per-bucket losses weighted by the bucket's share of the batch
        out = small(batch.x_t[index], batch.t[index], batch.y[index], subnet=subnet, label_dropout=False)
        loss = diffusion.loss_from_output(out, batch.x0[index], batch.x_t[index], batch.t[index], batch.noise[index])
        want += loss["loss"].sum().item() / 16
    assert r.gt == pytest.approx(want, rel=1e-5) and r.subnet == schedule.union()


# ---------------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------------
def test_finetuning_trains_every_weight_and_lowers_the_loss(subnet_dir: Path, supernet: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    result = finetune(cfg(subnet_dir, out, steps=30, ckpt_every=30, distill_weight=0.0, lr=3e-3), progress=False)
    assert (result.step, result.start_step, result.teacher, result.distill_weight) == (30, 0, None, 0.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.csv", "model.safetensors", "raw.safetensors", "train_state.pt"]
    )
    before, after = proxy_loss(subnet_dir), proxy_loss(out)
    assert after < 0.9 * before, (before, after)

    src, raw = load_file(str(subnet_dir / "model.safetensors")), load_file(str(out / "raw.safetensors"))
    unchanged = {k for k in src if torch.equal(src[k], raw[k])}
    assert unchanged == {"pos_embed"}  # the fixed sin-cos positions; every trained tensor moved

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == list(FINETUNE_COLUMNS) and metrics["step"].tolist() == list(range(1, 31))
    assert metrics["distill"].isna().all() and (metrics["teacher_gflops"] == 0).all()
    assert (metrics["loss"] == metrics["loss_gt"]).all()
    assert metrics["loss"][-10:].mean() < metrics["loss"][:10].mean()

    # the output is a sliced checkpoint with the input's sections and a finetune section
    doc, src_doc = read_config(out), read_config(subnet_dir)
    for key in ("model", "subnet", "data", "search", "kind"):
        assert doc[key] == src_doc[key], key
    ft = doc["finetune"]
    assert (ft["checkpoint"], ft["steps"], ft["lr"], ft["teacher"], ft["distill_weight"], ft["step"]) == (
        str(subnet_dir), 30, 3e-3, None, 0.0, 30)
    assert ft["data_from"] == f"from checkpoint '{subnet_dir}'"
    assert result.summary_table().row_count >= 8


def test_resume_after_interruption_is_bit_identical(subnet_dir: Path, supernet: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    full = tmp_path / "full"
    done = finetune(cfg(subnet_dir, full, steps=8, ckpt_every=8, distill_weight=0.5), progress=False)
    assert done.teacher == str(supernet) and done.distill_weight == 0.5  # the supernet the export names

    part = tmp_path / "part"
    calls = {"n": 0}
    original = F.finetune_step

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed inside step 6; the last checkpoint is step 4
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "finetune_step", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(subnet_dir, part, steps=8, ckpt_every=2, distill_weight=0.5), progress=False)
    monkeypatch.setattr(F, "finetune_step", original)
    assert torch.load(part / "train_state.pt", weights_only=True)["step"] == 4
    assert pd.read_csv(part / "metrics.csv")["step"].tolist() == [1, 2, 3, 4, 5]

    with pytest.raises(TrainingError, match="already exists"):
        finetune(cfg(subnet_dir, part, steps=8, distill_weight=0.5), progress=False)
    with pytest.raises(TrainingError, match=r"--distill-weight 0\.5 -> 0\.2"):
        finetune(cfg(subnet_dir, part, steps=8, distill_weight=0.2, resume=True), progress=False)
    # the stored arguments fill what a resume leaves out (no --checkpoint, no teacher, no weight)
    resumed = finetune(FinetuneConfig(out=str(part), steps=8, ckpt_every=2, log_every=1, device="cpu", resume=True,
                                      batch_size=16), progress=False)
    assert (resumed.start_step, resumed.step, resumed.teacher) == (4, 8, str(supernet))

    for name in ("raw.safetensors", "model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = pd.read_csv(full / "metrics.csv"), pd.read_csv(part / "metrics.csv")
    for col in ("loss", "loss_gt", "distill", "lr", "grad_norm"):
        assert a[col].tolist() == b[col].tolist(), col
    sa, sb = (torch.load(d / "train_state.pt", weights_only=True) for d in (full, part))
    assert sa["step"] == sb["step"] == 8 and sa["ema_updates"] == sb["ema_updates"] == 8
    for key, state in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][key][n]) for n, v in state.items())


def test_ctrl_c_stops_at_a_step_boundary_and_resume_finishes(subnet_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "ft"
    calls = {"n": 0}
    original = F.finetune_step
    handler = signal.getsignal(signal.SIGINT)

    def ctrl_c_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: the step still finishes
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "finetune_step", ctrl_c_in_step_3)
    args = ["finetune", "--checkpoint", str(subnet_dir), "--steps", "6", "--batch-size", "8", "--device", "cpu",
            "--ckpt-every", "100", "--out", str(out)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted (SIGINT) at step 3 of 6; checkpoint saved; resume with: dynasearch finetune --resume --out {out}"
    )
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 3
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back

    monkeypatch.setattr(F, "finetune_step", original)
    assert main(["finetune", "--resume", "--out", str(out)]) == 0  # the printed command, as it is
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == list(range(1, 7))
    assert read_config(out)["finetune"]["checkpoint"] == str(subnet_dir)


def _child(config: FinetuneConfig) -> None:
    torch.set_num_threads(1)
    finetune(config, progress=False)


def _rows(out: Path) -> int:
    """Steps in metrics.csv so far (0 before the first flush)."""
    try:
        return max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow  # 1 s on 2 idle cores, 5 s busy: processes killed at random steps, some inside a checkpoint write
def test_sigkill_at_random_moments_then_resume_reaches_the_uninterrupted_result(subnet_dir: Path,
                                                                                tmp_path: Path) -> None:
    steps = 30

    def run(out: Path, **kw) -> FinetuneConfig:
        return cfg(subnet_dir, out, steps=steps, batch_size=8, ckpt_every=2, **kw)

    finetune(run(tmp_path / "reference"), progress=False)
    out = tmp_path / "run"
    rng = random.Random(5)
    states = []
    for i, target in enumerate(sorted(rng.sample(range(2, steps - 2), 4))):
        assert torch.get_num_threads() == 1, "fork needs a single-threaded parent (tests/conftest.py sets it)"
        proc = mp.get_context("fork").Process(target=_child, args=(run(out, resume=True),), daemon=True)
        proc.start()
        deadline = time.monotonic() + 60
        while proc.is_alive() and _rows(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        while i % 2 and proc.is_alive() and not (out / PENDING_DIR).is_dir() and time.monotonic() < deadline:
            time.sleep(0.0005)  # every other kill lands inside a checkpoint write
        assert proc.is_alive(), f"fine-tuning ended before kill {i + 1} (step {target})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        states.append("pending" if (out / PENDING_DIR).exists() else "clean")
    assert "pending" in states, states
    result = finetune(run(out, resume=True), progress=False)
    assert result.step == steps and not (out / PENDING_DIR).exists()
    a, b = pd.read_csv(tmp_path / "reference" / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    assert b["step"].tolist() == list(range(1, steps + 1))
    assert a["loss"].tolist() == b["loss"].tolist() and a["grad_norm"].tolist() == b["grad_norm"].tolist()
    for name in ("raw.safetensors", "model.safetensors"):
        ra, rb = load_file(str(tmp_path / "reference" / name)), load_file(str(out / name))
        assert all(torch.equal(ra[k], rb[k]) for k in ra), name


@pytest.mark.slow  # 2 torchrun ranks start their own interpreters: ~10 s
def test_two_ddp_ranks_reach_what_one_process_does(subnet_dir: Path, tmp_path: Path) -> None:
    args = ["finetune", "--checkpoint", str(subnet_dir), "--steps", "4", "--batch-size", "8", "--distill-weight",
            "0.5", "--device", "cpu", "--log-every", "1"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dynasearch", *args, "--out", str(tmp_path / "ddp")],
                         env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    finetune(cfg(subnet_dir, tmp_path / "one", steps=4, batch_size=8, distill_weight=0.5), progress=False)
    assert read_config(tmp_path / "ddp")["distributed"] == {"world_size": 2, "backend": "gloo"}
    a, b = pd.read_csv(tmp_path / "ddp" / "metrics.csv"), pd.read_csv(tmp_path / "one" / "metrics.csv")
    for col in ("loss", "loss_gt", "distill", "grad_norm"):
        assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=1e-4), col
    ra, rb = load_file(str(tmp_path / "ddp" / "raw.safetensors")), load_file(str(tmp_path / "one" / "raw.safetensors"))
    assert max((ra[k] - rb[k]).abs().max().item() for k in ra) < 1e-4


def test_distillation_on_and_off_give_other_weights(subnet_dir: Path, supernet: Path, tmp_path: Path) -> None:
    runs = {w: finetune(cfg(subnet_dir, tmp_path / f"w{w}", steps=4, distill_weight=w), progress=False)
            for w in (0.0, 0.5)}
    off, on = (load_file(str(tmp_path / f"w{w}" / "raw.safetensors")) for w in (0.0, 0.5))
    assert any(not torch.equal(off[k], on[k]) for k in off)
    m_off, m_on = (pd.read_csv(tmp_path / f"w{w}" / "metrics.csv") for w in (0.0, 0.5))
    assert m_off["distill"].isna().all() and (m_on["distill"] > 0).all()
    assert m_on["loss"].tolist() == pytest.approx((0.5 * m_on["loss_gt"] + 0.5 * m_on["distill"]).tolist(), rel=1e-4)
    assert m_on["teacher_gflops"].iloc[0] > m_on["gflops"].iloc[0] > 0
    assert (runs[0.0].teacher, runs[0.5].teacher) == (None, str(supernet))
    assert read_config(tmp_path / "w0.5")["finetune"]["teacher"] == str(supernet)

    # by default no distillation; --distill-weight alone needs the supernet the export names; --teacher turns it on
    assert finetune(cfg(subnet_dir, tmp_path / "default", steps=1), progress=False).teacher is None
    moved = tmp_path / "orphan"
    save_checkpoint(load_checkpoint(subnet_dir), moved, extra={"search": {"source_supernet": str(tmp_path / "gone")},
                                                               "data": read_config(subnet_dir)["data"]})
    with pytest.raises(TrainingError, match=r"needs a teacher.*gone' it was cut from does not exist"):
        finetune(cfg(moved, tmp_path / "x", steps=1, distill_weight=0.5), progress=False)
    assert not (tmp_path / "x").exists()
    given = finetune(cfg(moved, tmp_path / "given", steps=1, teacher=str(supernet)), progress=False)
    assert given.teacher == str(supernet) and given.distill_weight == 0.5


def test_a_timestep_dynamic_checkpoint_is_finetuned_per_bucket(supernet: Path, tmp_path: Path, capsys) -> None:
    model = load_checkpoint(supernet)
    c = model.config
    buckets = (Subnet.uniform(c, 0.25, 0.25, 0.5), Subnet.uniform(c, 0.5, 0.5, 1.0))
    schedule = SubnetSchedule(TimestepBuckets.equal(2), buckets)
    src = save_checkpoint(slice_schedule(model, schedule), tmp_path / "sched",
                          extra={"kind": "timestep-dynamic", "schedule": schedule.to_dict(),
                                 "search": {"source_supernet": str(supernet)}, "data": read_config(supernet)["data"]})
    out = tmp_path / "ft"
    finetune(cfg(src, out, steps=3), progress=False)
    doc = read_config(out)
    assert doc["kind"] == "timestep-dynamic" and doc["schedule"] == schedule.to_dict()
    # its FLOPs per step are the mean of the buckets' subnets for the batch's timesteps, below the union's
    metrics = pd.read_csv(out / "metrics.csv")
    from dynasearch.cost.flops import closed_form_flops

    union = closed_form_flops(load_checkpoint(out).config, schedule.union(), batch=16) / 1e9
    assert (metrics["gflops"] < union).all()
    assert main(["flops", "--checkpoint", str(out)]) == 0
    assert "bucket" in capsys.readouterr().out


def test_the_output_is_a_checkpoint_sample_eval_and_flops_accept(subnet_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    finetune(cfg(subnet_dir, out, steps=2), progress=False)
    assert main(["flops", "--checkpoint", str(out), "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert main(["flops", "--checkpoint", str(subnet_dir), "--json"]) == 0
    assert flops["gflops"] == json.loads(capsys.readouterr().out)["gflops"] > 0  # the same architecture
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(out), "--labels", "0-9", "--per-label", "1", "--steps", "2",
                 "--device", "cpu", "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--num", "20", "--steps", "2", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num"] == 20 and result["model"] == "DiT-N/2" and result["fd"] > 0
    assert result["extra"]["data_from"] == "checkpoint"


@pytest.mark.slow  # 1 s on 2 idle cores, 23 s busy: a search, then the report measures every model of it
def test_report_measures_a_finetuned_subnet_beside_the_exported_ones(supernet: Path, tmp_path: Path) -> None:
    search = tmp_path / "search"
    assert main(["search", "--supernet", str(supernet), "--flops", "0.5x", "--trials", "3", "--proxy-samples", "16",
                 "--export-top", "0", "--out", str(search)]) == 0
    tuned = search / "subnets" / "best-finetuned"
    finetune(cfg(search / "subnets" / "best", tuned, steps=2), progress=False)
    assert main(["report", str(search), "--eval-num", "20", "--steps", "2", "--no-samples"]) == 0
    rows = {r["model"]: r for r in json.loads((search / "report.json").read_text())["models"]}
    assert set(rows) == {"full model", "best", "uniform", "best-finetuned"}
    assert rows["best-finetuned"]["gflops"] == rows["best"]["gflops"] and rows["best-finetuned"]["FD"] > 0


@pytest.mark.slow  # 4 s on 2 idle cores, 10 s busy: a 33M-parameter supernet, its slice and the run's files
def test_a_sliced_dit_s2_from_the_registry_finetunes_one_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_supernet("DiT-S/2", input_size=8, in_channels=1, num_classes=10)
    randomize_(model, seed=0)
    sup = save_checkpoint(model, tmp_path / "sup", weights_name="supernet.safetensors",
                          extra={"data": {"spec": "digits", "seed": 0, "val_fraction": 0.1}})
    small = slice_subnet(model, Subnet.uniform(model.config, 0.5, 0.5, 0.75))
    src = save_checkpoint(small, tmp_path / "best", extra={"search": {"source_supernet": str(sup)}})
    out = tmp_path / "ft"
    result = finetune(cfg(src, out, steps=1, batch_size=4, distill_weight=0.5), progress=False)
    assert result.model == "DiT-S/2" and result.teacher == str(sup) and result.distill_weight == 0.5
    assert read_config(out)["finetune"]["data_from"] == f"from supernet '{sup}'"
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "raw.safetensors"))
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(before) - {"pos_embed"}
    tuned = load_checkpoint(out)
    assert tuned.config == small.config and tuned.config.block_heads == (3,) * 12
    x = torch.randn(2, 1, 8, 8)
    assert tuned(x, torch.tensor([10, 900]), torch.tensor([1, 2])).shape == (2, 2, 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
def test_clear_errors_before_anything_is_written(subnet_dir: Path, supernet: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    with pytest.raises(CheckpointError, match="is a supernet, not an exported subnet"):
        finetune(cfg(supernet, out), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        finetune(cfg(tmp_path / "nothing", out), progress=False)
    with pytest.raises(CheckpointError, match="is a sliced model"):
        finetune(cfg(subnet_dir, out, teacher=str(subnet_dir)), progress=False)
    other = tmp_path / "other"
    save_checkpoint(create_supernet("DiT-N/4", input_size=8, in_channels=1, num_classes=10), other)
    with pytest.raises(CheckpointError, match="patch_size 4"):
        finetune(cfg(subnet_dir, out, teacher=str(other)), progress=False)
    with pytest.raises(TrainingError, match="--checkpoint is required"):
        FinetuneConfig(out=str(out))
    with pytest.raises(TrainingError, match="holds no checkpoint to resume"):
        finetune(FinetuneConfig(out=str(out), resume=True, device="cpu"), progress=False)
    for bad, message in (({"steps": 0}, "--steps"), ({"distill_weight": 1.5}, "--distill-weight"),
                         ({"lr": -1.0}, "--lr"), ({"resume": True, "overwrite": True}, "exclude")):
        with pytest.raises(TrainingError, match=message):
            cfg(subnet_dir, out, **bad)
    assert not out.exists()
