"""``rate``: a chat model scores each candidate 0-10 (the paper's model preference, stage 2).

The released parser fell back to fixed scores when the judge's reply did not parse (0 for one
side, 5 for the other), which biases every pair built from them. Here a reply without a score on
its first line gets one follow-up asking for the number; if that fails too the item is recorded
as failed and gets no rating at all.

What the judge scores is the ``unit``. ``conversation`` (the default) sends the whole
conversation under :data:`JUDGE_PROMPT`. ``first_exchange`` is the paper's unit: the released
scorer gave one score to one question and its answer, and the selector's ``paper`` text recipe
sees only the first exchange, so rating and selection see the same thing. It sends the first
question and its answer under :data:`EXCHANGE_PROMPT`, whose criteria
(:data:`RATING_CRITERIA`, ``(id, phrase)`` pairs) are the released scorer's, in this project's
words. Each unit's prompt is its own, so a unit's requests never share a cache entry with the
other's.

With ``preferences`` the judge also scores both answers of each clinician pair, and the run
reports how often it agrees with the clinicians (preferred scored above rejected; ties apart).

The judge needs the figure's caption: ``generate`` writes candidates without one, so they get it
from ``figures`` (joined on ``pair_id``; a candidate whose figure is not there is a bad record).
Candidates judged without any caption are counted (``no_caption``) and warned about.

Candidates are streamed like ``generate``'s figures: requests are built as the client has room,
a plan line per item is spooled to disk, and the outputs are assembled from the plan and the
journal in input order. ``client.mode: batch`` runs both passes (scores, then re-asks) as batch
jobs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ValidationError

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import (
    atomic_write,
    check_unique,
    handle_bad,
    iter_objects,
    parse_record,
    write_jsonl,
)
from biomedvital.data.records import (
    Candidate,
    Preference,
    Rating,
    mentions_text,
    read_figures,
    read_preferences,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError, OnBad, RecordReport
from biomedvital.generation.prompts import MENTIONS_HEADER
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.images import image_ref
from biomedvital.llm.outcome import ChatRequest
from biomedvital.llm.sampling import SamplingArgs
from biomedvital.llm.stage import Answer, ChatStage, Report
from biomedvital.tracking.mlflow import DEFAULT_STORE

__all__ = [
    "EXCHANGE_PROMPT",
    "JUDGE_PROMPT",
    "RATING_CRITERIA",
    "RateUnit",
    "check_unit",
    "judge_messages",
    "judge_prompt",
    "parse_score",
    "rate",
]

log = logging.getLogger(__name__)

SAMPLING = SamplingArgs(temperature=0.0, max_tokens=256)
"""``rate``'s default sampling: the most likely score, room for a short reason."""

JUDGE_PROMPT = """\
You are a medical expert acting as a judge of training data for a medical vision-language \
assistant. You receive a figure's caption, the article sentences that refer to it, and a \
question-answer conversation about the image.

Score the conversation from 0 (useless or wrong) to 10 (excellent), considering:
- relevance of the questions to the image and to medicine;
- whether each answer directly addresses the question it follows;
- accuracy of the answers with respect to the figure and its text;
- use of what the image shows, rather than generic statements;
- clarity, detail and precision of the answers;
- value of the conversation for fine-tuning a medical assistant.

Write the score, a single integer from 0 to 10, alone on the first line. Then explain it \
briefly."""

RateUnit = Literal["conversation", "first_exchange"]
"""What one score is given to: the whole conversation, or its first question and answer."""

RATING_CRITERIA: tuple[tuple[str, str], ...] = (
    (
        "scope",
        "scope and relevance: the question is about what this biomedical figure shows and "
        "matters in medicine",
    ),
    (
        "fine_tuning_value",
        "value for fine-tuning: training a medical vision-language assistant on this pair would "
        "teach it something worth knowing",
    ),
    (
        "alignment",
        "answer alignment: the answer responds to the question actually asked",
    ),
    (
        "accuracy",
        "accuracy: every statement of the answer agrees with the image, the caption and the "
        "article's sentences",
    ),
    (
        "utility",
        "utility: a clinician or a student asking this question would find the answer useful",
    ),
    (
        "image_use",
        "use of the image: the answer rests on what can be seen in the figure, not on generic "
        "statements",
    ),
    (
        "clarity",
        "clarity, detail and medical precision: the answer is clearly written, specific, and "
        "uses exact medical terms",
    ),
)
"""The ``first_exchange`` judge's criteria, ``(id, phrase)``: the released scorer's, in this
project's words; :data:`EXCHANGE_PROMPT` carries each phrase."""

SCORE_FORMAT = (
    "Write the score, a single integer from 0 to 10, alone on the first line. Then explain it "
    "briefly."
)
"""Score first, reasons after: the reply :func:`parse_score` reads, the same for both units."""

EXCHANGE_PROMPT = (
    "You are a medical expert acting as a judge of training data for a medical vision-language "
    "assistant. You receive a biomedical figure's caption, the article sentences that refer to "
    "it, the image itself when it is attached, and one question about the image with its "
    "answer.\n\n"
    "Score this question-answer pair from 0 (useless or wrong) to 10 (excellent), weighing:\n"
    + ";\n".join(f"- {phrase}" for _, phrase in RATING_CRITERIA)
    + ".\n\n"
    + SCORE_FORMAT
)
"""The ``first_exchange`` judge's system prompt."""

_PROMPTS: dict[str, str] = {"conversation": JUDGE_PROMPT, "first_exchange": EXCHANGE_PROMPT}
_HEADERS: dict[str, str] = {
    "conversation": "Conversation to score:",
    "first_exchange": "Question-answer pair to score:",
}


def check_unit(unit: str) -> None:
    """Refuse an unknown ``unit`` before anything is read or sent."""
    if unit not in get_args(RateUnit):
        raise ValueError(f"unit must be one of {', '.join(get_args(RateUnit))}, got {unit!r}")


def judge_prompt(unit: RateUnit = "conversation") -> str:
    """The judge's system prompt for ``unit``."""
    check_unit(unit)
    return _PROMPTS[unit]


def prompt_version(unit: RateUnit = "conversation") -> str:
    """Hash of the unit's judge prompt, recorded with the run (which prompt gave the scores)."""
    return hashlib.sha256(judge_prompt(unit).encode("utf-8")).hexdigest()[:16]


REASK_PROMPT = (
    "Your reply did not start with the score. Reply with only the score, a single integer "
    "from 0 to 10, on the first line."
)


_MARKUP = re.compile(r"[*_#`>]+")
# the scale, not the score: "(0-10)", "0 to 10", "(out of 10)", "of 10", "/10"
_SCALE = re.compile(
    r"\(?\s*(?:\b(?:out\s+)?of\s+10\b|\b[01]\s*(?:-|–|—|to)\s*10\b)\s*\)?|/\s*10\b",
    re.IGNORECASE,
)
# a whole number (not the start of a longer one or of a range "7-8"), with its sign if any
_NUM = r"([-−–+]?\d+(?:\.\d+)?)(?![\d.]*\d)(?!\s*[-–—]\s*\d)"
_LABELLED = re.compile(r"\b(?:scores?|ratings?)\b[^:\n]*:\s*" + _NUM, re.IGNORECASE)
_LABEL_NUM = re.compile(r"\b(?:scores?|ratings?)\b\s*(?:is\s+|of\s+|=\s*)?" + _NUM, re.IGNORECASE)
_LEADING = re.compile(r"^\s*" + _NUM)


def _score_value(token: str) -> int | None:
    """An integer 0..10, else ``None``: negatives, decimals and out-of-range get re-asked."""
    if token[0] in "-−–" or "." in token:
        return None
    value = int(token.lstrip("+"))
    return value if 0 <= value <= 10 else None


def parse_score(text: str | None) -> int | None:
    """The score on the first non-blank line, or ``None`` (the item is re-asked).

    The first number is not enough: "Score (0-10): 7" would read 0 and "Rating for
    conversation 1: 6" would read 1, and a wrong score silently trains the selector. So the
    scale notation ("0-10", "(out of 10)", "/10") and markdown are dropped first; then the number
    after "score:"/"rating:" wins, else one right after "score"/"rating", else a number that
    starts the line. Negatives, decimals, ranges ("7-8") and values above 10 give ``None``.
    """
    if not text:
        return None
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        return None
    line = _SCALE.sub(" ", _MARKUP.sub("", first))
    for pattern in (_LABELLED, _LABEL_NUM, _LEADING):
        m = pattern.search(line)
        if m is not None:
            return _score_value(m.group(1))
    return None


def _context_parts(caption: str, mentions: str) -> list[dict[str, Any]]:
    return [
        {"type": "text", "text": f"Caption: {caption.strip() or '(none)'}"},
        {"type": "text", "text": f"{MENTIONS_HEADER} {mentions.strip() or '(none)'}"},
    ]


def judge_messages(
    caption: str,
    mentions: str,
    qa: list[tuple[str, str]],
    image_url: str | None = None,
    unit: RateUnit = "conversation",
) -> list[dict[str, Any]]:
    """The judge's request for one item (``qa``: question/answer pairs): every pair for
    ``conversation``, the first only for ``first_exchange``."""
    prompt = judge_prompt(unit)
    if unit == "first_exchange":
        qa = qa[:1]
    convo = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa)
    parts = _context_parts(caption, mentions)
    parts.append({"type": "text", "text": f"{_HEADERS[unit]}\n{convo}"})
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "system", "content": prompt}, {"role": "user", "content": parts}]


def rate(
    candidates: Path,
    out: Path,
    client: ClientConfig,
    figures: Path | None = None,
    image_root: Path | None = None,
    vision: bool = False,
    preferences: Path | None = None,
    unit: RateUnit = "conversation",
    sampling: SamplingArgs = SAMPLING,
    extra_body: dict[str, Any] | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    dry_run: bool = False,
    store: str = DEFAULT_STORE,
    tags: dict[str, str] | None = None,
    progress: bool = True,
    batch_results: list[Path] | Path | None = None,
) -> dict:
    """Score each candidate 0-10 with a judge model; write ``ratings.jsonl`` (Rating records).

    Args:
        candidates: generated conversations (LLaVA layout, JSONL or JSON array).
        out: output folder: ``ratings.jsonl``, ``failed.jsonl``, ``journal.jsonl``,
            ``manifest.json`` and, with ``preferences``, ``preference_scores.jsonl``.
        client: the judge endpoint and how to call it, as for ``generate``: ``base_url``,
            ``model``, ``api_key_env`` (the key is read from that variable only), pacing,
            retries, prices and batch mode (the re-asks are a second batch).
        figures: figures to take captions and mentions from, joined on ``pair_id``; a candidate
            whose ``pair_id`` is missing or not among them is a bad record (``unknown_figure``).
            Without it the candidates' own ``fig_caption`` / ``in_text_mention`` fields are
            used, which ``generate``'s output lacks: candidates judged without a caption are
            counted (``counts.no_caption``) and warned about.
        image_root / vision: attach each candidate's image to the judge's request (the
            paper's GPT-4V judge saw it: ``vision: true`` with a vision model).
        preferences: clinician pairs (or accept/reject marks): both answers are scored too and
            the agreement with clinicians is reported.
        unit: what one score is given to. ``conversation``: the whole conversation.
            ``first_exchange`` (the paper's): caption, mentions, the first question and its
            answer (and the image with ``vision``), judged on the released scorer's criteria;
            it is the text the selector's ``paper`` recipe sees. Clinician pairs are judged
            with the same unit's prompt. Part of every request, so of the cache key.
        sampling: the judge's temperature, top_p, seed and max_tokens (part of the cache key).
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        on_bad_record: ``raise`` (before any request) or ``skip`` (counted) for bad input
            records: invalid candidates, duplicate ids (candidates and preference pairs),
            unknown figures, missing images.
        dry_run: print the first judge prompt and the estimated cost; send nothing.
        store: MLflow store folder (experiment ``rating``).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).
        progress: show the progress bar.
        batch_results: results file(s) of the offline runner to import
            (``client.batch_runner: file``), as for ``generate``.
    """
    check_unit(unit)
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root")
    stage = Rate(
        Path(candidates),
        figures,
        image_root,
        vision,
        preferences,
        on_bad_record,
        unit=unit,
        out=out,
        client=client,
        sampling=sampling,
        extra_body=extra_body,
        store=store,
        tags=tags,
        progress=progress,
        dry_run=dry_run,
        batch_results=batch_results,
    )
    return stage.run()


class Rate(ChatStage):
    """``rate`` on the chat-stage skeleton: one judge request per candidate (and per side of each
    clinician pair), a reply without a score re-asked once."""

    name = "rate"
    experiment = "rating"
    reask_prompt = REASK_PROMPT

    def __init__(
        self,
        candidates: Path,
        figures: Path | None,
        image_root: Path | None,
        vision: bool,
        preferences: Path | None,
        on_bad_record: OnBad,
        unit: RateUnit = "conversation",
        **stage: Any,
    ) -> None:
        check_unit(unit)  # before any input is read
        super().__init__(**stage)
        self.unit = unit
        self.candidates, self.figures, self.preferences = candidates, figures, preferences
        self.vision, self.on_bad_record = vision, on_bad_record
        self.reports = {"candidates": RecordReport()}
        self.captions = self._read_captions()
        self.prefs = self._read_preferences()
        self.root = ImageRoot(image_root) if vision else None
        self.no_caption = 0  # candidates sent to the judge without a caption (counted as built)

    # -- inputs

    def _read_captions(self) -> dict[str, tuple[str, str]]:
        """``pair_id -> (caption, mentions)`` from ``figures`` (empty without it)."""
        if self.figures is None:
            return {}
        report = self.reports["figures"] = RecordReport()
        figs = read_figures(self.figures, self.on_bad_record, report)
        # joined on pair_id: a repeated one would give its candidates the last figure's caption
        figs = check_unique(figs, "pair_id", self.figures, on_bad=self.on_bad_record, report=report)
        return {str(f.pair_id): (f.fig_caption, f.mentions_text()) for f in figs}

    def _read_preferences(self) -> list[Preference]:
        if self.preferences is None:
            return []
        report = self.reports["preferences"] = RecordReport()
        prefs = read_preferences(self.preferences, self.on_bad_record, report)
        # scores are kept by pair id: a repeated id would overwrite the first pair's
        return check_unique(prefs, "id", self.preferences, on_bad=self.on_bad_record, report=report)

    def _image_url(self, rel: str, path: Path, pos: int, kind: Any, build: bool) -> str | None:
        if self.root is None:
            return None
        try:
            found = self.root.resolve(rel)
            return image_ref(found) if build else None
        except (OSError, ValueError) as exc:
            raise BadRecordError(
                path, pos, str(exc), "image", kind=kind, category="missing_image"
            ) from exc

    def _context(self, cand: Candidate, pos: int, kind: Any) -> tuple[str, str]:
        """The caption and mentions the judge sees: from ``figures`` when given, else the
        candidate's own fields."""
        if self.figures is not None:
            fig = self.captions.get(str(cand.pair_id)) if cand.pair_id is not None else None
            if fig is None:
                what = (
                    "has no pair_id"
                    if cand.pair_id is None
                    else f"has pair_id {cand.pair_id!r}, which is not"
                )
                raise BadRecordError(
                    self.candidates,
                    pos,
                    f"candidate {cand.id!r} {what} among the figures of {self.figures}, so the "
                    "judge would see no caption",
                    "pair_id",
                    kind=kind,
                    category="unknown_figure",
                )
            return fig
        extra = cand.model_extra or {}
        try:
            mentions = mentions_text(extra.get("in_text_mention"))
        except (ValidationError, TypeError, AttributeError) as exc:
            raise BadRecordError(
                self.candidates,
                pos,
                "in_text_mention must be a string or a list of mentions "
                f"({{'tokens': ...}}), got {type(extra.get('in_text_mention')).__name__}",
                "in_text_mention",
                kind=kind,
                category="invalid:in_text_mention",
            ) from exc
        return str(extra.get("fig_caption") or ""), mentions

    def _candidates(
        self, report: RecordReport, on_bad: OnBad, build: bool = True
    ) -> Iterator[tuple[str, str, list]]:
        """(kind, item id, judge messages) of every usable candidate (``build=False``: only the
        checks, no messages or image hashes)."""
        ids: set[str] = set()
        for pos, kind, obj in iter_objects(self.candidates, on_bad=on_bad, report=report):
            try:
                cand = parse_record(obj, Candidate, self.candidates, pos, kind)
                if cand.id in ids:
                    raise BadRecordError(
                        self.candidates,
                        pos,
                        f"duplicate id {cand.id!r}",
                        "id",
                        kind=kind,
                        category="duplicate:id",
                    )
                caption, mentions = self._context(cand, pos, kind)
                url = self._image_url(cand.image, self.candidates, pos, kind, build)
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            ids.add(cand.id)
            report.kept()
            if not build:
                continue
            if not caption.strip():
                self.no_caption += 1
            qa = cand.qa_pairs()
            yield "candidate", cand.id, judge_messages(caption, mentions, qa, url, self.unit)

    def _pair_sides(self, build: bool = True) -> Iterator[tuple[str, str, list]]:
        """(side, pair id, judge messages) of both answers of every clinician pair."""
        for n, p in enumerate(self.prefs, start=1):
            try:
                url = self._image_url(p.image, self.preferences or Path(), n, "record", build)
            except BadRecordError as err:
                handle_bad(err, self.on_bad_record, self.reports["preferences"])
                continue
            q = strip_image_token(p.question)
            for side, answer in (("preferred", p.preferred), ("rejected", p.rejected)):
                yield (
                    side,
                    p.id,
                    judge_messages(p.fig_caption, p.mentions_text(), [(q, answer)], url, self.unit),
                )

    def check(self) -> None:
        if self.on_bad_record == "raise":  # fail before paying for any
            for _ in self._candidates(RecordReport(), "raise", build=False):
                pass
            for _ in self._pair_sides(build=False):
                pass

    def inputs(self) -> dict[str, Path | None]:
        return {
            "candidates": self.candidates,
            "figures": self.figures,
            "preferences": self.preferences,
        }

    def records(self) -> dict[str, RecordReport]:
        return self.reports

    def public(self) -> dict[str, Any]:
        return {
            "candidates": str(self.candidates),
            "figures": str(self.figures) if self.figures else None,
            "preferences": str(self.preferences) if self.preferences else None,
            "vision": self.vision,
            "unit": self.unit,
            "judge_prompt_version": prompt_version(self.unit),
            "on_bad_record": self.on_bad_record,
        }

    # -- requests and replies

    def requests(self) -> Iterator[tuple[ChatRequest, dict[str, Any]]]:
        items = itertools.chain(
            self._candidates(self.reports["candidates"], self.on_bad_record), self._pair_sides()
        )
        for kind, item_id, msgs in items:
            req = ChatRequest(msgs, dict(self.params), meta={"kind": kind, "id": item_id})
            yield req, {"kind": kind, "id": item_id, "user": msgs[1]["content"]}

    def requests_done(self) -> None:
        _warn_no_caption(
            self.no_caption, self.reports["candidates"].n_kept, self.figures is not None
        )

    def parses(self, reply: str | None) -> bool:
        return parse_score(reply) is not None

    def first_messages(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": judge_prompt(self.unit)},
            {"role": "user", "content": plan["user"]},
        ]

    # -- outputs

    def assemble(self, answers: Iterator[Answer]) -> Report:
        """Write ratings and failures in input order; score the clinician pairs."""
        rated = failed = reasked = unparsable = 0
        pair_scores: dict[str, dict[str, int]] = {}
        with (
            atomic_write(self.out / "ratings.jsonl") as fr,
            atomic_write(self.out / "failed.jsonl") as ff,
        ):
            for a in answers:
                kind, item_id = a.plan["kind"], a.plan["id"]
                reasked += a.reasked
                if a.reply is None:
                    failed += 1
                    unparsable += a.unparsable
                    reason = a.error or "unparsable_score: no 0-10 integer on line 1"
                    ff.write(json.dumps({"kind": kind, "id": item_id, "reason": reason}) + "\n")
                    continue
                score = parse_score(a.reply)
                assert score is not None
                if kind != "candidate":
                    pair_scores.setdefault(item_id, {})[kind] = score
                    continue
                rated += 1
                raw = a.first.content or ""
                if a.reasked:
                    raw = f"{raw}\n[re-asked]\n{a.reply}"
                rating = Rating(candidate_id=item_id, score=score, judge=self.client.model, raw=raw)
                line = json.dumps(rating.model_dump(mode="json", by_alias=True), ensure_ascii=False)
                fr.write(line + "\n")
        counts = {
            "candidates": self.reports["candidates"].n_kept,
            "no_caption": self.no_caption,
            "rated": rated,
            "failed": failed,
            "reasked": reasked,
            "unparsable_after_reask": unparsable,
        }
        return self._alignment_report(counts, pair_scores)

    def _alignment_report(
        self, counts: dict[str, Any], pair_scores: dict[str, dict[str, int]]
    ) -> Report:
        """The counts, and with ``preferences`` the judge's agreement with the clinicians."""
        if self.preferences is None:
            return Report(counts, manifest={"alignment": None})
        rows = [
            {
                "id": p.id,
                "preferred_score": pair_scores.get(p.id, {}).get("preferred"),
                "rejected_score": pair_scores.get(p.id, {}).get("rejected"),
            }
            for p in self.prefs
        ]
        write_jsonl(self.out / "preference_scores.jsonl", rows)
        alignment = _alignment(rows)
        metrics = {}
        if alignment["align_rate"] is not None:
            metrics = {
                "rate/align_rate": alignment["align_rate"],
                "rate/align_ties": alignment["ties"],
            }
        return Report(counts, manifest={"alignment": alignment}, metrics=metrics)


def _warn_no_caption(n: int, total: int, with_figures: bool) -> None:
    """Say once how many candidates the judge scores blind to their figure's caption: a silent
    "Caption: (none)" makes every score worse without anything showing it."""
    if not n:
        return
    fix = (
        "their figures have no caption"
        if with_figures
        else "pass --figures (the figures the candidates were generated from) so the judge sees "
        "each figure's caption and mentions"
    )
    log.warning(
        "rate: %d of %d candidates are judged without a caption (counts.no_caption); %s",
        n,
        total,
        fix,
    )


def _alignment(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge/clinician agreement: preferred above rejected; ties and unscored pairs apart."""
    aligned = misaligned = ties = unscored = 0
    for r in rows:
        p, q = r["preferred_score"], r["rejected_score"]
        if p is None or q is None:
            unscored += 1
        elif p > q:
            aligned += 1
        elif p < q:
            misaligned += 1
        else:
            ties += 1
    scored = aligned + misaligned + ties
    return {
        "pairs": len(rows),
        "aligned": aligned,
        "misaligned": misaligned,
        "ties": ties,
        "unscored": unscored,
        "align_rate": aligned / scored if scored else None,
        "align_rate_without_ties": (
            aligned / (aligned + misaligned) if aligned + misaligned else None
        ),
    }
