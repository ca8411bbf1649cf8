"""``rate --unit conversation | first_exchange``: the paper's unit scores the first question and
its answer on the released criteria; ``conversation`` stays byte for byte what it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fakeapi import FakeAPI, fake_client

from biomedvital.cli import ConfigError, main
from biomedvital.data.demo import demo
from biomedvital.generation.rate import (
    EXCHANGE_PROMPT,
    JUDGE_PROMPT,
    RATING_CRITERIA,
    REASK_PROMPT,
    SCORE_FORMAT,
    judge_messages,
    judge_prompt,
    parse_score,
    rate,
)

PAPER_RATE = Path(__file__).resolve().parents[2] / "conf" / "paper" / "rate.yaml"

# The released scorer's criteria (reference-method.md, stage 2): one lost from the prompt fails.
CRITERIA_IDS = {
    "scope",  # scope and relevance
    "fine_tuning_value",
    "alignment",  # the answer answers the question asked
    "accuracy",
    "utility",
    "image_use",
    "clarity",  # clarity, detail and medical precision
}

QA = [("What modality is this?", "An axial CT slice."), ("Is there a mass?", "No mass is seen.")]


def _user_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(p["text"] for p in messages[1]["content"] if p["type"] == "text")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def test_conversation_unit_is_unchanged() -> None:
    """The default unit's prompt and request are the ones earlier journals were keyed on."""
    assert hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest() == (
        "449964f36942c2b300129961e1785d1acd483ff14e4d03159c0876865802ae2c"
    )
    args = ("Cap <x>", "Ment", [("Q1?", "A1."), ("Q2?", "A2.")], "data:image/png;base64,AAA")
    pinned = "dc571a848e3fa40e1bb27c134b7066738c325110827f4b0e82e691e662af0444"
    assert _digest(judge_messages(*args)) == pinned
    assert _digest(judge_messages(*args, unit="conversation")) == pinned


def test_exchange_prompt_carries_each_released_criterion() -> None:
    assert {cid for cid, _ in RATING_CRITERIA} == CRITERIA_IDS
    for cid, phrase in RATING_CRITERIA:
        assert phrase in EXCHANGE_PROMPT, cid
    assert judge_prompt("first_exchange") == EXCHANGE_PROMPT != JUDGE_PROMPT
    # score first, reasons after: the format parse_score reads, as for the conversation unit
    assert EXCHANGE_PROMPT.endswith(SCORE_FORMAT) and JUDGE_PROMPT.endswith(SCORE_FORMAT)
    assert parse_score("7\nClear and accurate.") == 7


def test_first_exchange_holds_caption_mentions_and_one_question_with_its_answer() -> None:
    msgs = judge_messages(
        "Axial CT of the chest.", "Figure 2 shows the chest.", QA, "data:x", "first_exchange"
    )
    assert msgs[0] == {"role": "system", "content": EXCHANGE_PROMPT}
    text = _user_text(msgs)
    assert "Axial CT of the chest." in text and "Figure 2 shows the chest." in text
    assert "Question: What modality is this?\nAnswer: An axial CT slice." in text
    assert "Is there a mass?" not in text and "No mass is seen." not in text
    assert text.count("Question:") == 1 and text.count("Answer:") == 1
    assert msgs[1]["content"][-1] == {"type": "image_url", "image_url": {"url": "data:x"}}
    assert judge_messages("c", "m", QA, None, "first_exchange")[1]["content"][-1]["type"] == "text"
    # the whole conversation under the default unit
    assert "No mass is seen." in _user_text(judge_messages("c", "m", QA))


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    figs = tmp_path / "figures.jsonl"
    cands = tmp_path / "cands.jsonl"
    rows_f, rows_c = [], []
    for i in range(2):
        rows_f.append(
            {
                "pair_id": f"p{i}",
                "fig_caption": f"CT caption {i}.",
                "in_text_mention": f"Mention {i}.",
            }
        )
        rows_c.append(
            {
                "id": f"c{i}",
                "image": f"c{i}.jpg",
                "pair_id": f"p{i}",
                "conversations": [
                    {"from": "human", "value": f"<image>\nFirst question {i}?"},
                    {"from": "gpt", "value": f"First answer {i}."},
                    {"from": "human", "value": f"Second question {i}?"},
                    {"from": "gpt", "value": f"Second answer {i}."},
                ],
            }
        )
    figs.write_text("".join(json.dumps(r) + "\n" for r in rows_f))
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows_c))
    return cands, figs


def test_rate_first_exchange_sends_the_first_pair_and_keys_it_apart(
    api: FakeAPI, tmp_path: Path, mlstore: str
) -> None:
    """Only the first exchange is sent; a re-ask keeps the unit's prompt; the manifest records
    the unit; the other unit's requests are new ones, never the cached scores of this one."""

    def responder(body: dict[str, Any]) -> str:
        last = body["messages"][-1]["content"]
        if last == REASK_PROMPT:
            return "6"
        return "no number here" if "First question 1?" in json.dumps(last) else "8\nGood."

    api.responder = responder
    cands, figs = _inputs(tmp_path)
    client = fake_client(api, "judge", max_attempts=2, timeout_s=5)
    args = dict(figures=figs, client=client, store=mlstore, progress=False)
    m = rate(cands, tmp_path / "out", unit="first_exchange", **args)
    assert m["counts"]["rated"] == 2 and m["counts"]["reasked"] == 1
    assert m["config"]["unit"] == "first_exchange"
    assert len(api.seen) == 3
    for body in api.seen:
        assert body["messages"][0]["content"] == EXCHANGE_PROMPT
        sent = json.dumps(body["messages"][1]["content"])
        assert "First question" in sent and "First answer" in sent and "CT caption" in sent
        assert "Second question" not in sent and "Second answer" not in sent
    ratings = [json.loads(x) for x in (tmp_path / "out" / "ratings.jsonl").open()]
    assert [r["score"] for r in ratings] == [8, 6]

    m2 = rate(cands, tmp_path / "out", unit="conversation", **args)
    assert m2["config"]["unit"] == "conversation"
    assert m2["config"]["judge_prompt_version"] != m["config"]["judge_prompt_version"]
    new = api.seen[3:]
    assert len(new) >= 2 and all(b["messages"][0]["content"] == JUDGE_PROMPT for b in new)
    sent_new = [json.dumps(b["messages"][1]["content"]) for b in new]
    # requests run concurrently: their order is not the candidates' order
    for i in (0, 1):
        assert any(f"Second answer {i}." in s for s in sent_new), i


def test_a_bad_unit_is_one_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unit must be one of conversation, first_exchange"):
        rate(tmp_path / "absent.jsonl", tmp_path / "o", fake_client(FakeAPI()), unit="pair")
    with pytest.raises(ConfigError) as err:
        main(["rate", "--config", str(PAPER_RATE), "--unit", "pair", "--dry_run", "true"])
    assert str(err.value) == (
        "rate: the command line: unit must be one of 'conversation', 'first_exchange', got 'pair'"
    )


def test_paper_config_dry_run_prints_one_question_and_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rate --config conf/paper/rate.yaml`` on the demo data (its own paths for the paper's
    absolute image and clinician-pair paths) shows the first exchange's prompt."""
    monkeypatch.chdir(tmp_path)
    demo(out_dir="data/demo")
    first = json.loads(Path("data/demo/candidates.jsonl").read_text().splitlines()[0])
    (q1, a1), (q2, a2) = (
        (first["conversations"][i]["value"], first["conversations"][i + 1]["value"]) for i in (0, 2)
    )
    main(
        [
            "rate",
            "--config", str(PAPER_RATE),
            "--candidates", "data/demo/candidates.jsonl",
            "--figures", "data/demo/figures.jsonl",
            "--image_root", "data/demo/images",
            "--preferences", "data/demo/preferences.jsonl",
            "--dry_run", "true",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    user = out.split("--- user ---\n", 1)[1].split("\n\n", 1)[0]
    assert EXCHANGE_PROMPT in out
    assert user.count("Question:") == 1 and user.count("Answer:") == 1
    assert f"Question: {q1.replace('<image>', '').strip()}\nAnswer: {a1}" in user
    assert q2 not in user and a2 not in user
    assert "[image " in user
