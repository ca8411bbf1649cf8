"""Two runs pointed at the same output folder: the second refuses at once, naming the folder and
the holder's pid; once the holder is SIGKILLed, a rerun works (the kernel dropped its lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kill_harness import ForkServer
from reliability_helpers import SECRET_ENV, Chain, leftovers

from biomedvital.data.outputs import (
    LOCK_NAME,
    OutputFolderBusy,
    acquire_output,
    output_lock,
    release_output,
)

GOOD = Path(__file__).resolve().parents[1] / "bad_inputs" / "_good"
HOLD = "import sys, time; from biomedvital.data.outputs import acquire_output; acquire_output(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_lock_is_reentrant_and_leaves_nothing(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out") as folder:
        assert folder is not None and (folder / LOCK_NAME).is_file()
        assert acquire_output(folder) == folder  # the CLI, then a callback, in one process
        release_output(folder)
        assert (folder / LOCK_NAME).is_file()
    assert list((tmp_path / "out").iterdir()) == []


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    stale = [
        out / ".selected.json.0123456789ab.tmp",
        out / ".scores.jsonl.tmp-4242",
        out / "checkpoints" / ".last.ckpt.a1b2c3d4e5f6.tmp",
    ]
    for p in stale:
        p.write_text("partial")
    (out / ".export.tmp-a1b2c3d4e5f6").mkdir()
    (out / "keep.json").write_text("{}")
    with output_lock(out):
        pass
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "keep.json"]


def test_pipeline_verbs_refuse_a_held_folder(tmp_path: Path, fork_server: ForkServer) -> None:
    """select, score-vqa, score-chat and win-rate on a folder another process holds; after the
    holder is SIGKILLed, the same select works."""
    out = tmp_path / "out"
    holder = _holder(out)
    select = [
        "select",
        "--scores", str(GOOD / "scores.jsonl"),
        "--candidates", str(GOOD / "candidates.jsonl"),
        "--out", str(out),
        "--store", str(tmp_path / "mlruns"),
    ]  # fmt: skip
    score = [
        "score-vqa", "--benchmark", "vqa_rad", "--data", str(GOOD / "vqa_rad.json"),
        "--predictions", str(tmp_path / "p.jsonl"), "--out", str(out / "scores.json"),
    ]  # fmt: skip
    (tmp_path / "p.jsonl").write_text(
        "".join(f'{{"question_id": {i}, "text": "yes"}}\n' for i in range(3))
    )
    try:
        # in this process: the exception itself
        with pytest.raises(OutputFolderBusy) as e:
            from biomedvital.cli import main

            main(select)
        assert str(out) in str(e.value) and f"pid {holder.pid}" in str(e.value)
        # as processes: fast, one error line, exit status 1, nothing written
        for argv in (select, score):
            log = tmp_path / f"{argv[0]}.log"
            t0 = time.monotonic()
            rc = fork_server.run(argv, tmp_path, log)
            text = log.read_text()
            assert rc == 1, text
            assert time.monotonic() - t0 < 30
            assert f"output folder {out} is in use by another run (pid {holder.pid}" in text
            assert "Traceback" not in text
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        _kill(holder)
    assert fork_server.run(select, tmp_path, tmp_path / "rerun.log") == 0
    assert (out / "selected.json").is_file() and leftovers(out) == []
    assert fork_server.run(score, tmp_path, tmp_path / "rerun.log") == 0


def test_second_fit_refused_then_resume_after_sigkill(
    tmp_path: Path, fork_server: ForkServer, chain: Chain
) -> None:
    """A long tuner fit holds its folder; a second fit on it fails fast naming the first's pid;
    the first is SIGKILLed and ``--ckpt_path last`` then runs."""
    argv = chain.argv["tuner_fit"]
    first = fork_server.spawn(
        [*argv, "--trainer.max_epochs", "1000"], tmp_path, tmp_path / "a.log", SECRET_ENV
    )
    lock = tmp_path / "tuner" / LOCK_NAME
    deadline = time.monotonic() + 120
    while not lock.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.is_file(), (tmp_path / "a.log").read_text()
    try:
        t0 = time.monotonic()
        rc = fork_server.run(argv, tmp_path, tmp_path / "b.log", SECRET_ENV)
        text = (tmp_path / "b.log").read_text()
        assert rc == 1, text
        assert f"{tmp_path / 'tuner'} is in use by another run (pid {first}" in text
        assert time.monotonic() - t0 < 30
    finally:
        fork_server.kill(first)
        assert fork_server.wait(first) == -signal.SIGKILL
    rc = fork_server.run([*argv, "--ckpt_path", "last"], tmp_path, tmp_path / "c.log", SECRET_ENV)
    assert rc == 0, (tmp_path / "c.log").read_text()[-3000:]
    assert (tmp_path / "tuner" / "export" / "run.json").is_file()
    assert leftovers(tmp_path) == []


def test_lock_not_inherited_by_forked_children(tmp_path: Path) -> None:
    """A DataLoader worker forked by the holder does not keep the folder locked after the
    holder dies (POSIX record locks belong to one process)."""
    code = (
        "import os, sys, time; from biomedvital.data.outputs import acquire_output; "
        "acquire_output(sys.argv[1]); pid = os.fork()\n"
        "if pid == 0: time.sleep(600)\n"
        "print(pid, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(OutputFolderBusy):
            acquire_output(tmp_path)
        _kill(proc)
        assert acquire_output(tmp_path) == tmp_path.resolve()  # the orphan still runs
        release_output(tmp_path)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_subfolder_another_live_run_holds_keeps_its_temporaries(tmp_path: Path) -> None:
    """Locking a folder cleans killed runs' temporaries one level down too, but not in a
    subfolder a live run holds (``score-vqa --out outputs/demo/x.json`` locks outputs/demo while
    ``generate`` writes outputs/demo/generate/): those are writes in progress."""
    out = tmp_path / "out"
    busy, idle = out / "generate", out / "rate"
    holder = _holder(busy)
    try:
        idle.mkdir(parents=True)
        writing = busy / ".candidates.jsonl.0123456789ab.tmp"
        stale = idle / ".ratings.jsonl.0123456789ab.tmp"
        writing.write_text("in progress")
        stale.write_text("left by a killed run")
        with output_lock(out):
            assert writing.exists() and not stale.exists()
    finally:
        _kill(holder)
