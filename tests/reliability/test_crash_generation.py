"""Crash and resume for ``generate`` and ``rate``: SIGKILL at a seeded random instant, rerun,
compare with an uninterrupted run.

Besides identical outputs (no record lost, none duplicated), these stages spend money, so the
fake API counts what it is sent per cache key: a request whose answer was journaled before the
kill must never be sent again (a request in flight at the kill was never journaled and may
legitimately go again). In batch mode nothing may be answered twice at all: a submitted batch is
collected by the rerun, never submitted again.

CI runs 2 trials per stage; ``-m slow`` runs 20 per stage and the batch-mode variant.
"""

from __future__ import annotations

import json
import random
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kill_harness import ForkServer
from reliability_helpers import leftovers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from fakeapi import (  # noqa: E402
    KEY_ENV,
    SECRET,
    FakeAPI,
    default_responder,
    running_api,
    write_candidates,
    write_inputs,
)

CI_TRIALS = 2
SLOW_TRIALS = 20
N_ITEMS = 40
ENV: dict[str, str | None] = {KEY_ENV: SECRET}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    yield from running_api(monkeypatch)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("mlruns"))


def _judge(body: dict) -> str:
    """Deterministic judge: items marked NOSCORE need the re-ask, which answers 7."""
    if "reply with only the score" in str(body["messages"][-1]["content"]).lower():
        return "7"
    if "NOSCORE" in json.dumps(body):
        return "Excellent conversation."
    return default_responder(body)


@dataclass
class Stage:
    """One verb's command line (``--out out``, relative to the trial folder) and its outputs."""

    argv: list[str]
    outputs: tuple[str, ...]
    batch: bool = False


def _stage(name: str, root: Path, api: FakeAPI, store: str) -> Stage:
    common = [
        "--client.base_url", api.base_url, "--client.api_key_env", KEY_ENV, "--store", store,
        "--progress", "false", "--client.concurrency", "4", "--client.max_attempts", "3",
        "--client.timeout_s", "10", "--client.backoff_base_s", "0.01",
        "--client.backoff_max_s", "0.05",
    ]  # fmt: skip
    if name.startswith("generate"):
        inputs = write_inputs(root / "in", n_figures=N_ITEMS, markers={5: "REFUSE-ME"})
        argv = ["generate", "--figures", str(inputs["figures"])]
        argv += ["--image_root", str(inputs["image_root"]), "--demonstrations"]
        argv += [str(inputs["demonstrations"]), "--client.model", "gen", "--vision", "false"]
        argv += ["--out", "out", *common]
        batch = name == "generate_batch"
        if batch:
            argv += ["--client.mode", "batch", "--client.batch_poll_s", "0.05"]
        return Stage(argv, ("candidates.jsonl", "failed.jsonl"), batch)
    noscore = {i: "NOSCORE" for i in range(0, N_ITEMS, 7)}
    cands = write_candidates(root / "candidates.jsonl", N_ITEMS, noscore)
    argv = ["rate", "--candidates", str(cands), "--client.model", "judge", "--out", "out"]
    argv += common
    return Stage(argv, ("ratings.jsonl", "failed.jsonl"))


def _journal_keys(path: Path) -> list[str]:
    """Keys of the complete lines of a journal (a torn last line is not journaled)."""
    if not path.is_file():
        return []
    keys = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            keys.append(json.loads(raw)["key"])
    return keys


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run(server: ForkServer, stage: Stage, cwd: Path) -> float:
    t0 = time.monotonic()
    rc = server.run(stage.argv, cwd, cwd / "log.txt", ENV)
    assert rc == 0, (cwd / "log.txt").read_text()[-4000:]
    return time.monotonic() - t0


def _trials(name: str, n: int, server: ForkServer, api: FakeAPI, store: str, tmp: Path) -> int:
    """``n`` kill-and-resume trials of a stage; returns how many runs were killed mid-way."""
    if name == "rate":
        api.responder = _judge
    api.delay_s = 0.03  # requests take long enough for kills to land among them
    stage = _stage(name, tmp, api, store)
    ref = tmp / "reference"
    ref.mkdir()
    duration = _run(server, stage, ref)
    assert (ref / "out" / stage.outputs[0]).stat().st_size > 0
    rng = random.Random(zlib.crc32(name.encode()))
    killed = 0
    for i in range(n):
        cwd = tmp / f"trial-{i}"
        cwd.mkdir()
        api.reset()
        delay = rng.uniform(0.0, duration)
        # odd trials (not batch mode, which journals at collection) are killed once a seeded
        # number of answers is journaled, so kills land mid-run however loaded the machine is
        # (a machine busier or idler than for the reference run shifts timed kills out of it)
        progress = rng.randint(1, N_ITEMS - 1) if i % 2 and not stage.batch else 0
        pid = server.spawn(stage.argv, cwd, cwd / "log.txt", ENV)
        t0 = time.monotonic()
        deadline = t0 + (5 * duration + 10 if progress else delay)
        while time.monotonic() < deadline and _running(pid):
            if progress and len(_journal_keys(cwd / "out" / "journal.jsonl")) >= progress:
                delay = time.monotonic() - t0
                break
            time.sleep(0.005)
        was_running = _running(pid)
        server.kill(pid)
        rc = server.wait(pid)
        killed += was_running and rc == -9
        journaled = set(_journal_keys(cwd / "out" / "journal.jsonl"))
        sent_before = len(api.sent_keys)
        _run(server, stage, cwd)
        at = f"{progress} answers, " if progress else ""
        where = f"{name} trial {i} (killed after {at}{delay:.2f}s of {duration:.2f}s)"
        resent = journaled & set(api.sent_keys[sent_before:])
        assert not resent, f"{where}: {len(resent)} journaled requests paid for twice"
        if stage.batch:
            assert api.paid_twice() == [], f"{where}: batch lines answered twice"
        for out in stage.outputs:
            got, want = cwd / "out" / out, ref / "out" / out
            assert got.read_bytes() == want.read_bytes(), f"{where}: {out} differs"
        keys = _journal_keys(cwd / "out" / "journal.jsonl")
        assert len(keys) == len(set(keys)), f"{where}: duplicate journal lines"
        first = stage.outputs[0]
        ids = [
            json.loads(x).get("id") or json.loads(x).get("candidate_id")
            for x in (cwd / "out" / first).open()
        ]
        assert len(ids) == len(set(ids)), f"{where}: duplicate records"
        assert leftovers(cwd / "out") == [], f"{where}: temporary files left"
        assert not (cwd / "out" / f".{name.split('_')[0]}.plan.jsonl").exists()
    return killed


@pytest.mark.parametrize("name", ["generate", "rate"])
def test_kill_and_resume(
    name: str, fork_server: ForkServer, api: FakeAPI, store: str, tmp_path: Path
) -> None:
    """CI: 2 trials per stage, SIGKILLed at seeded random instants."""
    _trials(name, CI_TRIALS, fork_server, api, store, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["generate", "rate", "generate_batch"])
def test_kill_and_resume_many(
    name: str, fork_server: ForkServer, api: FakeAPI, store: str, tmp_path: Path
) -> None:
    """The long version: 20 trials per stage, most of them killed mid-run."""
    assert _trials(name, SLOW_TRIALS, fork_server, api, store, tmp_path) >= SLOW_TRIALS // 2
