"""``rate``: a chat model scores each candidate 0-10 (the paper's model preference, stage 2).

The released parser fell back to fixed scores when the judge's reply did not parse (0 for one
side, 5 for the other), which biases every pair built from them. Here a reply without a score on
its first line gets one follow-up asking for the number; if that fails too the item is recorded
as failed and gets no rating at all.

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

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import ValidationError

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import (
    atomic_write,
    check_unique,
    handle_bad,
    iter_objects,
    parse_record,
    sha256_file,
    write_json,
    write_jsonl,
)
from biomedvital.data.outputs import output_lock
from biomedvital.data.records import (
    Candidate,
    Rating,
    mentions_text,
    read_figures,
    read_preferences,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError, OnBad, RecordReport
from biomedvital.generation.generate import Estimate, estimate_cost, pending_result
from biomedvital.generation.prompts import MENTIONS_HEADER, printable_messages
from biomedvital.llm.batch import BatchPending
from biomedvital.llm.config import ClientConfig
from biomedvital.llm.images import image_ref
from biomedvital.llm.journal import Journal
from biomedvital.llm.keys import request_key
from biomedvital.llm.outcome import ChatRequest, FillResult, Outcome
from biomedvital.llm.runner import fill_requests
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

__all__ = ["estimate_cost", "judge_messages", "parse_score", "rate"]

log = logging.getLogger(__name__)

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
    caption: str, mentions: str, qa: list[tuple[str, str]], image_url: str | None = None
) -> list[dict[str, Any]]:
    """The judge's request for one conversation (``qa``: question/answer pairs)."""
    convo = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa)
    parts = _context_parts(caption, mentions)
    parts.append({"type": "text", "text": f"Conversation to score:\n{convo}"})
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": parts}]


def _reask(messages: list[dict[str, Any]], reply: str) -> list[dict[str, Any]]:
    return [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": REASK_PROMPT},
    ]


def rate(
    candidates: Path,
    out: Path,
    client: ClientConfig,
    figures: Path | None = None,
    image_root: Path | None = None,
    vision: bool = False,
    preferences: Path | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    seed: int = 0,
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
        temperature / max_tokens / seed: judge sampling (part of the cache key).
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
    candidates, out = Path(candidates), Path(out)
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root")
    if isinstance(batch_results, str | Path):
        batch_results = [Path(batch_results)]
    reports = {"candidates": RecordReport()}
    by_pair: dict[str, tuple[str, str]] = {}
    if figures is not None:
        reports["figures"] = RecordReport()
        figs = read_figures(figures, on_bad_record, reports["figures"])
        # joined on pair_id: a repeated one would give its candidates the last figure's caption
        figs = check_unique(
            figs, "pair_id", figures, on_bad=on_bad_record, report=reports["figures"]
        )
        for f in figs:
            by_pair[str(f.pair_id)] = (f.fig_caption, f.mentions_text())
    prefs = []
    if preferences is not None:
        reports["preferences"] = RecordReport()
        prefs = read_preferences(preferences, on_bad_record, reports["preferences"])
        # scores are kept by pair id: a repeated id would overwrite the first pair's
        prefs = check_unique(
            prefs, "id", preferences, on_bad=on_bad_record, report=reports["preferences"]
        )
    root = ImageRoot(image_root) if vision else None
    no_caption = 0  # candidates sent to the judge without a caption (filled as they stream)
    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    params.update(extra_body or {})
    estimate = Estimate(client.price_per_million, client.mode == "batch")

    def image_url(rel: str, path: Path, pos: int, kind: Any, build: bool = True) -> str | None:
        if root is None:
            return None
        try:
            found = root.resolve(rel)
            return image_ref(found) if build else None
        except (OSError, ValueError) as exc:
            raise BadRecordError(
                path, pos, str(exc), "image", kind=kind, category="missing_image"
            ) from exc

    def context(cand: Candidate, pos: int, kind: Any) -> tuple[str, str]:
        """The caption and mentions the judge sees: from ``figures`` when given, else the
        candidate's own fields."""
        if figures is not None:
            fig = by_pair.get(str(cand.pair_id)) if cand.pair_id is not None else None
            if fig is None:
                what = (
                    "has no pair_id"
                    if cand.pair_id is None
                    else f"has pair_id {cand.pair_id!r}, which is not"
                )
                raise BadRecordError(
                    candidates,
                    pos,
                    f"candidate {cand.id!r} {what} among the figures of {figures}, so the "
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
                candidates,
                pos,
                "in_text_mention must be a string or a list of mentions "
                f"({{'tokens': ...}}), got {type(extra.get('in_text_mention')).__name__}",
                "in_text_mention",
                kind=kind,
                category="invalid:in_text_mention",
            ) from exc
        return str(extra.get("fig_caption") or ""), mentions

    def items(
        report: RecordReport, on_bad: OnBad, build: bool = True
    ) -> Iterator[tuple[str, str, list]]:
        """(kind, item id, judge messages): candidates streamed, then both sides of each pair
        (``build=False``: only the checks, no messages or image hashes)."""
        nonlocal no_caption
        ids: set[str] = set()
        for pos, kind, obj in iter_objects(candidates, on_bad=on_bad, report=report):
            try:
                cand = parse_record(obj, Candidate, candidates, pos, kind)
                if cand.id in ids:
                    raise BadRecordError(
                        candidates,
                        pos,
                        f"duplicate id {cand.id!r}",
                        "id",
                        kind=kind,
                        category="duplicate:id",
                    )
                caption, mentions = context(cand, pos, kind)
                url = image_url(cand.image, candidates, pos, kind, build)
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
                continue
            ids.add(cand.id)
            report.kept()
            if not build:
                continue
            if not caption.strip():
                no_caption += 1
            yield "candidate", cand.id, judge_messages(caption, mentions, cand.qa_pairs(), url)
        del ids
        for n, p in enumerate(prefs, start=1):
            try:
                url = image_url(p.image, preferences or Path(), n, "record", build)
            except BadRecordError as err:
                handle_bad(err, on_bad, reports["preferences"])
                continue
            q = strip_image_token(p.question)
            for side, answer in (("preferred", p.preferred), ("rejected", p.rejected)):
                yield (
                    side,
                    p.id,
                    judge_messages(p.fig_caption, p.mentions_text(), [(q, answer)], url),
                )

    def first_requests(plan: IO[str] | None) -> Iterator[ChatRequest]:
        for kind, item_id, msgs in items(reports["candidates"], on_bad_record):
            req = ChatRequest(msgs, dict(params), meta={"kind": kind, "id": item_id})
            req.key = request_key(client.model, msgs, req.params)
            estimate.add(req)
            if plan is not None:
                line = {"kind": kind, "id": item_id, "key": req.key, "user": msgs[1]["content"]}
                plan.write(json.dumps(line, ensure_ascii=False) + "\n")
            yield req

    if on_bad_record == "raise" and not dry_run:
        for _ in items(RecordReport(), "raise", build=False):  # fail before paying for any
            pass

    if dry_run:
        first = None
        for req in first_requests(None):
            first = first or req
        if first is not None:
            print(printable_messages(first.messages))
        _warn_no_caption(no_caption, reports["candidates"].n_kept, figures is not None)
        est = estimate.as_dict()
        print(
            f"\n{est['requests']} requests (+ re-asks), ~{est['input_tokens']} input "
            f"tokens, estimated cost <= ${est['cost_usd_upper_bound']:.4f}"
        )
        return {"dry_run": True, "estimate": est}

    # one run per output folder; taking the lock removes temporaries of a killed run
    with output_lock(out):
        public = {
            **client.public(),
            "candidates": str(candidates),
            "figures": str(figures) if figures else None,
            "preferences": str(preferences) if preferences else None,
            "vision": vision,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "seed": seed,
            "extra_body": extra_body,
            "on_bad_record": on_bad_record,
            "batch_results": [str(p) for p in batch_results] if batch_results else None,
        }
        plan_path = out / ".rate.plan.jsonl"
        with PipelineRun("rating", "rate", store, {**(tags or {}), "model": client.model}) as run:
            run.log_params(public)
            with Journal(out / "journal.jsonl") as journal:
                try:
                    with open(plan_path, "w", encoding="utf-8") as plan:
                        first = fill_requests(
                            client,
                            journal,
                            first_requests(plan),
                            "rate",
                            progress,
                            batch_results=batch_results,
                        )
                    _warn_no_caption(no_caption, reports["candidates"].n_kept, figures is not None)
                    second = fill_requests(
                        client,
                        journal,
                        _reask_requests(plan_path, journal, client.model, params),
                        "rate-reask",
                        progress,
                        batch_results=batch_results,
                    )
                except BatchPending as exc:
                    plan_path.unlink(missing_ok=True)
                    return pending_result(exc, run)
                counts, pref_rows = _assemble(
                    plan_path, journal, first, second, client, params, out
                )
                torn = journal.torn_lines
            plan_path.unlink(missing_ok=True)
            counts = {
                "candidates": reports["candidates"].n_kept,
                "no_caption": no_caption,
                **counts,
            }
            alignment = None
            if preferences is not None:
                rows = [
                    {
                        "id": p.id,
                        "preferred_score": pref_rows.get(p.id, {}).get("preferred"),
                        "rejected_score": pref_rows.get(p.id, {}).get("rejected"),
                    }
                    for p in prefs
                ]
                write_jsonl(out / "preference_scores.jsonl", rows)
                alignment = _alignment(rows)
            ledger1, ledger2 = first.ledger, second.ledger
            ledgers = {"first": ledger1.as_dict(), "reask": ledger2.as_dict()}
            cost = ledger1.cost_usd + ledger2.cost_usd
            inputs = {"candidates": {"path": str(candidates), "sha256": sha256_file(candidates)}}
            for name, path in (("figures", figures), ("preferences", preferences)):
                if path is not None:
                    inputs[name] = {"path": str(path), "sha256": sha256_file(path)}
            manifest = {
                "counts": counts,
                "alignment": alignment,
                "ledger": ledgers,
                "cost_usd": round(cost, 6),
                "torn_journal_lines": torn,
                "estimate": estimate.as_dict(),
                "batch": {"first": first.batch, "reask": second.batch}
                if client.mode == "batch"
                else None,
                "inputs": inputs,
                "records": {k: r.as_dict() for k, r in reports.items()},
                "config": public,
                "mlflow_run_id": run.run_id,
                "git": git_state(),
            }
            metrics = {f"rate/{k}": v for k, v in counts.items()}
            metrics["rate/cost_usd"] = cost
            metrics["rate/requests_sent"] = ledger1.requests_sent + ledger2.requests_sent
            if alignment and alignment["align_rate"] is not None:
                metrics["rate/align_rate"] = alignment["align_rate"]
                metrics["rate/align_ties"] = alignment["ties"]
            run.log_metrics(metrics)
            run.log_dict(manifest, "rate.manifest.json")
        write_json(out / "manifest.json", manifest)
        return manifest


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


def _plan_lines(plan_path: Path) -> Iterator[dict[str, Any]]:
    with open(plan_path, encoding="utf-8") as f:
        for raw in f:
            yield json.loads(raw)


def _messages(user: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": user}]


def _reask_requests(
    plan_path: Path, journal: Journal, model: str, params: dict[str, Any]
) -> Iterator[ChatRequest]:
    """The follow-up for every answered item whose reply has no score on its first line."""
    for p in _plan_lines(plan_path):
        entry = journal.get(p["key"])
        if entry is None:
            continue
        content = entry["response"].get("content")
        if parse_score(content) is not None:
            continue
        msgs = _reask(_messages(p["user"]), content or "")
        req = ChatRequest(msgs, dict(params), meta={"kind": p["kind"], "id": p["id"]})
        req.key = request_key(model, msgs, req.params)
        yield req


def _assemble(
    plan_path: Path,
    journal: Journal,
    first: FillResult,
    second: FillResult,
    config: ClientConfig,
    params: dict[str, Any],
    out: Path,
) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Write ratings and failures in input order; return the counts and pair scores."""
    prices, model = config.price_per_million, config.model
    rated = failed = reasked = unparsable = 0
    pref_scores: dict[str, dict[str, int]] = {}

    def outcome(key: str, res: FillResult) -> Outcome:
        return res.outcome(key, journal, prices)

    with (
        atomic_write(out / "ratings.jsonl") as fr,
        atomic_write(out / "failed.jsonl") as ff,
    ):
        for p in _plan_lines(plan_path):
            kind, item_id = p["kind"], p["id"]
            res = outcome(p["key"], first)
            score, raw, reason = None, "", None
            if not res.ok:
                reason = res.error or "unknown"
            else:
                score = parse_score(res.content)
                raw = res.content or ""
                if score is None:
                    reasked += 1
                    msgs = _reask(_messages(p["user"]), raw)
                    res2 = outcome(request_key(model, msgs, params), second)
                    score = parse_score(res2.content) if res2.ok else None
                    if score is not None:
                        raw = f"{raw}\n[re-asked]\n{res2.content}"
                    elif res2.ok:
                        reason = "unparsable_score: no 0-10 integer on line 1"
                        unparsable += 1
                    else:
                        reason = res2.error or "unknown"
            if score is None:
                failed += 1
                ff.write(json.dumps({"kind": kind, "id": item_id, "reason": reason}) + "\n")
            elif kind == "candidate":
                rated += 1
                rating = Rating(candidate_id=item_id, score=score, judge=model, raw=raw)
                ff_line = json.dumps(
                    rating.model_dump(mode="json", by_alias=True), ensure_ascii=False
                )
                fr.write(ff_line + "\n")
            else:
                pref_scores.setdefault(item_id, {})[kind] = score
    counts = {
        "rated": rated,
        "failed": failed,
        "reasked": reasked,
        "unparsable_after_reask": unparsable,
    }
    return counts, pref_scores


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
