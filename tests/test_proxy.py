"""The quality proxy's kinds (eps, teacher, teacher-norm, teacher-sample): values by hand, the full model's zero,
per-bucket splits, the study settings that record the kind, and the timestep-aware search's refusal."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import optuna
import pytest
import torch
import typer
from conftest import fake_supernet_run, make_model

import dynasearch.cli  # noqa: F401  (registers the commands)
from dynasearch.cli._app import app
from dynasearch.diffusion.factory import diffusion_for
from dynasearch.errors import SearchError
from dynasearch.model.config import DiTConfig
from dynasearch.model.subnet import Subnet
from dynasearch.sampling import sample_images
from dynasearch.search.buckets import prepare_timestep_search
from dynasearch.search.config import SearchConfig
from dynasearch.search.context import prepare_search
from dynasearch.search.proxy import (
    DEFAULT_PROXY,
    NORM_BINS,
    PROXY_KINDS,
    SAMPLE_STEPS,
    ProxyEvaluator,
    ProxySet,
    build_proxy_set,
    timestep_bins,
)
from dynasearch.search.run import run_search
from dynasearch.search.storage import make_storage


class ConstantDiT(torch.nn.Module):
    """Predicts epsilon = 0 everywhere with the full subnet and 1 with any other: values a hand can compute."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, subnet: Subnet | None = None,
                label_dropout: bool = True) -> torch.Tensor:
        value = 0.0 if subnet == Subnet.full(self.config) else 1.0
        return torch.full((x.shape[0], self.config.out_channels, *x.shape[2:]), value)


def _hand_set(config: DiTConfig) -> ProxySet:
    """Four quadruples with noise 0, 1, 2, 3 everywhere, at timesteps in bins 0, 0, 5 and 9."""
    shape = (4, config.in_channels, config.input_size, config.input_size)
    noise = torch.arange(4.0).view(4, 1, 1, 1).expand(shape).clone()
    zeros = torch.zeros(shape)
    return ProxySet(x0=zeros, x_t=zeros, t=torch.tensor([0, 10, 500, 999]), noise=noise,
                    y=torch.zeros(4, dtype=torch.long), seed=0)


def test_kinds_by_hand(tiny_config: DiTConfig) -> None:
    model, proxy = ConstantDiT(tiny_config), _hand_set(tiny_config)
    half = Subnet.uniform(tiny_config, 0.5, 0.5, 1.0)
    full = Subnet.full(tiny_config)
    assert diffusion_for(tiny_config).num_timesteps == 1000 and NORM_BINS == 10
    assert timestep_bins(proxy.t, 1000).tolist() == [0, 0, 5, 9]
    eps = ProxyEvaluator(model, proxy, kind="eps")
    assert eps.per_sample(half).tolist() == [1.0, 0.0, 1.0, 4.0]  # (1 - noise)^2
    assert eps(half) == pytest.approx(1.5) and eps(full) == pytest.approx((0 + 1 + 4 + 9) / 4)
    teacher = ProxyEvaluator(model, proxy, kind="teacher")
    assert teacher(half) == pytest.approx(1.0) and teacher(full) == 0.0  # (1 - 0)^2; the teacher against itself
    norm = ProxyEvaluator(model, proxy, kind="teacher-norm")
    # the teacher's own epsilon MSE is noise^2 = 0, 1, 4, 9: bin means 0.5 (bin 0), 4 (bin 5), 9 (bin 9)
    assert norm.proxy.norm.tolist() == [0.5, 0.5, 4.0, 9.0]
    torch.testing.assert_close(norm.per_sample(half), torch.tensor([2.0, 2.0, 0.25, 1 / 9]))
    assert norm(half) == pytest.approx((2 + 2 + 0.25 + 1 / 9) / 4) and norm(full) == 0.0
    # one bucket keeps the whole set's bin scale (a subset's bins would have other means)
    torch.testing.assert_close(norm.restricted(torch.tensor([1, 2])).per_sample(half), torch.tensor([2.0, 0.25]))


def test_real_model_kinds_and_the_full_model_scores_zero(tiny_config: DiTConfig) -> None:
    model = make_model(tiny_config, seed=3)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
    proxy = build_proxy_set(images, torch.arange(40) % 10, diffusion_for(tiny_config), num=48, seed=5)
    full, half = Subnet.full(tiny_config), Subnet.uniform(tiny_config, 0.5, 0.5, 0.5)
    with torch.no_grad():
        pred_half = model(proxy.x_t, proxy.t, proxy.y, subnet=half, label_dropout=False)[:, :1]
        pred_full = model(proxy.x_t, proxy.t, proxy.y, subnet=full, label_dropout=False)[:, :1]
    values = {kind: ProxyEvaluator(model, proxy, batch_size=16, kind=kind) for kind in PROXY_KINDS}
    assert values["eps"](half) == pytest.approx(float(((pred_half - proxy.noise) ** 2).mean()), rel=1e-5)
    assert values["teacher"](half) == pytest.approx(float(((pred_half - pred_full) ** 2).mean()), rel=1e-4)
    # teacher-sample: 48 // 8 = 6 eight-step DDIM runs from the proxy seed's noise, without guidance
    n = 48 // SAMPLE_STEPS
    a = sample_images(model, num=n, cfg_scale=1.0, steps=SAMPLE_STEPS, seed=5, subnet=half)
    b = sample_images(model, num=n, cfg_scale=1.0, steps=SAMPLE_STEPS, seed=5, subnet=full)
    assert values["teacher-sample"].proxy.teacher_samples.shape == (n, 1, 8, 8)
    assert values["teacher-sample"](half) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-5)
    for kind in ("teacher", "teacher-norm", "teacher-sample"):
        assert values[kind](full) == 0.0, kind
        assert values[kind](half) > 0.0, kind
    assert values["eps"](full) > 0.0  # the irreducible noise stays in eps
    with pytest.raises(SearchError, match="cannot be split by timestep bucket"):
        values["teacher-sample"].restricted(torch.tensor([0, 1]))
    # the cache travels with the set: a second evaluator on it runs no teacher forward
    again = ProxyEvaluator(model, values["teacher"].proxy, kind="teacher-norm")
    assert again.proxy.teacher is values["teacher"].proxy.teacher


def test_bad_kind_and_too_few_samples(tmp_path: Path) -> None:
    base = {"supernet": tmp_path, "flops": "0.5x", "out": tmp_path / "out"}
    with pytest.raises(SearchError,
                       match="--proxy must be one of eps, teacher, teacher-norm, teacher-sample, got 'l1'"):
        SearchConfig(proxy="l1", **base)
    with pytest.raises(SearchError, match="--proxy teacher-sample needs --proxy-samples of at least 8"):
        SearchConfig(proxy="teacher-sample", proxy_samples=4, **base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_supernet_run(tmp_path_factory.mktemp("run") / "supernet")


def _stored_settings(out: Path) -> dict:
    storage = make_storage(None, out)
    return storage.get_study_user_attrs(storage.get_study_id_from_name("dynasearch"))["dynasearch"]


def test_proxy_kind_is_recorded_and_a_resume_with_another_is_refused(run_dir: Path, tmp_path: Path) -> None:
    base = {"supernet": run_dir, "flops": "0.5x", "trials": 3, "proxy_samples": 32, "export_top": 0, "seed": 0}
    teacher = run_search(SearchConfig(out=tmp_path / "t", proxy="teacher", **base), progress=False)
    assert _stored_settings(tmp_path / "t")["proxy"] == "teacher"
    # the searched loss is the teacher's: the seeded full model scores exactly 0 (eps never does)
    trials = optuna.load_study(study_name="dynasearch", storage=make_storage(None, tmp_path / "t")).trials
    assert min(t.values[0] for t in trials if t.values) == 0.0
    assert teacher.best["proxy_loss"] > 0.0
    journal = (tmp_path / "t" / "study.journal").read_bytes()
    for other in ("eps", "teacher-norm"):
        with pytest.raises(SearchError, match=r"different settings \(proxy\)"):
            run_search(SearchConfig(out=tmp_path / "t", proxy=other, **base), progress=False)
    assert (tmp_path / "t" / "study.journal").read_bytes() == journal  # refused before anything was written
    # every study and best.json names its proxy, eps too
    eps = run_search(SearchConfig(out=tmp_path / "e", proxy="eps", **base), progress=False)
    assert _stored_settings(tmp_path / "e")["proxy"] == "eps"
    assert json.loads((tmp_path / "e" / "best.json").read_text())["settings"]["proxy"] == "eps"
    assert json.loads((tmp_path / "t" / "best.json").read_text())["settings"]["proxy"] == "teacher"
    with pytest.raises(SearchError, match=r"different settings \(proxy\)"):  # the default is the teacher now
        run_search(SearchConfig(out=tmp_path / "e", **base), progress=False)
    # a study made before proxy kinds recorded none: it was eps, so an eps search resumes it and no other does
    storage = make_storage(None, tmp_path / "e")
    study_id = storage.get_study_id_from_name("dynasearch")
    old = {k: v for k, v in _stored_settings(tmp_path / "e").items() if k != "proxy"}
    storage.set_study_user_attr(study_id, "dynasearch", old)
    with pytest.raises(SearchError, match=r"different settings \(proxy\)"):
        run_search(SearchConfig(out=tmp_path / "e", proxy="teacher", **base), progress=False)
    resumed = run_search(SearchConfig(out=tmp_path / "e", proxy="eps", **{**base, "trials": 4}), progress=False)
    assert len(resumed.trials) == len(eps.trials) + 1


def test_timestep_search_splits_teacher_kinds_and_refuses_teacher_sample(run_dir: Path, tmp_path: Path) -> None:
    base = {"supernet": run_dir, "flops": "0.5x", "out": tmp_path / "out", "space": "timestep", "trials": 2,
            "proxy_samples": 64}
    tc = prepare_timestep_search(SearchConfig(proxy="teacher-norm", **base))
    assert tc.ctx.settings["proxy"] == "teacher-norm"
    subnet = Subnet.uniform(tc.ctx.model.config, 0.5, 0.5, 1.0)
    whole = tc.ctx.evaluator.per_sample(subnet)  # (64,)
    bucket = tc.buckets.bucket_index(tc.ctx.evaluator.proxy.t).cpu()
    for k, ev in enumerate(tc.evaluators):
        assert ev.kind == "teacher-norm"
        torch.testing.assert_close(ev.per_sample(subnet), whole[bucket == k])
    with pytest.raises(SearchError, match="--proxy teacher-sample scores whole sampling trajectories"):
        prepare_search(SearchConfig(proxy="teacher-sample", **base))
    assert not (tmp_path / "out").exists()


def test_the_default_proxy_is_the_teacher_mse_everywhere() -> None:
    """Chosen from results/mnist/bench (tau 0.857 against the fine-tuned loss; eps 0.571): CLI, config and evaluator."""
    command = typer.main.get_command(app).commands["search"]
    option = next(p for p in command.params if p.name == "proxy")
    assert DEFAULT_PROXY == "teacher" == option.default
    assert inspect.signature(SearchConfig).parameters["proxy"].default == DEFAULT_PROXY
