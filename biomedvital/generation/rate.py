"""``rate``: a chat model scores each candidate 0-10 (the paper's model preference, stage 2).

The released parser fell back to fixed scores when the judge's reply did not parse (0 for one
side, 5 for the other), which biases every pair built from them. Here a reply without a score on
its first line gets one follow-up asking for the number; if that fails too the item is recorded
as failed and gets no rating at all.

With ``preferences`` the judge also scores both answers of each clinician pair, and the run
reports how often it agrees with the clinicians (preferred scored above rejected; ties apart).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import check_unique, read_records, sha256_file, write_json, write_jsonl
from biomedvital.data.records import (
    Candidate,
    Rating,
    SourceFigure,
    read_figures,
    read_preferences,
    strip_image_token,
)
from biomedvital.data.report import RecordReport
from biomedvital.generation.client import (
    ChatRequest,
    ClientConfig,
    request_key,
    run_requests,
)
from biomedvital.generation.generate import estimate_cost
from biomedvital.generation.prompts import MENTIONS_HEADER, image_ref, printable_messages
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

JUDGE_PROMPT = """\
You are a medical expert acting as a judge of training data for a medical vision-language \
assistant. You receive a figure's caption, the article sentences that refer to it, and a \
question-answer conversation about the image.

Score the conversation from 0 (useless or wrong) to 10 (excellent), considering:
- relevance of the questions to the image and to medicine;
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


def parse_score(text: str | None) -> int | None:
    """The first number on the first non-blank line if it is an integer 0..10, else ``None``."""
    if not text:
        return None
    for line in text.splitlines():
        if line.strip():
            first = line
            break
    else:
        return None
    m = re.search(r"\d+(?:\.\d+)?", first)
    if m is None or "." in m.group(0):
        return None
    value = int(m.group(0))
    return value if 0 <= value <= 10 else None


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
    base_url: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    figures: Path | None = None,
    image_root: Path | None = None,
    vision: bool = False,
    preferences: Path | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    seed: int = 0,
    concurrency: int = 8,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    max_attempts: int = 5,
    timeout_s: float = 120,
    price_per_million: dict[str, float] | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    dry_run: bool = False,
    store: str = DEFAULT_STORE,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    progress: bool = True,
) -> dict:
    """Score each candidate 0-10 with a judge model; write ``ratings.jsonl`` (Rating records).

    Args:
        candidates: generated conversations (LLaVA layout, JSONL or JSON array).
        out: output folder: ``ratings.jsonl``, ``failed.jsonl``, ``journal.jsonl``,
            ``manifest.json`` and, with ``preferences``, ``preference_scores.jsonl``.
        base_url / model / api_key_env: the judge endpoint (key read from that variable only).
        figures: figures to take captions and mentions from, joined on ``pair_id`` (else the
            candidates' own ``fig_caption`` / ``in_text_mention`` fields are used).
        image_root / vision: attach each candidate's image to the judge's request.
        preferences: clinician pairs (or accept/reject marks): both answers are scored too and
            the agreement with clinicians is reported.
        temperature / max_tokens / seed: judge sampling (part of the cache key).
        concurrency / requests_per_minute / tokens_per_minute / max_attempts / timeout_s /
            backoff_base_s / backoff_max_s / price_per_million: as for ``generate``.
        on_bad_record: ``raise`` or ``skip`` (counted) for bad input records.
        dry_run: print the first judge prompt and the estimated cost; send nothing.
        store: MLflow store folder (experiment ``rating``).
        progress: show the progress bar.
    """
    candidates, out = Path(candidates), Path(out)
    if vision and image_root is None:
        raise ValueError("vision=True needs image_root")
    config = ClientConfig.from_knobs(locals())
    reports = {"candidates": RecordReport()}
    cands: list[Candidate] = read_records(
        candidates, Candidate, on_bad=on_bad_record, report=reports["candidates"]
    )
    cands = check_unique(
        cands, "id", candidates, on_bad=on_bad_record, report=reports["candidates"]
    )
    by_pair: dict[str, SourceFigure] = {}
    if figures is not None:
        reports["figures"] = RecordReport()
        by_pair = {
            str(f.pair_id): f for f in read_figures(figures, on_bad_record, reports["figures"])
        }
    root = ImageRoot(image_root) if vision else None
    params = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}

    # (kind, item id, messages): kind "candidate", or "preferred"/"rejected" of a clinician pair
    items: list[tuple[str, str, list[dict[str, Any]]]] = []
    for cand in cands:
        fig = by_pair.get(str(cand.pair_id)) if cand.pair_id is not None else None
        if fig is not None:
            caption, mentions = fig.fig_caption, fig.mentions_text()
        else:
            extra = cand.model_extra or {}
            caption = str(extra.get("fig_caption") or "")
            mention = extra.get("in_text_mention")
            mentions = mention if isinstance(mention, str) else ""
        url = image_ref(root.resolve(cand.image)) if root is not None else None
        items.append(
            ("candidate", cand.id, judge_messages(caption, mentions, cand.qa_pairs(), url))
        )
    prefs = []
    if preferences is not None:
        reports["preferences"] = RecordReport()
        prefs = read_preferences(preferences, on_bad_record, reports["preferences"])
        for p in prefs:
            url = image_ref(root.resolve(p.image)) if root is not None else None
            q = strip_image_token(p.question)
            for side, answer in (("preferred", p.preferred), ("rejected", p.rejected)):
                msgs = judge_messages(p.fig_caption, p.mentions_text(), [(q, answer)], url)
                items.append((side, p.id, msgs))

    requests = [ChatRequest(m, dict(params), meta={"kind": k, "id": i}) for k, i, m in items]
    for r in requests:
        r.key = request_key(model, r.messages, r.params)
    estimate = estimate_cost(requests, config.price_per_million)
    if dry_run:
        if requests:
            print(printable_messages(requests[0].messages))
        print(
            f"\n{estimate['requests']} requests (+ re-asks), ~{estimate['input_tokens']} input "
            f"tokens, estimated cost <= ${estimate['cost_usd_upper_bound']:.4f}"
        )
        return {"dry_run": True, "estimate": estimate}

    out.mkdir(parents=True, exist_ok=True)
    journal = out / "journal.jsonl"
    public = {
        **config.public(),
        "candidates": str(candidates),
        "figures": str(figures) if figures else None,
        "preferences": str(preferences) if preferences else None,
        "vision": vision,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "seed": seed,
        "on_bad_record": on_bad_record,
    }
    with PipelineRun("rating", "rate", store, {"model": model}) as run:
        run.log_params(public)
        first, ledger1, torn = run_requests(config, journal, requests, "rate", progress)
        scores: dict[int, tuple[int, str]] = {}
        failures: dict[int, str] = {}
        again: dict[int, ChatRequest] = {}
        for n, req in enumerate(requests):
            res = first[req.key]
            if not res.ok:
                failures[n] = res.error or "unknown"
                continue
            s = parse_score(res.content)
            if s is not None:
                scores[n] = (s, res.content or "")
            else:
                msgs = _reask(req.messages, res.content or "")
                again[n] = ChatRequest(msgs, dict(params), meta=req.meta)
        ledger2 = None
        if again:
            second, ledger2, _ = run_requests(
                config, journal, list(again.values()), "rate (re-ask)", progress
            )
            for n, req in again.items():
                res = second[req.key]
                s = parse_score(res.content) if res.ok else None
                if s is not None:
                    raw1 = first[requests[n].key].content or ""
                    scores[n] = (s, f"{raw1}\n[re-asked]\n{res.content}")
                else:
                    failures[n] = (
                        res.error if not res.ok else "unparsable_score: no 0-10 integer on line 1"
                    )

        ratings, failed, pref_scores = [], [], {}
        for n, (kind, item_id, _) in enumerate(items):
            if n in failures:
                failed.append({"kind": kind, "id": item_id, "reason": failures[n]})
            elif kind == "candidate":
                s, raw = scores[n]
                ratings.append(Rating(candidate_id=item_id, score=s, judge=model, raw=raw))
            else:
                pref_scores.setdefault(item_id, {})[kind] = scores[n][0]
        write_jsonl(out / "ratings.jsonl", ratings)
        write_jsonl(out / "failed.jsonl", failed)
        alignment = None
        if preferences is not None:
            rows = [
                {
                    "id": p.id,
                    "preferred_score": pref_scores.get(p.id, {}).get("preferred"),
                    "rejected_score": pref_scores.get(p.id, {}).get("rejected"),
                }
                for p in prefs
            ]
            write_jsonl(out / "preference_scores.jsonl", rows)
            alignment = _alignment(rows)
        reask_failed = sum(1 for f in failed if f["reason"].startswith("unparsable_score"))
        counts = {
            "candidates": len(cands),
            "rated": len(ratings),
            "failed": len(failed),
            "reasked": len(again),
            "unparsable_after_reask": reask_failed,
        }
        ledgers = {"first": ledger1.as_dict(), "reask": ledger2.as_dict() if ledger2 else None}
        cost = ledger1.cost_usd + (ledger2.cost_usd if ledger2 else 0.0)
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
            "inputs": inputs,
            "records": {k: r.as_dict() for k, r in reports.items()},
            "config": public,
            "mlflow_run_id": run.run_id,
            "git": git_state(),
        }
        metrics = {f"rate/{k}": v for k, v in counts.items()}
        metrics["rate/cost_usd"] = cost
        if alignment and alignment["align_rate"] is not None:
            metrics["rate/align_rate"] = alignment["align_rate"]
            metrics["rate/align_ties"] = alignment["ties"]
        run.log_metrics(metrics)
        run.log_dict(manifest, "rate.manifest.json")
    write_json(out / "manifest.json", manifest)
    return manifest


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
