"""Pydantic models for the records the pipeline reads and writes.

Layouts follow the released LLaVA-Med / BioMed-VITAL files (figures, demonstrations, LLaVA-style
conversations) so the real data validates as is; fields those files carry that we do not use are
kept (``extra="allow"``) so records round-trip without loss.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .jsonio import (
    LocatedRecords,
    PathLike,
    bad_from_validation,
    detect_format,
    handle_bad,
    iter_objects,
    load_json,
    parse_record,
    read_records,
)
from .report import BadRecordError, OnBad, RecordReport

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_IMAGE_TOKEN_RE = re.compile(r"\s*<image>\s*")


def _int_to_str(value: Any) -> Any:
    # Real files store ids as ints in some releases and strings in others; accept both.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


IdStr = Annotated[str, BeforeValidator(_int_to_str)]
"""A string id that also accepts JSON integers (converted with ``str``)."""

MAX_TEXT_CHARS = 100_000
"""Longest caption, mention or turn accepted (the longest real PMC captions are a few thousand
characters): a longer one is a broken record (a concatenated file, a stray binary), and would
otherwise cost a fortune in prompt tokens or be cut away silently by a tokenizer."""


def _bounded(value: str) -> str:
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(
            f"text of {len(value):,} characters is longer than the {MAX_TEXT_CHARS:,} accepted"
        )
    return value


Text = Annotated[str, AfterValidator(_bounded)]
"""A string of at most :data:`MAX_TEXT_CHARS` characters."""


def strip_image_token(text: str) -> str:
    """Remove the ``<image>`` placeholder and the whitespace/newlines around it."""
    return _IMAGE_TOKEN_RE.sub(" ", text).strip()


class Mention(BaseModel):
    """One in-text mention of a figure (sentence tokens plus entity spans)."""

    tokens: Text
    entities: list[dict[str, Any]] = Field(default_factory=list)


def mentions_text(mentions: list[Mention] | list[dict[str, Any] | str] | str | None) -> str:
    """Join mention sentences with a space: the form prompts and text scorers consume."""
    if mentions is None:
        return ""
    if isinstance(mentions, str):
        return mentions.strip()
    parts: list[str] = []
    for m in mentions:
        if isinstance(m, str):
            tokens = m
        else:
            tokens = m.tokens if isinstance(m, Mention) else Mention.model_validate(m).tokens
        tokens = tokens.strip()
        if tokens:
            parts.append(tokens)
    return " ".join(parts)


def _none_to_list(value: Any) -> Any:
    # 4 of the 50 LLaVA-Med benchmark figures have "in_text_mention": null; LLaVA-Med's own
    # generation demonstrations hold plain sentences rather than {"tokens": ...} mentions.
    if value is None:
        return []
    if isinstance(value, str):
        return [{"tokens": value}] if value.strip() else []
    if isinstance(value, list):
        return [{"tokens": m} if isinstance(m, str) else m for m in value]
    return value


class _FigureFields(BaseModel):
    """Figure context shared by figures and demonstrations."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    fig_caption: Text = ""
    fig_label: str | None = None
    pair_id: IdStr | None = None
    pmid: IdStr | None = None
    in_text_mention: Annotated[list[Mention], BeforeValidator(_none_to_list)] = Field(
        default_factory=list
    )
    domain: dict[str, bool] = Field(default_factory=dict)

    def mentions_text(self) -> str:
        """In-text mentions as one string."""
        return mentions_text(self.in_text_mention)

    def modalities(self) -> list[str]:
        """Domain flags set to true, e.g. ``["ct_scan"]`` (a figure may have several)."""
        return [k for k, v in self.domain.items() if v]


class SourceFigure(_FigureFields):
    """A PMC figure with caption and in-text mentions: the input to instruction generation."""

    pair_id: IdStr
    fig_caption: Text


class Turn(BaseModel):
    """One conversation turn in LLaVA layout (``{"from": "human", "value": ...}``)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: Text


def _check_conversation(turns: list[Turn]) -> list[Turn]:
    if not turns:
        raise ValueError("candidate has no turns")
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t.from_ != expected:
            if i == 0:
                raise ValueError(f"conversation must start with a human turn (got {t.from_!r})")
            raise ValueError(
                f"turns must alternate human/gpt: turn {i + 1} is from {t.from_!r}, "
                f"expected {expected!r}"
            )
    if len(turns) % 2:
        raise ValueError(f"conversation ends with an unanswered question (turn {len(turns)})")
    if not any(
        strip_image_token(q.value) and a.value.strip()
        for q, a in zip(turns[::2], turns[1::2], strict=False)
    ):
        raise ValueError("candidate has no question-answer turn")
    return turns


def _qa_pairs(turns: list[Turn]) -> list[tuple[str, str]]:
    return [
        (strip_image_token(q.value), a.value.strip())
        for q, a in zip(turns[::2], turns[1::2], strict=False)
    ]


class Demonstration(_FigureFields):
    """A clinician-selected few-shot example (BioMed-VITAL ``doctor_few_shot_examples.json``).

    LLaVA-Med's ``instruct_few_shot_examples.json`` reads too: it has no ``id`` (its
    ``pair_id`` serves) and no ``imgs`` (prompts carry demonstrations as text only).
    """

    id: IdStr
    imgs: str | None = None
    conversations: list[Turn]
    fig_caption: Text

    @model_validator(mode="before")
    @classmethod
    def _id_from_pair_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("id") is None and data.get("pair_id") is not None:
            return {**data, "id": data["pair_id"]}
        return data

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(question, answer) pairs with the image token removed."""
        return _qa_pairs(self.conversations)


class Candidate(BaseModel):
    """A generated instruction-following sample in LLaVA layout, before/after selection."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: IdStr
    image: str
    conversations: list[Turn]
    pair_id: IdStr | None = None
    generator: dict[str, Any] = Field(default_factory=dict)

    @field_validator("conversations")
    @classmethod
    def _check_turns(cls, v: list[Turn]) -> list[Turn]:
        return _check_conversation(v)

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(question, answer) pairs with the image token removed."""
        return _qa_pairs(self.conversations)

    def first_qa(self) -> tuple[str, str]:
        """The first complete question/answer (image token stripped from the question)."""
        for q, a in self.qa_pairs():
            if q and a:
                return q, a
        raise ValueError(f"candidate {self.id} has no question-answer turn")  # pragma: no cover

    def conversation_text(self) -> str:
        """All turns as ``Question: ... Answer: ...`` text, for text-only scorers."""
        parts: list[str] = []
        for t in self.conversations:
            label = "Question" if t.from_ == "human" else "Answer"
            parts.append(f"{label}: {strip_image_token(t.value)}")
        return " ".join(parts)


def _normalise_mentions(value: Any) -> str:
    if value is None or isinstance(value, str):
        return (value or "").strip()
    if isinstance(value, list):
        return mentions_text(value)
    raise ValueError(f"in_text_mention must be a string or a list of mentions (got {value!r})")


MentionText = Annotated[str, BeforeValidator(_normalise_mentions), AfterValidator(_bounded)]


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class Preference(BaseModel):
    """One clinician preference: for this image and question, ``preferred`` beats ``rejected``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: IdStr
    image: str
    question: Text
    preferred: Text
    rejected: Text
    fig_caption: Text = ""
    in_text_mention: MentionText = ""
    pair_id: IdStr | None = None
    annotator: str | None = None

    @field_validator("question", "preferred", "rejected")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        return _non_empty(v)

    @model_validator(mode="after")
    def _differs(self) -> Preference:
        if self.preferred.strip() == self.rejected.strip():
            raise ValueError("preferred and rejected answers are identical")
        return self

    def mentions_text(self) -> str:
        """In-text mentions as one string (already normalised)."""
        return self.in_text_mention


class MarkedAnswer(BaseModel):
    """One candidate answer with a clinician's accept/reject mark."""

    text: Text
    acceptable: bool

    @field_validator("text")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        return _non_empty(v)


class AnswerMarks(BaseModel):
    """A clinician's accept/reject marks on several answers to one question."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: IdStr
    image: str
    question: Text
    answers: list[MarkedAnswer]
    fig_caption: Text = ""
    in_text_mention: MentionText = ""
    pair_id: IdStr | None = None
    annotator: str | None = None

    @field_validator("question")
    @classmethod
    def _question_not_empty(cls, v: str) -> str:
        return _non_empty(v)

    @field_validator("answers")
    @classmethod
    def _consistent(cls, v: list[MarkedAnswer]) -> list[MarkedAnswer]:
        if not v:
            raise ValueError("no answers")
        marks: dict[str, bool] = {}
        for a in v:
            key = a.text.strip()
            if marks.get(key, a.acceptable) != a.acceptable:
                raise ValueError(f"answer marked both acceptable and not acceptable: {key[:60]!r}")
            marks[key] = a.acceptable
        return v

    def to_pairs(self) -> list[Preference]:
        """One preference per (acceptable i, not acceptable j), id ``f"{id}#{i}>{j}"`` (0-based).

        Returns ``[]`` when all answers carry the same mark (no contrast to learn from).
        """
        good = [(i, a) for i, a in enumerate(self.answers) if a.acceptable]
        bad = [(j, a) for j, a in enumerate(self.answers) if not a.acceptable]
        shared = {
            "image": self.image,
            "question": self.question,
            "fig_caption": self.fig_caption,
            "in_text_mention": self.in_text_mention,
            "pair_id": self.pair_id,
            "annotator": self.annotator,
        }
        return [
            Preference(id=f"{self.id}#{i}>{j}", preferred=a.text, rejected=b.text, **shared)
            for i, a in good
            for j, b in bad
            if a.text.strip() != b.text.strip()
        ]


class Rating(BaseModel):
    """A judge's 0-10 score for one candidate (``raw`` keeps the judge's text for audits)."""

    model_config = ConfigDict(populate_by_name=True)

    candidate_id: IdStr
    score: float
    judge: str
    raw: str = ""

    @field_validator("score", mode="before")
    @classmethod
    def _parse_score(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number (got {v!r})")
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                raise ValueError(f"must be a number (got {v[:40]!r})") from None
        return v

    @field_validator("score")
    @classmethod
    def _in_range(cls, v: float) -> float:
        if not math.isfinite(v) or not 0.0 <= v <= 10.0:
            raise ValueError(f"must be between 0 and 10 (got {v})")
        return v


# ----------------------------------------------------------------------------- loaders


def _looks_like_domain_layout(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and "pair_id" not in obj
        and all(isinstance(v, list) for v in obj.values())
    )


def _first_nonblank_line(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                return raw.strip().removeprefix(b"\xef\xbb\xbf")
    return b""


def read_figures(
    path: PathLike, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> list[SourceFigure]:
    """Read figures from JSONL, a JSON array, or LLaVA-Med's ``{domain: [figure, ...]}`` dict.

    In the dict layout positions are 1-based across all domains in file order.
    """
    if detect_format(path) != "jsonl":
        return read_records(path, SourceFigure, on_bad=on_bad, report=report)
    # JSONL's first line is a whole figure object; anything else means one JSON document.
    try:
        head = json.loads(_first_nonblank_line(path))
    except ValueError:
        head = None
    if isinstance(head, dict) and not _looks_like_domain_layout(head):
        return read_records(path, SourceFigure, on_bad=on_bad, report=report)
    try:
        data = load_json(path)
    except BadRecordError:
        if head is None:  # not one document either: a JSONL file with a broken first line
            return read_records(path, SourceFigure, on_bad=on_bad, report=report)
        raise
    if not _looks_like_domain_layout(data):
        raise BadRecordError(
            path,
            None,
            "expected JSONL, a JSON array, or an object mapping domain names to lists of figures",
            category="unknown_layout",
        )
    return _read_domain_layout(path, data, on_bad, report)


def _read_domain_layout(
    path: PathLike, data: dict[str, list[Any]], on_bad: OnBad, report: RecordReport | None
) -> list[SourceFigure]:
    if on_bad == "skip" and report is None:
        raise ValueError("on_bad='skip' needs a RecordReport so skipped records are counted")
    out = LocatedRecords()
    pos = 0
    for figures in data.values():
        for obj in figures:
            pos += 1
            try:
                fig = parse_record(obj, SourceFigure, path, pos, "record")
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            if report is not None:
                report.kept()
            out.add(fig, pos, "record")
    return out


def read_demonstrations(
    path: PathLike, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> list[Demonstration]:
    """Read few-shot demonstrations (JSON array as released, or JSONL)."""
    return read_records(path, Demonstration, on_bad=on_bad, report=report)


def read_preferences(
    path: PathLike, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> list[Preference]:
    """Read clinician preferences: each record is a pair or an :class:`AnswerMarks` (has ``answers``).

    Marks are expanded into pairs. Marks records that yield no pair (all answers marked alike) are
    counted as skipped with reason ``"no_contrast"`` (logged when no report is given), never raised.
    ``report.kept`` counts input records that produced at least one pair. Each pair remembers
    the record it came from (:class:`LocatedRecords`).
    """
    out: LocatedRecords = LocatedRecords()
    no_contrast = 0
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        model: type[BaseModel] = (
            AnswerMarks if isinstance(obj, dict) and "answers" in obj else Preference
        )
        try:
            rec = parse_record(obj, model, path, pos, kind)
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        if isinstance(rec, AnswerMarks):
            try:
                pairs = rec.to_pairs()
            except ValidationError as exc:  # pragma: no cover - validators above prevent this
                handle_bad(bad_from_validation(exc, path, pos, kind=kind), on_bad, report)
                continue
            if not pairs:
                no_contrast += 1
                if report is not None:
                    report.skip(
                        BadRecordError(
                            path,
                            pos,
                            "all answers carry the same mark; no preference pair",
                            "answers",
                            kind=kind,
                            category="no_contrast",
                        )
                    )
                continue
            for pair in pairs:
                out.add(pair, pos, kind)
        else:
            out.add(rec, pos, kind)
        if report is not None:
            report.kept()
    if no_contrast and report is None:
        log.warning("%s: %d answer-marks records gave no preference pair", path, no_contrast)
    return out


def read_candidates(
    path: PathLike, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> list[Candidate]:
    """Read generated candidates (LLaVA layout) from JSONL or a JSON array."""
    return read_records(path, Candidate, on_bad=on_bad, report=report)


def read_ratings(
    path: PathLike, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> list[Rating]:
    """Read judge ratings from JSONL or a JSON array."""
    return read_records(path, Rating, on_bad=on_bad, report=report)
