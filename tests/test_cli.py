"""Tests for the `models` and `flops` commands: JSON / Markdown output with the right numbers, subnets and
checkpoints, and for every bad input exit code 2 with exactly one `error:` line naming the offending value, no
traceback, and no file touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_model

from dynasearch.checkpoint.native import save_checkpoint
from dynasearch.cli import main
from dynasearch.cost.flops import closed_form_flops, closed_form_params
from dynasearch.model import DIT_CONFIGS, get_config
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.slicing import slice_subnet


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------------
def test_models_json(capsys) -> None:
    rows = run_json(capsys, "models", "--json")
    assert [r["model"] for r in rows] == list(DIT_CONFIGS)
    by_name = {r["model"]: r for r in rows}
    xl = by_name["DiT-XL/2"]
    assert round(xl["gflops"], 2) == 118.69 and xl["gflops"] == 118_688_661_504 / 1e9
    assert xl["params"] == 675_129_632  # the original DiT-XL/2 (no routers)
    assert xl["params_with_routers"] == 675_129_632 + 28 * (1152 * 144 + 144 + 144 + 1)
    assert (xl["depth"], xl["hidden_size"], xl["num_heads"], xl["patch_size"], xl["tokens"]) == (28, 1152, 16, 2, 256)
    # the DiT paper's parameter counts (Table 1: 33M, 130M, 458M, 675M) and their GFLOPs ordering
    for name, millions in (("DiT-S/2", 33.0), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)):
        assert round(by_name[name]["params"] / 1e6, 1) == pytest.approx(millions, abs=0.1)
    for size in ("XL", "L", "B", "S", "T", "N"):
        assert (by_name[f"DiT-{size}/2"]["gflops"] > by_name[f"DiT-{size}/4"]["gflops"]
                > by_name[f"DiT-{size}/8"]["gflops"])
    for r in rows:
        config = get_config(r["model"])
        assert r["gflops"] == closed_form_flops(config) / 1e9
        assert r["params"] == closed_form_params(config, routers=False)


def test_models_json_other_sizes(capsys) -> None:
    rows = run_json(capsys, "models", "--json", "--input-size", "64", "--in-channels", "3", "--num-classes", "10")
    xl = next(r for r in rows if r["model"] == "DiT-XL/2")
    config = get_config("DiT-XL/2", input_size=64, in_channels=3, num_classes=10)
    assert xl["tokens"] == 1024 and xl["gflops"] == closed_form_flops(config) / 1e9 > 4 * 118.69


def test_models_markdown(capsys) -> None:
    code, out, err = run(capsys, "models", "--markdown")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0] == "| model | depth | width | heads | patch | tokens | params (M) | GFLOPs |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(DIT_CONFIGS)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == list(DIT_CONFIGS)
    assert rows["DiT-XL/2"] == ["28", "1152", "16", "2", "256", "675.13", "118.69"]
    assert rows["DiT-S/2"][-2:] == ["32.96", "6.07"]


def test_models_table(capsys) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0 and "DiT-XL/2" in out and "118.69" in out and "DiT-N/8" in out


# ---------------------------------------------------------------------------------------------------------------------
# flops
# ---------------------------------------------------------------------------------------------------------------------
def test_flops_model_json(capsys) -> None:
    doc = run_json(capsys, "flops", "--model", "DiT-S/2", "--json")
    assert {"model", "gflops", "gflops_closed_form", "params"} <= doc.keys()
    assert "by_module" not in doc
    config = get_config("DiT-S/2")
    assert doc["model"] == "DiT-S/2" and doc["input_size"] == 32 and doc["batch"] == 1
    assert doc["gflops"] == doc["gflops_closed_form"] == closed_form_flops(config) / 1e9
    assert doc["flops"] == doc["flops_closed_form"] == closed_form_flops(config)
    assert round(doc["gflops"], 2) == 6.07
    assert doc["params"] == closed_form_params(config)
    assert doc["subnet"] == Subnet.full(config).to_dict()


def test_flops_by_module_and_rates(capsys) -> None:
    full = run_json(capsys, "flops", "--model", "DiT-T/2", "--input-size", "16", "--json", "--by-module")
    config = get_config("DiT-T/2", input_size=16)
    assert full["flops"] == full["flops_closed_form"] == closed_form_flops(config)
    modules = full["by_module"]
    expected = {"x_embedder", "t_embedder", "final_layer", "blocks", *(f"blocks.{i}" for i in range(config.depth))}
    assert set(modules) == expected
    for name, entry in modules.items():
        assert entry["fvcore"] == entry["closed_form"] > 0, name
    assert sum(modules[f"blocks.{i}"]["fvcore"] for i in range(config.depth)) == modules["blocks"]["fvcore"]
    assert sum(modules[k]["fvcore"] for k in ("x_embedder", "t_embedder", "final_layer", "blocks")) == full["flops"]

    half = run_json(capsys, "flops", "--model", "DiT-T/2", "--input-size", "16", "--attn-rate", "0.5", "--json")
    subnet = Subnet.uniform(config, attn_rate=0.5)
    assert half["flops"] == half["flops_closed_form"] == closed_form_flops(config, subnet) < full["flops"]
    assert half["subnet"] == subnet.to_dict() and half["params"] < full["params"]
    assert "by_module" not in half


def test_flops_all_rates_and_batch(capsys) -> None:
    doc = run_json(capsys, "flops", "--model", "DiT-N/2", "--input-size", "8", "--mlp-rate", "0.25",
                   "--token-ratio", "0.5", "--batch", "2", "--json")
    config = get_config("DiT-N/2", input_size=8)
    subnet = Subnet.uniform(config, mlp_rate=0.25, token_ratio=0.5)
    assert doc["flops"] == doc["flops_closed_form"] == closed_form_flops(config, subnet, batch=2)
    assert doc["batch"] == 2 and doc["subnet"] == subnet.to_dict()


def test_flops_table_output(capsys) -> None:
    code, out, err = run(capsys, "flops", "--model", "DiT-N/2", "--input-size", "8", "--by-module")
    assert code == 0 and err == ""
    config = get_config("DiT-N/2", input_size=8)
    assert f"{closed_form_flops(config) / 1e9:.4f}" in out and "blocks.1" in out and "final_layer" in out


def test_flops_subnet_file(capsys, tmp_path) -> None:
    config = get_config("DiT-T/2", input_size=16)
    subnet = Subnet(tuple(BlockChoice(1 + i, 64 * (8 - i), (0.25, 0.5, 0.75, 1.0)[i % 4]) for i in range(6)))
    path = tmp_path / "subnet.json"
    subnet.save(path)
    before = path.read_bytes()
    doc = run_json(capsys, "flops", "--model", "DiT-T/2", "--input-size", "16", "--subnet", str(path), "--json")
    assert doc["flops"] == doc["flops_closed_form"] == closed_form_flops(config, subnet)
    assert doc["params"] == closed_form_params(config, subnet)
    assert doc["subnet"] == subnet.to_dict()
    assert path.read_bytes() == before


@pytest.fixture
def sliced_checkpoint(tmp_path) -> tuple[Path, object]:
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10), seed=0)
    small = slice_subnet(model, Subnet((BlockChoice(3, 64, 0.5), BlockChoice(1, 96, 1.0))))
    return save_checkpoint(small, tmp_path / "sliced"), small


def test_flops_checkpoint_of_a_sliced_model(capsys, sliced_checkpoint) -> None:
    directory, small = sliced_checkpoint
    doc = run_json(capsys, "flops", "--checkpoint", str(directory), "--json")
    assert doc["model"] == "DiT-N/2" and doc["input_size"] == 8 and doc["in_channels"] == 1
    assert doc["flops"] == doc["flops_closed_form"] == closed_form_flops(small.config)
    assert doc["params"] == sum(p.numel() for p in small.parameters())
    assert doc["subnet"]["blocks"][0] == {"heads": 3, "mlp_hidden": 64, "token_ratio": 0.5}
    # a smaller subnet of the sliced model, from a file
    sub = Subnet((BlockChoice(1, 32, 0.25), BlockChoice(1, 32, 1.0)))
    sub.save(directory.parent / "sub.json")
    doc = run_json(capsys, "flops", "--checkpoint", str(directory), "--subnet", str(directory.parent / "sub.json"),
                   "--json")
    assert doc["flops"] == doc["flops_closed_form"] == closed_form_flops(small.config, sub)


def test_flops_checkpoint_of_a_supernet_uses_its_active_subnet(capsys, tmp_path) -> None:
    model = make_model(get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10), seed=0)
    subnet = Subnet((BlockChoice(2, 64, 0.5), BlockChoice(4, 128, 1.0)))
    model.set_subnet(subnet)
    save_checkpoint(model, tmp_path / "super")
    doc = run_json(capsys, "flops", "--checkpoint", str(tmp_path / "super"), "--json")
    assert doc["flops"] == closed_form_flops(model.config, subnet) and doc["subnet"] == subnet.to_dict()
    doc = run_json(capsys, "flops", "--checkpoint", str(tmp_path / "super"), "--attn-rate", "0.25", "--json")
    assert doc["flops"] == closed_form_flops(model.config, Subnet.uniform(model.config, attn_rate=0.25))


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, sliced_checkpoint) -> Path:
    """Files the bad invocations point at: a 12-block subnet, invalid JSON, a good and a corrupt checkpoint."""
    Subnet.uniform(get_config("DiT-S/2"), 0.5).save(tmp_path / "s12.json")
    Subnet.uniform(get_config("DiT-N/2"), 0.5).save(tmp_path / "n2.json")
    (tmp_path / "bad.json").write_text('{"blocks": [')
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((sliced_checkpoint[0] / "config.json").read_bytes())
    weights = (sliced_checkpoint[0] / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return tmp_path


N2 = ("flops", "--model", "DiT-N/2", "--input-size", "8")
BAD = {  # id: (argv with {ws} for the workspace, strings the error line must contain)
    "unknown_model": (("flops", "--model", "DiT-Q/2"), ["DiT-Q/2"]),
    "attn_rate_0": ((*N2, "--attn-rate", "0"), ["--attn-rate", "got 0"]),
    "attn_rate_1.5": ((*N2, "--attn-rate", "1.5"), ["--attn-rate", "1.5"]),
    "mlp_rate_negative": ((*N2, "--mlp-rate", "-0.5"), ["--mlp-rate", "-0.5"]),
    "token_ratio_2": ((*N2, "--token-ratio", "2"), ["--token-ratio", "2"]),
    "attn_rate_abc": ((*N2, "--attn-rate", "abc"), ["--attn-rate", "abc"]),
    "unknown_option": ((*N2, "--frobnicate", "3"), ["--frobnicate"]),
    "unknown_command": (("flopz", "--model", "DiT-N/2"), ["flopz"]),
    "batch_0": ((*N2, "--batch", "0"), ["--batch", "0"]),
    "subnet_missing": ((*N2, "--subnet", "{ws}/missing.json"), ["{ws}/missing.json"]),
    "subnet_invalid_json": ((*N2, "--subnet", "{ws}/bad.json"), ["{ws}/bad.json", "JSON"]),
    "subnet_wrong_depth": ((*N2, "--subnet", "{ws}/s12.json"), ["12 blocks", "DiT-N/2", "2"]),
    "checkpoint_missing": (("flops", "--checkpoint", "{ws}/nothing"), ["{ws}/nothing"]),
    "model_and_checkpoint": ((*N2, "--checkpoint", "{ws}/sliced"), ["--model", "--checkpoint"]),
    "neither": (("flops", "--json"), ["--model", "--checkpoint"]),
    "subnet_and_rate": ((*N2, "--subnet", "{ws}/n2.json", "--attn-rate", "0.5"), ["--subnet", "--attn-rate"]),
    "corrupt_checkpoint": (("flops", "--checkpoint", "{ws}/corrupt"), ["{ws}/corrupt/model.safetensors"]),
    "rates_on_sliced_checkpoint": (("flops", "--checkpoint", "{ws}/sliced", "--attn-rate", "0.5"), ["sliced"]),
    "models_bad_size": (("models", "--input-size", "0"), ["input_size", "0"]),
}
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_bad(capsys, workspace: Path, case: str) -> tuple[int, str, str, list[str]]:
    argv, needles = BAD[case]
    argv = [a.replace("{ws}", str(workspace)) for a in argv]
    needles = [n.replace("{ws}", str(workspace)) for n in needles]
    code, out, err = run(capsys, *argv)
    return code, out, err, needles


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_touches_nothing(capsys, workspace, case: str) -> None:
    before = _snapshot(workspace)
    code, out, err, _ = _run_bad(capsys, workspace, case)
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out and "internal error" not in err
    assert out == ""
    assert _snapshot(workspace) == before  # no file changed, none created or removed


@pytest.mark.parametrize(
    "case",
    BAD,
)
def test_bad_input_message_names_the_offending_value(capsys, workspace, case: str) -> None:
    code, _, err, needles = _run_bad(capsys, workspace, case)
    assert code == 2
    for needle in needles:
        assert needle in err, (needle, err)


def test_wrong_depth_subnet_error_names_the_file(capsys, workspace) -> None:
    code, _, err, _ = _run_bad(capsys, workspace, "subnet_wrong_depth")
    assert code == 2 and "s12.json" in err


def test_debug_flag_shows_the_traceback_for_user_errors(capsys, workspace, monkeypatch) -> None:
    monkeypatch.setenv("DYNASEARCH_DEBUG", "0")  # --debug sets it; restored after the test
    code, _, err = run(capsys, "--debug", "flops", "--checkpoint", str(workspace / "corrupt"))
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_version(capsys) -> None:
    import torch

    from dynasearch import __version__

    code, out, err = run(capsys, "--version")
    assert code == 0 and err == ""
    assert out.startswith(f"dynasearch {__version__} (torch {torch.__version__}, Python ")
    code, out, _ = run(capsys, "--version", "models", "--json")  # eager: prints the version, runs nothing else
    assert code == 0 and out.startswith("dynasearch ") and "[" not in out
