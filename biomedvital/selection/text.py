"""What text the selector reads for a candidate: the ``text_recipe`` switch.

``paper`` (faithful): figure caption + in-text mentions + "Question:" first question +
"Answer:" first answer, concatenated without separators as the released code does.
``conversation``: caption and mentions, then every turn of the conversation; the tokenizer
truncates it to the backbone's context length.

Clinician pairs go through the same recipe (their one QA turn), so that the selector sees the
same kind of text in training and scoring — the released code fed clinician pairs question and
answer only, which differs from what it scored.
"""

from __future__ import annotations

from typing import Literal

TextRecipe = Literal["paper", "conversation"]


def _strip_image(text: str) -> str:
    return text.replace("<image>", "").strip()


def candidate_text(
    recipe: TextRecipe, caption: str, mentions: str, turns: list[tuple[str, str]]
) -> str:
    """Text for one candidate given its QA turns ``[(question, answer), ...]``."""
    if not turns:
        raise ValueError("candidate has no question-answer turn")
    if recipe == "paper":
        question, answer = turns[0]
        return "".join(
            [caption, mentions, "Question:", _strip_image(question), "Answer:", answer.strip()]
        )
    if recipe == "conversation":
        body = " ".join(f"Question: {_strip_image(q)} Answer: {a.strip()}" for q, a in turns)
        return " ".join(part for part in (caption, mentions, body) if part)
    raise ValueError(f"unknown text recipe {recipe!r}; use 'paper' or 'conversation'")
