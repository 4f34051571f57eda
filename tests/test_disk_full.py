"""A full disk is a user error: every writing command, on a tiny tmpfs, gives one `error:` line naming the path and
"no space left", exit code 2, no traceback, and leaves what was on the file system before exactly as it was.

Needs root (mount -t tmpfs); skipped elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_supernet_run

from dynasearch.cli import main


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Path -> bytes (None for directories) of everything under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _fill(root: Path) -> None:
    """Use up every free byte of the file system under `root` (a file named 'filler')."""
    with open(root / "filler", "ab", buffering=0) as handle:
        for size in (65536, 4096, 512, 64, 1):
            while True:
                try:
                    handle.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted under tmp_path (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supernet and a finished 2-trial search of it (its best subnet exported)."""
    ws = tmp_path_factory.mktemp("disk")
    run = fake_supernet_run(ws / "run")
    assert main(["search", "--supernet", str(run), "--flops", "0.5x", "--trials", "2", "--proxy-samples", "8",
                 "--export-top", "0", "--out", str(ws / "search")]) == 0
    return ws / "search"


def _check_full(argv: list[str], fs: Path, capsys: pytest.CaptureFixture[str], fill: bool = False) -> str:
    """Run `argv` on `fs` (filled first when `fill`): one error line saying no space left, exit 2, nothing changed."""
    (fs / "keep.txt").write_text("what was there before\n")
    if fill:
        _fill(fs)
    before = _snapshot(fs)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0].lower(), err
    assert str(fs) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(fs) == before
    return lines[0]


def test_search_on_a_full_disk(tiny_fs: Path, search_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    supernet = search_dir.parent / "run"
    _check_full(["search", "--supernet", str(supernet), "--flops", "0.5x", "--trials", "2", "--proxy-samples", "8",
                 "--export-top", "0", "--out", str(tiny_fs / "s")], tiny_fs, capsys)


def test_train_supernet_on_a_full_disk(tiny_fs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_full(["train-supernet", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "8", "--device", "cpu",
                 "--sandwich", "0", "--out", str(tiny_fs / "t")], tiny_fs, capsys)


def test_finetune_on_a_full_disk(tiny_fs: Path, search_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_full(["finetune", "--checkpoint", str(search_dir / "subnets" / "best"), "--steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--out", str(tiny_fs / "ft")], tiny_fs, capsys)


def test_sample_on_a_full_disk(tiny_fs: Path, search_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_full(["sample", "--checkpoint", str(search_dir.parent / "run"), "--num", "2", "--steps", "2",
                 "--device", "cpu", "--out", str(tiny_fs / "g.png")], tiny_fs, capsys, fill=True)


def test_report_on_a_full_disk_keeps_the_search(tiny_fs: Path, search_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The search's tables are on the full disk (its checkpoints stay outside: they do not fit in 64 KiB)."""
    copy = tiny_fs / "search"
    copy.mkdir()
    for name in ("trials.csv", "pareto.csv", "best.json", "baseline.csv"):
        if (search_dir / name).is_file():
            shutil.copy(search_dir / name, copy / name)
    _check_full(["report", str(copy), "--no-samples", "--eval-num", "0", "--steps", "2"], tiny_fs, capsys, fill=True)


def test_bench_on_a_full_disk_keeps_the_previous_results(tiny_fs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_fs / "b"
    out.mkdir()
    (out / "flops.csv").write_text("model\nprevious run\n")
    _check_full(["bench", "flops", "--models", "DiT-N/2", "--input-size", "8", "--in-channels", "1",
                 "--num-classes", "10", "--out", str(out)], tiny_fs, capsys, fill=True)


def test_a_new_bench_directory_is_not_left_behind(tiny_fs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check_full(["bench", "flops", "--models", "DiT-N/2", "--input-size", "8", "--in-channels", "1",
                 "--num-classes", "10", "--out", str(tiny_fs / "new")], tiny_fs, capsys, fill=True)


def test_a_failed_multi_file_write_puts_the_previous_files_back(tmp_path: Path) -> None:
    """kept_on_failure (the report's and the benches' transaction): replaced files restored, new ones removed."""
    from dynasearch.errors import DiskFullError
    from dynasearch.fileio import atomic_write_text, kept_on_failure

    (tmp_path / "a.csv").write_text("old a\n")
    (tmp_path / "b.png").write_text("old b\n")
    before = _snapshot(tmp_path)
    with pytest.raises(DiskFullError), kept_on_failure(tmp_path):
        atomic_write_text(tmp_path / "a.csv", "new a\n")
        atomic_write_text(tmp_path / "c.json", "new c\n")
        raise DiskFullError("cannot write 'b.png': no space left on the device")
    assert _snapshot(tmp_path) == before
    with kept_on_failure(tmp_path):  # success: the new files stay, no keep-links left behind
        atomic_write_text(tmp_path / "a.csv", "new a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.png"]
    assert (tmp_path / "a.csv").read_text() == "new a\n"


def test_demo_overwrite_puts_the_previous_outputs_back_when_it_fails(tmp_path: Path) -> None:
    """replaced_on_success (demo --overwrite): the old directories come back whole after a failure."""
    from dynasearch.fileio import replaced_on_success

    old = tmp_path / "out"
    old.mkdir()
    (old / "report.html").write_text("previous report\n")
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError), replaced_on_success([old, tmp_path / "run"]):
        assert not old.exists()
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "half.safetensors").write_text("x")
        raise RuntimeError("stage 2 failed")
    assert _snapshot(tmp_path) == before
    with replaced_on_success([old]):
        old.mkdir()
        (old / "report.html").write_text("new report\n")
    assert _snapshot(tmp_path) == {"out": None, "out/report.html": b"new report\n"}


@pytest.mark.parametrize("fail_with", ["disk-full", "nan-loss"])
def test_train_overwrite_never_loses_the_previous_run(
    fail_with: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite moves the old run aside and deletes it only at the new run's first checkpoint: a failure before
    that (a full disk writing it, a NaN loss) puts the old run back byte for byte."""
    import dynasearch.train.loop as loop
    from dynasearch.checks import disk_full
    from dynasearch.errors import TrainingError

    out = tmp_path / "run"
    argv = ["train-supernet", "--model", "DiT-N/2", "--steps", "2", "--batch-size", "8", "--device", "cpu",
            "--sandwich", "0", "--out", str(out)]
    assert main(argv) == 0
    before = _snapshot(tmp_path)

    def fail(*_a: object, **_k: object) -> None:
        if fail_with == "disk-full":
            raise disk_full(out / "supernet.safetensors")
        raise TrainingError("loss is NaN at step 1")

    with monkeypatch.context() as m:
        m.setattr(loop, "save_run" if fail_with == "disk-full" else "check_finite", fail)
        capsys.readouterr()
        assert main([*argv, "--overwrite", "--lr", "0.5"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before
    assert main([*argv, "--overwrite", "--lr", "0.5"]) == 0  # a finished overwrite leaves no copy of the old run
    assert not (out / ".previous-run.tmp").exists()
    assert '"lr": 0.5' in (out / "config.json").read_text()
