"""The reply parser against real conversations and the reply shapes models really produce.

The real files are conversations that LLaVA-Med and BioMed-VITAL kept (clinician-picked
demonstrations, GPT-4 reference answers) and real model answers. Filters that reject what those
projects kept are over-broad; the golden counts below pin how many each filter rejects.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeapi import SHARED

from biomedvital.data import read_demonstrations
from biomedvital.generation.parse import (
    DroppedExchange,
    FlaggedAnswers,
    Rejected,
    parse_conversation,
    parse_pairs,
)
from biomedvital.generation.prompts import render_conversation

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")

QS = ("What modality is this?", "Which organ is shown?", "Is there a lesion?", "How large?")
AS = ("A contrast-enhanced CT.", "The liver.", "Yes, a hypodense lesion.", "About 3 cm.")


def _conv(sep: str = "\n", q: str = "User: {}", a: str = "Assistant: {}") -> str:
    return sep.join(f"{q.format(x)}{sep}{a.format(y)}" for x, y in zip(QS, AS, strict=True))


def _reason(text: str, flagged: FlaggedAnswers = "reject", **kw: int) -> str:
    """The reply's fate; by default under ``reject``, so that the golden counts below pin what
    each filter flags (under ``drop_exchange`` a flag costs one exchange, not the reply)."""
    try:
        parse_conversation(text, flagged=flagged, **kw)
    except Rejected as e:
        return e.reason
    return "kept"


def _values(text: str) -> list[str]:
    turns = parse_conversation(text)
    return [t["value"].removeprefix("<image>\n") for t in turns]


# ------------------------------------------------------------------ real data: golden counts


def _demo_outcomes(path: Path) -> Counter[str]:
    """Each demonstration rendered as the model is shown it (and asked to write)."""
    demos = read_demonstrations(path)
    return Counter(
        _reason(render_conversation(d), min_exchanges=min(4, len(d.conversations) // 2))
        for d in demos
    )


def _raw_demo_text(demo: dict[str, object]) -> str:
    """``User:``/``Assistant:`` text of a raw demonstration record (LLaVA-Med's file has
    plain-string mentions, which the project's ``Demonstration`` does not read)."""
    turns = demo["conversations"]
    assert isinstance(turns, list)
    return "\n".join(
        f"{'User' if t['from'] == 'human' else 'Assistant'}: {t['value']}" for t in turns
    )


@needs_shared
def test_biomedvital_demonstrations_mostly_pass() -> None:
    """58 clinician-picked conversations. A bare-word ``context`` filter over questions and
    answers rejected 19 (and ``caption`` one more, for a question); the six left cite the
    supplied text in an answer ("According to the context, the MRI was performed...")."""
    got = _demo_outcomes(SHARED / "biomed-vital" / "doctor_few_shot_examples.json")
    assert got == {"kept": 52, "mentions_context": 6}


@needs_shared
def test_biomedvital_demonstrations_drop_flagged_exchanges() -> None:
    """Under ``drop_exchange`` (LLaVA-Med's way) a demonstration citing the context in one
    answer of several loses that exchange only; the ones left short of their exchanges are
    still rejected, and every exchange taken out is reported."""
    demos = read_demonstrations(SHARED / "biomed-vital" / "doctor_few_shot_examples.json")
    fates: Counter[str] = Counter()
    dropped: list[DroppedExchange] = []
    for d in demos:
        need = min(4, len(d.conversations) // 2)
        try:
            parse_conversation(render_conversation(d), need, dropped=dropped)
            fates["kept"] += 1
        except Rejected as e:
            fates[e.reason] += 1
    assert fates == {"kept": 53, "mentions_context": 5}
    assert [x.reason for x in dropped] == ["mentions_context"]
    assert "context" in dropped[0].answer.lower()


@needs_shared
def test_demonstration_with_two_answers_in_a_row_renders_alternating() -> None:
    """Demos 34 and 49 hold two answers in a row; the prompt must not show the model a
    non-alternating layout (it would copy it and be rejected)."""
    demos = read_demonstrations(SHARED / "biomed-vital" / "doctor_few_shot_examples.json")
    demo = next(d for d in demos if str(d.id) == "34")
    text = render_conversation(demo)
    assert "\nAssistant: Based on the abnormalities" not in text
    turns = parse_conversation(text)
    assert len(turns) == 8 and [t["from"] for t in turns] == ["human", "gpt"] * 4
    assert turns[5]["value"].count("\n") == 1  # both answers kept, one after the other


@needs_shared
def test_llava_med_demonstrations_all_pass() -> None:
    """LLaVA-Med's 8 demonstrations answer "In this context, the X-ray is taken to..." and
    "In the context of the CT scan provided, ...": ordinary wording (2 were rejected)."""
    demos = json.loads((SHARED / "llava-med" / "instruct_few_shot_examples.json").read_text())
    got = Counter(
        _reason(_raw_demo_text(d), min_exchanges=len(d["conversations"]) // 2) for d in demos
    )
    assert got == {"kept": 8}


def _single(path: Path, answer_key: str) -> Counter[str]:
    rows = [json.loads(x) for x in path.open() if x.strip()]
    out: Counter[str] = Counter()
    for r in rows:
        question = str(r.get("text" if answer_key == "gpt4_answer" else "prompt"))
        question = question.replace("<image>", "").strip()
        out[_reason(f"User: {question}\nAssistant: {r[answer_key]}", min_exchanges=1)] += 1
    return out


@needs_shared
def test_gpt4_reference_answers() -> None:
    """LLaVA-Med-Bench's 193 GPT-4 answers: 19 were rejected for the word "context" ("in the
    context of a liver biopsy", "providing context for the size"); left: the two that cite the
    context ("The tumor mentioned in the context is...") and GPT-4's one real apology."""
    got = _single(SHARED / "llava-med" / "llava_med_eval_qa50_qa.jsonl", "gpt4_answer")
    assert got == {"kept": 190, "mentions_context": 2, "refusal": 1}


@needs_shared
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("answer_file1.jsonl", {"kept": 179, "refusal": 11, "mentions_context": 3}),
        (
            "llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json",
            {"kept": 174, "refusal": 17, "mentions_context": 2},
        ),
        ("answer-file.jsonl", {"kept": 434, "refusal": 14, "mentions_caption": 3}),
        ("answer-file-llava-zeorshot.jsonl", {"kept": 449, "refusal": 1, "mentions_context": 1}),
    ],
)
def test_real_model_answers(name: str, expected: dict[str, int]) -> None:
    """Real model answers: every "As an AI, I cannot view the actual image" and "I'm sorry, I
    cannot see the image" is still a refusal after the refusal filter was narrowed."""
    assert _single(SHARED / "llava-med" / name, "text") == expected


# ------------------------------------------------------------------ content filters


@pytest.mark.parametrize(
    "question",
    [
        "What does consolidation mean in this context?",
        "What does the caption mean by 'infected lymphocele'?",
        "Is there any other condition mentioned in the context?",
    ],
)
def test_questions_are_not_filtered(question: str) -> None:
    """LLaVA-Med filters answers only; clinicians kept such questions (BioMed-VITAL demos)."""
    assert _reason(_conv().replace(QS[1], question)) == "kept"


@pytest.mark.parametrize(
    "answer",
    [
        "In the context of a liver biopsy, confluent necrosis means extensive cell death.",
        "In this context, the X-ray is taken to check the tube position.",
        "The ribs provide context for the size of the mass.",
        "Without further clinical context, other anomalies are hard to exclude.",
        "I cannot see any fracture line; the cortex is intact.",
        "I can't identify a pneumothorax on this radiograph.",
        "No, I am unable to identify any calcification in the mass.",
    ],
)
def test_ordinary_clinical_answers_pass(answer: str) -> None:
    assert _reason(_conv().replace(AS[2], answer)) == "kept"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("According to the context provided, the cord is intact.", "mentions_context"),
        ("According to the context, the MRI confirmed recurrence.", "mentions_context"),
        ("The tumor mentioned in the context is a renal cell carcinoma.", "mentions_context"),
        ("The context mentions a solid pseudopapillary tumor.", "mentions_context"),
        ("Considering the provided context, the surgery worked.", "mentions_context"),
        ("Based on the image and its context, OGI is an ocular globe injury.", "mentions_context"),
        ("Based on the figure caption, it is an infarct.", "mentions_caption"),
        ("I cannot actually see the image, but it may be a CT.", "refusal"),
        ("I'm unable to view the image directly.", "refusal"),
        ("As an AI, I cannot view the actual image.", "refusal"),
    ],
)
def test_giveaways_and_refusals_in_answers_rejected(answer: str, reason: str) -> None:
    assert _reason(_conv().replace(AS[2], answer)) == reason


def test_pairs_filter_answers_only() -> None:
    text = (
        "Question: What does hyperintense mean in this context?\n"
        "Answer A: Brighter than the surrounding tissue.\nAnswer B: Bright on T2."
    )
    assert parse_pairs(text)[0].question.endswith("in this context?")
    with pytest.raises(Rejected) as e:
        parse_pairs(text.replace("Bright on T2.", "The caption says bright."))
    assert e.value.reason == "mentions_caption"


# ------------------------------------------------------------------ reply shapes


def test_crlf_does_not_stay_inside_answers() -> None:
    text = _conv("\r\n").replace(AS[0], "A CT.\r\nThe arterial phase.")
    assert _values(text)[1] == "A CT.\nThe arterial phase."


def test_lone_cr_line_endings_split_turns() -> None:
    assert _values(_conv("\r")) == [v for pair in zip(QS, AS, strict=True) for v in pair]


def test_code_fence_not_in_last_answer() -> None:
    for fence in ("```", "```text"):
        assert _values(f"{fence}\n{_conv()}\n```\n")[-1] == AS[-1]


def test_whole_line_bold_label() -> None:
    """A bolded line ("**User: What is shown?**"): the closing marker is not part of the question."""
    values = _values(_conv(q="**User: {}**", a="**Assistant:** {}"))
    assert values[0] == QS[0] and values[1] == AS[0]
    # bold inside a question stays
    values = _values(_conv().replace(QS[0], "Is the **left** lobe involved?"))
    assert values[0] == "Is the **left** lobe involved?"


def test_markdown_heading_labels() -> None:
    assert _values(_conv(q="### User: {}", a="### Assistant: {}"))[-1] == AS[-1]


def test_trailing_empty_answer_is_dropped_like_unanswered_question() -> None:
    assert len(parse_conversation(_conv() + "\nUser: Anything else?\nAssistant:")) == 8
    pairs = "Question: q1?\nAnswer A: a\nAnswer B: b\nQuestion: q2?\nAnswer A: x\nAnswer B:"
    assert [it.question for it in parse_pairs(pairs)] == ["q1?"]
    # an empty answer in the middle still rejects
    with pytest.raises(Rejected, match="empty_turn"):
        parse_conversation(_conv().replace(AS[1], ""))


def test_numbered_question_tags_in_pairs() -> None:
    text = "\n".join(
        f"**Question {i + 1}:** {q}\nAnswer A: {a}\nAnswer B: {a} Probably."
        for i, (q, a) in enumerate(zip(QS, AS, strict=True))
    )
    items = parse_pairs(text)
    assert [it.question for it in items] == list(QS)
    assert items[0].answers == [AS[0], AS[0] + " Probably."]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda turns: json.dumps(turns),
        lambda turns: "```json\n" + json.dumps({"conversations": turns}, indent=2) + "\n```",
        lambda turns: json.dumps(
            [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in turns
            ]
        ),
    ],
)
def test_json_reply(wrap: Callable[[list[dict[str, str]]], str]) -> None:
    turns = [
        {"from": role, "value": v}
        for q, a in zip(QS, AS, strict=True)
        for role, v in (("human", q), ("gpt", a))
    ]
    out = parse_conversation(wrap(turns))
    assert [t["value"] for t in out] == [f"<image>\n{QS[0]}", *[t["value"] for t in turns][1:]]
    # the same filters apply
    turns[3]["value"] = "As the caption says, the liver."
    with pytest.raises(Rejected, match="mentions_caption"):
        parse_conversation(wrap(turns))


def test_json_that_is_not_a_conversation_is_no_turns() -> None:
    for text in ('{"answer": "CT"}', "[1, 2]", '[{"from": "doctor", "value": "x"}]'):
        with pytest.raises(Rejected, match="no_turns"):
            parse_conversation(text)


# ------------------------------------------------------------------ flagged answers


def test_flagged_exchange_is_dropped_and_reported() -> None:
    text = _conv() + "\nUser: What does it show?\nAssistant: The caption says a liver lesion."
    dropped: list[DroppedExchange] = []
    turns = parse_conversation(text, 4, dropped=dropped)
    assert len(turns) == 8 and "caption" not in json.dumps(turns)
    assert turns[0]["value"].startswith("<image>\n")
    assert dropped == [
        DroppedExchange(
            "mentions_caption", "What does it show?", "The caption says a liver lesion."
        )
    ]
    # the same reply under reject, or when the drop leaves too few exchanges: rejected
    assert _reason(text) == "mentions_caption"
    kept: list[DroppedExchange] = []
    with pytest.raises(Rejected) as info:
        parse_conversation(text, 5, dropped=kept)
    assert info.value.reason == "mentions_caption" and "1 of 5 exchanges" in info.value.detail
    assert kept == []  # a rejected reply reports its rejection, not drops


def test_flagged_answers_keep_leaves_every_exchange_and_reports_each_flag() -> None:
    """``keep`` (BioMed-VITAL's released script) trains on flagged answers: nothing is taken out
    or rejected, and each flagged answer is reported with ``kept`` set (even a reply of
    refusals, which the other modes reject)."""
    text = _conv() + "\nUser: What does it show?\nAssistant: The caption says a liver lesion."
    found: list[DroppedExchange] = []
    turns = parse_conversation(text, 5, flagged="keep", dropped=found)
    assert len(turns) == 10 and turns[-1]["value"] == "The caption says a liver lesion."
    assert found == [
        DroppedExchange(
            "mentions_caption", "What does it show?", "The caption says a liver lesion.", True
        )
    ]
    refusals = "\n".join(f"User: {q}\nAssistant: I'm sorry, I cannot see the image." for q in QS)
    found = []
    assert len(parse_conversation(refusals, 1, flagged="keep", dropped=found)) == 2 * len(QS)
    assert [d.reason for d in found] == ["refusal"] * len(QS) and all(d.kept for d in found)
    pairs = (
        "Question: Any lesion?\nAnswer A: As the caption notes, yes.\n"
        "Answer B: I cannot see the image.\n"
    )
    found = []
    (item,) = parse_pairs(pairs, 1, flagged="keep", dropped=found)
    assert item.answers[0] == "As the caption notes, yes."
    assert [d.reason for d in found] == ["mentions_caption", "refusal"]  # one per answer
    with pytest.raises(ValueError, match="flagged_answers must be one of .*'drop'"):
        parse_conversation(text, 1, flagged="drop")  # type: ignore[arg-type]


def test_reply_of_refusals_is_rejected_as_refusal() -> None:
    text = "\n".join(f"User: {q}\nAssistant: I'm sorry, I cannot see the image." for q in QS)
    assert _reason(text, flagged="drop_exchange", min_exchanges=1) == "refusal"


def test_flagged_question_dropped_from_answer_pairs() -> None:
    text = (
        "Question: What organ?\nAnswer A: The liver.\nAnswer B: The spleen.\n"
        "Question: Any lesion?\nAnswer A: As the caption notes, yes.\nAnswer B: No.\n"
    )
    dropped: list[DroppedExchange] = []
    items = parse_pairs(text, 1, dropped=dropped)
    assert [it.question for it in items] == ["What organ?"]
    assert [(d.reason, d.question) for d in dropped] == [("mentions_caption", "Any lesion?")]
    with pytest.raises(Rejected, match="mentions_caption"):
        parse_pairs(text, 1, flagged="reject")
