"""Search reliability: SIGKILL mid-trial and resume, Ctrl-C, 4 workers on one journal, PostgreSQL across processes.

Every search here runs `dynasearch search` in real subprocesses through a small launcher that wraps the trial
evaluation (the proxy evaluator, inside `dynasearch.search.objective._evaluate`) to log each evaluation, to hang
in a chosen one (so that a kill lands while that trial is RUNNING) or to wait until a given number of worker
processes are up (so that every worker really takes part). Spawned worker processes re-import the launcher, so they
get the same wrapper.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import fake_supernet_run

import dynasearch.search.objective as search_module
from dynasearch.cli import main as cli_main
from dynasearch.search.trials import (
    ATTR_CRASHED,
    ATTR_RETRY_OF,
    ATTR_SEED,
    ATTR_WORKER,
    CRASH_REASON,
)

ROOT = Path(__file__).resolve().parents[1]

LAUNCHER = textwrap.dedent(
    '''
    """dynasearch's CLI with trial evaluations wrapped: DS_MARK logs, DS_HANG_AT hangs, DS_BARRIER waits."""
    import os
    import sys
    import time

    from dynasearch.search import objective as search
    from dynasearch.search.proxy import ProxyEvaluator

    _real_evaluate = search._evaluate
    _real_proxy = ProxyEvaluator.__call__
    _calls = [0]
    _trial = [None]


    def _evaluate(ctx, trial):
        _trial[0] = trial.number
        try:
            return _real_evaluate(ctx, trial)
        finally:
            _trial[0] = None


    def _proxy(self, subnet):
        mark = os.environ.get("DS_MARK")
        if mark and _trial[0] is not None:  # a trial's evaluation (its parameters are suggested by now)
            barrier = int(os.environ.get("DS_BARRIER", "0"))
            if barrier and _calls[0] == 0:  # first trial of this process: wait for the other workers
                with open(mark + ".ready", "a") as f:
                    f.write(f"{os.getpid()}\\n")
                deadline = time.time() + 120
                while len(set(open(mark + ".ready").read().split())) < barrier and time.time() < deadline:
                    time.sleep(0.05)
            _calls[0] += 1
            with open(mark, "a") as f:
                f.write(f"{os.getpid()} {_trial[0]}\\n")
            if _calls[0] == int(os.environ.get("DS_HANG_AT", "0")):
                time.sleep(float(os.environ.get("DS_HANG_SECONDS", "300")))
            time.sleep(float(os.environ.get("DS_DELAY", "0")))
        return _real_proxy(self, subnet)


    search._evaluate = _evaluate
    ProxyEvaluator.__call__ = _proxy

    if __name__ == "__main__":
        from dynasearch.cli import main

        sys.exit(main(sys.argv[1:]))
    '''
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supernet run (DiT-N/2, 8x8x1) whose data is a small npz (no sklearn import in every subprocess)."""
    import numpy as np

    base = tmp_path_factory.mktemp("run")
    run = fake_supernet_run(base / "supernet")
    rng = np.random.default_rng(0)
    np.savez(base / "data.npz", x=rng.standard_normal((64, 1, 8, 8)).astype("float32"), y=np.arange(64) % 10)
    doc = json.loads((run / "config.json").read_text())
    doc["data"]["spec"] = f"npz:{base / 'data.npz'}"
    (run / "config.json").write_text(json.dumps(doc))
    return run


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launcher script (see the module docstring)."""
    path = tmp_path_factory.mktemp("launch") / "ds_launch.py"
    path.write_text(LAUNCHER)
    return path


def _env(**extra: str) -> dict[str, str]:
    """The environment for a search subprocess: one thread, the checkout importable, plus `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("DYNASEARCH_DEBUG", None)
    env.update(extra)
    return env


def _search_args(run_dir: Path, out: Path, trials: int, *extra: str) -> list[str]:
    """`search` arguments for a small, fast study."""
    return [
        "search", "--supernet", str(run_dir), "--flops", "0.5x", "--trials", str(trials), "--proxy-samples", "16",
        "--export-top", "0", "--out", str(out), *extra,
    ]


def _journal_study(out: Path) -> optuna.Study:
    """The study in `out`'s journal (read only)."""
    backend = optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    return optuna.load_study(study_name="dynasearch", storage=optuna.storages.JournalStorage(backend))


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Wait until `path` has `n` lines (the process must stay alive meanwhile)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"search exited with {proc.returncode} before evaluation {n}: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"no evaluation {n} within {timeout} s")


def _marks(path: Path) -> list[tuple[int, int]]:
    """(pid, trial number) of every evaluation logged in `path`."""
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]


def _check_outputs(out: Path, study: optuna.Study, target: int) -> pd.DataFrame:
    """trials.csv / pareto.csv / best.json agree with the storage: `target` counted trials, no duplicates."""
    trials = pd.read_csv(out / "trials.csv", keep_default_na=False)
    stored = [t for t in study.get_trials() if t.state.name not in ("PRUNED", "WAITING")]
    assert sorted(trials["number"]) == sorted(t.number for t in stored)
    assert trials["number"].is_unique
    assert int(trials["counted"].astype(str).eq("True").sum()) == target
    pareto = pd.read_csv(out / "pareto.csv")
    complete = set(trials.loc[trials["state"] == "COMPLETE", "number"])
    assert set(pareto["number"]) <= complete
    best = json.loads((out / "best.json").read_text())
    assert best["finished_trials"] == target
    assert best["trial"] in complete
    return trials


@pytest.mark.slow
def test_sigkill_mid_trial_resumes_with_exact_counts(
    run_dir: Path, launcher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two SIGKILLs, each while a trial is RUNNING; the rerun fails and retries them once and finishes exactly."""
    out, target = tmp_path / "s", 8
    args = [sys.executable, str(launcher), *_search_args(run_dir, out, target)]
    evaluations = 0
    for run, hang_at in enumerate((2, 2)):  # run 1 kills the retry of run 0's killed trial: not retried again
        mark = tmp_path / f"mark{run}"
        proc = subprocess.Popen(args, env=_env(DS_MARK=str(mark), DS_HANG_AT=str(hang_at)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_lines(mark, hang_at, proc)
        hung = _marks(mark)[-1][1]
        assert [t.state.name for t in _journal_study(out).get_trials() if t.number == hung] == ["RUNNING"]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        evaluations += len(_marks(mark))
    # the rerun (in this process, counting its evaluations) recovers the killed trials and finishes
    final_numbers: list[int] = []
    real_evaluate = search_module._evaluate

    def counting(ctx: object, trial: optuna.Trial) -> object:
        final_numbers.append(trial.number)
        return real_evaluate(ctx, trial)

    monkeypatch.setattr(search_module, "_evaluate", counting)
    assert cli_main(_search_args(run_dir, out, target)) == 0, capsys.readouterr().err
    evaluations += len(final_numbers)

    study = _journal_study(out)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == target and states.count("RUNNING") == 0
    crashed = [t for t in trials if t.state.name == "FAIL"]
    assert len(crashed) == 2
    for t in crashed:
        assert t.user_attrs[ATTR_CRASHED] is True and t.user_attrs["fail_reason"] == CRASH_REASON
    retries = [t for t in trials if ATTR_RETRY_OF in t.user_attrs]
    crashed_retries = [t for t in crashed if ATTR_RETRY_OF in t.user_attrs]
    assert len(crashed_retries) == 1  # the retry killed in run 1 is not retried again
    assert sorted(t.user_attrs[ATTR_RETRY_OF] for t in retries) == sorted(
        t.number for t in crashed if ATTR_RETRY_OF not in t.user_attrs
    )  # every first crash is retried exactly once
    for t in retries:
        assert t.params == by_number[t.user_attrs[ATTR_RETRY_OF]].params
    # every evaluation ran a distinct trial: nothing finished was run again
    assert evaluations == len([t for t in trials if t.state.name in ("COMPLETE", "FAIL")]) == target + 2
    # the journal has no torn records
    for line in (out / "study.journal").read_text().splitlines():
        json.loads(line)
    table = _check_outputs(out, study, target)
    crash_rows = table[table["state"] == "FAIL"]
    assert crash_rows["fail_reason"].str.contains("died").all()
    assert crash_rows["fail_reason"].str.contains("retried as trial").sum() == 1
    assert crash_rows["fail_reason"].str.contains("not retried").sum() == 1
    assert json.loads((out / "best.json").read_text())["crashed_trials"] == 2


@pytest.mark.slow
def test_sigint_stops_at_a_safe_point_and_resumes(
    run_dir: Path, launcher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during a trial: that trial completes, nothing fails, exit 130 with a resume command that works."""
    out, target = tmp_path / "s", 6
    mark = tmp_path / "mark"
    args = [sys.executable, str(launcher), *_search_args(run_dir, out, target)]
    proc = subprocess.Popen(args, env=_env(DS_MARK=str(mark), DS_HANG_AT="3", DS_HANG_SECONDS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(mark, 3, proc)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted after 3 trials" in stderr
    resume = stderr.split("resume with: ", 1)[1].split(" (same --out)")[0].strip()
    assert resume.startswith("dynasearch search ") and f"--out {out}" in resume
    states = [t.state.name for t in _journal_study(out).get_trials()]
    assert states.count("COMPLETE") == 3 and "FAIL" not in states and "RUNNING" not in states
    assert not (out / "trials.csv").exists()  # outputs are only written by a finished run

    cmd = shlex.split(resume)  # the printed command, run as it stands (in this process)
    assert cli_main(cmd[1:]) == 0, capsys.readouterr().err
    study = _journal_study(out)
    assert [t.state.name for t in study.get_trials()].count("COMPLETE") == target
    _check_outputs(out, study, target)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_the_trial_is_retried(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two Ctrl-C during trial 3: it stops at once (exit 130), that trial fails as interrupted and is retried."""
    out, target = tmp_path / "s", 5
    real_evaluate = search_module._evaluate

    def interrupted_twice(ctx: object, trial: optuna.Trial) -> object:
        values = real_evaluate(ctx, trial)  # parameters suggested, loss computed: then the two Ctrl-C arrive
        if trial.number == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: stop after this trial
            os.kill(os.getpid(), signal.SIGINT)  # second: stop now
        return values

    monkeypatch.setattr(search_module, "_evaluate", interrupted_twice)
    assert cli_main(_search_args(run_dir, out, target)) == 130
    err = capsys.readouterr().err
    assert "interrupted after 3 trials" in err and "resume with: dynasearch search" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    trials = _journal_study(out).get_trials()
    stopped = next(t for t in trials if t.number == 3)
    assert stopped.state.name == "FAIL" and "Ctrl-C" in stopped.user_attrs["fail_reason"]
    retry = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == 3]
    assert len(retry) == 1 and retry[0].state.name == "WAITING"

    monkeypatch.setattr(search_module, "_evaluate", real_evaluate)
    assert cli_main(_search_args(run_dir, out, target)) == 0
    study = _journal_study(out)
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[retry[0].number].state.name == "COMPLETE"
    assert by_number[retry[0].number].params == stopped.params
    _check_outputs(out, study, target)


def _check_shared_study(study: optuna.Study, target: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly `target` completed trials, nothing running or failed, and every seed subnet evaluated once."""
    trials = study.get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == target, states
    assert "RUNNING" not in states and "FAIL" not in states
    assert len({t.number for t in trials}) == len(trials)
    evaluated = [t for t in trials if t.state.name == "COMPLETE"]
    seeds = [t.user_attrs[ATTR_SEED] for t in evaluated if ATTR_SEED in t.user_attrs]
    assert sorted(seeds) == list(range(len(seeds))) and len(seeds) >= 2
    return evaluated


@pytest.mark.slow
def test_four_workers_on_one_journal(run_dir: Path, launcher: Path, tmp_path: Path) -> None:
    """`--workers 4` on the journal file: all four evaluate, exactly the requested number of trials, no duplicates."""
    out, target, mark = tmp_path / "s", 12, tmp_path / "mark"
    args = [sys.executable, str(launcher), *_search_args(run_dir, out, target, "--workers", "4")]
    done = subprocess.run(args, env=_env(DS_MARK=str(mark), DS_BARRIER="4", DS_DELAY="0.1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    study = _journal_study(out)
    evaluated = _check_shared_study(study, target)
    marks = _marks(mark)
    assert len({pid for pid, _ in marks}) == 4
    assert sorted(n for _, n in marks) == sorted(t.number for t in evaluated)  # one evaluation per trial
    assert len({t.user_attrs[ATTR_WORKER]["pid"] for t in evaluated}) == 4
    _check_outputs(out, study, target)


# --- PostgreSQL ----------------------------------------------------------------------------------------------

PASSWORD = "pw-Zq81-secret"


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl in a temporary directory, loopback, free port) and a database.

    initdb refuses to run as root, so as root the server runs as the 'postgres' user (or 'nobody').
    """
    initdb, pg_ctl, createdb = _pg_bin("initdb"), _pg_bin("pg_ctl"), _pg_bin("createdb")
    if not (initdb and pg_ctl and createdb):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, createdb) not found: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="ds-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        shutil.chown(base, user=user)
        prefix = ["runuser", "-u", user, "--"]
    pwfile = base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if prefix:
        shutil.chown(pwfile, user=prefix[2])
    port = _free_port()
    data = base / "data"

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        done = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    run([initdb, "-D", str(data), "-U", "dyna", "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"])
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    run([pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "-t", "60", "start"])
    try:
        subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "dyna", "dynasearch"],
                       env={**os.environ, "PGPASSWORD": PASSWORD}, check=True, capture_output=True, timeout=60)
        yield f"postgresql://dyna:{PASSWORD}@127.0.0.1:{port}/dynasearch"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_postgres_two_machines_share_one_study(
    run_dir: Path, launcher: Path, tmp_path: Path, postgres_url: str
) -> None:
    """Two separate `dynasearch search` commands (two "machines", 2 workers each) on one PostgreSQL study."""
    target, mark = 8, tmp_path / "mark"
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    env = _env(DS_MARK=str(mark), DS_BARRIER="4", DS_DELAY="0.1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(launcher),
             *_search_args(run_dir, out, target, "--workers", "2", "--storage", postgres_url)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for out in outs
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert PASSWORD not in stdout and PASSWORD not in stderr

    study = optuna.load_study(study_name="dynasearch", storage=postgres_url)
    evaluated = _check_shared_study(study, target)
    marks = _marks(mark)
    assert len({pid for pid, _ in marks}) == 4
    assert sorted(n for _, n in marks) == sorted(t.number for t in evaluated)
    # every file either machine wrote is free of the password; the reports name the masked URL
    for out in outs:
        for path in out.rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path
    bests = [json.loads((out / "best.json").read_text()) for out in outs]
    assert all(b["settings"]["storage"] == postgres_url.replace(PASSWORD, "***") for b in bests)
    assert max(b["finished_trials"] for b in bests) == target  # the machine that finished last saw everything


@pytest.mark.slow
def test_trial_of_a_dead_worker_on_another_machine_fails_by_heartbeat_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_dir: Path
) -> None:
    """RDB storage (SQLite here): a RUNNING trial from another host whose heartbeat stopped is failed and retried
    once."""
    import dynasearch.search.storage as storage_module
    from dynasearch.search.config import SearchConfig
    from dynasearch.search.context import prepare_search
    from dynasearch.search.objective import run_trials
    from dynasearch.search.study import make_sampler, open_study

    monkeypatch.setattr(storage_module, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(storage_module, "GRACE_PERIOD", 1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = SearchConfig(supernet=run_dir, flops="0.5x", out=tmp_path / "s", trials=5, proxy_samples=16, storage=url)
    ctx = prepare_search(config)
    study = open_study(ctx, make_sampler("tpe", 0, 5))
    lost = study.ask()  # a trial some other machine started, then that machine went away
    params = {"attn_0": lost.suggest_categorical("attn_0", ctx.space.attn_rate),
              "mlp_0": lost.suggest_categorical("mlp_0", ctx.space.mlp_rate)}
    lost.set_user_attr(ATTR_WORKER, {"host": "another-machine", "boot": "x", "pid": 1, "start": "1"})
    lost.set_user_attr(ATTR_CRASHED, True)
    lost.set_user_attr("fail_reason", CRASH_REASON)
    study._storage.record_heartbeat(lost._trial_id)
    time.sleep(2.5)  # past the grace period
    study = run_trials(ctx)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[lost.number].state.name == "FAIL"
    retry = [t for t in trials.values() if t.user_attrs.get(ATTR_RETRY_OF) == lost.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert {k: retry[0].params[k] for k in params} == params
    assert [t.state.name for t in trials.values()].count("COMPLETE") == 5
