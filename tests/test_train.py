"""Tests for dynasearch.train (train-supernet): run files, resume, the sandwich step's gradients, distillation,
seeded per-step randomness, clear errors, --init-from an original DiT state dict, NaN handling and the CLI."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_model, randomize_
from safetensors.torch import load_file

from dynasearch.checkpoint.native import load_checkpoint
from dynasearch.cli import main
from dynasearch.data import load_dataset
from dynasearch.diffusion.gaussian import GaussianDiffusion
from dynasearch.errors import CheckpointError, DataError, DynasearchError, TrainingError
from dynasearch.model import DiT, get_config
from dynasearch.model.subnet import Subnet
from dynasearch.space.search_space import load_space
from dynasearch.train.config import (
    TrainConfig,
    TrainingWarning,
    learning_rate,
    load_run_config,
)
from dynasearch.train.ema import EMA
from dynasearch.train.loop import train_supernet
from dynasearch.train.metrics import METRIC_COLUMNS
from dynasearch.train.sandwich import (
    EpochOrder,
    draw_batch,
    sandwich_step,
    sandwich_subnets,
    step_seed,
)


def tiny(out: Path, **kw) -> TrainConfig:
    """A few-second run: DiT-N/2 on digits."""
    base = {"model": "DiT-N/2", "steps": 3, "batch_size": 16, "ckpt_every": 2, "log_every": 1, "device": "cpu",
            "out": str(out)}
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_close_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, worst


def digits_batch(config, step: int = 1, batch: int = 8, seed: int = 0):
    split = load_dataset("digits")
    diffusion = GaussianDiffusion(learn_sigma=config.learn_sigma)
    return split, diffusion, draw_batch(split, diffusion, seed, step, batch, 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# A short run and its files
# ---------------------------------------------------------------------------------------------------------------------
def test_short_run_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_supernet(tiny(out), progress=False)
    assert (result.step, result.start_step, result.steps_run, result.world_size) == (3, 0, 3, 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.csv", "raw.safetensors", "supernet.safetensors", "train_state.pt"]
    )
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"]["name"] == "DiT-N/2" and doc["model"]["input_size"] == 8 and doc["model"]["num_classes"] == 10
    assert doc["step"] == 3 and doc["train"]["step"] == 3 and doc["total_steps"] == 3
    assert set(TrainConfig().to_dict()) <= set(doc["train"])
    assert doc["train"]["batch_size"] == 16 and doc["train"]["reorder"] is False
    assert doc["space"]["name"] == "blockwise" and doc["space"]["granularity"] == "block"
    assert doc["data"]["name"] == "digits" and doc["data"]["num_train"] == 1617 and "val_digest" in doc["data"]
    assert doc["seeds"]["seed"] == 0 and "torch" in doc["versions"] and doc["init"]["kind"] == "scratch"
    assert doc["kind"] == "supernet" and doc["distributed"]["world_size"] == 1
    assert load_run_config(out) == tiny(out).replace(reorder=False, precision="fp32")  # resolved values recorded

    ema, raw = weights(out / "supernet.safetensors"), weights(out / "raw.safetensors")
    model = load_checkpoint(out)  # the EMA supernet
    assert isinstance(model, DiT) and model.config.name == "DiT-N/2"
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    moved = [k for k in raw if not torch.equal(raw[k], ema[k])]
    assert moved  # EMA lags the raw weights

    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and state["ema_updates"] == 3
    assert state["optimizer"]["state"] and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        learning_rate(tiny(out), 3)
    )

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert metrics["step"].tolist() == [1, 2, 3]
    for col in ("loss_max", "loss_min", "loss_random", "lr", "grad_norm", "step_seconds", "sandwich_gflops"):
        assert metrics[col].notna().all() and (metrics[col] > 0).all(), col
    assert (metrics["loss_max"] < 2.0).all()
    assert metrics["elapsed_seconds"].is_monotonic_increasing
    assert metrics["subnets"].nunique() == 3
    # The step's FLOPs: max + min + 2 random forward passes of the global batch of 16.
    from dynasearch.cost.flops import closed_form_flops

    config = model.config
    space = load_space("blockwise")
    want = sum(closed_form_flops(config, s, batch=16) for _, s in sandwich_subnets(space, config, 0, 2, 2)) / 1e9
    assert metrics["sandwich_gflops"][1] == pytest.approx(want, rel=1e-5)
    table = result.summary_table()
    assert table.row_count >= 8


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    full = tmp_path / "full"
    train_supernet(tiny(full, steps=8, ckpt_every=4), progress=False)

    # Interrupted run: checkpoints at 2 and 4, killed during step 6 (row 5 is already in metrics.csv).
    part = tmp_path / "part"
    import dynasearch.train.loop as T

    calls = {"n": 0}
    original = T.sandwich_step

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(T, "sandwich_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(tiny(part, steps=8, ckpt_every=2), progress=False)
    monkeypatch.setattr(T, "sandwich_step", original)
    assert torch.load(part / "train_state.pt", weights_only=True)["step"] == 4
    assert pd.read_csv(part / "metrics.csv")["step"].tolist() == [1, 2, 3, 4, 5]
    with (part / "metrics.csv").open("a") as handle:
        handle.write("3,0.12")  # a line torn by a crash

    with pytest.raises(TrainingError, match="already exists"):
        train_supernet(tiny(part, steps=8, ckpt_every=2), progress=False)
    with pytest.raises(TrainingError, match=rf"--lr {TrainConfig().lr!r} -> 0\.01"):
        train_supernet(tiny(part, steps=8, ckpt_every=2, lr=0.01, resume=True), progress=False)
    result = train_supernet(tiny(part, steps=8, ckpt_every=2, resume=True), progress=False)
    assert (result.start_step, result.step) == (4, 8)

    a, b = pd.read_csv(full / "metrics.csv"), pd.read_csv(part / "metrics.csv")
    assert b["step"].tolist() == list(range(1, 9))
    assert a["subnets"].tolist() == b["subnets"].tolist()  # the same sampling sequence
    for col in ("loss_max", "loss_min", "loss_random", "lr"):
        assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=1e-4, abs=1e-6), col
    assert_close_dicts(weights(full / "raw.safetensors"), weights(part / "raw.safetensors"), 1e-6)
    assert_close_dicts(weights(full / "supernet.safetensors"), weights(part / "supernet.safetensors"), 1e-6)
    sa = torch.load(full / "train_state.pt", weights_only=True)
    sb = torch.load(part / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 8 and sa["ema_updates"] == sb["ema_updates"] == 8

    # Resuming a finished run does nothing; --resume on an empty directory starts from scratch.
    again = train_supernet(tiny(part, steps=8, ckpt_every=2, resume=True), progress=False)
    assert again.steps_run == 0 and again.step == 8
    fresh = train_supernet(tiny(tmp_path / "new", steps=1, resume=True), progress=False)
    assert fresh.start_step == 0 and fresh.step == 1


def test_inconsistent_checkpoint_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_supernet(tiny(out, steps=2), progress=False)
    doc = json.loads((out / "config.json").read_text())
    doc["step"] = 1  # as if the run died between writing the weights and config.json
    (out / "config.json").write_text(json.dumps(doc))
    with pytest.raises(TrainingError, match="inconsistent"):
        train_supernet(tiny(out, steps=2, resume=True), progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# The sandwich step
# ---------------------------------------------------------------------------------------------------------------------
def _grads(model: DiT) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_sandwich_step_trains_max_min_and_random_subnets(tiny_config) -> None:
    config = tiny_config  # DiT-N/2, 4 heads of 8 channels, MLP 128 in 4 groups of 32, 16 tokens
    space = load_space("blockwise")
    _, diffusion, batch = digits_batch(config)
    largest, smallest = space.largest(config), space.smallest(config)
    assert (smallest.blocks[0].heads == 1 and smallest.blocks[0].mlp_hidden == 32
            and smallest.blocks[0].token_ratio == 0.5)

    def run(subnets, distill=0.0):
        model = make_model(config, seed=0).train()
        out = sandwich_step(model, diffusion, batch, subnets, distill=distill)
        return model, out, _grads(model)

    _, out_max, g_max = run([("max", largest)])
    _, out_min, g_min = run([("min", smallest)])
    qkv = "blocks.0.attn.qkv.weight"  # rows [q | k | v], each 4 heads x 8
    fc1 = "blocks.1.mlp.fc1.weight"
    router = "blocks.0.token_router.fc1.weight"
    head_rows = g_max[qkv].view(3, 4, 8, -1)
    assert all(head_rows[:, h].abs().sum() > 0 for h in range(4))  # the largest trains every head
    assert g_max[router] is None  # token ratio 1: the router is not used
    rows = g_min[qkv].view(3, 4, 8, -1)
    assert rows[:, 0].abs().sum() > 0 and rows[:, 1:].abs().sum() == 0  # heads beyond the smallest's: no gradient
    assert g_min[fc1][:32].abs().sum() > 0 and g_min[fc1][32:].abs().sum() == 0
    assert g_min[router] is not None and g_min[router].abs().sum() > 0  # token ratio 0.5 trains the router
    assert g_min["blocks.0.attn.proj.weight"][:, 8:].abs().sum() == 0

    # A random subnet with a mid-size block: its heads get gradients, the rest not.
    rng = random.Random(3)
    rand = next(s for s in (space.sample(config, rng) for _ in range(100)) if 1 < s.blocks[0].heads < 4)
    _, _, g_rand = run([("random-1", rand)])
    h = rand.blocks[0].heads
    rows = g_rand[qkv].view(3, 4, 8, -1)
    assert rows[:, h - 1].abs().sum() > 0 and rows[:, h:].abs().sum() == 0

    # Gradients of the sandwich accumulate: with distill 0 they are the sum of the per-subnet gradients.
    _model, out_all, g_all = run([("max", largest), ("min", smallest), ("random-1", rand)])
    assert [r.name for r in out_all] == ["max", "min", "random-1"]
    assert [r.gt for r in out_all] == pytest.approx([out_max[0].gt, out_min[0].gt, out_all[2].gt], rel=1e-5)
    for name, g in g_all.items():
        parts = [x[name] for x in (g_max, g_min, g_rand) if x[name] is not None]
        if not parts:
            assert g is None, name
            continue
        torch.testing.assert_close(g, sum(parts), rtol=1e-4, atol=1e-6, msg=name)
    assert all(r.seconds > 0 for r in out_all)


def test_distillation_on_and_off(tiny_config) -> None:
    config = tiny_config
    space = load_space("blockwise")
    _, diffusion, batch = digits_batch(config, step=2)
    subnets = [("max", space.largest(config)), ("min", space.smallest(config)), ("same", space.largest(config))]
    results = {}
    for weight in (0.0, 1.0, 3.0):
        model = make_model(config, seed=0).train()
        results[weight] = (sandwich_step(model, diffusion, batch, subnets, distill=weight), _grads(model))
    off, on, strong = (results[w][0] for w in (0.0, 1.0, 3.0))
    assert off[0].distill == 0.0 and off[0].loss == off[0].gt  # the teacher: ground truth only
    assert off[1].loss == off[1].gt and off[1].distill > 0  # distill 0: student loss == ground-truth loss
    assert on[1].gt == pytest.approx(off[1].gt, rel=1e-6)
    assert on[1].loss == pytest.approx(on[1].gt + on[1].distill, rel=1e-6)
    assert strong[1].loss == pytest.approx(strong[1].gt + 3.0 * strong[1].distill, rel=1e-6)
    assert on[2].distill == pytest.approx(0.0, abs=1e-12)  # the largest distilled onto itself: nothing to learn
    g_off, g_on = results[0.0][1], results[1.0][1]
    diff = max((g_on[k] - g_off[k]).abs().max().item() for k in g_on if g_on[k] is not None)
    assert diff > 1e-6  # distillation adds gradient


def test_real_registry_config_sandwich_step() -> None:
    config = get_config("DiT-S/2", input_size=4, in_channels=4, num_classes=10)  # 12 blocks, 384 wide, 4 tokens
    torch.manual_seed(0)
    model = randomize_(DiT(config), seed=0).train()
    diffusion = GaussianDiffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(x0.shape, generator=gen)
    from dynasearch.train.sandwich import TrainBatch

    batch = TrainBatch(x0, torch.tensor([1, 2, 3, 10]), t, noise, diffusion.q_sample(x0, t, noise))
    subnets = sandwich_subnets(load_space("blockwise"), config, seed=0, step=1, n_random=2)
    out = sandwich_step(model, diffusion, batch, subnets, distill=1.0)
    assert [r.name for r in out] == ["max", "min", "random-1", "random-2"]
    assert all(math.isfinite(r.loss) and math.isfinite(r.gt) and r.seconds > 0 for r in out)
    assert out[0].distill == 0.0 and all(r.distill > 0 for r in out[1:])
    assert len({s for _, s in subnets}) == 4
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:10])
    assert model.blocks[11].token_router.fc1.weight.grad is not None  # some subnet ran token selection


# ---------------------------------------------------------------------------------------------------------------------
# Seeded per-step randomness
# ---------------------------------------------------------------------------------------------------------------------
def test_every_draw_derives_from_seed_and_step(tiny_config) -> None:
    config = tiny_config
    split, diffusion, a = digits_batch(config, step=5, batch=32)
    b = draw_batch(split, diffusion, 0, 5, 32, 0.1)
    c = draw_batch(split, diffusion, 0, 6, 32, 0.1)
    d = draw_batch(split, diffusion, 1, 5, 32, 0.1)
    for name in ("x0", "y", "t", "noise", "x_t"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.noise, c.noise) and not torch.equal(a.t, c.t) and not torch.equal(a.noise, d.noise)
    halves = [a.shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h.noise for h in halves]), a.noise) and torch.equal(
        torch.cat([h.y for h in halves]), a.y
    )
    space = load_space("blockwise")
    assert sandwich_subnets(space, config, 0, 5, 2) == sandwich_subnets(space, config, 0, 5, 2)
    assert sandwich_subnets(space, config, 0, 5, 2) != sandwich_subnets(space, config, 0, 6, 2)
    assert step_seed(0, 5, "batch") != step_seed(0, 5, "subnets") != step_seed(1, 5, "subnets")
    # Each epoch visits every training sample once; label dropout hits about 10% of the labels.
    order = EpochOrder(100, seed=0)
    epoch = torch.cat([order.indices(s, 30) for s in range(1, 11)])  # 300 positions = 3 epochs
    for e in range(3):
        assert sorted(epoch[100 * e : 100 * (e + 1)].tolist()) == list(range(100))
    dropped = sum(int((draw_batch(split, diffusion, 0, s, 64, 0.1).y == 10).sum()) for s in range(1, 31))
    assert 0.06 < dropped / (30 * 64) < 0.14


def test_learning_rate_schedule_and_ema() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(cfg, 1) == pytest.approx(1e-4) and learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(0.55e-3) and learning_rate(cfg, 110) == pytest.approx(1e-4)
    assert learning_rate(cfg.replace(lr_schedule="constant"), 100) == 1e-3
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(100_000) == 0.999
    with torch.no_grad():
        before = model.weight.clone()
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], before + (1 - 2 / 11))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": -1.0}, "--lr"),
        ({"ema_decay": 1.0}, "--ema-decay"),
        ({"distill": -0.5}, "--distill"),
        ({"device": "tpu"}, "--device"),
        ({"resume": True, "overwrite": True}, "exclude"),
        ({"model": "DiT-Q/2"}, "unknown model"),
    ],
)
def test_invalid_arguments(kwargs, message) -> None:
    with pytest.raises(DynasearchError, match=message):
        TrainConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_data_and_existing_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DataError, match="does not exist"):
        train_supernet(tiny(out, data=f"npz:{tmp_path / 'missing.npz'}"), progress=False)
    with pytest.raises(DataError, match="not one of"):
        train_supernet(tiny(out, data="cifar"), progress=False)
    assert not out.exists()  # nothing written before the data was checked
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already exists and is not empty"):
        train_supernet(tiny(out), progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_supernet(tiny(out, resume=True), progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no CUDA device"):
        train_supernet(tiny(tmp_path / "run", device="cuda"), progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_errors_are_one_line_and_leave_files_alone(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    files = {"config.json": b'{"precious": true}\n', "metrics.csv": b"step\n1\n", "supernet.safetensors": b"\x00\x01"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    args = ["train-supernet", "--model", "DiT-N/2", "--steps", "1", "--batch-size", "8", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: run directory") and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main([*args[:-2], "--out", str(tmp_path / "b"), "--data", "npz:nope.npz"]) == 2
    err = capsys.readouterr().err
    assert err == "error: npz file 'nope.npz' does not exist\n"
    assert main([*args[:-2], "--out", str(tmp_path / "c"), "--sandwich", "-1"]) == 2
    assert "--sandwich" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_cli_trains_and_resumes_with_stored_arguments(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--ckpt-every", "1", "--batch-size", "8"]
    assert main(["train-supernet", "--model", "DiT-N/2", "--steps", "2", "--sandwich", "1", *common]) == 0
    text = capsys.readouterr().out
    assert "supernet training" in text and "sandwich step" in text
    # --resume without repeating --model / --sandwich: the stored run's arguments are used.
    assert main(["train-supernet", "--resume", "--steps", "3", "--out", str(out)]) == 0
    assert "warning: --resume with --steps 3 (the run was started for 2)" in capsys.readouterr().err
    doc = json.loads((out / "config.json").read_text())
    assert doc["step"] == 3 and doc["model"]["name"] == "DiT-N/2" and doc["train"]["sandwich"] == 1
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == [1, 2, 3]
    # An explicitly different argument is refused.
    assert main(["train-supernet", "--resume", "--steps", "4", "--sandwich", "2", "--out", str(out)]) == 2
    assert "--sandwich 1 -> 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# --init-from
# ---------------------------------------------------------------------------------------------------------------------
def test_init_from_original_dit_state_dict(tmp_path: Path) -> None:
    # An original-layout DiT-N/2 checkpoint for 5 classes (the digits have 10): no token routers, raw state dict.
    source = make_model(get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=5), seed=7)
    state = {k: v for k, v in source.state_dict().items() if ".token_router." not in k}
    ckpt = tmp_path / "DiT-N-2.pt"
    torch.save(state, ckpt)

    out = tmp_path / "run"
    with pytest.warns(TrainingWarning, match=r"re-initialising"):
        train_supernet(tiny(out, model=None, steps=1, lr=1e-9, warmup_steps=0, init_from=str(ckpt), reorder=False),
                       progress=False)
    doc = json.loads((out / "config.json").read_text())
    assert doc["init"]["kind"] == "dit" and doc["init"]["reinitialised"] == ["y_embedder.embedding_table.weight"]
    assert doc["init"]["reordered"] is False and doc["train"]["model"] == "DiT-N/2"
    raw = weights(out / "raw.safetensors")
    assert raw["y_embedder.embedding_table.weight"].shape == (11, 32)
    for key, value in state.items():
        if key != "y_embedder.embedding_table.weight":
            torch.testing.assert_close(raw[key], value, atol=1e-6, rtol=0, msg=key)  # lr 1e-9: barely moved

    # Re-ordering (default with --init-from) keeps the full model's function.
    out2 = tmp_path / "run2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        train_supernet(tiny(out2, model=None, steps=1, lr=1e-9, warmup_steps=0, init_from=str(ckpt)), progress=False)
    assert json.loads((out2 / "config.json").read_text())["init"]["reordered"] is True
    raw2 = weights(out2 / "raw.safetensors")
    assert not torch.equal(raw2["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])
    torch.testing.assert_close(  # a permutation of the same rows
        raw2["blocks.0.mlp.fc1.weight"].norm(dim=1).sort().values,
        state["blocks.0.mlp.fc1.weight"].norm(dim=1).sort().values,
    )

    # A dynasearch checkpoint directory works too (the previous run, no class mismatch, no warning).
    out3 = tmp_path / "run3"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        train_supernet(tiny(out3, steps=1, init_from=str(out)), progress=False)
    assert json.loads((out3 / "config.json").read_text())["init"]["kind"] == "dynasearch"

    # Other mismatches are clear errors: another model, other channels.
    with pytest.raises(TrainingError, match="holds a DiT-N/2 but --model is DiT-T/2"):
        train_supernet(tiny(tmp_path / "x", model="DiT-T/2", init_from=str(ckpt)), progress=False)
    rgb = make_model(get_config("DiT-N/2", input_size=8, in_channels=3, num_classes=10), seed=1)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(CheckpointError, match=r"x_embedder\.proj\.weight"):
        train_supernet(tiny(tmp_path / "y", model=None, init_from=str(tmp_path / "rgb.pt")), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train_supernet(tiny(tmp_path / "z", init_from=str(tmp_path / "none.pt")), progress=False)
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------------------
def test_nan_loss_names_step_and_subnet_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    config = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    smallest = load_space("blockwise").smallest(config)
    calls = {"max": 0}
    original = DiT.forward

    def forward(self, x, t, y, subnet=None, label_dropout=None):
        out = original(self, x, t, y, subnet=subnet, label_dropout=label_dropout)
        if subnet == Subnet.full(self.config):
            calls["max"] += 1
        if calls["max"] == 3 and subnet == smallest:
            return out * float("nan")
        return out

    monkeypatch.setattr(DiT, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        train_supernet(tiny(out, steps=5, ckpt_every=2), progress=False)
    message = str(info.value)
    assert "step 3" in message and "'min'" in message and "nan" in message and "step 2" in message
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert pd.read_csv(out / "metrics.csv")["step"].tolist() == [1, 2]
