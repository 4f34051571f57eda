"""Search: outputs, budgets, resume, workers, failures, study settings (on tiny supernets)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import fake_supernet_run

from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint
from dynasearch.cost.flops import closed_form_flops, count_flops
from dynasearch.errors import BudgetError, SearchError, SearchSpaceError
from dynasearch.model import create_supernet
from dynasearch.model.subnet import Subnet
from dynasearch.search.config import SearchConfig
from dynasearch.search.context import prepare_search
from dynasearch.search.objective import run_trials
from dynasearch.search.outputs import pareto_frame
from dynasearch.search.run import run_search
from dynasearch.space.search_space import load_space

_fake_run = fake_supernet_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_run(tmp_path_factory.mktemp("run") / "supernet")


def _config(run_dir: Path, out: Path, **kw) -> SearchConfig:
    base = {"supernet": run_dir, "flops": "0.5x", "out": out, "trials": 8, "proxy_samples": 64, "export_top": 2,
            "seed": 0}
    base.update(kw)
    return SearchConfig(**base)


def test_search_writes_every_output_within_budget(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = run_search(_config(run_dir, out), progress=False)
    for name in ("trials.csv", "pareto.csv", "baseline.csv", "best.json"):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    pareto = pd.read_csv(out / "pareto.csv")
    baseline = pd.read_csv(out / "baseline.csv")
    best = json.loads((out / "best.json").read_text())
    assert len(trials) == 8 and set(trials["state"]) == {"COMPLETE"}
    assert {"number", "state", "gflops", "proxy_loss", "feasible", "seconds", "attn_b0", "mlp_b1",
            "tok_b1"} <= set(trials.columns)
    # the study was seeded with the largest and the smallest subnets
    full = closed_form_flops(load_checkpoint(run_dir).config)
    assert trials["gflops"].max() == pytest.approx(full / 1e9)
    assert (pareto["gflops"].diff().dropna() > 0).all() and (pareto["proxy_loss"].diff().dropna() < 0).all()
    assert pareto["feasible"].all()
    assert best["gflops"] * 1e9 <= best["budget_gflops"] * 1e9 + 1
    assert len(baseline) > 10 and {"attn_rate", "mlp_rate", "token_ratio", "on_front"} <= set(baseline.columns)
    # exported checkpoints: physically smaller, within budget, fvcore == closed form, same function
    supernet = load_checkpoint(run_dir)
    assert len(result.exported) >= 2
    uniform = next(e for e in result.exported if e["name"] == "uniform")  # the best feasible uniform subnet, sliced
    assert uniform["proxy_loss"] == best["best_uniform"]["proxy_loss"]
    assert json.loads(best["best_uniform"]["subnet"]) == Subnet.load(Path(uniform["path"]) / "subnet.json").to_dict()
    for entry in result.exported:
        small = load_checkpoint(entry["path"])
        subnet = Subnet.load(Path(entry["path"]) / "subnet.json")
        assert small.config.is_sliced
        assert count_flops(small).total == closed_form_flops(supernet.config, subnet) <= best["budget_gflops"] * 1e9
        x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
        torch.testing.assert_close(small(x, t, y), supernet(x, t, y, subnet=subnet), atol=1e-5, rtol=1e-5)


def test_resume_continues_without_repeating(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    cfg = _config(run_dir, out, trials=5, export_top=0)
    first = run_search(cfg, progress=False).trials
    second = run_search(replace(cfg, trials=9), progress=False).trials
    assert len(first) == 5 and len(second) == 9
    assert second["number"].is_unique
    merged = second.set_index("number").loc[first["number"]]
    assert (merged["proxy_loss"].values == first["proxy_loss"].values).all()
    third = run_search(replace(cfg, trials=9), progress=False).trials  # nothing left to do
    assert len(third) == 9


def test_two_workers_one_consistent_study(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = run_search(_config(run_dir, out, trials=10, workers=2, export_top=0), progress=False)
    trials = result.trials
    assert len(trials) == 10 and trials["number"].is_unique
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="dynasearch", storage=storage)
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 10
    # what optuna-dashboard shows: named objectives, and the budget as the constraint 'flops' of every trial
    assert study.metric_names == ["proxy_loss", "gflops"]
    assert all("constraints:flops" in t.system_attrs for t in study.get_trials())


def test_failed_trials_do_not_stop_the_study(run_dir: Path, tmp_path: Path) -> None:
    ctx = prepare_search(_config(run_dir, tmp_path / "s", trials=6, export_top=0))
    calls = {"n": 0}
    real = ctx.evaluator

    class Flaky:
        def __call__(self, subnet):
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                raise RuntimeError("boom")
            if calls["n"] == 3:
                return float("nan")
            return real(subnet)

    ctx.evaluator = Flaky()
    study = run_trials(ctx)
    states = [t.state.name for t in study.get_trials()]
    assert states.count("FAIL") >= 3 and states.count("COMPLETE") >= 1 and len(states) == 6
    reasons = {t.user_attrs.get("fail_reason") for t in study.get_trials() if t.state.name == "FAIL"}
    assert "RuntimeError: boom" in reasons and "proxy loss is nan" in reasons


def test_budget_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="below the smallest subnet"):
        prepare_search(_config(run_dir, tmp_path / "a", flops="0.01x"))
    with pytest.raises(BudgetError, match="not understood"):
        prepare_search(_config(run_dir, tmp_path / "b", flops="50X"))
    with pytest.raises(BudgetError, match="positive"):
        prepare_search(_config(run_dir, tmp_path / "c", flops="0"))


def test_budget_above_full_returns_full_model(run_dir: Path, tmp_path: Path) -> None:
    result = run_search(_config(run_dir, tmp_path / "s", flops="2x", trials=3, export_top=0), progress=False)
    assert result.best["full_model"] is True
    assert any("full model" in n for n in result.notes)
    config = load_checkpoint(run_dir).config
    assert Subnet.from_dict(result.best["subnet"]) == Subnet.full(config)


def test_same_study_name_with_other_space_is_an_error(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    run_search(_config(run_dir, out, trials=2, export_top=0), progress=False)
    with pytest.raises(SearchError, match="different settings"):
        run_search(_config(run_dir, out, trials=2, export_top=0, space="uniform"), progress=False)


def test_space_with_choices_the_supernet_lacks(run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "odd.yaml"
    bad.write_text("granularity: block\nattn_rate: [0.3, 1.0]\nmlp_rate: [1.0]\ntoken_ratio: [1.0]\n")
    with pytest.raises(SearchSpaceError, match=r"0\.3"):
        prepare_search(_config(run_dir, tmp_path / "s", space=str(bad)))


def test_pareto_frame_keeps_only_non_dominated() -> None:
    df = pd.DataFrame(
        {
            "number": [0, 1, 2, 3, 4],
            "state": ["COMPLETE"] * 4 + ["FAIL"],
            "gflops": [1.0, 2.0, 3.0, 1.5, 0.5],
            "proxy_loss": [0.5, 0.6, 0.3, 0.4, 0.1],
            "feasible": [True, True, True, True, True],
            "subnet": ["a", "b", "c", "d", "e"],
        }
    )
    front = pareto_frame(df)
    assert list(front["number"]) == [0, 3, 2]


def test_search_on_registry_config(tmp_path: Path) -> None:
    """One search step on a real registry architecture (DiT-S/8: 12 blocks, 6 heads) at a tiny input size."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = create_supernet("DiT-S/8", input_size=8, in_channels=1, num_classes=10)
    extra = {"space": load_space("stagewise").to_dict(), "data": {"spec": "digits"}}
    save_checkpoint(model, run, weights_name="supernet.safetensors", extra=extra)
    result = run_search(_config(run, tmp_path / "s", flops="0.9x", trials=4, export_top=1, proxy_samples=16),
                        progress=False)
    assert len(result.trials) == 4
    assert result.best["gflops"] <= result.best["budget_gflops"]


def test_mask_url_hides_every_password_form() -> None:
    from dynasearch.search.storage import mask_url

    assert mask_url("postgresql://user:s3cr@t@db.example:5432/opt") == "postgresql://user:***@db.example:5432/opt"
    assert mask_url("postgresql://:pw@127.0.0.1/db") == "postgresql://:***@127.0.0.1/db"
    assert mask_url("postgresql://u@h/db?sslmode=require&password=pw&x=1") == "postgresql://u@h/db?sslmode=require&password=***&x=1"
    assert mask_url("sqlite:///tmp/study.db") == "sqlite:///tmp/study.db"
    assert mask_url("runs/study.journal") == "runs/study.journal"


def test_missing_database_driver_names_it_and_masks_the_password(tmp_path: Path) -> None:
    from dynasearch.search.storage import make_storage

    with pytest.raises(SearchError) as info:
        make_storage("mysql://user:hunter2@127.0.0.1:1/db", tmp_path)
    assert "hunter2" not in str(info.value) and "user:***@" in str(info.value)
    assert "driver" in str(info.value) and "None" not in str(info.value)


def test_torn_journal_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    """A writer killed mid-append leaves half a record; the next writer removes it instead of gluing onto it."""
    from dynasearch.search.storage import make_storage

    path = tmp_path / "study.journal"
    optuna.create_study(study_name="a", storage=make_storage(str(path), tmp_path))
    good = path.read_text()
    path.write_text(good + '{"op_code": 4, "worker_id": "x", "study_id": 0, "da')  # torn record, no newline
    storage = make_storage(str(path), tmp_path)
    study = optuna.create_study(study_name="b", storage=storage)
    study.enqueue_trial({"x": 1.0})
    lines = path.read_text().splitlines()
    assert path.read_text().startswith(good) and all(json.loads(line) for line in lines)
    reread = make_storage(str(path), tmp_path)
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(reread)) == ["a", "b"]


def test_seeds_enqueued_twice_are_evaluated_once(run_dir: Path, tmp_path: Path) -> None:
    """Two fresh workers may both seed a new study: every copy but the first is pruned, counts stay exact."""
    from dynasearch.search.study import make_sampler, open_study, seed_study
    from dynasearch.search.trials import ATTR_SEED

    ctx = prepare_search(_config(run_dir, tmp_path / "s", trials=5, export_top=0))
    study = open_study(ctx, make_sampler("tpe", 0, 5))
    seed_study(ctx, study)
    for t in study.get_trials():  # a second worker's copies (the race skip_if_exists cannot close)
        study.enqueue_trial(t.system_attrs["fixed_params"], user_attrs={ATTR_SEED: t.user_attrs[ATTR_SEED]})
    study = run_trials(ctx)
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    seeds = [t.user_attrs[ATTR_SEED] for t in complete if ATTR_SEED in t.user_attrs]
    assert sorted(seeds) == [0, 1, 2]
    assert [t.state.name for t in trials if ATTR_SEED in t.user_attrs].count("PRUNED") == 3
