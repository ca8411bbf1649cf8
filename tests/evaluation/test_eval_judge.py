"""``judge`` on the first real LLaVA-Med-Bench questions against the loopback fake chat API."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from fakeapi import SHARED, FakeAPI, fake_client, running_api  # noqa: E402

from biomedvital.evaluation.chat import score_chat  # noqa: E402
from biomedvital.evaluation.judge import judge, parse_verdict  # noqa: E402

BENCH = SHARED / "llava-med"
QUESTIONS = BENCH / "llava_med_eval_qa50_qa.jsonl"
CAPTIONS = BENCH / "llava_med_eval_qa50_fig_captions.json"
N = 5

pytestmark = pytest.mark.skipif(not QUESTIONS.is_file(), reason="LLaVA-Med-Bench files absent")


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    yield from running_api(monkeypatch)


def _first_questions() -> list[dict]:
    lines = QUESTIONS.read_text().splitlines()[:N]
    return [json.loads(x) for x in lines]


def _verdict(body: dict) -> str:
    """Scores that depend on the candidate answer: 9 for the reference, 3..8 for the model."""
    user = body["messages"][1]["content"]
    cand = user.split("[Assistant 2]\n", 1)[1].split("\n[End of Assistant 2]", 1)[0]
    return f"9 {3 + len(cand) % 6}\nAssistant 1 is grounded in the caption; Assistant 2 less so."


def _run(api: FakeAPI, tmp: Path, **kw: object) -> dict:
    answers = tmp / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": q["question_id"], "text": f"Answer {i} to the question."})
            + "\n"
            for i, q in enumerate(_first_questions())
        )
    )
    args = dict(
        client=fake_client(
            api, "judge-x", backoff_base_s=0.01, price_per_million={"input": 1.0, "output": 2.0}
        ),
        captions=CAPTIONS,
        limit=N,
        store=str(tmp / "mlruns"),
        progress=False,
    )
    args.update(kw)
    return judge(QUESTIONS, answers, tmp / "judge", **args)


def test_parse_verdict() -> None:
    assert parse_verdict("8 6\nwhy") == (8.0, 6.0)
    assert parse_verdict("8, 6") == (8.0, 6.0)
    for bad in ("", None, "8\n6", "Assistant 1: 8", "0 5", "11 3", "8 6 7"):
        assert parse_verdict(bad) is None


def test_judge_reviews_score_chat_reads(api: FakeAPI, tmp_path: Path) -> None:
    qs = _first_questions()
    api.responder = _verdict
    # question 2: unparsable once, then fine; question 4: unparsable twice -> failure
    api.arm(qs[1]["gpt4_answer"][:40], "text:Both answers are reasonable.")
    api.arm(qs[3]["gpt4_answer"][:40], "text:Good answers.", "text:I would rather not score.")
    api.arm(qs[0]["gpt4_answer"][:40], "500")  # a transient error, retried
    manifest = _run(api, tmp_path)
    assert manifest["counts"] == {
        "questions": N,
        "reviewed": N - 1,
        "failed": 1,
        "reasked": 2,
        "unparsable_after_reask": 1,
    }
    out = tmp_path / "judge"
    reviews = [json.loads(x) for x in (out / "reviews.jsonl").read_text().splitlines()]
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == [
        q["question_id"] for i, q in enumerate(qs) if i != 3
    ]
    assert failed == [{"question_id": qs[3]["question_id"], "reason": failed[0]["reason"]}]
    assert failed[0]["reason"].startswith("unparsable")
    assert "[re-asked; first reply]" in reviews[1]["result"]
    # the judge saw caption, question, both answers; never the image
    body = json.dumps(api.seen[-1])
    assert "image_url" not in body
    first = next(b for b in api.seen if qs[2]["gpt4_answer"][:40] in json.dumps(b))
    user = first["messages"][1]["content"]
    assert qs[2]["fig_caption"][:40] in user and "Answer 2 to the question." in user

    summary = score_chat(out / "reviews.jsonl", QUESTIONS, CAPTIONS)
    assert summary["n"] == N - 1
    assert str(qs[3]["question_id"]) in summary["missing_question_ids"]
    expect = sum((3 + len(f"Answer {i} to the question.") % 6) / 9 for i in (0, 1, 2, 4)) / 4
    assert summary["overall"]["relative_mean_of_ratios"] == pytest.approx(expect * 100)
    assert manifest["overall"]["relative_mean_of_ratios"] == pytest.approx(expect * 100)
    assert manifest["cost_usd"] > 0
    # 4 of the benchmark's 193 questions reviewed: marked partial everywhere it is read
    assert manifest["partial"] is True
    assert json.loads((out / "scores.json").read_text())["partial"] is True
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    mlf = MlflowClient(tracking_uri=tracking_uri(str(tmp_path / "mlruns")))
    assert mlf.get_run(manifest["mlflow_run_id"]).data.tags["partial"] == "true"

    # a rerun is answered from the journal: nothing is sent again
    n_sent = len(api.seen)
    again = _run(api, tmp_path)
    assert len(api.seen) == n_sent
    assert again["counts"] == manifest["counts"]
    assert again["ledger"]["first"]["requests_sent"] == 0


def test_answers_must_match_questions(api: FakeAPI, tmp_path: Path) -> None:
    from biomedvital.data.report import BadRecordError

    answers = tmp_path / "answers.jsonl"
    for qid, limit, problem in ((0, 3, "have no answer"), (99999, 1, "not questions")):
        answers.write_text(json.dumps({"question_id": qid, "text": "an answer"}) + "\n")
        with pytest.raises(BadRecordError, match=problem):
            judge(
                QUESTIONS,
                answers,
                tmp_path / "o",
                fake_client(api),
                limit=limit,
                store=str(tmp_path / "mlruns"),
                progress=False,
            )
    assert api.seen == []


def test_judge_refuses_batch_mode(api: FakeAPI, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="judge runs online only"):
        _run(api, tmp_path, client=fake_client(api, mode="batch"))
    assert api.seen == [] and not (tmp_path / "judge" / "journal.jsonl").exists()


def test_killed_run_resumes_without_paying_again(api: FakeAPI, tmp_path: Path) -> None:
    # A run killed after 3 of 5 verdicts leaves only its journal (and maybe a torn last line):
    # the rerun sends the 2 missing requests and nothing else, and its summary is complete.
    api.responder = _verdict
    _run(api, tmp_path, limit=3)
    out = tmp_path / "judge"
    for name in ("reviews.jsonl", "failed.jsonl", "scores.json", "manifest.json"):
        (out / name).unlink()
    with (out / "journal.jsonl").open("a") as fh:
        fh.write('{"key": "cut sho')
    n_sent = len(api.seen)
    manifest = _run(api, tmp_path)
    assert len(api.seen) - n_sent == N - 3
    assert manifest["ledger"]["first"]["requests_sent"] == N - 3
    assert manifest["torn_journal_lines"] == 1
    assert manifest["counts"]["reviewed"] == N
