"""``pairwise`` on the first real VQA-RAD test questions against the loopback fake chat API."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from fakeapi import SHARED, FakeAPI, fake_client, running_api  # noqa: E402

from biomedvital.data.report import BadRecordError  # noqa: E402
from biomedvital.evaluation.benchmarks import VQA_RAD_FILE, load_benchmark  # noqa: E402
from biomedvital.evaluation.pairwise import pairwise  # noqa: E402
from biomedvital.evaluation.winrate import read_verdicts  # noqa: E402

DATA = SHARED / "vqa-rad" / VQA_RAD_FILE
N = 7
ODD = "An answer the judge cannot decide on."

pytestmark = pytest.mark.skipif(not DATA.is_file(), reason="VQA-RAD files absent")


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    yield from running_api(monkeypatch)


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def _verdict(body: dict) -> str:
    """The assistant whose answer equals the reference wins; both or neither: a tie."""
    user = body["messages"][1]["content"]
    ref = _between(user, "[Reference answer]\n", "\n\n")
    a = _between(user, "[Assistant A]\n", "[End of Assistant A]") == ref
    b = _between(user, "[Assistant B]\n", "[End of Assistant B]") == ref
    label = "A" if a and not b else "B" if b and not a else "C"
    return f"Compared with the reference, my verdict is\n[[{label}]]"


def _answers(tmp: Path) -> tuple[Path, Path, list]:
    """A right on i % 3 in (1, 2); B right on i % 3 == 2; question 4: A's answer is odd."""
    items = load_benchmark("vqa_rad", DATA, "test")
    a_lines, b_lines = [], []
    for i, it in enumerate(items):
        a = ODD if i == 4 else it.answer if i % 3 else "not sure"
        b = it.answer if i % 3 == 2 else "cannot tell"
        a_lines.append(json.dumps({"question_id": int(it.question_id), "text": a}) + "\n")
        b_lines.append(json.dumps({"question_id": it.question_id, "text": b}) + "\n")
    pa, pb = tmp / "a.jsonl", tmp / "b.jsonl"
    pa.write_text("".join(a_lines))
    pb.write_text("".join(reversed(b_lines)))  # joined by id, not by position
    return pa, pb, items


def _run(api: FakeAPI, tmp: Path, a: Path, b: Path) -> dict:
    return pairwise(
        DATA,
        a,
        b,
        tmp / "pairwise",
        client=fake_client(
            api, "judge-x", backoff_base_s=0.01, price_per_million={"input": 1.0, "output": 2.0}
        ),
        limit=N,
        n_boot=200,
        store=str(tmp / "mlruns"),
        progress=False,
    )


def test_pairwise_win_rate(api: FakeAPI, tmp_path: Path) -> None:
    a, b, items = _answers(tmp_path)
    api.responder = _verdict
    api.arm(ODD, "text:Both have merit.", "text:Hard to say.")  # no marker, both orders
    api.arm(items[0].question, "500")  # transient, retried
    manifest = _run(api, tmp_path, a, b)
    out = tmp_path / "pairwise"
    pairs = read_verdicts(out / "verdicts.jsonl")
    assert list(pairs) == [it.question_id for it in items[:N]]
    # i % 3 == 2 (i = 2, 5): both answers are the reference, the same text: a tie, not asked
    assert manifest["counts"] == {
        "questions": N,
        "calls": 2 * (N - 2),
        "identical_answers": 2,
        "failed_calls": 0,
    }
    asked = {_between(x["messages"][1]["content"], "[Question]\n", "\n\n") for x in api.seen}
    assert items[2].question.strip() not in asked and items[1].question.strip() in asked
    # i = 0..6: tie, win, tie, tie, failed(4), tie, tie
    res = manifest["win_rate"]
    assert (res["n"], res["wins"], res["ties"], res["losses"]) == (N - 1, 1, 5, 0)
    assert res["failed_question_ids"] == [items[4].question_id]
    assert res["win_rate_half_ties"] == pytest.approx((1 + 2.5) / 6 * 100)
    assert res["position_consistency"] == pytest.approx(100.0)
    assert res["n_identical"] == 2
    # per answer type: the verdicts carry each question's category, and the counts add up
    cats = {it.question_id: it.answer_type for it in items[:N]}
    assert {r["category"] for r in pairs_records(out)} <= {"open", "closed"}
    by_cat = res["by_category"]
    assert sum(c["n"] + c["n_failed"] for c in by_cat.values()) == N
    for cat, c in by_cat.items():
        assert c["n"] + c["n_failed"] == sum(1 for t in cats.values() if t == cat)
    assert sum(c["wins"] for c in by_cat.values()) == 1
    assert manifest["partial"] is True  # limit: 7 of the 451 test questions
    assert json.loads((out / "win_rate.json").read_text())["wins"] == 1
    assert manifest["cost_usd"] > 0

    # both orders were asked, with the answers swapped, and the ground truth was shown
    q1 = [
        b
        for b in api.seen
        if _between(b["messages"][1]["content"], "[Question]\n", "\n\n")
        == items[1].question.strip()
    ]
    shown = {_between(x["messages"][1]["content"], "[Assistant A]\n", "[End of") for x in q1}
    assert shown == {items[1].answer, "cannot tell"}
    assert all(f"[Reference answer]\n{items[1].answer}" in x["messages"][1]["content"] for x in q1)
    assert "image_url" not in json.dumps(api.seen)

    # a rerun is answered from the journal
    n_sent = len(api.seen)
    again = _run(api, tmp_path, a, b)
    assert len(api.seen) == n_sent
    assert again["win_rate"]["wins"] == res["wins"]

    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(str(tmp_path / "mlruns")))
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["pairwise/wins"] == 1
    assert run.data.metrics["pairwise/n_failed"] == 1
    assert run.data.tags["partial"] == "true"


def pairs_records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]


def test_answers_must_match_questions(api: FakeAPI, tmp_path: Path) -> None:
    a, b, _ = _answers(tmp_path)
    lines = b.read_text().splitlines()
    b.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(BadRecordError, match="have no prediction"):
        _run(api, tmp_path, a, b)
    b.write_text("\n".join([*lines, json.dumps({"question_id": 10**9, "text": "x"})]) + "\n")
    with pytest.raises(BadRecordError, match="not questions"):
        _run(api, tmp_path, a, b)
    b.write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(BadRecordError, match="duplicate question_id"):
        _run(api, tmp_path, a, b)
    assert api.seen == []


def test_pairwise_refuses_batch_mode(api: FakeAPI, tmp_path: Path) -> None:
    a, b, _ = _answers(tmp_path)
    with pytest.raises(ValueError, match="pairwise runs online only"):
        pairwise(DATA, a, b, tmp_path / "pairwise", fake_client(api, mode="batch"), limit=1)
    assert api.seen == []
