"""Every command, driven through its command line with bad inputs: each gives exactly one `error: ...` line naming the
offending input, exit code 2, no traceback, and leaves the working directory byte-for-byte unchanged.

One table (`CASES`) drives one test. The workspace (a tiny supernet run, a finished search, corrupt and malicious
files) is built once per module; every case runs in-process with that workspace as the current directory, so
commands whose outputs default to relative paths (``results/bench``, ``samples.png``) would be caught writing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import fake_supernet_run

from dynasearch.checkpoint.native import save_checkpoint
from dynasearch.cli import main
from dynasearch.model import create_supernet

MARKER_ENV = "DYNASEARCH_TEST_PWNED"
"""The malicious pickle creates the file this variable names (if its code ever runs)."""

SECRET = "hunter2-secret"
"""The password in the unreachable storage URL: it must never be printed."""


class _Payload:
    """Unpickling this runs code: it creates the file named by $DYNASEARCH_TEST_PWNED."""

    def __reduce__(self) -> tuple:
        code = f"import os; open(os.environ.get('{MARKER_ENV}', os.devnull), 'w').close()"
        return (exec, (code,))


def _write_malicious_pt(path: Path) -> None:
    """A `.pt` file (torch's zip format) whose state dict holds a code-running object beside a real tensor."""
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "evil": _Payload()}, path)


def _write_malicious_raw_pickle(path: Path) -> None:
    """A legacy (non-zip) `.pt` file that is a bare pickle running code."""
    path.write_bytes(pickle.dumps(_Payload(), protocol=2))


@dataclass(frozen=True)
class Case:
    """One bad invocation: argv ({ws} = the workspace, {ro} = a read-only directory) and what the line must name."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    known_bug: str = ""  # a bug in a module this test's author may not edit: the case is a strict xfail


def _ro_dir(ws: Path) -> Path:
    """A directory nobody may write into: chmod 555 for ordinary users; root ignores modes, so /sys (read-only)."""
    if os.geteuid() == 0:
        return Path("/sys")
    return ws / "readonly"


def _latents_templates(ws: Path) -> None:
    """Latent directories good and bad (8x8x4, DiT-N/2-sized), images, a VAE folder whose weights are garbage, and a
    run trained on latents that were deleted afterwards."""
    import numpy as np
    from PIL import Image

    def lat(name: str, n: int = 40, labels: int | None = None, classes: int = 4) -> Path:
        root = ws / name
        root.mkdir()
        np.save(root / "latents.npy", np.random.default_rng(0).standard_normal((n, 4, 8, 8)).astype(np.float16))
        np.save(root / "labels.npy", (np.arange(n if labels is None else labels) % classes).astype(np.int64))
        return root

    lat("lat_ok")
    (lat("lat_labels_only") / "latents.npy").unlink()
    lat("lat_mismatch", n=12, labels=10)
    (lat("lat_garbage") / "latents.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(lat("lat_3d") / "latents.npy", np.zeros((40, 8, 8), dtype=np.float16))
    np.save(lat("lat_unfinished") / "progress.npy", np.zeros(40, dtype=np.uint8))
    np.save(lat("lat_labels_float") / "labels.npy", np.zeros(40, dtype=np.float32))
    (lat("lat_meta_bad") / "meta.json").write_text("{not json")
    (lat("lat_meta_classes") / "meta.json").write_text('{"num_classes": 2}')
    x = np.zeros((40, 4, 8, 8), dtype=np.float16)
    x[5, 1, 2, 3] = np.nan
    np.save(lat("lat_nan") / "latents.npy", x)
    (ws / "lat_features" / "features").mkdir(parents=True)
    np.save(ws / "lat_features" / "features" / "0.npy", np.zeros((1, 4, 8, 8), dtype=np.float32))
    for cls in ("a", "b"):
        (ws / "imgs" / cls).mkdir(parents=True)
        Image.fromarray(np.full((12, 10, 3), 100, dtype=np.uint8)).save(ws / "imgs" / cls / "0.png")
    (ws / "imgs_empty" / "a").mkdir(parents=True)
    (ws / "vae").mkdir()
    (ws / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "latent_channels": 4, "scaling_factor": 0.5,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 16,
    }))
    (ws / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00\xff" * 64)
    gone = lat("lat_gone")
    assert main(["train-supernet", "--data", f"latents:{gone}", "--model", "DiT-N/2", "--steps", "1", "--batch-size",
                 "8", "--device", "cpu", "--sandwich", "0", "--out", str(ws / "trained_lat")]) == 0
    shutil.rmtree(gone)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the bad invocations point at (built once per module, copied for each case)."""
    ws = tmp_path_factory.mktemp("template")
    run = fake_supernet_run(ws / "run")  # DiT-N/2 supernet, blockwise space, digits 8x8x1
    fake_supernet_run(ws / "other", name="DiT-N/4")
    # checkpoints without a data record: a latent model, and one that is not digits-shaped
    save_checkpoint(create_supernet("DiT-N/2", input_size=8, in_channels=4, num_classes=10), ws / "latent")
    save_checkpoint(create_supernet("DiT-N/2", input_size=16, in_channels=1, num_classes=10), ws / "unrecorded16")
    # a checkpoint directory whose weights belong to another model than its config says
    (ws / "mixed").mkdir()
    (ws / "mixed" / "config.json").write_bytes((run / "config.json").read_bytes())
    (ws / "mixed" / "supernet.safetensors").write_bytes((ws / "other" / "supernet.safetensors").read_bytes())
    # truncated and garbage safetensors
    weights = (run / "supernet.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("garbage", b"\x00\xff" * 64)):
        (ws / name).mkdir()
        (ws / name / "config.json").write_bytes((run / "config.json").read_bytes())
        (ws / name / "supernet.safetensors").write_bytes(data)
    _write_malicious_pt(ws / "evil.pt")
    _write_malicious_raw_pickle(ws / "evil_raw.pt")
    # a real (2-step) training run, and a copy whose train_state.pt is malicious (must be refused by --resume)
    assert main(["train-supernet", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "8", "--device", "cpu",
                 "--sandwich", "0", "--out", str(ws / "trained")]) == 0
    shutil.copytree(ws / "trained", ws / "evilrun")
    _write_malicious_pt(ws / "evilrun" / "train_state.pt")
    # search spaces: malformed YAML, an unknown key, choices the supernet was not trained on
    (ws / "malformed.yaml").write_text("granularity: block\nattn_rate: [0.5, 1.0\n")
    (ws / "unknown_key.yaml").write_text(
        "granularity: block\nattn_rate: [0.5, 1.0]\nmlp_rate: [0.5, 1.0]\ntoken_ratio: [1.0]\nwidth: 3\n"
    )
    (ws / "untrained.yaml").write_text(
        "granularity: block\nattn_rate: [0.3, 1.0]\nmlp_rate: [0.5, 1.0]\ntoken_ratio: [1.0]\n"
    )
    (ws / "notes.txt").write_text("not a run\n")
    (ws / "existing_run").mkdir()
    (ws / "existing_run" / "notes.txt").write_text("someone's files\n")
    (ws / "not_npz.npz").write_bytes(b"this is not an npz archive")
    (ws / "subnet12.json").write_text(
        '{"blocks": ' + str([{"heads": 1, "mlp_hidden": 32, "token_ratio": 1.0}] * 12).replace("'", '"') + "}"
    )
    (ws / "empty_results").mkdir()
    (ws / "empty_results" / "keep.txt").write_text("x\n")
    # checkpoint configs with numbers outside their domain, or sizes no machine holds (weights of the real run)
    for name, key, value in (("nan_mlp", "mlp_ratio", float("nan")), ("neg_mlp", "mlp_ratio", -4.0),
                             ("nan_router", "router_ratio", float("nan")), ("huge_hidden", "hidden_size", 2**30),
                             ("huge_input", "input_size", 2**20)):
        doc = json.loads((run / "config.json").read_text())
        doc["model"][key] = value
        (ws / name).mkdir()
        (ws / name / "config.json").write_text(json.dumps(doc))  # NaN as JSON's NaN token, as Python writes it
        (ws / name / "supernet.safetensors").write_bytes((run / "supernet.safetensors").read_bytes())
    ro = ws / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    # a finished search with the blockwise space (its study then exists in study.journal)
    code = main(["search", "--supernet", str(run), "--flops", "0.5x", "--trials", "2", "--proxy-samples", "8",
                 "--export-top", "0", "--out", str(ws / "search"), "--study-name", "s1"])
    assert code == 0
    # a 2-step fine-tuning run of that search's best subnet (distilling the supernet the export names)
    assert main(["finetune", "--checkpoint", str(ws / "search" / "subnets" / "best"), "--steps", "2", "--batch-size",
                 "8", "--distill-weight", "0.5", "--device", "cpu", "--out", str(ws / "finetuned")]) == 0
    # -- issue 14 template files: checkpoint formats and diffusers
    import argparse

    from safetensors.torch import load_file, save_file

    from dynasearch.checkpoint.diffusers import save_diffusers
    from dynasearch.model.subnet import BlockChoice, Subnet

    hf_model = create_supernet("DiT-N/2", input_size=8, in_channels=1, num_classes=10, time_shift=1.0,
                               mlp_norm_eps=1e-5)
    save_diffusers(hf_model, ws / "hf")  # a diffusers DiTTransformer2DModel folder of a digits model
    shutil.copytree(ws / "hf", ws / "hf_untied")  # its blocks' embedders differ: not one DiT embedder
    hf_weights = ws / "hf_untied" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(hf_weights))
    tensors["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"] += 1.0
    save_file(tensors, str(hf_weights))
    shutil.copytree(ws / "hf", ws / "hf_corrupt")
    (ws / "hf_corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00\xff" * 64)
    (ws / "hf_pipe").mkdir()  # a DiTPipeline folder without its transformer
    (ws / "hf_pipe" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    (ws / "hf_unet").mkdir()
    (ws / "hf_unet" / "config.json").write_text('{"_class_name": "UNet2DModel", "in_channels": 3}')
    raw_state = {k: v for k, v in hf_model.state_dict().items() if ".token_router." not in k}
    torch.save(raw_state, ws / "raw_dit.pt")
    torch.save({"model": raw_state, "ema": raw_state, "opt": {}, "args": argparse.Namespace(model="DiT-N/2")},
               ws / "dit_train.pt")
    torch.save({"model": raw_state, "ema": raw_state, "args": argparse.Namespace(model="DiT-N/2", hook=_Payload())},
               ws / "evil_args.pt")  # DiT's layout, a code-running object inside its allowed Namespace
    save_checkpoint(hf_model.to_static(Subnet.uniform(hf_model.config, attn_rate=0.5, mlp_rate=0.5)),
                    ws / "sub_uniform")
    save_checkpoint(hf_model.to_static(Subnet((BlockChoice(4, 128, 0.5), BlockChoice(4, 128, 1.0)))),
                    ws / "sub_tokens")
    # -- issue 14 template files: latents
    _latents_templates(ws)
    # -- issue 14 template files: the FID protocol
    import numpy as np  # the FID protocol's files: ADM batches, references, Inception weights that are not

    np.savez(ws / "fid_samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))  # a valid (tiny) ADM sample batch
    np.savez(ws / "fid_float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(ws / "ref_no_keys.npz", x=np.zeros(3))
    np.savez(ws / "ref_mu64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(ws / "ref_mu_only.npz", mu=np.zeros(2048))
    (ws / "inception_garbage.pth").write_bytes(b"\x00\xff" * 64)
    torch.save({"x_embedder.proj.weight": torch.zeros(2)}, ws / "not_inception.pth")
    # -- issue 14 template files: training at scale
    return ws


@pytest.fixture
def workspace(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template (so a case that does write cannot hide another case's writes)."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    return ws


W = "{ws}"
RUN = f"{W}/run"
N2 = ("--model", "DiT-N/2", "--input-size", "8")
TRAIN = ("train-supernet", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "8", "--device", "cpu")
SEARCH = ("search", "--supernet", RUN, "--trials", "2", "--proxy-samples", "8", "--out", f"{W}/new_search")
BEST = f"{W}/search/subnets/best"
EXTRACT = ("extract-latents", "--data", f"folder:{W}/imgs", "--vae", f"{W}/vae", "--image-size", "8", "--device", "cpu")
FT = ("finetune", "--checkpoint", BEST, "--steps", "2", "--batch-size", "8", "--device", "cpu")

CASES = [
    # models / flops
    Case("models-input-size-0", ("models", "--input-size", "0"), ("input_size", "0")),
    Case("models-classes-abc", ("models", "--num-classes", "abc"), ("--num-classes", "abc")),
    Case("flops-unknown-model", ("flops", "--model", "DiT-Q/2"), ("DiT-Q/2",)),
    Case("flops-attn-rate-0", ("flops", *N2, "--attn-rate", "0"), ("--attn-rate", "0")),
    Case("flops-mlp-rate-1.5", ("flops", *N2, "--mlp-rate", "1.5"), ("--mlp-rate", "1.5")),
    Case("flops-token-ratio-abc", ("flops", *N2, "--token-ratio", "abc"), ("--token-ratio", "abc")),
    Case("flops-subnet-other-depth", ("flops", *N2, "--subnet", f"{W}/subnet12.json"), ("12 blocks",)),
    Case("flops-checkpoint-truncated", ("flops", "--checkpoint", f"{W}/truncated"), (f"{W}/truncated",)),
    Case("flops-checkpoint-garbage", ("flops", "--checkpoint", f"{W}/garbage"), (f"{W}/garbage",)),
    Case("flops-checkpoint-other-model", ("flops", "--checkpoint", f"{W}/mixed"), (f"{W}/mixed",)),
    Case("flops-checkpoint-is-pt", ("flops", "--checkpoint", f"{W}/evil.pt"), (f"{W}/evil.pt",)),
    # train-supernet
    Case("train-unknown-model", ("train-supernet", "--model", "DiT-Q/2"), ("--model", "DiT-Q/2")),
    Case("train-steps-0", (*TRAIN, "--steps", "0", "--out", f"{W}/t"), ("--steps", "0")),
    Case("train-lr-abc", (*TRAIN, "--lr", "abc", "--out", f"{W}/t"), ("--lr", "abc")),
    Case("train-lr-negative", (*TRAIN, "--lr", "-1", "--out", f"{W}/t"), ("--lr", "-1")),
    Case("train-ema-1.5", (*TRAIN, "--ema-decay", "1.5", "--out", f"{W}/t"), ("--ema-decay", "1.5")),
    Case("train-data-missing-folder", (*TRAIN, "--data", f"folder:{W}/nowhere", "--out", f"{W}/t"), (f"{W}/nowhere",)),
    Case("train-data-bad-npz", (*TRAIN, "--data", f"npz:{W}/not_npz.npz", "--out", f"{W}/t"), (f"{W}/not_npz.npz",)),
    Case("train-data-unknown-kind", (*TRAIN, "--data", "imagenet", "--out", f"{W}/t"), ("imagenet",)),
    Case("train-space-malformed-yaml", (*TRAIN, "--space", f"{W}/malformed.yaml", "--out", f"{W}/t"),
         (f"{W}/malformed.yaml",)),
    Case("train-space-unknown-key", (*TRAIN, "--space", f"{W}/unknown_key.yaml", "--out", f"{W}/t"),
         (f"{W}/unknown_key.yaml", "width")),
    Case("train-space-unknown-name", (*TRAIN, "--space", "nonsense", "--out", f"{W}/t"), ("nonsense",)),
    Case("train-out-exists", (*TRAIN, "--out", f"{W}/existing_run"), (f"{W}/existing_run", "--resume")),
    Case("train-out-is-file", (*TRAIN, "--out", f"{W}/notes.txt"), (f"{W}/notes.txt",)),
    Case("train-out-read-only", (*TRAIN, "--out", "{ro}/run"), ("{ro}/run",)),
    Case("train-resume-foreign-dir", (*TRAIN, "--resume", "--out", f"{W}/existing_run"), (f"{W}/existing_run",)),
    Case("train-resume-malicious-state", ("train-supernet", "--resume", "--out", f"{W}/evilrun"),
         (f"{W}/evilrun/train_state.pt",)),
    Case("train-resume-other-arguments", ("train-supernet", "--resume", "--lr", "0.5", "--out", f"{W}/trained"),
         (f"{W}/trained", "--lr")),
    Case("train-resume-other-model", ("train-supernet", "--resume", "--model", "DiT-N/4", "--out", f"{W}/trained"),
         (f"{W}/trained", "DiT-N/4")),
    Case("train-init-from-malicious-pt", (*TRAIN, "--init-from", f"{W}/evil.pt", "--out", f"{W}/t"),
         (f"{W}/evil.pt", "refused")),
    Case("train-init-from-raw-pickle", (*TRAIN, "--init-from", f"{W}/evil_raw.pt", "--out", f"{W}/t"),
         (f"{W}/evil_raw.pt",)),
    Case("train-init-from-truncated", (*TRAIN, "--init-from", f"{W}/truncated", "--out", f"{W}/t"),
         (f"{W}/truncated",)),
    Case("train-init-from-other-model", (*TRAIN, "--init-from", f"{W}/other", "--out", f"{W}/t"),
         (f"{W}/other", "DiT-N/2")),
    Case("train-init-from-missing", (*TRAIN, "--init-from", f"{W}/missing.pt", "--out", f"{W}/t"),
         (f"{W}/missing.pt",)),
    # search
    Case("search-budget-50X", (*SEARCH, "--flops", "50X"), ("50X",)),
    Case("search-budget-negative", (*SEARCH, "--flops", "-1G"), ("-1G",)),
    Case("search-budget-0", (*SEARCH, "--flops", "0"), ("'0'",)),
    Case("search-budget-below-smallest", (*SEARCH, "--flops", "0.01x"), ("0.01x", "smallest")),
    Case("search-supernet-missing", ("search", "--supernet", f"{W}/nothing", "--flops", "0.5x", "--out", f"{W}/s"),
         (f"{W}/nothing",)),
    Case("search-supernet-corrupt", ("search", "--supernet", f"{W}/truncated", "--flops", "0.5x", "--out", f"{W}/s"),
         (f"{W}/truncated",)),
    Case("search-space-untrained-choices", (*SEARCH, "--flops", "0.5x", "--space", f"{W}/untrained.yaml"),
         (f"{W}/untrained.yaml", "0.3")),
    Case("search-space-malformed", (*SEARCH, "--flops", "0.5x", "--space", f"{W}/malformed.yaml"),
         (f"{W}/malformed.yaml",)),
    Case("search-sampler-unknown", (*SEARCH, "--flops", "0.5x", "--sampler", "annealing"), ("--sampler", "annealing")),
    Case("search-trials-0", (*SEARCH, "--flops", "0.5x", "--trials", "0"), ("--trials", "0")),
    Case("search-storage-unreachable", (*SEARCH, "--flops", "0.5x", "--storage",
                                        f"postgresql://alice:{SECRET}@127.0.0.1:9/db"), ("127.0.0.1",), (SECRET,)),
    Case("search-storage-sqlite-unreachable", (*SEARCH, "--flops", "0.5x", "--storage",
                                               f"sqlite:///{W}/no/such/dir/db.sqlite"), ("sqlite",)),
    Case("search-study-other-space", ("search", "--supernet", RUN, "--flops", "0.5x", "--trials", "2",
                                      "--proxy-samples", "8", "--out", f"{W}/search", "--study-name", "s1",
                                      "--space", "uniform"), ("s1", "space")),
    Case("search-out-read-only", ("search", "--supernet", RUN, "--flops", "0.5x", "--trials", "2",
                                  "--out", "{ro}/search"), ("{ro}/search",)),
    Case("search-proxy-unknown", (*SEARCH, "--flops", "0.5x", "--proxy", "l1"), ("--proxy", "'l1'", "teacher-norm")),
    Case("search-proxy-sample-timestep",
         (*SEARCH, "--flops", "0.5x", "--space", "timestep", "--proxy", "teacher-sample"),
         ("--proxy teacher-sample", "timestep bucket")),
    Case("search-study-other-proxy", ("search", "--supernet", RUN, "--flops", "0.5x", "--trials", "2",
                                      "--proxy-samples", "8", "--out", f"{W}/search", "--study-name", "s1",
                                      "--proxy", "eps"), ("s1", "proxy")),
    # finetune
    Case("finetune-checkpoint-missing", ("finetune", "--checkpoint", f"{W}/nothing", "--out", f"{W}/ft"),
         (f"{W}/nothing",)),
    Case("finetune-checkpoint-is-supernet", ("finetune", "--checkpoint", RUN, "--out", f"{W}/ft"), (RUN, "supernet")),
    Case("finetune-no-checkpoint", ("finetune", "--out", f"{W}/ft"), ("--checkpoint",)),
    Case("finetune-steps-0", (*FT, "--steps", "0", "--out", f"{W}/ft"), ("--steps", "0")),
    Case("finetune-steps-abc", ("finetune", "--checkpoint", BEST, "--steps", "abc", "--out", f"{W}/ft"),
         ("--steps", "abc")),
    Case("finetune-steps-given-twice", (*FT, "--steps", "abc", "--out", f"{W}/ft"), ("--steps", "abc")),
    Case("finetune-distill-weight-1.5", (*FT, "--distill-weight", "1.5", "--out", f"{W}/ft"),
         ("--distill-weight", "1.5")),
    Case("finetune-out-exists", (*FT, "--out", f"{W}/existing_run"), (f"{W}/existing_run", "--resume")),
    Case("finetune-out-read-only", (*FT, "--out", "{ro}/ft"), ("{ro}/ft",)),
    Case("finetune-teacher-missing", (*FT, "--teacher", f"{W}/nothing", "--out", f"{W}/ft"), (f"{W}/nothing",)),
    Case("finetune-teacher-sliced", (*FT, "--teacher", BEST, "--out", f"{W}/ft"), (BEST, "sliced")),
    Case("finetune-teacher-other-model", (*FT, "--teacher", f"{W}/other", "--out", f"{W}/ft"),
         (f"{W}/other", "DiT-N/4", "patch_size")),
    Case("finetune-teacher-malicious-pt", (*FT, "--teacher", f"{W}/evil.pt", "--out", f"{W}/ft"),
         (f"{W}/evil.pt", "refused")),
    Case("finetune-resume-other-arguments", ("finetune", "--resume", "--lr", "0.5", "--out", f"{W}/finetuned"),
         (f"{W}/finetuned", "--lr")),
    Case("finetune-resume-foreign-dir", ("finetune", "--resume", "--out", f"{W}/existing_run"), (f"{W}/existing_run",)),
    # sample / eval
    Case("sample-checkpoint-missing", ("sample", "--checkpoint", f"{W}/nothing", "--out", f"{W}/g.png"),
         (f"{W}/nothing",)),
    Case("sample-checkpoint-corrupt", ("sample", "--checkpoint", f"{W}/garbage", "--out", f"{W}/g.png"),
         (f"{W}/garbage",)),
    Case("sample-labels-abc", ("sample", "--checkpoint", RUN, "--labels", "abc", "--out", f"{W}/g.png"), ("abc",)),
    Case("sample-label-out-of-range", ("sample", "--checkpoint", RUN, "--labels", "0,42", "--out", f"{W}/g.png"),
         ("42",)),
    Case("sample-subnet-other-depth", ("sample", "--checkpoint", RUN, "--subnet", f"{W}/subnet12.json",
                                       "--out", f"{W}/g.png"), ("12",)),
    Case("sample-out-read-only", ("sample", "--checkpoint", RUN, "--num", "2", "--steps", "2",
                                  "--out", "{ro}/g.png"), ("{ro}/g.png",)),
    Case("eval-checkpoint-pt-file", ("eval", "--checkpoint", f"{W}/evil.pt", "--num", "4"), (f"{W}/evil.pt",)),
    Case("eval-num-1", ("eval", "--checkpoint", RUN, "--num", "1"), ("--num", "1")),
    Case("eval-data-unknown-kind", ("eval", "--checkpoint", RUN, "--data", "cifar"), ("--data", "cifar")),
    Case("eval-data-missing-folder", ("eval", "--checkpoint", RUN, "--data", f"folder:{W}/nowhere"), (f"{W}/nowhere",)),
    Case("eval-data-bad-npz", ("eval", "--checkpoint", RUN, "--data", f"npz:{W}/not_npz.npz"), (f"{W}/not_npz.npz",)),
    Case("eval-latent-model", ("eval", "--checkpoint", f"{W}/latent"), ("latents", "decoder", "Inception")),
    Case("eval-unrecorded-not-digits", ("eval", "--checkpoint", f"{W}/unrecorded16"),
         (f"{W}/unrecorded16", "--data SPEC")),
    # report / demo
    Case("report-missing-dir", ("report", f"{W}/nothing"), (f"{W}/nothing",)),
    Case("report-not-search-dir", ("report", f"{W}/empty_results"), (f"{W}/empty_results",)),
    Case("demo-budget-50X", ("demo", "--quick", "--flops", "50X", "--out", f"{W}/d", "--run-dir", f"{W}/dr"),
         ("50X",)),
    Case("demo-out-exists", ("demo", "--quick", "--out", f"{W}/existing_run", "--run-dir", f"{W}/dr"),
         (f"{W}/existing_run", "--overwrite")),
    # bench
    Case("bench-latency-unknown-model", ("bench", "latency", "--model", "DiT-Q/2"), ("DiT-Q/2",)),
    Case("bench-latency-ratios-abc", ("bench", "latency", "--model", "DiT-N/2", "--ratios", "abc"), ("abc",)),
    Case("bench-flops-unknown-models", ("bench", "flops", "--models", "DiT-N/2,DiT-Z/9"), ("DiT-Z/9",)),
    Case("bench-search-unknown-sampler", ("bench", "search", "--supernet", RUN, "--samplers", "tpe,magic"),
         ("magic",)),
    Case("bench-ranking-flops-range", ("bench", "ranking", "--supernet", RUN, "--flops-range", "0.9,0.1"),
         ("0.9,0.1",)),
    Case("bench-ranking-fd-samples-1", ("bench", "ranking", "--supernet", RUN, "--fd-samples", "1"),
         ("--fd-samples", "1")),
    Case("bench-train-unknown-data", ("bench", "train", "--model", "DiT-N/2", "--data", f"folder:{W}/nowhere"),
         (f"{W}/nowhere",)),
    Case("unknown-command", ("flopz",), ("flopz",)),
    # -- round two: numbers outside their domain (seeds, NaN, negatives in a checkpoint's config)
    Case("train-seed-negative", (*TRAIN, "--seed", "-1", "--out", f"{W}/t"), ("--seed", "-1")),
    Case("train-seed-2pow32", (*TRAIN, "--seed", str(2**32), "--out", f"{W}/t"), ("--seed", str(2**32))),
    Case("train-seed-2pow64", (*TRAIN, "--seed", str(2**64), "--out", f"{W}/t"), ("--seed", str(2**64))),
    Case("train-lr-nan", (*TRAIN, "--lr", "nan", "--out", f"{W}/t"), ("--lr", "nan")),
    Case("train-distill-nan", (*TRAIN, "--distill", "nan", "--out", f"{W}/t"), ("--distill", "nan")),
    Case("search-seed-negative", (*SEARCH, "--flops", "0.5x", "--seed", "-1"), ("--seed", "-1")),
    Case("search-seed-2pow32", (*SEARCH, "--flops", "0.5x", "--seed", str(2**32)), ("--seed", str(2**32))),
    Case("search-budget-nan", (*SEARCH, "--flops", "nan"), ("nan",)),
    Case("finetune-seed-negative", (*FT, "--seed", "-1", "--out", f"{W}/ft"), ("--seed", "-1")),
    Case("finetune-distill-weight-nan", (*FT, "--distill-weight", "nan", "--out", f"{W}/ft"),
         ("--distill-weight", "nan")),
    Case("sample-seed-negative", ("sample", "--checkpoint", RUN, "--num", "2", "--steps", "2", "--seed", "-1",
                                  "--out", f"{W}/g.png"), ("--seed", "-1")),
    Case("sample-seed-2pow32", ("sample", "--checkpoint", RUN, "--num", "2", "--steps", "2", "--seed", str(2**32),
                                "--out", f"{W}/g.png"), ("--seed", str(2**32))),
    Case("sample-cfg-scale-nan", ("sample", "--checkpoint", RUN, "--num", "2", "--cfg-scale", "nan",
                                  "--out", f"{W}/g.png"), ("--cfg-scale", "nan")),
    Case("eval-seed-negative", ("eval", "--checkpoint", RUN, "--num", "4", "--steps", "2", "--seed", "-1"),
         ("--seed", "-1")),
    Case("report-seed-negative", ("report", f"{W}/search", "--eval-num", "2", "--steps", "2", "--seed", "-1"),
         ("--seed", "-1")),
    Case("demo-seed-negative", ("demo", "--quick", "--seed", "-1", "--out", f"{W}/d", "--run-dir", f"{W}/dr"),
         ("--seed", "-1")),
    Case("bench-latency-seed-negative", ("bench", "latency", "--model", "DiT-N/2", "--input-size", "8", "--seed", "-1",
                                         "--out", f"{W}/b"), ("--seed", "-1")),
    Case("bench-latency-ratios-nan", ("bench", "latency", "--model", "DiT-N/2", "--ratios", "nan", "--out", f"{W}/b"),
         ("--ratios", "nan")),
    Case("bench-search-seed-negative", ("bench", "search", "--supernet", RUN, "--seed", "-1", "--out", f"{W}/b"),
         ("--seed", "-1")),
    Case("bench-ranking-seed-negative", ("bench", "ranking", "--supernet", RUN, "--seed", "-1", "--out", f"{W}/b"),
         ("--seed", "-1")),
    Case("bench-ranking-flops-range-nan", ("bench", "ranking", "--supernet", RUN, "--flops-range", "nan,1"),
         ("nan,1",)),
    Case("bench-train-seed-negative", ("bench", "train", "--model", "DiT-N/2", "--seed", "-1", "--out", f"{W}/b"),
         ("--seed", "-1")),
    Case("bench-train-distill-nan", ("bench", "train", "--model", "DiT-N/2", "--distill", "nan", "--out", f"{W}/b"),
         ("--distill", "nan")),
    Case("flops-checkpoint-mlp-ratio-nan", ("flops", "--checkpoint", f"{W}/nan_mlp"), (f"{W}/nan_mlp", "mlp_ratio")),
    Case("flops-checkpoint-mlp-ratio-negative", ("flops", "--checkpoint", f"{W}/neg_mlp"),
         (f"{W}/neg_mlp", "mlp_ratio", "-4.0")),
    Case("flops-checkpoint-router-ratio-nan", ("flops", "--checkpoint", f"{W}/nan_router"),
         (f"{W}/nan_router", "router_ratio")),
    # -- sizes that cannot fit: refused from the arithmetic, before anything is allocated
    Case("flops-input-size-huge", ("flops", "--model", "DiT-N/2", "--input-size", "100000"),
         ("input_size", "100000", "memory")),
    Case("flops-num-classes-huge", ("flops", *N2, "--num-classes", str(10**12)), ("num_classes", str(10**12))),
    Case("flops-in-channels-huge", ("flops", *N2, "--in-channels", str(10**9)), ("in_channels", str(10**9))),
    Case("flops-batch-huge", ("flops", *N2, "--batch", str(10**12)), ("--batch", str(10**12), "memory")),
    Case("flops-checkpoint-hidden-huge", ("flops", "--checkpoint", f"{W}/huge_hidden"),
         (f"{W}/huge_hidden", "hidden_size")),
    Case("sample-checkpoint-input-huge", ("sample", "--checkpoint", f"{W}/huge_input", "--num", "2", "--steps", "2",
                                          "--out", f"{W}/g.png"), (f"{W}/huge_input", "input_size")),
    Case("train-batch-size-huge", (*TRAIN, "--batch-size", str(10**12), "--out", f"{W}/t"),
         ("--batch-size", str(10**12))),
    Case("train-image-size-huge", (*TRAIN, "--image-size", str(10**7), "--out", f"{W}/t"),
         ("--image-size", str(10**7))),
    Case("finetune-batch-size-huge", (*FT, "--batch-size", str(10**12), "--out", f"{W}/ft"),
         ("--batch-size", str(10**12))),
    Case("search-proxy-samples-huge", (*SEARCH, "--flops", "0.5x", "--proxy-samples", str(10**12)),
         ("--proxy-samples", str(10**12))),
    Case("sample-num-huge", ("sample", "--checkpoint", RUN, "--num", str(10**12), "--out", f"{W}/g.png"),
         ("--num", str(10**12))),
    Case("sample-labels-huge-range", ("sample", "--checkpoint", RUN, "--labels", "0-99999999999",
                                      "--out", f"{W}/g.png"), ("--labels", "0-99999999999")),
    Case("sample-per-label-huge", ("sample", "--checkpoint", RUN, "--labels", "0", "--per-label", str(10**12),
                                   "--out", f"{W}/g.png"), ("--per-label", str(10**12))),
    Case("eval-num-huge", ("eval", "--checkpoint", RUN, "--num", str(10**12)), ("--num", str(10**12))),
    Case("report-eval-num-huge", ("report", f"{W}/search", "--eval-num", str(10**12)), ("--eval-num", str(10**12))),
    Case("report-latency-batch-huge", ("report", f"{W}/search", "--latency-batch", str(10**12)),
         ("--latency-batch", str(10**12))),
    Case("bench-latency-input-size-huge", ("bench", "latency", "--model", "DiT-N/2", "--input-size", "100000",
                                           "--out", f"{W}/b"), ("input_size", "100000")),
    Case("bench-latency-batch-huge", ("bench", "latency", "--model", "DiT-N/2", "--input-size", "8", "--batch",
                                      str(10**12), "--out", f"{W}/b"), ("--batch", str(10**12))),
    Case("bench-flops-num-classes-huge", ("bench", "flops", "--models", "DiT-N/2", "--num-classes", str(10**12),
                                          "--out", f"{W}/b"), ("num_classes", str(10**12))),
    Case("bench-search-proxy-samples-huge", ("bench", "search", "--supernet", RUN, "--proxy-samples", str(10**12),
                                             "--out", f"{W}/b"), ("--proxy-samples", str(10**12))),
    Case("bench-train-batch-size-huge", ("bench", "train", "--model", "DiT-N/2", "--batch-size", str(10**12),
                                         "--out", f"{W}/b"), ("--batch-size", str(10**12))),
    Case("bench-train-image-size-huge", ("bench", "train", "--model", "DiT-N/2", "--image-size", str(10**7),
                                         "--out", f"{W}/b"), ("--image-size", str(10**7))),
    Case("bench-ranking-batch-size-huge", ("bench", "ranking", "--supernet", RUN, "--k", "3", "--batch-size",
                                           str(10**12), "--proxy-samples", "8", "--eval-samples", "8",
                                           "--out", f"{W}/b"), ("--batch-size", str(10**12))),
    Case("train-sandwich-huge", (*TRAIN, "--sandwich", str(10**12), "--out", f"{W}/t"), ("--sandwich", str(10**12))),
    Case("search-workers-huge", (*SEARCH, "--flops", "0.5x", "--workers", str(10**6)), ("--workers", str(10**6))),
    Case("bench-train-sandwich-huge", ("bench", "train", "--model", "DiT-N/2", "--sandwich", str(10**12),
                                       "--out", f"{W}/b"), ("--sandwich", str(10**12))),
    Case("bench-latency-mixed-huge", ("bench", "latency", "--model", "DiT-N/2", "--input-size", "8", "--mixed",
                                      str(10**12), "--out", f"{W}/b"), ("--mixed", str(10**12))),
    Case("bench-ranking-fd-samples-huge", ("bench", "ranking", "--supernet", RUN, "--fd-samples", str(10**12),
                                           "--out", f"{W}/b"), ("--fd-samples", str(10**12))),
    # -- side effects before validation: each of these once wrote (or deleted) files before its error
    Case("report-cfg-scale-nan", ("report", f"{W}/search", "--eval-num", "2", "--steps", "2", "--cfg-scale", "nan"),
         ("--cfg-scale", "nan")),
    Case("report-eval-num-1", ("report", f"{W}/search", "--eval-num", "1", "--steps", "2"), ("--eval-num", "1")),
    Case("report-steps-too-many", ("report", f"{W}/search", "--eval-num", "2", "--steps", "100000"),
         ("--steps", "100000")),
    Case("search-storage-is-directory", (*SEARCH, "--flops", "0.5x", "--storage", f"{W}/existing_run"),
         ("--storage", f"{W}/existing_run", "directory")),
    Case("demo-trials-0", ("demo", "--quick", "--trials", "0", "--out", f"{W}/d", "--run-dir", f"{W}/dr"),
         ("--trials", "0")),
    Case("demo-eval-num-1", ("demo", "--quick", "--eval-num", "1", "--out", f"{W}/d", "--run-dir", f"{W}/dr"),
         ("--eval-num", "1")),
    Case("demo-overwrite-budget-below-smallest", ("demo", "--quick", "--overwrite", "--flops", "0.01x",
                                                  "--out", f"{W}/search", "--run-dir", f"{W}/trained"),
         ("0.01x", "smallest")),
    Case("demo-out-same-as-run-dir", ("demo", "--quick", "--out", f"{W}/d", "--run-dir", f"{W}/d"),
         ("--out", "--run-dir")),
    # -- messages that said something false: a file where a directory is expected is not "missing"
    Case("demo-out-is-file", ("demo", "--quick", "--out", f"{W}/notes.txt", "--run-dir", f"{W}/dr"),
         (f"{W}/notes.txt", "is a file")),
    Case("demo-run-dir-is-file", ("demo", "--quick", "--out", f"{W}/d", "--run-dir", f"{W}/notes.txt"),
         (f"{W}/notes.txt", "is a file")),
    Case("search-out-is-file", (*SEARCH[:-2], "--out", f"{W}/notes.txt", "--flops", "0.5x"),
         (f"{W}/notes.txt", "is a file")),
    Case("report-results-is-file", ("report", f"{W}/notes.txt"), (f"{W}/notes.txt", "is a file")),
    Case("search-supernet-is-file", ("search", "--supernet", f"{W}/notes.txt", "--flops", "0.5x", "--out", f"{W}/s"),
         (f"{W}/notes.txt", "not a directory")),
    # -- issue 14: checkpoint formats and diffusers
    Case("export-checkpoint-missing", ("export", "--checkpoint", f"{W}/nothing", "--out", f"{W}/x"),
         (f"{W}/nothing", "does not exist")),
    Case("export-no-checkpoint", ("export", "--out", f"{W}/x"), ("--checkpoint",)),
    Case("export-format-unknown", ("export", "--checkpoint", RUN, "--format", "onnx", "--out", f"{W}/x"),
         ("--format", "onnx")),
    Case("export-out-exists", ("export", "--checkpoint", f"{W}/hf", "--format", "dynasearch", "--out",
                               f"{W}/existing_run"), (f"{W}/existing_run", "--overwrite")),
    Case("export-out-is-file", ("export", "--checkpoint", f"{W}/hf", "--format", "dynasearch", "--out",
                                f"{W}/notes.txt"), (f"{W}/notes.txt", "is a file")),
    Case("export-out-read-only", ("export", "--checkpoint", f"{W}/hf", "--format", "dynasearch", "--out", "{ro}/x"),
         ("{ro}/x",)),
    Case("export-out-is-the-checkpoint", ("export", "--checkpoint", f"{W}/sub_uniform", "--pad", "--overwrite",
                                          "--out", f"{W}/sub_uniform"), ("--out", "--checkpoint")),
    Case("export-time-shift-of-dit", ("export", "--checkpoint", RUN, "--out", f"{W}/x"),
         ("frequency shift 0", "--allow-time-shift")),
    Case("export-narrower-needs-pad", ("export", "--checkpoint", f"{W}/sub_uniform", "--out", f"{W}/x"),
         ("2 of 4 heads", "--pad")),
    Case("export-token-ratio", ("export", "--checkpoint", f"{W}/sub_tokens", "--pad", "--out", f"{W}/x"),
         ("token ratio 0.5", "token selection")),
    Case("export-already-dynasearch", ("export", "--checkpoint", RUN, "--format", "dynasearch", "--out", f"{W}/x"),
         (RUN, "already a dynasearch")),
    Case("export-malicious-pt", ("export", "--checkpoint", f"{W}/evil.pt", "--out", f"{W}/x"),
         (f"{W}/evil.pt", "refused", "'exec'")),
    Case("export-namespace-payload", ("export", "--checkpoint", f"{W}/evil_args.pt", "--format", "dynasearch",
                                      "--out", f"{W}/x"), (f"{W}/evil_args.pt", "refused", "'exec'")),
    Case("export-weights-choice-unknown", ("export", "--checkpoint", f"{W}/dit_train.pt#latest", "--format",
                                           "dynasearch", "--out", f"{W}/x"), ("#latest", "#ema or #model")),
    Case("export-diffusers-untied", ("export", "--checkpoint", f"{W}/hf_untied", "--format", "dynasearch", "--out",
                                     f"{W}/x"), (f"{W}/hf_untied", "block 1", "differs from block 0")),
    Case("export-diffusers-corrupt", ("export", "--checkpoint", f"{W}/hf_corrupt", "--format", "dynasearch", "--out",
                                      f"{W}/x"), (f"{W}/hf_corrupt", "corrupt")),
    Case("export-pipeline-without-transformer", ("export", "--checkpoint", f"{W}/hf_pipe", "--format", "dynasearch",
                                                 "--out", f"{W}/x"), (f"{W}/hf_pipe", "transformer/config.json")),
    Case("export-diffusers-other-class", ("export", "--checkpoint", f"{W}/hf_unet", "--format", "dynasearch", "--out",
                                          f"{W}/x"), (f"{W}/hf_unet", "UNet2DModel")),
    Case("train-init-from-diffusers-untied", (*TRAIN, "--init-from", f"{W}/hf_untied", "--out", f"{W}/t"),
         (f"{W}/hf_untied", "block 1")),
    Case("train-init-from-diffusers-corrupt", (*TRAIN, "--init-from", f"{W}/hf_corrupt", "--out", f"{W}/t"),
         (f"{W}/hf_corrupt",)),
    Case("train-init-from-weights-choice-unknown", (*TRAIN, "--init-from", f"{W}/dit_train.pt#latest", "--out",
                                                    f"{W}/t"), ("#latest", "#ema or #model")),
    Case("train-init-from-raw-with-choice", (*TRAIN, "--init-from", f"{W}/raw_dit.pt#model", "--out", f"{W}/t"),
         (f"{W}/raw_dit.pt", "picks nothing")),
    Case("train-init-from-dir-with-choice", (*TRAIN, "--init-from", f"{RUN}#model", "--out", f"{W}/t"),
         (RUN, "is a directory")),
    Case("train-init-from-namespace-payload", (*TRAIN, "--init-from", f"{W}/evil_args.pt", "--out", f"{W}/t"),
         (f"{W}/evil_args.pt", "refused", "'exec'")),
    # -- issue 14: latents
    Case("train-latents-missing-dir", (*TRAIN, "--data", f"latents:{W}/nowhere", "--out", f"{W}/t"),
         (f"{W}/nowhere", "does not exist")),
    Case("train-latents-dir-is-file", (*TRAIN, "--data", f"latents:{W}/notes.txt", "--out", f"{W}/t"),
         (f"{W}/notes.txt", "is a file")),
    Case("train-latents-no-latents-npy", (*TRAIN, "--data", f"latents:{W}/lat_labels_only", "--out", f"{W}/t"),
         (f"{W}/lat_labels_only", "no latents.npy")),
    Case("train-latents-neither-layout", (*TRAIN, "--data", f"latents:{W}/existing_run", "--out", f"{W}/t"),
         (f"{W}/existing_run", "neither latents.npy")),
    Case("train-latents-shape-mismatch", (*TRAIN, "--data", f"latents:{W}/lat_mismatch", "--out", f"{W}/t"),
         (f"{W}/lat_mismatch", "12 latents", "10 labels")),
    Case("train-latents-not-npy", (*TRAIN, "--data", f"latents:{W}/lat_garbage", "--out", f"{W}/t"),
         (f"{W}/lat_garbage/latents.npy", "not a readable .npy")),
    Case("train-latents-3d", (*TRAIN, "--data", f"latents:{W}/lat_3d", "--out", f"{W}/t"),
         (f"{W}/lat_3d/latents.npy", "4 dims")),
    Case("train-latents-unfinished", (*TRAIN, "--data", f"latents:{W}/lat_unfinished", "--out", f"{W}/t"),
         (f"{W}/lat_unfinished", "unfinished extraction")),
    Case("train-latents-labels-float", (*TRAIN, "--data", f"latents:{W}/lat_labels_float", "--out", f"{W}/t"),
         (f"{W}/lat_labels_float/labels.npy", "integers")),
    Case("train-latents-meta-bad-json", (*TRAIN, "--data", f"latents:{W}/lat_meta_bad", "--out", f"{W}/t"),
         (f"{W}/lat_meta_bad/meta.json", "not valid JSON")),
    Case("train-latents-labels-exceed-meta-classes", (*TRAIN, "--data", f"latents:{W}/lat_meta_classes",
                                                      "--out", f"{W}/t"), ("lat_meta_classes", "outside [0, 2)")),
    Case("train-latents-features-without-labels", (*TRAIN, "--data", f"latents:{W}/lat_features", "--out", f"{W}/t"),
         (f"{W}/lat_features", "labels/")),
    Case("train-latents-image-size-mismatch", (*TRAIN, "--data", f"latents:{W}/lat_ok", "--image-size", "16",
                                               "--out", f"{W}/t"), ("8x8", "16")),
    Case("train-latents-nan-row", (*TRAIN, "--data", f"latents:{W}/lat_nan", "--out", f"{W}/t"),
         (f"{W}/lat_nan/latents.npy", "row", "non-finite")),  # the fresh --out it made is removed again
    Case("search-latents-data-gone", ("search", "--supernet", f"{W}/trained_lat", "--flops", "0.5x", "--trials", "2",
                                      "--proxy-samples", "8", "--out", f"{W}/s"), ("lat_gone", "does not exist")),
    Case("extract-data-missing", (*EXTRACT, "--data", f"folder:{W}/nowhere", "--out", f"{W}/l"), (f"{W}/nowhere",)),
    Case("extract-data-not-a-folder-spec", (*EXTRACT, "--data", f"latents:{W}/lat_ok", "--out", f"{W}/l"),
         ("folder:PATH", f"latents:{W}/lat_ok")),
    Case("extract-data-class-without-images", (*EXTRACT, "--data", f"folder:{W}/imgs_empty", "--out", f"{W}/l"),
         (f"{W}/imgs_empty/a", "no images")),
    Case("extract-vae-option-missing", ("extract-latents", "--data", f"folder:{W}/imgs", "--out", f"{W}/l"),
         ("--vae",)),
    Case("extract-vae-missing-dir", (*EXTRACT, "--vae", f"{W}/nowhere", "--out", f"{W}/l"), (f"{W}/nowhere",)),
    Case("extract-vae-not-an-autoencoder", (*EXTRACT, "--vae", f"{W}/run", "--out", f"{W}/l"),
         (f"{W}/run", "AutoencoderKL")),
    Case("extract-vae-garbage-weights", (*EXTRACT, "--out", f"{W}/l"), (f"{W}/vae",)),
    Case("extract-image-size-0", (*EXTRACT, "--image-size", "0", "--out", f"{W}/l"), ("--image-size", "0")),
    Case("extract-image-size-not-multiple", (*EXTRACT, "--image-size", "7", "--out", f"{W}/l"),
         ("--image-size", "7", "multiple of 2")),
    Case("extract-batch-size-0", (*EXTRACT, "--batch-size", "0", "--out", f"{W}/l"), ("--batch-size", "0")),
    Case("extract-batch-size-huge", (*EXTRACT, "--batch-size", str(10**12), "--out", f"{W}/l"),
         ("--batch-size", str(10**12))),
    Case("extract-dtype-float64", (*EXTRACT, "--dtype", "float64", "--out", f"{W}/l"), ("--dtype", "float64")),
    Case("extract-seed-negative", (*EXTRACT, "--seed", "-1", "--out", f"{W}/l"), ("--seed", "-1")),
    Case("extract-out-is-file", (*EXTRACT, "--out", f"{W}/notes.txt"), (f"{W}/notes.txt", "is a file")),
    Case("extract-out-read-only", (*EXTRACT, "--out", "{ro}/l"), ("{ro}/l",)),
    Case("extract-out-holds-other-latents", (*EXTRACT, "--out", f"{W}/lat_ok"), (f"{W}/lat_ok", "--overwrite")),
    # -- issue 14: the FID protocol
    # (the reference is checked before the weights file is read, so reference cases pass the garbage file)
    Case("sample-npz-not-npz", ("sample", "--checkpoint", RUN, "--npz", f"{W}/s.png", "--num", "2", "--steps", "2"),
         ("--npz", f"{W}/s.png")),
    Case("sample-npz-read-only", ("sample", "--checkpoint", RUN, "--npz", "{ro}/s.npz", "--num", "2", "--steps", "2",
                                  "--device", "cpu"), ("{ro}/s.npz",)),
    Case("sample-npz-dir-is-file", ("sample", "--checkpoint", RUN, "--npz", f"{W}/notes.txt/s.npz", "--num", "2",
                                    "--steps", "2", "--device", "cpu"), (f"{W}/notes.txt",)),
    Case("sample-npz-vae-pixel-model", ("sample", "--checkpoint", RUN, "--npz", f"{W}/s.npz", "--num", "2",
                                        "--vae", f"{W}/nowhere"), ("--vae", "4-channel", "1 channel")),
    Case("sample-npz-latent-without-vae", ("sample", "--checkpoint", f"{W}/latent", "--npz", f"{W}/s.npz", "--num",
                                           "2"), (f"{W}/latent", "latents", "--vae")),
    Case("sample-npz-latent-vae-missing", ("sample", "--checkpoint", f"{W}/latent", "--npz", f"{W}/s.npz", "--num",
                                           "2", "--steps", "2", "--device", "cpu", "--vae", f"{W}/nowhere"),
         (f"{W}/nowhere",)),
    Case("sample-npz-with-labels", ("sample", "--checkpoint", RUN, "--npz", f"{W}/s.npz", "--labels", "0,1"),
         ("--labels",)),
    Case("sample-npz-batch-size-0", ("sample", "--checkpoint", RUN, "--npz", f"{W}/s.npz", "--batch-size", "0"),
         ("--batch-size", "0")),
    Case("eval-fid-weights-missing", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/fid_samples.npz",
                                      "--inception-weights", f"{W}/nothing.pth", "--device", "cpu"),
         (f"{W}/nothing.pth", "does not exist")),
    Case("eval-fid-weights-garbage", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/fid_samples.npz",
                                      "--inception-weights", f"{W}/inception_garbage.pth", "--device", "cpu"),
         (f"{W}/inception_garbage.pth", "unreadable")),
    Case("eval-fid-weights-malicious", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/fid_samples.npz",
                                        "--inception-weights", f"{W}/evil.pt", "--device", "cpu"),
         (f"{W}/evil.pt", "refused")),
    Case("eval-fid-weights-not-inception", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref",
                                            f"{W}/fid_samples.npz", "--inception-weights", f"{W}/not_inception.pth",
                                            "--device", "cpu"), (f"{W}/not_inception.pth", "Inception-v3")),
    Case("eval-fid-ref-missing", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/nothing.npz",
                                  "--inception-weights", f"{W}/inception_garbage.pth"), (f"{W}/nothing.npz",)),
    Case("eval-fid-ref-not-npz", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/not_npz.npz",
                                  "--inception-weights", f"{W}/inception_garbage.pth"), (f"{W}/not_npz.npz",)),
    Case("eval-fid-ref-no-images-or-stats", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref",
                                             f"{W}/ref_no_keys.npz", "--inception-weights",
                                             f"{W}/inception_garbage.pth"),
         (f"{W}/ref_no_keys.npz", "mu/sigma", "arr_0")),
    Case("eval-fid-ref-mu-without-sigma", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref",
                                           f"{W}/ref_mu_only.npz", "--inception-weights",
                                           f"{W}/inception_garbage.pth"), (f"{W}/ref_mu_only.npz", "sigma")),
    Case("eval-fid-ref-feature-size", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/ref_mu64.npz",
                                       "--inception-weights", f"{W}/inception_garbage.pth"),
         (f"{W}/ref_mu64.npz", "(64,)", "2048")),
    Case("eval-fid-ref-float-images", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"{W}/fid_float.npz",
                                       "--inception-weights", f"{W}/inception_garbage.pth"),
         (f"{W}/fid_float.npz", "uint8")),
    Case("eval-fid-ref-folder-missing", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref", f"folder:{W}/nowhere",
                                         "--inception-weights", f"{W}/inception_garbage.pth"), (f"{W}/nowhere",)),
    Case("eval-fid-ref-folder-no-images", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref",
                                           f"folder:{W}/empty_results", "--inception-weights",
                                           f"{W}/inception_garbage.pth"), (f"{W}/empty_results", "0 images")),
    Case("eval-fid-no-ref", ("eval", "--samples", f"{W}/fid_samples.npz", "--inception-weights",
                             f"{W}/inception_garbage.pth"), ("--ref",)),
    Case("eval-fid-ref-without-weights", ("eval", "--samples", f"{W}/fid_samples.npz", "--ref",
                                          f"{W}/fid_samples.npz"), ("--inception-weights",)),
    Case("eval-fid-samples-float", ("eval", "--samples", f"{W}/fid_float.npz", "--ref", f"{W}/fid_samples.npz",
                                    "--inception-weights", f"{W}/inception_garbage.pth"),
         (f"{W}/fid_float.npz", "uint8")),
    Case("eval-fid-samples-missing", ("eval", "--samples", f"{W}/nothing.npz", "--ref", f"{W}/fid_samples.npz",
                                      "--inception-weights", f"{W}/inception_garbage.pth"), (f"{W}/nothing.npz",)),
    Case("eval-fid-samples-and-checkpoint", ("eval", "--samples", f"{W}/fid_samples.npz", "--checkpoint", RUN,
                                             "--ref", f"{W}/fid_samples.npz", "--inception-weights",
                                             f"{W}/inception_garbage.pth"), ("--samples", "--checkpoint")),
    Case("eval-fid-vae-pixel-model", ("eval", "--checkpoint", RUN, "--vae", f"{W}/nowhere", "--ref",
                                      f"{W}/fid_samples.npz", "--inception-weights", f"{W}/inception_garbage.pth"),
         ("--vae", "4-channel")),
    Case("eval-fid-latent-without-vae", ("eval", "--checkpoint", f"{W}/latent", "--ref", f"{W}/fid_samples.npz",
                                         "--inception-weights", f"{W}/inception_garbage.pth"),
         (f"{W}/latent", "--vae")),
    Case("eval-vae-without-weights", ("eval", "--checkpoint", RUN, "--vae", f"{W}/nowhere"),
         ("--vae", "--inception-weights")),
    # -- issue 14: training at scale
    Case("train-precision-fp8", (*TRAIN, "--precision", "fp8", "--out", f"{W}/t"), ("--precision", "fp8")),
    Case("train-log-wandb", (*TRAIN, "--log", "wandb", "--out", f"{W}/t"), ("--log", "wandb")),
    Case("train-preset-unknown", (*TRAIN, "--preset", "dit-pretrain", "--out", f"{W}/t"), ("--preset", "dit-pretrain")),
    Case("train-preset-without-init-from", (*TRAIN, "--preset", "dit-finetune", "--out", f"{W}/t"),
         ("--preset dit-finetune", "--init-from")),
    Case("train-compile-given-a-value", (*TRAIN, "--compile", "yes", "--out", f"{W}/t"), ("yes",)),
    Case("train-resume-other-precision", ("train-supernet", "--resume", "--precision", "bf16", "--out", f"{W}/trained"),
         (f"{W}/trained", "--precision 'fp32' -> 'bf16'")),
    Case("finetune-precision-fp8", (*FT, "--precision", "fp8", "--out", f"{W}/ft"), ("--precision", "fp8")),
    Case("finetune-log-wandb", (*FT, "--log", "wandb", "--out", f"{W}/ft"), ("--log", "wandb")),
    Case("finetune-preset-unknown", (*FT, "--preset", "unknown", "--out", f"{W}/ft"), ("--preset", "unknown")),
    Case("finetune-resume-other-precision", ("finetune", "--resume", "--precision", "fp16", "--out", f"{W}/finetuned"),
         (f"{W}/finetuned", "--precision 'fp32' -> 'fp16'")),
    Case("finetune-resume-with-a-preset",
         ("finetune", "--resume", "--preset", "dit-finetune", "--out", f"{W}/finetuned"),
         (f"{W}/finetuned", "--preset")),
]


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Path -> (bytes, mode) of every file and directory under `root`."""
    snap: dict[str, tuple[bytes | None, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        snap[str(path.relative_to(root))] = (path.read_bytes() if path.is_file() else None, st.st_mode)
    return snap


def _fill(text: str, ws: Path) -> str:
    return text.replace("{ws}", str(ws)).replace("{ro}", str(_ro_dir(ws)))


PARAMS = [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known_bug)] if c.known_bug else [])
    for c in CASES
]


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(
    case: Case, workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv(MARKER_ENV, str(workspace / "PWNED"))
    monkeypatch.delenv("DYNASEARCH_DEBUG", raising=False)
    before = _snapshot(workspace)
    capsys.readouterr()
    code = main([_fill(a, workspace) for a in case.argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in case.needles:
        assert _fill(needle, workspace) in lines[0], (needle, lines[0])
    for secret in case.forbidden:
        assert secret not in out + err
    assert not (workspace / "PWNED").exists(), "the pickled payload ran"
    assert _snapshot(workspace) == before


def test_there_are_enough_cases_over_every_command() -> None:
    assert len(CASES) >= 140 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] if c.argv[0] != "bench" else f"bench {c.argv[1]}" for c in CASES}
    assert {"models", "flops", "train-supernet", "search", "sample", "eval", "report", "demo", "bench latency",
            "bench flops", "bench search", "bench ranking", "bench train", "finetune"} <= commands


def test_the_malicious_pickle_really_runs_code_when_unpickled_unsafely(workspace: Path, tmp_path: Path) -> None:
    """The payload is live: loading it without weights_only creates the marker (so the refusal above means
    something)."""
    marker = tmp_path / "ran"
    env = {**os.environ, MARKER_ENV: str(marker)}
    code = f"import torch; torch.load({str(workspace / 'evil.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert marker.exists()


def test_debug_shows_the_traceback(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DYNASEARCH_DEBUG", "0")  # --debug sets it; monkeypatch restores it
    code = main(["--debug", "flops", "--checkpoint", str(workspace / "truncated")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("url", [f"postgresql://alice:{SECRET}@127.0.0.1:9/db", f"mysql://bob:{SECRET}@localhost:1/x"])
def test_a_storage_password_is_never_printed(url: str, workspace: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    code = main(["search", "--supernet", str(workspace / "run"), "--flops", "0.5x", "--trials", "2",
                 "--proxy-samples", "8", "--out", str(workspace / "s"), "--storage", url])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and "***" in err, err
    assert SECRET not in out + err
    assert all(SECRET.encode() not in p.read_bytes() for p in workspace.rglob("*") if p.is_file())


def test_warnings_never_precede_the_error_line(workspace: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A library's deprecation lines and the command's own warnings are dropped when the command fails."""
    import warnings

    import dynasearch.cost.query as query
    from dynasearch.errors import ConfigError

    def warn_then_fail(_q: object) -> None:
        warnings.warn("old API", DeprecationWarning, stacklevel=2)
        warnings.warn("something odd", UserWarning, stacklevel=2)
        raise ConfigError("--batch is wrong")

    monkeypatch.setattr(query, "run_flops_query", warn_then_fail)
    assert main(["flops", *N2]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --batch is wrong"]


def test_a_finished_command_still_tells_its_warnings_but_not_deprecations(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    import dynasearch.cost.query as query

    real = query.run_flops_query

    def warn_then_run(q: object) -> object:
        warnings.warn("old API", DeprecationWarning, stacklevel=2)
        warnings.warn("something odd", UserWarning, stacklevel=2)
        return real(q)  # type: ignore[arg-type]

    monkeypatch.setattr(query, "run_flops_query", warn_then_run)
    assert main(["flops", *N2]) == 0
    assert capsys.readouterr().err.splitlines() == ["warning: something odd"]


def test_ctrl_c_while_importing_prints_one_line(tmp_path: Path) -> None:
    """SIGINT during `python -m dynasearch`'s imports (torch takes seconds): 'interrupted', exit 130, no traceback."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dynasearch", "models"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err, err
    if proc.returncode == 0:  # pragma: no cover - the imports finished within 0.5 s: nothing to interrupt
        pytest.skip("the command finished before the signal")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", (proc.returncode, err)
