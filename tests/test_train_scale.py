"""Tests for training at DiT scale (train-supernet and finetune): --precision fp32|bf16|fp16 (bf16 autocast on the
CPU, fp16's loss scaling with skipped steps counted and resumed), TF32, --compile and its fall-back, per-block
--grad-checkpoint (equal gradients), --log tensorboard (the same scalars as metrics.csv) and --preset dit-finetune."""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import fake_supernet_run, randomize_
from safetensors.torch import load_file

import dynasearch.train.build as build
import dynasearch.train.precision as precision
from dynasearch.checkpoint.native import load_checkpoint, read_config, save_checkpoint
from dynasearch.cli import main
from dynasearch.diffusion.gaussian import GaussianDiffusion
from dynasearch.errors import TrainingError
from dynasearch.model import DiT, get_config
from dynasearch.model.subnet import Subnet
from dynasearch.slicing import slice_subnet
from dynasearch.space.search_space import load_space
from dynasearch.train.config import TrainConfig, TrainingWarning
from dynasearch.train.finetune import finetune
from dynasearch.train.finetune_config import FinetuneConfig
from dynasearch.train.loop import train_supernet
from dynasearch.train.metrics import METRIC_COLUMNS
from dynasearch.train.precision import SCALER_COLUMNS, LossScaler, autocast_dtype, resolve_precision, tf32_mode
from dynasearch.train.presets import ADAMW_BETAS, PRESETS
from dynasearch.train.sandwich import TrainBatch, forward_output, sandwich_step, sandwich_subnets

CPU = torch.device("cpu")


def tiny(out: Path, **kw) -> TrainConfig:
    """A few-second run: DiT-N/2 on digits."""
    base = {"model": "DiT-N/2", "steps": 2, "batch_size": 8, "sandwich": 1, "ckpt_every": 2, "log_every": 1,
            "device": "cpu",
            "lr_schedule": "constant",  # constant: a resume to more steps stretches nothing
            "out": str(out)}
    base.update(kw)
    return TrainConfig(**base)


def raw(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "raw.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights a fresh DiT-N/2 digits run starts from (build_model seeds the initialisation with the run's seed)."""
    torch.manual_seed(seed)
    return DiT(get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)).state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# --precision
# ---------------------------------------------------------------------------------------------------------------------
def test_precision_defaults_and_dtypes() -> None:
    assert resolve_precision(None, CPU) == "fp32" and resolve_precision(None, torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", CPU) == "fp16"
    assert [autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(TrainingError, match="--precision must be one of fp32, bf16, fp16, got 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(TrainingError, match="--precision"):
        FinetuneConfig(checkpoint="x", precision="half")


def test_bf16_autocast_runs_on_the_cpu(tiny_model) -> None:
    """The forward's matmuls run in bf16 on the CPU, the output comes back float32, close to the fp32 one."""
    model = tiny_model.train()
    seen: list[torch.dtype] = []
    model.blocks[0].attn.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([1, 50, 500, 999]), torch.tensor([0, 1, 2, 10])
    ref = forward_output(model, x, t, y)
    out = forward_output(model, x, t, y, autocast_dtype=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err  # bf16 really ran (not bit-equal), and it is close
    out.square().mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_run_on_the_cpu_is_recorded_and_kept_by_resume(tmp_path: Path) -> None:
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train_supernet(tiny(fp32), progress=False)
    train_supernet(tiny(bf16, precision="bf16"), progress=False)
    assert read_config(fp32)["train"]["precision"] == "fp32"  # the default on the CPU, resolved and recorded
    assert read_config(bf16)["train"]["precision"] == "bf16"
    a, b = pd.read_csv(fp32 / "metrics.csv"), pd.read_csv(bf16 / "metrics.csv")
    assert list(b.columns) == list(METRIC_COLUMNS)  # no loss-scale columns without fp16
    assert b["loss_max"].notna().all() and (abs(b["loss_max"] - a["loss_max"]) / a["loss_max"]).max() < 0.05
    assert 0 < max_diff(raw(fp32), raw(bf16)) < 1e-3  # bf16 really ran (the zero-initialised head hides it in the loss)
    assert all(v.dtype == torch.float32 for v in raw(bf16).values() if v.is_floating_point())

    # --resume keeps the stored precision (None: as stored) and refuses another one
    result = train_supernet(tiny(bf16, steps=3, resume=True), progress=False)
    assert result.step == 3 and read_config(bf16)["train"]["precision"] == "bf16"
    with pytest.raises(TrainingError, match=r"--precision 'bf16' -> 'fp32'"):
        train_supernet(tiny(bf16, steps=4, resume=True, precision="fp32"), progress=False)


def test_fp16_scales_the_loss_and_resumes_its_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 on the CPU: GradScaler's scale (growing every step here) is in metrics.csv and train_state.pt, and a
    resumed run continues it exactly as an uninterrupted one."""
    def growing(prec: str, device: torch.device) -> LossScaler | None:
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=1)
        return LossScaler(scaler) if prec == "fp16" else None

    monkeypatch.setattr(build, "make_scaler", growing)
    full, part = tmp_path / "full", tmp_path / "part"
    train_supernet(tiny(full, steps=4, precision="fp16"), progress=False)
    rows = pd.read_csv(full / "metrics.csv")
    assert list(rows.columns) == [*METRIC_COLUMNS, *SCALER_COLUMNS]
    assert rows["loss_scale"].tolist() == [2.0**11, 2.0**12, 2.0**13, 2.0**14]  # four good steps, each doubles it
    assert rows["skipped_steps"].tolist() == [0, 0, 0, 0]
    assert max_diff(raw(full), initial_weights()) > 1e-4  # it trained
    assert torch.load(full / "train_state.pt", weights_only=True)["amp"]["scaler"]["scale"] == 2.0**14

    train_supernet(tiny(part, steps=2, precision="fp16"), progress=False)
    train_supernet(tiny(part, steps=4, resume=True), progress=False)  # precision: as stored
    resumed = pd.read_csv(part / "metrics.csv")
    assert resumed["loss_scale"].tolist() == rows["loss_scale"].tolist()
    assert max_diff(raw(part), raw(full)) < 1e-6


def test_fp16_skips_and_counts_steps_with_inf_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss scale of 2**120 overflows fp16's gradients: each step is skipped (no AdamW step, no EMA update), the
    scale halves, the count grows -- and the run does not stop."""
    monkeypatch.setattr(precision, "FP16_INIT_SCALE", 2.0**120)
    out = tmp_path / "run"
    result = train_supernet(tiny(out, steps=3, precision="fp16"), progress=False)
    assert result.step == 3
    rows = pd.read_csv(out / "metrics.csv")
    assert rows["skipped_steps"].tolist() == [1, 2, 3]
    assert rows["loss_scale"].tolist() == pytest.approx([2.0**119, 2.0**118, 2.0**117], rel=1e-5)  # 6 digits
    assert rows["loss_max"].notna().all()  # the losses themselves are finite
    start = initial_weights()
    assert max_diff(raw(out), start) == 0.0
    assert max_diff(load_file(str(out / "supernet.safetensors")), start) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# TF32
# ---------------------------------------------------------------------------------------------------------------------
def test_tf32_mode_sets_and_restores_the_matmul_precision() -> None:
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    with tf32_mode(True, torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with tf32_mode(False, torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with tf32_mode(True, CPU):  # nothing changes on the CPU
        assert torch.get_float32_matmul_precision() == before[0]


def test_tf32_is_on_by_default_and_recorded(tmp_path: Path) -> None:
    assert TrainConfig().tf32 and FinetuneConfig(checkpoint="x").tf32
    out = tmp_path / "run"
    assert main(["train-supernet", "--model", "DiT-N/2", "--steps", "1", "--batch-size", "8", "--sandwich", "0",
                 "--device", "cpu", "--no-tf32", "--grad-checkpoint", "--precision", "bf16", "--out", str(out)]) == 0
    train = read_config(out)["train"]
    assert (train["tf32"], train["grad_checkpoint"], train["precision"], train["compile"], train["log"]) == (
        False, True, "bf16", False, "csv")
    # a CLI resume takes the stored values of the options it is not given; the precision cannot change
    assert main(["train-supernet", "--resume", "--steps", "2", "--out", str(out)]) == 0
    train = read_config(out)["train"]
    assert (train["step"], train["tf32"], train["grad_checkpoint"], train["precision"]) == (2, False, True, "bf16")


# ---------------------------------------------------------------------------------------------------------------------
# --grad-checkpoint
# ---------------------------------------------------------------------------------------------------------------------
def test_grad_checkpoint_gives_equal_gradients_on_a_real_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """DiT-S/2 (12 blocks, 384 wide) at 4 tokens, a random per-block subnet with token selection: the same
    gradients with and without checkpointing, one checkpoint per block, and far fewer saved activations."""
    config = get_config("DiT-S/2", input_size=4, in_channels=4, num_classes=10)
    model = randomize_(DiT(config), seed=0).train()
    subnet = load_space("blockwise").sample(config, random.Random(3))
    assert any(b.token_ratio < 1 for b in subnet.blocks) and any(b.heads < config.num_heads for b in subnet.blocks)
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([3, 700]), torch.tensor([1, 10])
    calls = {"n": 0}
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        assert kwargs.get("use_reentrant") is False
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)

    def grads_and_saved(checkpointed: bool) -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        model.grad_checkpoint = checkpointed
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(x, t, y, subnet=subnet, label_dropout=False).square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]

    plain, saved_plain = grads_and_saved(False)
    assert calls["n"] == 0
    ckpt, saved_ckpt = grads_and_saved(True)
    assert calls["n"] == config.depth
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    scale = max(g.abs().max().item() for g in plain.values())
    assert max_diff(plain, ckpt) <= 1e-6 * scale
    assert saved_ckpt < saved_plain / 3, (saved_ckpt, saved_plain)
    with torch.no_grad():  # no checkpointing without gradients
        model(x, t, y, subnet=subnet)
    assert calls["n"] == config.depth


def test_grad_checkpoint_run_trains_the_same_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train_supernet(tiny(a), progress=False)
    train_supernet(tiny(b, grad_checkpoint=True), progress=False)
    assert read_config(b)["train"]["grad_checkpoint"] is True
    assert max_diff(raw(a), raw(b)) < 1e-6


def test_sandwich_step_under_a_scaler_scales_the_gradients(tiny_model) -> None:
    model = tiny_model.train()
    config = model.config
    gen = torch.Generator().manual_seed(0)
    diffusion = GaussianDiffusion(learn_sigma=config.learn_sigma)
    x0, t = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([1, 10, 100, 900])
    noise = torch.randn(x0.shape, generator=gen)
    batch = TrainBatch(x0, torch.tensor([0, 1, 2, 10]), t, noise, diffusion.q_sample(x0, t, noise))
    subnets = sandwich_subnets(load_space("blockwise"), config, seed=0, step=1, n_random=1)
    sandwich_step(model, diffusion, batch, subnets)
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    scaler = LossScaler(torch.amp.GradScaler("cpu", init_scale=256.0))
    sandwich_step(model, diffusion, batch, subnets, scaler=scaler)
    scaled = {n: p.grad / 256.0 for n, p in model.named_parameters() if p.grad is not None}
    assert max_diff(plain, scaled) <= 1e-6 * max(g.abs().max().item() for g in plain.values())


# ---------------------------------------------------------------------------------------------------------------------
# --compile
# ---------------------------------------------------------------------------------------------------------------------
def _compile_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TrainingWarning) and "--compile" in str(w.message)]


def test_compile_failure_warns_once_and_trains_as_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that fails at the first compiled call: one warning, the step repeated eagerly, the same weights
    as an uncompiled run."""
    import torch._dynamo.exc as dynamo_exc

    compiled = {"n": 0}

    def failing_compile(fn, **_kwargs):
        compiled["n"] += 1

        def run(*_a, **_k):
            raise dynamo_exc.TorchDynamoException("backend exploded\nsecond line")
        return run

    eager = tmp_path / "eager"
    train_supernet(tiny(eager), progress=False)
    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "compiled"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_supernet(tiny(out, compile=True), progress=False)
    assert compiled["n"] == 2  # DiT-N/2's two blocks
    lines = _compile_warnings(caught)
    assert len(lines) == 1 and "backend exploded" in lines[0] and "second line" not in lines[0], lines
    assert "training continues without torch.compile" in lines[0]
    assert max_diff(raw(out), raw(eager)) == 0.0


def test_compile_unavailable_warns_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_supernet(tiny(tmp_path / "run", compile=True), progress=False)
    assert result.step == 2
    assert ["not supported" in line for line in _compile_warnings(caught)] == [True]


def test_compile_does_not_hide_the_models_own_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy_compile(fn, **_kwargs):
        def run(*_a, **_k):
            raise ValueError("a bug in the model")
        return run

    monkeypatch.setattr(torch, "compile", buggy_compile)
    with pytest.raises(ValueError, match="a bug in the model"):
        train_supernet(tiny(tmp_path / "run", compile=True), progress=False)


@pytest.mark.slow
def test_compile_really_compiles_or_warns_and_trains(tmp_path: Path) -> None:
    """torch.compile for real (inductor's C++ backend on the CPU): either the blocks compile and the run gives the
    eager run's losses, or one warning says why and the run trains eagerly."""
    eager, out = tmp_path / "eager", tmp_path / "compiled"
    train_supernet(tiny(eager, sandwich=2), progress=False)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_supernet(tiny(out, sandwich=2, compile=True), progress=False)
    seconds = time.perf_counter() - start
    assert result.step == 2
    lines = _compile_warnings(caught)
    assert len(lines) <= 1, lines
    a, b = pd.read_csv(eager / "metrics.csv"), pd.read_csv(out / "metrics.csv")
    for col in ("loss_max", "loss_min", "loss_random"):
        assert (abs(a[col] - b[col]) / a[col]).max() < 1e-3, (col, a[col].tolist(), b[col].tolist())
    print(f"compiled 2-step run: {seconds:.1f} s, warning: {lines}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# --log tensorboard
# ---------------------------------------------------------------------------------------------------------------------
def test_tensorboard_holds_the_scalars_of_metrics_csv(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_supernet(tiny(out, steps=3, log="tensorboard", ckpt_every=1), progress=False)
    rows = pd.read_csv(out / "metrics.csv")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = [c for c in METRIC_COLUMNS if c not in ("step", "subnets")]
    assert sorted(acc.Tags()["scalars"]) == sorted(scalars)
    for tag in scalars:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == rows["step"].tolist()
        assert [e.value for e in events] == pytest.approx(rows[tag].tolist(), rel=1e-5), tag

    # a resume continues the events; --overwrite replaces them (and a run without --log writes none)
    train_supernet(tiny(out, steps=4, resume=True), progress=False)  # log: as stored (the CLI); here csv
    train_supernet(tiny(out, steps=5, resume=True, log="tensorboard"), progress=False)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss_max")] == [1, 2, 3, 5]
    train_supernet(tiny(out, overwrite=True), progress=False)
    assert not (out / "tensorboard").exists()


def test_tensorboard_in_finetune_and_a_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best = _export(tmp_path)
    out = tmp_path / "ft"
    finetune(FinetuneConfig(checkpoint=str(best), steps=2, batch_size=8, device="cpu", log_every=1, log="tensorboard",
                            out=str(out)), progress=False)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "loss_gt", "lr", "grad_norm", "gflops"} <= set(acc.Tags()["scalars"])
    assert "distill" not in acc.Tags()["scalars"]  # NaN without a teacher: an empty cell, no event

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = main(["train-supernet", "--model", "DiT-N/2", "--steps", "1", "--device", "cpu", "--log", "tensorboard",
                 "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --log tensorboard"), err
    assert 'pip install -e ".[tensorboard]"' in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------------------------------------
# --preset dit-finetune
# ---------------------------------------------------------------------------------------------------------------------
def _export(tmp_path: Path) -> Path:
    """A uniform subnet of a fake DiT-N/2 supernet, exported as a search exports it."""
    run = fake_supernet_run(tmp_path / "supernet")
    model = load_checkpoint(run)
    small = slice_subnet(model, Subnet.uniform(model.config, 0.5, 0.5, 1.0))
    extra = {"search": {"source_supernet": str(run)}, "data": read_config(run)["data"]}
    return save_checkpoint(small, tmp_path / "best", extra=extra)


def test_preset_dit_finetune_sets_dits_recipe_and_explicit_flags_win(tmp_path: Path) -> None:
    run = fake_supernet_run(tmp_path / "pretrained")
    base = ["train-supernet", "--init-from", str(run), "--steps", "1", "--batch-size", "8", "--sandwich", "0",
            "--device", "cpu"]
    assert main([*base, "--preset", "dit-finetune", "--lr", "2e-4", "--out", str(tmp_path / "ft")]) == 0
    train = read_config(tmp_path / "ft")["train"]
    assert (train["preset"], train["lr"], train["ema_decay"], train["weight_decay"], train["lr_schedule"],
            train["warmup_steps"], train["grad_clip"]) == ("dit-finetune", 2e-4, 0.9999, 0.0, "constant", 0, 0.0)
    record = train["preset_values"]
    assert record["name"] == "dit-finetune" and record["values"] == PRESETS["dit-finetune"]
    assert record["overridden"] == {"lr": 2e-4} and record["adamw_betas"] == list(ADAMW_BETAS) == [0.9, 0.999]
    state = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=True)
    assert tuple(state["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.999)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.0

    # without the preset: the digits' defaults
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    train = read_config(tmp_path / "plain")["train"]
    assert (train["preset"], train["lr"], train["ema_decay"]) == (None, 3e-3, 0.999) and "preset_values" not in train

    # the library: from_preset, keyword arguments overriding it
    cfg = TrainConfig.from_preset("dit-finetune", init_from=str(run), ema_decay=0.999)
    assert (cfg.lr, cfg.ema_decay, cfg.preset) == (1e-4, 0.999, "dit-finetune")
    with pytest.raises(TrainingError, match=r"--preset dit-finetune .* --init-from"):
        TrainConfig(preset="dit-finetune")


def test_preset_in_finetune(tmp_path: Path) -> None:
    best = _export(tmp_path)
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(best), "--steps", "1", "--batch-size", "8", "--device", "cpu",
                 "--preset", "dit-finetune", "--ema-decay", "0.99", "--out", str(out)]) == 0
    section = read_config(out)["finetune"]
    assert (section["lr"], section["ema_decay"], section["lr_schedule"], section["precision"]) == (
        1e-4, 0.99, "constant", "fp32")
    assert section["preset_values"]["overridden"] == {"ema_decay": 0.99}
    assert math.isfinite(pd.read_csv(out / "metrics.csv")["loss"].iloc[0])
    # a resume keeps the preset's values without the flag being repeated
    assert main(["finetune", "--resume", "--steps", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["finetune"]["lr"] == 1e-4
