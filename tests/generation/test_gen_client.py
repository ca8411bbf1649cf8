"""The chat client against a real loopback server: retries, give-ups, cache and resume."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from fakeapi import KEY_ENV, SECRET, FakeAPI

from biomedvital.llm.config import ClientConfig
from biomedvital.llm.errors import ApiAccessError, parse_retry_after
from biomedvital.llm.journal import Journal, JournalBusy
from biomedvital.llm.keys import cost_of, request_key
from biomedvital.llm.online import ChatClient
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.pacing import TokenBucket
from biomedvital.llm.runner import run_requests


def _config(api: FakeAPI, **kw) -> ClientConfig:
    base = dict(
        base_url=api.base_url,
        model="fake-model",
        api_key_env=KEY_ENV,
        concurrency=4,
        max_attempts=3,
        timeout_s=5.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        price_per_million={"input": 2.0, "output": 10.0},
    )
    base.update(kw)
    return ClientConfig(**base)


def _req(text: str) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], {"temperature": 0.0, "max_tokens": 32})


def _run(api: FakeAPI, tmp_path: Path, texts: list[str], **kw):
    return run_requests(
        _config(api, **kw), tmp_path / "journal.jsonl", [_req(t) for t in texts], progress=False
    )


@pytest.mark.parametrize(
    "action",
    [
        "429",
        "500",
        "reset",
        "malformed",
        "empty",
        "text:",
        "text: \n",
        "null-content",
        "bad-choice",
    ],
)
def test_transient_errors_are_retried(api: FakeAPI, tmp_path: Path, action: str) -> None:
    api.arm("M1", action)
    outcomes, ledger, _ = _run(api, tmp_path, ["M1 hello"])
    (out,) = outcomes.values()
    assert out.ok and out.attempts == 2
    assert api.count("M1") == 2
    assert ledger.requests_sent == 2 and ledger.done == 1


def test_empty_replies_are_not_answers(api: FakeAPI, tmp_path: Path) -> None:
    """A reply with no text and no refusal is retried, the good one that follows is used, and
    after ``max_attempts`` empties the item fails unjournaled: a rerun asks again."""
    api.arm("ONCE", "text:")
    api.arm("ALWAYS", "text:", "null-content", "text:")
    outcomes, ledger, _ = _run(api, tmp_path, ["ONCE", "ALWAYS"])
    by_text = {o.key: o for o in outcomes.values()}
    once = by_text[request_key("fake-model", _req("ONCE").messages, _req("ONCE").params)]
    always = by_text[request_key("fake-model", _req("ALWAYS").messages, _req("ALWAYS").params)]
    assert once.ok and once.content and once.attempts == 2
    assert not always.ok and always.error.startswith("empty_content")
    assert ledger.done == 1 and ledger.failed_by_reason == {"empty_content": 1}
    journaled = [json.loads(x) for x in (tmp_path / "journal.jsonl").open()]
    assert [e["key"] for e in journaled] == [once.key]
    api.reset()
    outcomes, ledger, _ = _run(api, tmp_path, ["ONCE", "ALWAYS"])
    assert api.count() == 1 and api.count("ALWAYS") == 1
    assert all(o.ok and o.content for o in outcomes.values()) and ledger.cached == 1


def test_empty_reply_journaled_by_an_older_version_is_asked_again(
    api: FakeAPI, tmp_path: Path
) -> None:
    """Journals written before empty replies were retried hold them as answers: not any more."""
    req = _req("OLD")
    key = request_key("fake-model", req.messages, req.params)
    empty = {"content": "", "refusal": None, "finish_reason": "stop", "usage": None}
    line = {"key": key, "model": "fake-model", "meta": {}, "attempts": 1, "response": empty}
    (tmp_path / "journal.jsonl").write_text(json.dumps(line) + "\n")
    with Journal(tmp_path / "journal.jsonl") as j:
        assert key not in j and j.empty_replies == 1
    outcomes, ledger, _ = _run(api, tmp_path, ["OLD"])
    assert api.count("OLD") == 1 and ledger.cached == 0
    assert outcomes[key].ok and outcomes[key].content


def test_retry_after_is_honoured(api: FakeAPI, tmp_path: Path) -> None:
    api.retry_after = "0.4"
    api.arm("RA", "429")
    t0 = time.monotonic()
    outcomes, _, _ = _run(api, tmp_path, ["RA"])
    assert time.monotonic() - t0 >= 0.4
    assert next(iter(outcomes.values())).ok


def test_timeout_is_retried(api: FakeAPI, tmp_path: Path) -> None:
    api.sleep_s = 1.0
    api.arm("SLOW", "sleep")
    outcomes, _, _ = _run(api, tmp_path, ["SLOW"], timeout_s=0.3)
    out = next(iter(outcomes.values()))
    assert out.ok and out.attempts == 2


@pytest.mark.parametrize("status", ["400", "404", "422"])
def test_client_errors_are_not_retried(api: FakeAPI, tmp_path: Path, status: str) -> None:
    api.arm("BAD", status, status, status)
    outcomes, ledger, _ = _run(api, tmp_path, ["BAD"])
    out = next(iter(outcomes.values()))
    assert not out.ok and out.error.startswith(f"http_{status}")
    assert api.count("BAD") == 1
    assert ledger.failed_by_reason == {f"http_{status}": 1}
    assert not (tmp_path / "journal.jsonl").exists()  # failures are not cached


@pytest.mark.parametrize(
    ("action", "status", "reason"),
    [
        ("401", 401, "http_401: injected 401"),
        ("403", 403, "http_403: injected 403"),
        ("quota", 429, "http_429 insufficient_quota: You exceeded your current quota"),
        ("echo-auth", 401, "http_401: bad key: Bearer ***"),
    ],
)
def test_refused_key_or_quota_stops_the_run(
    api: FakeAPI, tmp_path: Path, action: str, status: int, reason: str
) -> None:
    """A bad key or a spent quota fails every request: the run stops at the first such answer
    (no retries, nothing more sent) instead of recording each item failed, keeps what was
    answered before, and a rerun sends only the rest."""
    texts = [f"q{i}" for i in range(3)] + ["STOP"] + [f"r{i}" for i in range(40)]
    api.arm("STOP", action)
    with pytest.raises(ApiAccessError) as info:
        _run(api, tmp_path, texts, concurrency=1)
    err = info.value
    assert err.status == status and err.reason.startswith(reason)
    msg = str(err)
    assert f"{api.base_url}/chat/completions answered {reason}" in msg and "rerun" in msg
    assert SECRET not in msg and SECRET not in repr(err.args)
    # concurrency 1: the three before were answered and journaled, then nothing was sent
    assert api.count() == 4 and api.count("STOP") == 1
    with Journal(tmp_path / "journal.jsonl") as j:
        assert len(j) == 3
    api.reset()
    outcomes, ledger, _ = _run(api, tmp_path, texts, concurrency=1)
    assert ledger.cached == 3 and api.count() == len(texts) - 3 and api.paid_twice() == []
    assert all(o.ok for o in outcomes.values())


def test_run_stop_drains_concurrent_requests_unsent(api: FakeAPI, tmp_path: Path) -> None:
    """With requests in flight and queued, a 401 stops every other worker too: queued requests
    and the retries of failing ones are not sent."""
    api.delay_s = 0.05
    api.arm("RETRYING", *["500"] * 10)
    texts = ["RETRYING", "STOP"] + [f"q{i}" for i in range(200)]
    api.arm("STOP", "401")
    with pytest.raises(ApiAccessError):
        _run(api, tmp_path, texts, concurrency=4, max_attempts=10, backoff_base_s=0.2)
    # at most the four first in flight plus one round of the others: far from all 202
    assert api.count() < 12 and api.count("RETRYING") < 3


def test_bounded_attempts_then_failed_with_reason(api: FakeAPI, tmp_path: Path) -> None:
    api.arm("X", *["500"] * 10)
    outcomes, ledger, _ = _run(api, tmp_path, ["X", "fine"])
    bad = [o for o in outcomes.values() if not o.ok]
    assert len(bad) == 1 and "http_500" in bad[0].error and "3 attempts" in bad[0].error
    assert api.count("X") == 3
    assert ledger.done == 1 and ledger.failed == 1


def test_journal_cache_and_cost(api: FakeAPI, tmp_path: Path) -> None:
    texts = [f"q{i}" for i in range(5)]
    out1, led1, _ = _run(api, tmp_path, texts)
    assert led1.requests_sent == 5
    assert led1.cost_usd == pytest.approx(5 * (1000 * 2 + 200 * 10) / 1e6)
    api.reset()
    out2, led2, _ = _run(api, tmp_path, texts)
    assert api.count() == 0 and led2.requests_sent == 0 and led2.cached == 5
    assert {k: o.content for k, o in out1.items()} == {k: o.content for k, o in out2.items()}


def test_torn_journal_line_is_redone_once(api: FakeAPI, tmp_path: Path) -> None:
    texts = [f"q{i}" for i in range(4)]
    out1, _, _ = _run(api, tmp_path, texts)
    journal = tmp_path / "journal.jsonl"
    data = journal.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last_start + 25])  # kill -9 in the middle of the last line
    torn_key = json.loads(data[last_start:])["key"]
    api.reset()
    out2, led2, torn = _run(api, tmp_path, texts)
    assert torn == 1 and led2.requests_sent == 1 and led2.cached == 3
    assert (
        request_key("fake-model", api.seen[0]["messages"], {"temperature": 0.0, "max_tokens": 32})
        == torn_key
    )
    lines = journal.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 4
    assert {k: o.content for k, o in out1.items()} == {k: o.content for k, o in out2.items()}


def test_key_is_sent_but_never_written(api: FakeAPI, tmp_path: Path) -> None:
    _run(api, tmp_path, ["a"])
    assert api.auth == [f"Bearer {SECRET}"]
    assert SECRET not in (tmp_path / "journal.jsonl").read_text()
    assert SECRET not in json.dumps(_config(api).public())


def test_missing_key_env_is_a_clear_error(api: FakeAPI, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        _run(api, tmp_path, ["a"])


def test_helpers() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None
    assert cost_of({"prompt_tokens": 1_000_000, "completion_tokens": 0}, {"input": 5}) == 5.0
    with pytest.raises(ValueError, match="input"):
        ClientConfig(base_url="x", model="m", price_per_million={"inptu": 1.0})
    k1 = request_key("m", [{"role": "user", "content": "a"}], {"temperature": 0.1, "seed": 1})
    k2 = request_key("m", [{"role": "user", "content": "a"}], {"seed": 1, "temperature": 0.1})
    assert k1 == k2 != request_key("m", [{"role": "user", "content": "a"}], {"seed": 2})


def test_token_bucket_paces() -> None:
    async def go() -> float:
        bucket = TokenBucket(rate_per_minute=600, capacity=2)  # 10 per second after a burst of 2
        t0 = time.monotonic()
        for _ in range(5):
            await bucket.acquire(1)
        return time.monotonic() - t0

    assert 0.25 <= asyncio.run(go()) < 1.0


def test_journal_skips_garbage_lines(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text('{"key": "a", "response": {}}\nnot json\n{"key": "b", "response": {}}\n')
    j = Journal(p)
    assert set(j.keys()) == {"a", "b"} and j.torn_lines == 1
    j.close()


def test_requests_are_pulled_as_room_frees(api: FakeAPI, tmp_path: Path) -> None:
    """A stream of requests is consumed lazily: never more than ~3 × concurrency ahead."""
    api.delay_s = 0.01
    conc = 2
    ahead: list[int] = []
    with Journal(tmp_path / "j.jsonl") as journal:

        def stream():
            for i in range(60):
                ahead.append(i - len(journal))
                yield _req(f"q{i}")

        res = ChatClient(_config(api, concurrency=conc), journal).fill(stream(), progress=False)
    assert res.ledger.done == 60 and max(ahead) <= 3 * conc + 1


def test_journal_reads_from_disk_and_is_locked(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _run(api, tmp_path, ["a", "b"])
    with Journal(path) as j:
        assert len(j) == 2 and all(j.get(k)["response"]["content"] for k in j)
        with pytest.raises(JournalBusy, match="in use by another process"):
            Journal(path)
    Journal(path).close()  # released at close


def test_sampling_args_are_the_request_parameters_and_are_checked() -> None:
    from biomedvital.llm.sampling import SamplingArgs, SamplingConfigError

    # top_p unset is not sent: the parameters (and so every cache key) are those of old runs
    assert SamplingArgs(temperature=0.7, max_tokens=1024).params() == {
        "temperature": 0.7,
        "max_tokens": 1024,
        "seed": 0,
    }
    assert SamplingArgs(top_p=0.9).params({"grammar": "g", "seed": 3}) == {
        "temperature": 0.0,
        "max_tokens": 256,
        "seed": 3,  # extra_body wins
        "top_p": 0.9,
        "grammar": "g",
    }
    for bad, where in (
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"seed": 1.5}, "sampling.seed"),
    ):
        with pytest.raises(SamplingConfigError, match=where):
            SamplingArgs(**bad)
