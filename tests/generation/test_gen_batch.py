"""Batch mode against the fake Batch API: one job, journaled ids, restart, smaller retries,
the offline request file for vLLM's ``run_batch`` and its results imported back."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import pytest
from fakeapi import KEY_ENV, SECRET, FakeAPI, default_responder, fake_client, write_inputs

from biomedvital.generation.generate import generate
from biomedvital.generation.rate import REASK_PROMPT, rate


def _gen(api: FakeAPI, inputs: dict, out: Path, store: str, batch_results=None, **kw) -> dict:
    """``generate`` in batch mode; ``kw`` overrides the client block's settings."""
    settings = dict(
        concurrency=3,
        max_attempts=3,
        timeout_s=5,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        price_per_million={"input": 10.0, "output": 30.0},
        mode="batch",
        batch_poll_s=0.02,
    )
    settings.update(kw)
    return generate(
        out=out,
        **inputs,
        client=fake_client(api, "fake-vlm", **settings),
        vision=False,
        store=store,
        progress=False,
        batch_results=batch_results,
    )


def _events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "batch" / "batches.jsonl").open()]


def _batch_sizes(api: FakeAPI) -> list[int]:
    return [len(api.files[b["input_file_id"]].splitlines()) for b in api.batches.values()]


def _vllm(api: FakeAPI, requests: Path, results: Path) -> None:
    """What ``vllm.entrypoints.openai.run_batch`` does with a request file (same formats)."""
    rows = []
    for i, raw in enumerate(requests.read_text().splitlines()):
        line = json.loads(raw)
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        reply = api.chat(json.dumps(line["body"]), in_batch=True)
        body = json.loads(reply.payload)
        resp = {"status_code": reply.status, "request_id": f"vllm-{i}", "body": body}
        rows.append(
            {"id": f"vllm-{i}", "custom_id": line["custom_id"], "response": resp, "error": None}
        )
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_batch_job_matches_online_at_half_price(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=4)
    out = tmp_path / "batch"
    m = _gen(api, inputs, out, mlstore)
    assert m["counts"]["written"] == 4 and m["counts"]["failed"] == 0
    assert (api.uploads, api.batch_creates) == (1, 1)
    (batch,) = api.batches.values()
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert [e["event"] for e in _events(out)] == ["uploaded", "submitted", "collected"]
    assert _events(out)[1]["batch_id"] == batch["id"] == m["batch"]["batches"][0]
    entries = [json.loads(x) for x in (out / "journal.jsonl").open()]
    assert len(entries) == 4 and {e["via"] for e in entries} == {"batch"}
    # custom_id is the cache key: the same journal serves online mode, so nothing is resent
    assert {e["key"] for e in entries} == set(api.sent_keys)

    online = _gen(api, inputs, tmp_path / "online", mlstore, mode="online")
    assert (out / "candidates.jsonl").read_bytes() == (
        tmp_path / "online" / "candidates.jsonl"
    ).read_bytes()
    assert m["ledger"]["cost_usd"] == pytest.approx(online["ledger"]["cost_usd"] / 2)
    api.reset()
    again = _gen(api, inputs, out, mlstore, mode="online")
    assert api.count() == 0 and again["ledger"]["cached"] == 4
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_restart_polls_the_journaled_batch(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=3)
    out = tmp_path / "out"
    api.batch_polls_to_finish = 10_000  # the batch stays in progress
    res = _gen(api, inputs, out, mlstore, batch_wait_s=0.1)
    assert res["batch_pending"] and "rerun the same command" in res["message"]
    assert not (out / "candidates.jsonl").exists()
    assert [e["event"] for e in _events(out)] == ["uploaded", "submitted"]
    api.batch_polls_to_finish = 0
    m = _gen(api, inputs, out, mlstore)
    assert m["counts"]["written"] == 3
    assert (api.uploads, api.batch_creates) == (1, 1)  # polled and collected, not resubmitted
    # the collected answers are fresh (paid at the batch price), not journal hits as well
    led = m["ledger"]
    assert (led["done"], led["cached"], led["cached_cost_usd"]) == (3, 0, 0.0)
    assert led["cost_usd"] == pytest.approx(3 * 0.5 * (1000 * 10 + 200 * 30) / 1e6)
    again = _gen(api, inputs, out, mlstore)["ledger"]  # a rerun: journal hits only
    assert (again["done"], again["cached"], again["cost_usd"]) == (0, 3, 0.0)
    assert again["cached_cost_usd"] == pytest.approx(led["cost_usd"])


def test_a_spent_quota_stops_the_batch_run_at_once(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    """Creating the batch answered 429 ``insufficient_quota``: no retry as for a rate limit
    (every try would fail alike), a one-line ApiAccessError naming the endpoint."""
    from biomedvital.llm.errors import ApiAccessError

    inputs = write_inputs(tmp_path / "in", n_figures=2)
    api.batch_create_actions = deque(["quota", "quota", "quota"])
    with pytest.raises(ApiAccessError, match=r"/batches answered http_429"):
        _gen(api, inputs, tmp_path / "out", mlstore)
    assert api.batch_creates == 0 and len(api.batch_create_actions) == 2  # asked once


def test_create_answer_lost_or_killed_before_journaling(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=2)
    # the create call succeeds on the server but its answer is lost: found through the list
    api.batch_create_actions = deque(["lost"])
    m = _gen(api, inputs, tmp_path / "a", mlstore)
    assert m["counts"]["written"] == 2 and api.batch_creates == 1

    # killed after create, before the id was journaled: the rerun adopts the batch
    out = tmp_path / "b"
    api.batch_polls_to_finish = 10_000
    _gen(api, write_inputs(tmp_path / "in2", n_figures=2), out, mlstore, batch_wait_s=0.05)
    events = _events(out)
    (out / "batch" / "batches.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in events if e["event"] != "submitted")
    )
    api.batch_polls_to_finish = 0
    creates = api.batch_creates
    m = _gen(api, write_inputs(tmp_path / "in2", n_figures=2), out, mlstore)
    assert m["counts"]["written"] == 2 and api.batch_creates == creates
    assert any(e.get("adopted") for e in _events(out))


def test_partial_failures_go_out_again_as_a_smaller_batch(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=5, markers={1: "B500", 3: "B400"})
    api.arm("B500", "500")
    api.arm("B400", "400")
    out = tmp_path / "out"
    m = _gen(api, inputs, out, mlstore)
    assert _batch_sizes(api) == [5, 1]  # the 500 is retried alone; the 400 is not retried
    assert m["counts"]["written"] == 4 and m["counts"]["failed"] == 1
    (failed,) = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert failed["pair_id"] == "PMC3_F3" and failed["reason"].startswith("http_400")
    assert m["batch"]["rounds"] == 2 and m["ledger"]["requests_sent"] == 6
    assert not list((out / "batch").glob("*.requests.jsonl"))  # request files cleaned up


def test_expired_batch_keeps_its_answers_and_retries_the_rest(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    api.batch_expire_after = 2
    m = _gen(api, write_inputs(tmp_path / "in", n_figures=5), tmp_path / "out", mlstore)
    assert _batch_sizes(api) == [5, 3, 1] and m["counts"]["written"] == 5
    assert [b["status"] for b in api.batches.values()] == ["expired", "expired", "completed"]

    api.batches.clear()
    m = _gen(
        api, write_inputs(tmp_path / "in2", n_figures=5), tmp_path / "o2", mlstore, max_attempts=2
    )
    assert m["counts"]["written"] == 4 and m["counts"]["failed"] == 1
    (failed,) = [json.loads(x) for x in (tmp_path / "o2" / "failed.jsonl").open()]
    assert "batch expired" in failed["reason"] and "2 batch rounds" in failed["reason"]


def test_offline_request_file_round_trip(
    api: FakeAPI, tmp_path: Path, mlstore: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)  # an offline run needs no key
    inputs = write_inputs(tmp_path / "in", n_figures=4, markers={2: "V500"})
    out = tmp_path / "out"
    res = _gen(api, inputs, out, mlstore, batch_runner="file")
    requests = out / "batch" / "generate.requests.jsonl"
    assert res["batch_pending"] and res["request_file"] == str(requests)
    assert "python -m vllm.entrypoints.openai.run_batch -i" in res["message"]
    assert "--batch_results" in res["message"] and api.count() == 0
    assert len(requests.read_text().splitlines()) == 4

    api.arm("V500", "500")
    results = tmp_path / "results1.jsonl"
    _vllm(api, requests, results)
    m = _gen(api, inputs, out, mlstore, batch_runner="file", batch_results=[results])
    assert m["counts"]["written"] == 3 and m["counts"]["failed"] == 1
    assert m["batch"]["retry_file"] == str(requests)
    assert len(requests.read_text().splitlines()) == 1  # the smaller file: the 500 only

    results2 = tmp_path / "results2.jsonl"
    _vllm(api, requests, results2)
    m = _gen(api, inputs, out, mlstore, batch_runner="file", batch_results=[results, results2])
    assert m["counts"]["written"] == 4 and m["counts"]["failed"] == 0
    assert not requests.exists()
    monkeypatch.setenv(KEY_ENV, SECRET)
    api.reset()
    _gen(api, inputs, out, mlstore, mode="online")
    assert api.count() == 0


def test_rate_in_batch_mode_reasks_in_a_second_batch(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    def judge(body: dict) -> str:
        if body["messages"][-1]["content"] == REASK_PROMPT:
            return "7"
        if "NOSCORE" in json.dumps(body):
            return "Excellent work."
        return default_responder(body)

    api.responder = judge
    rows = [
        {
            "id": f"c{i}",
            "image": f"c{i}.jpg",
            "fig_caption": f"CT {i} {'NOSCORE' if i == 1 else ''}",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": f"A lesion {i}."},
            ],
        }
        for i in range(3)
    ]
    cands = tmp_path / "c.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = rate(
        cands,
        tmp_path / "out",
        client=fake_client(api, "judge", mode="batch", batch_poll_s=0.02),
        store=mlstore,
        progress=False,
    )
    assert m["counts"]["rated"] == 3 and m["counts"]["reasked"] == 1
    assert _batch_sizes(api) == [3, 1]
    ratings = [json.loads(x) for x in (tmp_path / "out" / "ratings.jsonl").open()]
    assert ratings[1]["score"] == 7 and "[re-asked]" in ratings[1]["raw"]
