"""Turn a generator's text into LLaVA conversations or answer pairs, rejecting unusable output.

Unlike the released parser, which keeps only lines that start with a role tag (cutting every
multi-line answer short), a turn here runs from its tag to the next tag, so lists and paragraphs
survive. Rejections carry a reason so a run can report how much it lost and why:

* ``empty_output`` - no text at all;
* ``no_turns`` - no role tag found;
* ``not_alternating`` - two questions or two answers in a row;
* ``empty_turn`` - a tag with nothing after it;
* ``too_few_turns`` - fewer complete exchanges than required;
* ``refusal`` - the model declined (an API refusal, an apology, or a statement that it cannot
  see the image);
* ``mentions_caption`` - an answer names the caption, giving away that the model read it rather
  than the image (LLaVA-Med's post-processing drops such answers);
* ``mentions_context`` - an answer cites the supplied text as its source ("the context provided",
  "according to the context"; LLaVA-Med strips these phrases rather than keeping them);
* ``identical_answers`` - (answer pairs) both answers to a question are the same;
* ``truncated`` - the reply was cut off by ``max_tokens`` (``finish_reason: length``): its last
  answer is half-written, and a parser cannot tell (:func:`check_truncation`, given the
  reply's finish reason; ``truncated_replies: keep`` keeps such replies, as the released script does).

``flagged_answers`` decides what a refusal or a caption or context citation in an answer costs:
its exchange (``drop_exchange``), the reply (``reject``), or nothing but a count (``keep``).

The content filters (refusal, caption, context) read answers only, as LLaVA-Med's do: a question
such as "What does consolidation mean in this context?" is ordinary clinical wording, and the
clinician-picked BioMed-VITAL demonstrations ask such questions. Measured on those 58
demonstrations, a bare-word ``context`` filter over questions and answers rejected 19 of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

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

# A tag at the start of a line, optionally under a markdown heading, bulleted, numbered or in
# markdown bold: "User:", "**Assistant:**", "1. User:", "- Question:", "### User:". ``open`` is
# a bold marker before the tag; when nothing closes it by the colon, the model bolded the whole
# line ("**User: What is shown?**") and the marker at the line's end is not part of the text.
_PREFIX = r"^[ \t]*(?:#{1,6}[ \t]*)?(?:[-*•][ \t]*|\d+[.)][ \t]*)?(?P<open>\*\*|__)?[ \t]*"
_SUFFIX = r"[ \t]*(?P<mid>\*\*|__)?[ \t]*:[ \t]*(?P<close>\*\*|__)?"
_CONV_TAGS = re.compile(
    _PREFIX + r"(?P<tag>user|human|assistant|gpt)" + _SUFFIX, re.IGNORECASE | re.MULTILINE
)
# "Question 3:" is a question tag too (models number them).
_PAIR_TAGS = re.compile(
    _PREFIX
    + r"(?P<tag>question(?:[ \t]*\d+)?|answer[ \t]*a|answer[ \t]*b|answer[ \t]*1|answer[ \t]*2)"
    + _SUFFIX,
    re.IGNORECASE | re.MULTILINE,
)
# A markdown code fence alone on a line: models sometimes wrap the whole reply in one.
_FENCE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$", re.MULTILINE)
_ROLE = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
_PAIR_ROLE = {"question": "q", "answera": "a", "answer1": "a", "answerb": "b", "answer2": "b"}

# Perception verbs count as a refusal only with the image as their object: "I cannot see the
# image" declines, "I cannot see any fracture" is a finding.
_IMAGE_OBJ = (
    r"(?:(?:the|this|that|your|these|any) )?(?:actual |provided |attached |uploaded |original )?"
    r"(?:images?|pictures?|photos?|figures?|it)\b"
)
_REFUSAL = re.compile(
    r"\b(?:i['’]?m sorry|i am sorry|i apologi[sz]e|as an ai(?: language model)?"
    r"|(?:i (?:cannot|can ?not|can['’]?t|won['’]?t|am (?:unable|not able) to)"
    r"|i['’]?m (?:unable|not able) to)(?: actually| directly)? "
    r"(?:(?:help|assist|provide|comply|do that)\b"
    r"|(?:see|view|access|analy[sz]e|interpret|identify|examine) " + _IMAGE_OBJ + r"))",
    re.IGNORECASE,
)
_CAPTION = re.compile(r"\bcaptions?\b", re.IGNORECASE)
# "context" as the source of an answer, the phrases LLaVA-Med strips ("the context provided",
# "mentioned in the context"...); "in the context of a liver biopsy" or "provides context for
# the size" are ordinary wording and pass.
_CONTEXT = re.compile(
    r"\b(?:provided|supplied|accompanying|figure['’]?s?) context\b"
    r"|\b(?:the|this|that) given context\b|\bits context\b"
    r"|\bcontext (?:provided|given|supplied)\b"
    r"|\b(?:(?:mentioned|described|stated|noted|reported|found|given) in"
    r"|according to|based on|from|given) (?:the|its) context\b(?! of\b)"
    r"|\bthe context (?:mentions|notes|says|states|suggests|indicates|confirms|describes|reports)\b",
    re.IGNORECASE,
)


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
        value = text[m.end() : end].strip()
        marker = m.group("open")
        if marker and not m.group("mid") and not m.group("close"):
            first, nl, rest = value.partition("\n")
            if first.rstrip().endswith(marker):
                value = (first.rstrip()[: -len(marker)].rstrip() + nl + rest).strip()
        out.append((tag, value))
    return out


_FLAG_ORDER = ("refusal", "mentions_caption", "mentions_context")


def _flag(answer: str) -> str | None:
    """Why an answer must not be trained on (``refusal``, ``mentions_caption``,
    ``mentions_context``), or ``None``. Only answers are read (LLaVA-Med filters its ``gpt``
    turns only): a question may ask what a term means "in this context" without giving
    anything away."""
    if _REFUSAL.search(answer):
        return "refusal"
    if _CAPTION.search(answer):
        return "mentions_caption"
    if _CONTEXT.search(answer):
        return "mentions_context"
    return None


FlaggedAnswers = Literal["drop_exchange", "reject", "keep"]


def check_flagged_answers(flagged: str) -> None:
    """Refuse an unknown ``flagged_answers`` value before anything is read or sent."""
    if flagged not in get_args(FlaggedAnswers):
        raise ValueError(
            f"flagged_answers must be one of {', '.join(get_args(FlaggedAnswers))}, got {flagged!r}"
        )


TruncatedReplies = Literal["reject", "keep"]


def check_truncated_replies(mode: str) -> None:
    """Refuse an unknown ``truncated_replies`` value before anything is read or sent."""
    if mode not in get_args(TruncatedReplies):
        raise ValueError(
            f"truncated_replies must be one of {', '.join(get_args(TruncatedReplies))}, "
            f"got {mode!r}"
        )


def check_truncation(finish_reason: str | None, mode: TruncatedReplies) -> bool:
    """Whether a reply was cut off by ``max_tokens`` (``finish_reason: length``) and is kept.

    A cut reply still parses, its last answer half-written, and a parser cannot tell: ``reject``
    raises :class:`Rejected` (``truncated``); ``keep`` (BioMed-VITAL's released script, which
    keeps every tagged line) returns ``True`` so the caller counts it.
    """
    check_truncated_replies(mode)
    if finish_reason != "length":
        return False
    if mode == "reject":
        raise Rejected(
            "truncated", "the reply hit max_tokens (finish_reason 'length'); raise max_tokens"
        )
    return True


@dataclass
class DroppedExchange:
    """A question-answer exchange whose answer was flagged: taken out of a kept reply, or, with
    ``kept`` (``flagged_answers: keep``), left in it and only counted."""

    reason: str
    question: str
    answer: str
    kept: bool = False


def _drop_flagged(
    exchanges: list[tuple[str, list[str]]], need: int, flagged: FlaggedAnswers
) -> tuple[list[int], list[DroppedExchange]]:
    """Which exchanges (a question and its answers) stay, and the flagged answers' records.

    ``reject`` (stricter than the reference): one flagged answer rejects the reply.
    ``drop_exchange`` (LLaVA-Med's post-processing, which removes such answers): only its
    exchange goes; if fewer than ``need`` exchanges are left, the reply is rejected for the
    reason that removed the most. ``keep`` (BioMed-VITAL's released script, which filters
    nothing): every exchange stays, and each flagged answer is reported with ``kept`` set.
    """
    check_flagged_answers(flagged)
    if flagged == "keep":
        found = [
            DroppedExchange(r, question, a, kept=True)
            for question, answers in exchanges
            for a in answers
            if (r := _flag(a)) is not None
        ]
        return list(range(len(exchanges))), found
    kept: list[int] = []
    gone: list[DroppedExchange] = []
    for i, (question, answers) in enumerate(exchanges):
        flags = [(r, a) for a in answers if (r := _flag(a)) is not None]
        if flags:
            gone.append(DroppedExchange(flags[0][0], question, flags[0][1]))
        else:
            kept.append(i)
    if flagged == "reject" and gone:
        # a refusal anywhere names the reply; else its first flagged answer
        first = next((d for d in gone if d.reason == "refusal"), gone[0])
        raise Rejected(first.reason, first.answer[:80])
    if gone and len(kept) < max(need, 1):
        counts = {r: sum(d.reason == r for d in gone) for r in _FLAG_ORDER}
        reason = max(_FLAG_ORDER, key=lambda r: (counts[r], -_FLAG_ORDER.index(r)))
        first = next(d for d in gone if d.reason == reason)
        raise Rejected(
            reason,
            f"{len(gone)} of {len(exchanges)} exchanges flagged, {len(kept)} left "
            f"(need {need}): {first.answer[:80]}",
        )
    return kept, gone


def _check_text(text: str | None, refusal: str | None) -> str:
    """The reply with line endings unified and code-fence lines (a wrapping ``json`` block) removed.

    CRLF endings would otherwise stay inside multi-line answers, and lone CRs hide every tag but
    the first; a closing fence would end up in the last answer.
    """
    if refusal:
        raise Rejected("refusal", refusal[:80])
    if text is None or not text.strip():
        raise Rejected("empty_output")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _FENCE.sub("", text)
    if not text.strip():
        raise Rejected("empty_output")
    return text


def _json_segments(text: str) -> list[tuple[str, str]]:
    """(tag, text) from a reply written as JSON instead of tagged lines, else ``[]``.

    Accepted: a list of ``{"from": "human"|"gpt", "value"}`` or ``{"role": "user"|"assistant",
    "content"}`` turns, or an object holding such a list under ``"conversations"``. A reply in
    this form is the conversation asked for, only written differently; losing it would waste a
    paid request.
    """
    try:
        data = json.loads(text.strip())
    except ValueError:
        return []
    if isinstance(data, dict):
        data = data.get("conversations")
    if not isinstance(data, list) or not data:
        return []
    out = []
    for turn in data:
        if not isinstance(turn, dict):
            return []
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in _ROLE or not isinstance(value, str):
            return []
        out.append((role.lower(), value.strip()))
    return out


def parse_conversation(
    text: str | None,
    min_exchanges: int = 4,
    refusal: str | None = None,
    flagged: FlaggedAnswers = "drop_exchange",
    dropped: list[DroppedExchange] | None = None,
) -> list[dict[str, str]]:
    """LLaVA turns (``{"from": "human"|"gpt", "value"}``) from ``User:``/``Assistant:`` text.

    ``<image>`` goes on its own line before the first question, as in LLaVA's data. A trailing
    question without an answer (or with an empty ``Assistant:``) is dropped. A reply written as
    a JSON list of turns is read too. An exchange whose answer refuses or gives away the
    caption or context is taken out, or kept and counted (``flagged``, see
    :func:`_drop_flagged`; appended to ``dropped``). Raises :class:`Rejected` with the reason
    otherwise.
    """
    text = _check_text(text, refusal)
    segs = _segments(text, _CONV_TAGS) or _json_segments(text)
    if not segs:
        if _REFUSAL.search(text):
            raise Rejected("refusal", text[:80])
        raise Rejected("no_turns", text[:80])
    turns = [(_ROLE[tag], value) for tag, value in segs]
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise Rejected("not_alternating", f"turn {i + 1} is from {role}, expected {expected}")
    if turns[-1][0] == "gpt" and not turns[-1][1]:
        turns = turns[:-1]
    if turns[-1][0] == "human":
        turns = turns[:-1]
    for i, (_, value) in enumerate(turns):
        if not value:
            raise Rejected("empty_turn", f"turn {i + 1}")
    exchanges = [(turns[i][1], [turns[i + 1][1]]) for i in range(0, len(turns), 2)]
    kept, gone = _drop_flagged(exchanges, min_exchanges, flagged)
    turns = [t for i in kept for t in (("human", exchanges[i][0]), ("gpt", exchanges[i][1][0]))]
    if not turns or len(turns) // 2 < min_exchanges:
        raise Rejected("too_few_turns", f"{len(turns) // 2} exchanges, need {min_exchanges}")
    out = [{"from": role, "value": value} for role, value in turns]
    out[0]["value"] = f"{IMAGE_TOKEN}\n{out[0]['value']}"
    if dropped is not None:
        dropped.extend(gone)
    return out


def parse_pairs(
    text: str | None,
    min_questions: int = 1,
    refusal: str | None = None,
    flagged: FlaggedAnswers = "drop_exchange",
    dropped: list[DroppedExchange] | None = None,
) -> list[PairItem]:
    """Questions with two answers from ``Question:`` / ``Answer A:`` / ``Answer B:`` text.

    Each question needs exactly one A and one B answer, non-empty and different; a question
    that breaks this makes the whole output rejected (the model did not follow the format). A
    last question left without its answers (or with an empty last answer) is dropped. A
    question with a flagged answer is taken out as in :func:`parse_conversation`.
    """
    text = _check_text(text, refusal)
    segs = _segments(text, _PAIR_TAGS)
    if not segs:
        if _REFUSAL.search(text):
            raise Rejected("refusal", text[:80])
        raise Rejected("no_turns", text[:80])
    items: list[PairItem] = []
    expected = "q"
    for k, (tag, value) in enumerate(segs):
        role = "q" if tag.startswith("question") else _PAIR_ROLE[tag]
        if role != expected:
            raise Rejected("not_alternating", f"got {tag!r} where {expected!r} was expected")
        if not value and k == len(segs) - 1 and role != "q":
            break  # the last answer is empty: that question is left unanswered, dropped below
        if not value:
            raise Rejected("empty_turn", tag)
        if role == "q":
            items.append(PairItem(question=value))
        else:
            items[-1].answers.append(value)
        expected = {"q": "a", "a": "b", "b": "q"}[role]
    if items and len(items[-1].answers) < 2:
        items.pop()
    kept, gone = _drop_flagged([(it.question, it.answers) for it in items], min_questions, flagged)
    items = [items[i] for i in kept]
    for it in items:
        if it.answers[0].strip() == it.answers[1].strip():
            raise Rejected("identical_answers", it.question[:80])
    if len(items) < min_questions:
        raise Rejected("too_few_turns", f"{len(items)} questions, need {min_questions}")
    if dropped is not None:
        dropped.extend(gone)
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
