"""What text the selector reads for a candidate: the ``text_recipe`` switch.

``paper`` (faithful): figure caption + in-text mentions + "Question:" first question +
"Answer:" first answer, concatenated without separators as the released code does.
``conversation``: caption and mentions, then every turn of the conversation; the tokenizer
truncates it to the backbone's context length.

Clinician pairs (their one QA turn) follow the ``clinician_text`` switch:
``candidate_recipe`` (default) gives them the candidates' recipe, so that the selector reads the
same kind of text in training and scoring; ``qa_only`` (the released code) gives the clinician
pairs trained on their question and answer only (the recipe's ``Question:``/``Answer:`` layout
without caption and mentions), while held-out clinician pairs keep the candidates' recipe, as
the released alignment test read them. :class:`Captions` finds a candidate's or a preference's
caption and mentions among the source figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from biomedvital.data.records import Candidate, Preference, SourceFigure
from biomedvital.data.report import BadRecordError

TextRecipe = Literal["paper", "conversation"]
ClinicianText = Literal["candidate_recipe", "qa_only"]
CLINICIAN_TEXTS: tuple[str, ...] = ("candidate_recipe", "qa_only")


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


def check_clinician_text(value: str) -> None:
    """Refuse a ``clinician_text`` that is not one of :data:`CLINICIAN_TEXTS`."""
    if value not in CLINICIAN_TEXTS:
        raise ValueError(f"clinician_text must be 'candidate_recipe' or 'qa_only', got {value!r}")


def clinician_text(
    recipe: TextRecipe,
    mode: ClinicianText,
    caption: str,
    mentions: str,
    question: str,
    answer: str,
) -> str:
    """Text for one side of a clinician pair: the candidates' recipe, or under ``qa_only`` the
    same recipe without caption and mentions (the released code's clinician training text)."""
    check_clinician_text(mode)
    if mode == "qa_only":
        caption, mentions = "", ""
    return candidate_text(recipe, caption, mentions, [(question, answer)])


class Captions:
    """Caption and in-text mentions of each source figure, by ``pair_id``."""

    def __init__(self, figures: list[SourceFigure]) -> None:
        self.by_pair = {f.pair_id: (f.fig_caption, f.mentions_text()) for f in figures}

    def text_of(self, cand: Candidate, recipe: TextRecipe, path: Path, line: int | None) -> str:
        caption, mentions = "", ""
        if cand.pair_id is not None and cand.pair_id in self.by_pair:
            caption, mentions = self.by_pair[cand.pair_id]
        elif recipe == "paper":
            raise BadRecordError(
                path,
                line,
                f"candidate {cand.id!r}: its pair_id {cand.pair_id!r} is not among the source "
                "figures, and the 'paper' text recipe needs the caption and mentions",
                "pair_id",
                category="unknown_figure",
            )
        return candidate_text(recipe, caption, mentions, cand.qa_pairs())

    def of_preference(
        self, pref: Preference, recipe: TextRecipe, path: Path, line: int | None
    ) -> tuple[str, str]:
        """Caption and mentions of a clinician preference: its own, else its figure's. Under
        the ``paper`` recipe one with neither is refused as a candidate is (``unknown_figure``):
        its text would lack the caption and mentions that every scored text has."""
        if pref.fig_caption:
            return pref.fig_caption, pref.mentions_text()
        if pref.pair_id is not None and pref.pair_id in self.by_pair:
            return self.by_pair[pref.pair_id]
        if recipe == "paper":
            raise BadRecordError(
                path,
                line,
                f"it has no fig_caption and its pair_id {pref.pair_id!r} is not among the source "
                "figures, and the 'paper' text recipe needs the caption and mentions",
                "pair_id",
                category="unknown_figure",
            )
        return "", pref.mentions_text()
