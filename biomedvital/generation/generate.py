"""``generate``: ask a chat model for instruction conversations about PMC figures (paper stage 1).

One request per figure; responses are journaled so an interrupted run resumes where it stopped
and a finished one reruns for free. Figures are streamed: each one's request is built when the
client has room for it, and a small plan line (key, ids, demonstrations) is spooled to disk so
the outputs are assembled afterwards, in figure order, from the plan and the journal (the
chat-stage skeleton, :mod:`biomedvital.llm.stage`). Memory therefore stays flat in the number of
figures (the journal's key index and the set of seen ``pair_id`` values are all that grow).
Outputs are written at the end, atomically.

``client.mode: batch`` sends the same requests as Batch API jobs (or writes them for vLLM's
offline batch runner), see :mod:`biomedvital.llm.batch`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import (
    atomic_write,
    detect_format,
    handle_bad,
    iter_objects,
    parse_record,
)
from biomedvital.data.records import (
    Candidate,
    Demonstration,
    SourceFigure,
    read_figures,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError, OnBad, PositionKind, RecordReport
from biomedvital.generation.parse import (
    DroppedExchange,
    FlaggedAnswers,
    Rejected,
    TruncatedReplies,
    check_flagged_answers,
    check_truncated_replies,
    check_truncation,
    pair_records,
    parse_conversation,
    parse_pairs,
)
from biomedvital.generation.prompts import (
    MODALITIES,
    PromptStyle,
    build_messages,
    check_prompt_style,
    prompt_version,
    select_demonstrations,
)
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.images import image_ref
from biomedvital.llm.outcome import ChatRequest, Outcome
from biomedvital.llm.sampling import SamplingArgs
from biomedvital.llm.stage import Answer, ChatStage, Report
from biomedvital.tracking.mlflow import DEFAULT_STORE

log = logging.getLogger(__name__)

SAMPLING = SamplingArgs(temperature=0.7, max_tokens=1024)
"""``generate``'s default sampling: varied conversations, room for 4-5 exchanges."""


def figure_image(fig: SourceFigure) -> str:
    """The figure's image file: its ``image`` field if present, else ``<pair_id>.jpg`` (LLaVA-Med)."""
    image = getattr(fig, "image", None)
    return str(image) if image else f"{fig.pair_id}.jpg"


# ----------------------------------------------------------------------------- reading input


def _streamable(path: Path) -> bool:
    """Whether ``path`` can be read one figure at a time: a JSON array, or JSONL whose first
    line is one figure (not LLaVA-Med's ``{domain: [figures]}`` document)."""
    fmt = detect_format(path)
    if fmt == "array":
        return True
    if fmt != "jsonl":
        return False
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    head = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                except ValueError:
                    return False  # pretty-printed JSON, or broken: read_figures sorts it out
                return isinstance(head, dict) and (
                    "pair_id" in head or not all(isinstance(v, list) for v in head.values())
                )
    return False


def iter_figures(
    path: Path, on_bad: OnBad, report: RecordReport
) -> Iterator[tuple[int, PositionKind, SourceFigure]]:
    """``(position, kind, figure)`` one at a time; bad records raised or skipped (counted).

    JSONL is streamed line by line and a JSON array element by element (positions: 1-based
    record index); LLaVA-Med's ``{domain: [figures]}`` file is read whole. Kept records are not
    counted here: the caller counts them once its own checks pass.
    """
    if _streamable(path):
        for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
            try:
                fig = parse_record(obj, SourceFigure, path, pos, kind)
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            yield pos, kind, fig
        return
    scratch = RecordReport()
    figs = read_figures(path, on_bad, scratch)
    scratch.n_kept = 0
    report.merge(scratch)
    for pos, fig in enumerate(figs, start=1):
        yield pos, "record", fig


def _check_domain(domain: dict[str, bool], path: Path, pos: int, kind: PositionKind) -> None:
    unknown = sorted(set(domain) - set(MODALITIES))
    if unknown:
        raise BadRecordError(
            path,
            pos,
            f"unknown domain flag(s) {unknown}; known flags: {', '.join(MODALITIES)}",
            "domain",
            kind=kind,
            category="unknown_domain",
        )


def check_figure(fig: SourceFigure, path: Path, pos: int, kind: PositionKind) -> None:
    """Refuse a figure that cannot make a useful prompt: blank caption, unknown domain flags."""
    if not fig.fig_caption.strip():
        raise BadRecordError(
            path, pos, "empty caption", "fig_caption", kind=kind, category="empty_caption"
        )
    _check_domain(fig.domain, path, pos, kind)


def _check_demo(demo: Demonstration, path: Path, pos: int, kind: PositionKind) -> str | None:
    """Raise for a demonstration that cannot serve as an example; return a note for one that
    can but departs from strict question/answer alternation (the released file has two)."""
    if not demo.fig_caption.strip():
        raise BadRecordError(
            path, pos, "empty caption", "fig_caption", kind=kind, category="empty_caption"
        )
    _check_domain(demo.domain, path, pos, kind)
    turns = demo.conversations
    problem = None
    roles = {t.from_ for t in turns}
    if roles != {"human", "gpt"}:
        problem = "needs at least one question and one answer"
    else:
        for i, t in enumerate(turns):
            if not strip_image_token(t.value):
                problem = f"turn {i + 1} is empty"
                break
    if problem:
        raise BadRecordError(
            path,
            pos,
            f"malformed conversation: {problem}",
            "conversations",
            kind=kind,
            category="malformed_conversation",
        )
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t.from_ != expected:
            return f"{path}: {kind} {pos}: turn {i + 1} is from {t.from_!r}, expected {expected!r}"
    return None


def load_demonstrations(path: Path, on_bad: OnBad, report: RecordReport) -> list[Demonstration]:
    """Demonstrations that can serve as examples; bad ones raised or skipped (counted), with
    their file and record: invalid fields, blank caption, unknown domain flags, a conversation
    without a question and an answer or with an empty turn, duplicate ids. Turns that do not
    alternate are kept as released and counted under ``repaired``."""
    demos: list[Demonstration] = []
    ids: dict[str, int] = {}
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        try:
            demo = parse_record(obj, Demonstration, path, pos, kind)
            note = _check_demo(demo, path, pos, kind)
            if demo.id in ids:
                raise BadRecordError(
                    path,
                    pos,
                    f"duplicate id {demo.id!r} (also at {ids[demo.id]})",
                    "id",
                    kind=kind,
                    category="duplicate:id",
                )
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        ids[demo.id] = pos
        if note is not None:  # kept as released, and counted
            report.repair("non_alternating_turns", example=note)
        report.kept()
        demos.append(demo)
    return demos


# ----------------------------------------------------------------------------- the verb


def generate(
    figures: Path,
    image_root: Path,
    demonstrations: Path,
    out: Path,
    client: ClientConfig,
    n_demos: int = 5,
    vision: bool = True,
    answers: int = 1,
    sampling: SamplingArgs = SAMPLING,
    extra_body: dict[str, Any] | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    dry_run: bool = False,
    store: str = DEFAULT_STORE,
    tags: dict[str, str] | None = None,
    min_exchanges: int = 4,
    flagged_answers: FlaggedAnswers = "drop_exchange",
    prompt_style: PromptStyle = "suite",
    truncated_replies: TruncatedReplies = "reject",
    progress: bool = True,
    batch_results: list[Path] | Path | None = None,
) -> dict:
    """Generate candidate conversations (or answer pairs) for each figure with a chat model.

    Args:
        figures: PMC figures in LLaVA-Med's layout (JSONL, JSON array or domain-keyed dict).
        image_root: folder of the figure images (``<pair_id>.jpg``); paths cannot escape it.
        demonstrations: clinician-picked conversations (``doctor_few_shot_examples.json``).
        out: output folder: ``candidates.jsonl`` (``answers=1``) or ``pairs.jsonl``
            (``answers=2``), ``journal.jsonl``, ``failed.jsonl``, ``dropped_exchanges.jsonl``,
            ``manifest.json``
            (``batch/`` in batch mode).
        client: the endpoint and how to call it, shared with ``rate``, ``judge`` and
            ``pairwise``: ``base_url``, ``model`` (paper: ``gpt-4-vision-preview``),
            ``api_key_env`` (the variable's name, never the key), pacing, retries, prices and
            ``mode: batch`` (Batch API jobs at about half the price, 24 h window).
        n_demos: demonstrations per prompt, one per modality (paper: 5).
        vision: attach the image as a base64 data URL; ``false`` sends text only.
        answers: 1 = conversations; 2 = per question two answers, for clinician marking.
        sampling: temperature, top_p, seed and max_tokens of the requests (part of the cache
            key); the seed also draws each figure's demonstrations.
        extra_body: extra request fields for the endpoint, sent as given and part of the cache
            key: e.g. llama.cpp's ``grammar`` or vLLM's ``guided_choice`` to constrain a small
            local model's reply to the format asked for.
        on_bad_record: ``raise`` (before any request is sent: an error naming the file and the
            record) or ``skip`` (counted in the manifest) for figures without a caption, with
            unknown domain flags or a missing image, and for malformed demonstrations.
        dry_run: print the first full prompt and the estimated cost; send nothing, write nothing.
        store: MLflow store folder (experiment ``generation``).
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).
        min_exchanges: conversations with fewer question-answer exchanges are rejected
            (``answers=2`` needs one complete question).
        flagged_answers: what an answer that refuses or gives away the caption or context
            costs: ``drop_exchange`` (LLaVA-Med's post-processing removes such answers) takes
            out its question-answer exchange, written to ``dropped_exchanges.jsonl`` and
            counted, and rejects the reply only when fewer than ``min_exchanges`` are left;
            ``reject`` rejects the whole reply; ``keep`` (BioMed-VITAL's released script)
            keeps them, counted by reason (``kept_flagged_answers_by_reason``). Applied when
            replies are parsed, so a rerun with another value re-parses the journal and sends
            nothing.
        prompt_style: ``suite`` (this project's prompts) or ``vital`` (the released
            clinician-demonstration script's requirements in this project's words; with
            ``answers=2``, the released two-answer script's); see ``prompts``.
        truncated_replies: a reply cut off by ``max_tokens`` has a half-written last answer:
            ``reject`` it (counted as ``truncated``) or ``keep`` it as the released script does
            (counted as ``kept_truncated``). Applied when replies are parsed, like
            ``flagged_answers``.
        progress: show the progress bar.
        batch_results: results file(s) of the offline runner to import (``client.batch_runner:
            file``).
    """
    stage = Generate(
        Path(figures),
        Path(image_root),
        Path(demonstrations),
        n_demos,
        vision,
        answers,
        on_bad_record,
        min_exchanges,
        flagged_answers,
        prompt_style,
        truncated_replies,
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


class Generate(ChatStage):
    """``generate`` on the chat-stage skeleton: one request per usable figure, its reply parsed
    into a candidate conversation (or answer pairs)."""

    name = "generate"
    experiment = "generation"

    def __init__(
        self,
        figures: Path,
        image_root: Path,
        demonstrations: Path,
        n_demos: int,
        vision: bool,
        answers: int,
        on_bad_record: OnBad,
        min_exchanges: int,
        flagged_answers: FlaggedAnswers,
        prompt_style: PromptStyle,
        truncated_replies: TruncatedReplies,
        **stage: Any,
    ) -> None:
        if answers not in (1, 2):
            raise ValueError(f"answers must be 1 or 2, got {answers}")
        check_prompt_style(prompt_style)
        check_flagged_answers(flagged_answers)
        check_truncated_replies(truncated_replies)
        super().__init__(**stage)
        self.figures, self.image_root, self.demonstrations = figures, image_root, demonstrations
        self.n_demos, self.vision, self.answers = n_demos, vision, answers
        self.on_bad_record, self.min_exchanges = on_bad_record, min_exchanges
        self.flagged_answers = flagged_answers
        self.prompt_style, self.truncated_replies = prompt_style, truncated_replies
        self.reports = {"figures": RecordReport(), "demonstrations": RecordReport()}
        self.demos = load_demonstrations(
            demonstrations, on_bad_record, self.reports["demonstrations"]
        )
        if n_demos > 0 and not self.demos:
            raise ValueError(f"{demonstrations}: no usable demonstrations (n_demos={n_demos})")
        self.root = ImageRoot(image_root) if vision else None
        self.version = prompt_version(answers, prompt_style)
        self.output = self.out / ("candidates.jsonl" if answers == 1 else "pairs.jsonl")

    # -- inputs

    def _checked(
        self, report: RecordReport, on_bad: OnBad
    ) -> Iterator[tuple[SourceFigure, Path | None, int, PositionKind]]:
        """Figures that pass every check, with their image path (``None`` without vision)."""
        seen: set[str] = set()
        for pos, kind, fig in iter_figures(self.figures, on_bad, report):
            try:
                check_figure(fig, self.figures, pos, kind)
                pid = str(fig.pair_id)
                if pid in seen:
                    raise BadRecordError(
                        self.figures,
                        pos,
                        f"duplicate pair_id {pid!r}",
                        "pair_id",
                        kind=kind,
                        category="duplicate:pair_id",
                    )
                path = self._image_path(fig, pos, kind)
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            seen.add(pid)
            yield fig, path, pos, kind

    def _image_path(self, fig: SourceFigure, pos: int, kind: PositionKind) -> Path | None:
        if self.root is None:
            return None
        try:
            return self.root.resolve(figure_image(fig))
        except (OSError, ValueError) as exc:
            raise BadRecordError(
                self.figures, pos, str(exc), "image", kind=kind, category="missing_image"
            ) from exc

    def check(self) -> None:
        if self.on_bad_record == "raise":  # fail on a bad record before paying for any
            for _ in self._checked(RecordReport(), "raise"):
                pass

    def inputs(self) -> dict[str, Path | None]:
        return {"figures": self.figures, "demonstrations": self.demonstrations}

    def records(self) -> dict[str, RecordReport]:
        return self.reports

    def public(self) -> dict[str, Any]:
        return {
            "figures": str(self.figures),
            "image_root": str(self.image_root),
            "demonstrations": str(self.demonstrations),
            "out": str(self.out),
            "n_demos": self.n_demos,
            "vision": self.vision,
            "answers": self.answers,
            "min_exchanges": self.min_exchanges,
            "flagged_answers": self.flagged_answers,
            "prompt_style": self.prompt_style,
            "truncated_replies": self.truncated_replies,
            "on_bad_record": self.on_bad_record,
        }

    # -- requests

    def requests(self) -> Iterator[tuple[ChatRequest, dict[str, Any]]]:
        """One request per usable figure; its plan line says what the output record needs."""
        report = self.reports["figures"]
        for fig, path, pos, kind in self._checked(report, self.on_bad_record):
            url = None
            if path is not None:
                try:
                    url = image_ref(path)
                except (OSError, ValueError) as exc:  # unreadable DICOM and the like
                    err = BadRecordError(
                        self.figures, pos, str(exc), "image", kind=kind, category="missing_image"
                    )
                    handle_bad(err, self.on_bad_record, report)
                    continue
            report.kept()
            chosen = select_demonstrations(
                self.demos, self.n_demos, self.sampling.seed, str(fig.pair_id)
            )
            msgs = build_messages(fig, chosen, url, self.answers, self.prompt_style)
            req = ChatRequest(msgs, dict(self.params), meta={"pair_id": fig.pair_id})
            line = {
                "pair_id": fig.pair_id,
                "image": figure_image(fig),
                "domain": fig.domain,
                "fig_caption": fig.fig_caption,
                "mentions": fig.mentions_text(),
                "demos": [d.id for d in chosen],
            }
            yield req, line

    # -- outputs

    def assemble(self, answers: Iterator[Answer]) -> Report:
        """Write the outputs in figure order; a reply that does not parse is rejected with its
        reason, an exchange taken out of a kept reply is written to ``dropped_exchanges``."""
        tally = _Tally()
        with (
            atomic_write(self.output) as fo,
            atomic_write(self.out / "failed.jsonl") as ff,
            atomic_write(self.out / "dropped_exchanges.jsonl") as fd,
        ):
            for answer in answers:
                tally.requested += 1
                plan, res = answer.plan, answer.first
                if not res.ok:
                    tally.failed += 1
                    _emit(ff, _request_failure(plan, res))
                    continue
                dropped: list[DroppedExchange] = []
                try:
                    records = self._records(plan, res, dropped)
                except Rejected as rej:
                    tally.rejected[rej.reason] = tally.rejected.get(rej.reason, 0) + 1
                    _emit(ff, _parse_failure(plan, rej, res.content))
                    continue
                for rec in records:
                    _emit(fo, rec)
                tally.written += len(records)
                tally.kept_truncated += res.finish_reason == "length"
                for d in dropped:  # taken out of a kept reply: reported, never silently lost
                    if d.kept:  # flagged_answers: keep
                        tally.kept_flagged[d.reason] = tally.kept_flagged.get(d.reason, 0) + 1
                        continue
                    tally.dropped[d.reason] = tally.dropped.get(d.reason, 0) + 1
                    _emit(fd, _dropped_line(plan, d))
        counts = {
            "figures": self.reports["figures"].n_kept + self.reports["figures"].n_skipped,
            **tally.as_dict(),
            "torn_journal_lines": self.torn_lines,
        }
        return Report(counts, manifest={"output": str(self.output), "prompt_version": self.version})

    def _records(
        self, plan: dict[str, Any], res: Outcome, dropped: list[DroppedExchange]
    ) -> list[dict[str, Any]]:
        """The output records of one reply (raises :class:`Rejected`)."""
        check_truncation(res.finish_reason, self.truncated_replies)
        generator = {
            "model": self.client.model,
            "prompt_version": self.version,
            "request_key": plan["key"],
            "params": self.params,
            "demonstrations": plan["demos"],
            "finish_reason": res.finish_reason,
        }
        flagged = self.flagged_answers
        if self.answers == 1:
            turns = parse_conversation(
                res.content, self.min_exchanges, res.refusal, flagged, dropped
            )
            cand = Candidate(
                id=plan["pair_id"],
                image=plan["image"],
                pair_id=plan["pair_id"],
                conversations=turns,
                domain=plan["domain"],
                generator=generator,
            )
            return [cand.model_dump(mode="json", by_alias=True)]
        items = parse_pairs(res.content, 1, res.refusal, flagged, dropped)
        base = {
            "image": plan["image"],
            "fig_caption": plan["fig_caption"],
            "in_text_mention": plan["mentions"],
            "pair_id": plan["pair_id"],
            "generator": generator,
        }
        return pair_records(items, base, str(plan["pair_id"]))


class _Tally:
    """What ``generate`` wrote, counted by outcome and reason."""

    def __init__(self) -> None:
        self.requested = self.failed = self.written = self.kept_truncated = 0
        self.rejected: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.kept_flagged: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "done": self.requested - self.failed,
            "failed": self.failed,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "dropped_exchanges": sum(self.dropped.values()),
            "dropped_exchanges_by_reason": dict(sorted(self.dropped.items())),
            "kept_flagged_answers": sum(self.kept_flagged.values()),
            "kept_flagged_answers_by_reason": dict(sorted(self.kept_flagged.items())),
            "kept_truncated": self.kept_truncated,
            "written": self.written,
        }


def _emit(fh: IO[str], rec: dict[str, Any]) -> None:
    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _request_failure(plan: dict[str, Any], res: Outcome) -> dict[str, Any]:
    return {
        "pair_id": plan["pair_id"],
        "key": plan["key"],
        "stage": "request",
        "reason": res.error,
        "attempts": res.attempts,
    }


def _parse_failure(plan: dict[str, Any], rej: Rejected, raw: str | None) -> dict[str, Any]:
    return {
        "pair_id": plan["pair_id"],
        "key": plan["key"],
        "stage": "parse",
        "reason": rej.reason,
        "detail": rej.detail,
        "raw": raw,
    }


def _dropped_line(plan: dict[str, Any], d: DroppedExchange) -> dict[str, Any]:
    return {
        "pair_id": plan["pair_id"],
        "key": plan["key"],
        "reason": d.reason,
        "question": d.question,
        "answer": d.answer,
    }
