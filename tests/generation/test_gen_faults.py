"""30 % of API calls fail (429 with Retry-After, 500, timeouts, resets, malformed bodies, empty
choices, refusals): every item ends done or failed with its reason, in bounded time, and a later
rerun sends exactly the failed items again (counted on the server)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fakeapi import RANDOM_FAULTS, FakeAPI, fake_client, write_candidates, write_inputs

from biomedvital.generation.generate import generate
from biomedvital.generation.rate import rate

N = 40
BOUND_S = 30.0
"""Per item at most 2 attempts × (0.25 s timeout + 0.05 s back-off); 40 items at concurrency 8."""

SETTINGS = dict(
    concurrency=8, max_attempts=2, timeout_s=0.25, backoff_base_s=0.01, backoff_max_s=0.05
)
"""The client block's settings: short timeouts and back-off."""


def _faulty(api: FakeAPI, seed: int) -> None:
    api.random_faults(0.3, seed=seed)
    api.sleep_s = 0.6  # longer than the timeout: a timeout
    api.retry_after = "0.05"


def test_generate_under_random_faults(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    inputs = write_inputs(tmp_path / "in", n_figures=N)
    out = tmp_path / "out"
    _faulty(api, seed=3)
    t0 = time.monotonic()
    client = fake_client(api, **SETTINGS)
    m = generate(out=out, **inputs, client=client, vision=False, store=mlstore, progress=False)
    assert time.monotonic() - t0 < BOUND_S
    injected = sum(api.faults_injected.values())
    assert set(api.faults_injected) == set(RANDOM_FAULTS)
    assert 0.2 < injected / api.n_requests < 0.4

    ids = {f"PMC{i}_F{i}" for i in range(N)}
    written = {json.loads(x)["id"] for x in (out / "candidates.jsonl").open()}
    failed = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert all(f["reason"] for f in failed)
    assert written | {f["pair_id"] for f in failed} == ids
    assert len(written) + len(failed) == N  # each item once: done or failed
    request_failed = [f for f in failed if f["stage"] == "request"]
    assert request_failed and m["counts"]["failed"] == len(request_failed)
    assert {f["reason"] for f in failed if f["stage"] == "parse"} <= {"refusal"}

    api.random_faults(0)
    api.reset()
    m2 = generate(out=out, **inputs, client=client, vision=False, store=mlstore, progress=False)
    assert sorted(api.sent_keys) == sorted(f["key"] for f in request_failed)
    assert m2["counts"]["failed"] == 0 and api.paid_twice() == []


def test_rate_under_random_faults(api: FakeAPI, tmp_path: Path, mlstore: str) -> None:
    cands = write_candidates(tmp_path / "c.jsonl", N)
    out = tmp_path / "out"
    _faulty(api, seed=5)
    t0 = time.monotonic()
    client = fake_client(api, "judge", **SETTINGS)
    m = rate(cands, out, client=client, store=mlstore, progress=False)
    assert time.monotonic() - t0 < BOUND_S
    rated = [json.loads(x)["candidate_id"] for x in (out / "ratings.jsonl").open()]
    failed = [json.loads(x) for x in (out / "failed.jsonl").open()]
    assert all(f["reason"] for f in failed)
    assert sorted(rated + [f["id"] for f in failed]) == sorted(f"c{i}" for i in range(N))
    retryable = [f for f in failed if not f["reason"].startswith("unparsable_score")]
    assert retryable and m["counts"]["reasked"] > 0  # refusals were re-asked

    api.random_faults(0)
    api.reset()
    m2 = rate(cands, out, client=client, store=mlstore, progress=False)
    assert api.n_requests == len(retryable)  # only the failed items are asked again
    assert m2["counts"]["failed"] == len(failed) - len(retryable)
