"""Turn a generator's text into LLaVA conversations or answer pairs, rejecting unusable output.

Unlike the released parser, which keeps only lines that start with a role tag (cutting every
multi-line answer short), a turn here runs from its tag to the next tag, so lists and paragraphs
survive. Rejections carry a reason so a run can report how much it lost and why:

* ``empty_output`` - no text at all;
* ``no_turns`` - no role tag found;
* ``not_alternating`` - two questions or two answers in a row;
* ``empty_turn`` - a tag with nothing after it;
* ``too_few_turns`` - fewer complete exchanges than required;
* ``refusal`` - the model declined (an API refusal or an apology instead of content);
* ``mentions_caption`` / ``mentions_context`` - the text gives away that the model read a caption
  or context rather than the image (LLaVA-Med drops these too);
* ``identical_answers`` - (answer pairs) both answers to a question are the same;
* ``truncated`` - the reply was cut off by ``max_tokens`` (``finish_reason: length``): its last
  answer is half-written, and a parser cannot tell (set by ``generate``, not by the parsers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from biomedvital.data.records import IMAGE_TOKEN

REJECT_REASONS = (
    "empty_output",
    "no_turns",
    "not_alternating",
    "empty_turn",
    "too_few_turns",
    "refusal",
    "mentions_caption",
    "mentions_context",
    "identical_answers",
    "truncated",
)

# A tag at the start of a line, optionally bulleted, numbered or in markdown bold:
# "User:", "**Assistant:**", "1. User:", "- Question:".
_PREFIX = r"^[ \t]*(?:[-*•][ \t]*|\d+[.)][ \t]*)?(?:\*\*|__)?[ \t]*"
_SUFFIX = r"[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?"
_CONV_TAGS = re.compile(
    _PREFIX + r"(?P<tag>user|human|assistant|gpt)" + _SUFFIX, re.IGNORECASE | re.MULTILINE
)
_PAIR_TAGS = re.compile(
    _PREFIX
    + r"(?P<tag>question|answer[ \t]*a|answer[ \t]*b|answer[ \t]*1|answer[ \t]*2)"
    + _SUFFIX,
    re.IGNORECASE | re.MULTILINE,
)
_ROLE = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
_PAIR_ROLE = {"question": "q", "answera": "a", "answer1": "a", "answerb": "b", "answer2": "b"}

_REFUSAL = re.compile(
    r"\b(?:i['’]?m sorry|i am sorry|i apologi[sz]e|i (?:cannot|can['’]?t|am unable to|won['’]?t) "
    r"(?:help|assist|provide|comply|analy[sz]e|view|see|interpret|identify|do that)|"
    r"as an ai(?: language model)?|i['’]?m (?:not able|unable) to)",
    re.IGNORECASE,
)
_CAPTION = re.compile(r"\bcaptions?\b", re.IGNORECASE)
_CONTEXT = re.compile(r"\bcontexts?\b", re.IGNORECASE)


class Rejected(ValueError):
    """Output that cannot become training data; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class PairItem:
    """One question with two candidate answers (see :func:`parse_pairs`)."""

    question: str
    answers: list[str] = field(default_factory=list)


def _segments(text: str, pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    """(tag, text) for each tagged segment; a segment runs to the next tag (multi-line kept)."""
    matches = list(pattern.finditer(text))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        tag = re.sub(r"\s+", "", m.group("tag").lower())
        out.append((tag, text[m.end() : end].strip()))
    return out


def _check_content(texts: list[str], refusal: str | None) -> None:
    if refusal:
        raise Rejected("refusal", refusal[:80])
    for t in texts:
        if _REFUSAL.search(t):
            raise Rejected("refusal", t[:80])
    for t in texts:
        if _CAPTION.search(t):
            raise Rejected("mentions_caption", t[:80])
        if _CONTEXT.search(t):
            raise Rejected("mentions_context", t[:80])


def _check_text(text: str | None, refusal: str | None) -> str:
    if refusal:
        raise Rejected("refusal", refusal[:80])
    if text is None or not text.strip():
        raise Rejected("empty_output")
    return text


def parse_conversation(
    text: str | None, min_exchanges: int = 4, refusal: str | None = None
) -> list[dict[str, str]]:
    """LLaVA turns (``{"from": "human"|"gpt", "value"}``) from ``User:``/``Assistant:`` text.

    ``<image>`` goes on its own line before the first question, as in LLaVA's data. A trailing
    question without an answer is dropped. Raises :class:`Rejected` with the reason otherwise.
    """
    text = _check_text(text, refusal)
    segs = _segments(text, _CONV_TAGS)
    if not segs:
        if _REFUSAL.search(text):
            raise Rejected("refusal", text[:80])
        raise Rejected("no_turns", text[:80])
    turns = [(_ROLE[tag], value) for tag, value in segs]
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise Rejected("not_alternating", f"turn {i + 1} is from {role}, expected {expected}")
    if turns[-1][0] == "human":
        turns = turns[:-1]
    for i, (_, value) in enumerate(turns):
        if not value:
            raise Rejected("empty_turn", f"turn {i + 1}")
    _check_content([v for _, v in turns], None)
    if len(turns) // 2 < min_exchanges:
        raise Rejected("too_few_turns", f"{len(turns) // 2} exchanges, need {min_exchanges}")
    out = [{"from": role, "value": value} for role, value in turns]
    out[0]["value"] = f"{IMAGE_TOKEN}\n{out[0]['value']}"
    return out


def parse_pairs(
    text: str | None, min_questions: int = 1, refusal: str | None = None
) -> list[PairItem]:
    """Questions with two answers from ``Question:`` / ``Answer A:`` / ``Answer B:`` text.

    Each question needs exactly one A and one B answer, non-empty and different; a question
    that breaks this makes the whole output rejected (the model did not follow the format).
    """
    text = _check_text(text, refusal)
    segs = _segments(text, _PAIR_TAGS)
    if not segs:
        if _REFUSAL.search(text):
            raise Rejected("refusal", text[:80])
        raise Rejected("no_turns", text[:80])
    items: list[PairItem] = []
    expected = "q"
    for tag, value in segs:
        role = _PAIR_ROLE[tag]
        if role != expected:
            raise Rejected("not_alternating", f"got {tag!r} where {expected!r} was expected")
        if not value:
            raise Rejected("empty_turn", tag)
        if role == "q":
            items.append(PairItem(question=value))
        else:
            items[-1].answers.append(value)
        expected = {"q": "a", "a": "b", "b": "q"}[role]
    if items and len(items[-1].answers) < 2:
        items.pop()
    texts = [t for it in items for t in (it.question, *it.answers)]
    _check_content(texts, None)
    for it in items:
        if it.answers[0].strip() == it.answers[1].strip():
            raise Rejected("identical_answers", it.question[:80])
    if len(items) < min_questions:
        raise Rejected("too_few_turns", f"{len(items)} questions, need {min_questions}")
    return items


def pair_records(
    items: list[PairItem], base: dict[str, Any], id_prefix: str
) -> list[dict[str, Any]]:
    """Answer-pair items in the layout clinicians mark (``AnswerMarks`` minus the marks).

    Each record: ``{"id": f"{id_prefix}-q{i}", "image", "question", "answers": [a, b],
    "fig_caption", "in_text_mention", "pair_id", "generator"}``. After marking, each answer
    becomes ``{"text", "acceptable"}`` (or ``acceptable: [bool, bool]`` is added) and
    ``import-preferences`` turns the record into preference pairs.
    """
    return [
        {"id": f"{id_prefix}-q{i}", "question": it.question, "answers": list(it.answers), **base}
        for i, it in enumerate(items)
    ]
