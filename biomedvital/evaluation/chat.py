"""``score_chat``: summarise a GPT-4 review file of LLaVA-Med-Bench (open-ended visual chat).

The judge scores the GPT-4 reference answer (Assistant 1, ``s1``) and the model's answer
(Assistant 2, ``s2``) on the first line of its review, e.g. ``"9 5\\n\\nAssistant 1 ..."``.
LLaVA-Med's relative score is the mean over items of ``s2 / s1 × 100``; LLaVA's original summary
is the ratio of the means. Both are reported (switch 5 of the reference method), per question type,
per domain and overall, because they differ by several points on real reviews and papers do not
always say which one they print.

Refusals (a :class:`BadRecordError` naming file, line and field), never silent skips:

* a first line that is not exactly two numbers in ``[0, 10]`` separated by spaces and/or a comma
  (``"8 7"``, ``"8, 7"``, ``"8,7"``, ``"8.5 7"``);
* ``s1 == 0``: the per-item ratio is undefined, and dropping the item would bias the mean of
  ratios upwards (the reference answer failed, not the model);
* a repeated ``question_id``; a type or domain that cannot be found, or that disagrees between
  the review row, the question file and the caption file.

Reviews missing for some benchmark questions (the real review file has 192 of 193) are not an
error: they are counted and listed in ``missing_question_ids`` when the question file is given,
and the summary is then marked ``partial`` (its scores are over the reviewed questions only, so
they are not the benchmark's figure); without the question file completeness is unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import iter_objects, load_json, write_json
from biomedvital.data.outputs import locks_output
from biomedvital.data.report import BadRecordError, PositionKind

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
"""LLaVA-Med's domain order: a figure's domain is its first true flag in this order."""

TYPE_ALIASES = {
    "conversation": "conversation",
    "conv": "conversation",
    "detailed_description": "detailed_description",
    "detail": "detailed_description",
}
"""LLaVA uses ``conv``/``detail``; LLaVA-Med-Bench ``conversation``/``detailed_description``."""

SCORE_KEYS = ("gpt_eval", "result")
_SCORE_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:,\s*|\s+)(\d+(?:\.\d+)?)\s*$")
_MAX_SCORE = 10.0


@dataclass(frozen=True)
class ChatReview:
    """One judged item: reference score ``s1``, model score ``s2``, its type and domain."""

    question_id: str
    s1: float
    s2: float
    type: str
    domain: str


def parse_scores(text: str) -> tuple[float, float]:
    """The two scores on the review's first line; ``ValueError`` when it is not exactly two."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    m = _SCORE_LINE.match(first)
    if m is None:
        raise ValueError(f"first line is not two scores (got {first[:60]!r})")
    s1, s2 = float(m.group(1)), float(m.group(2))
    for s in (s1, s2):
        if s > _MAX_SCORE:
            raise ValueError(f"score {s:g} is outside the judge's 0-10 scale (line {first!r})")
    return s1, s2


def domain_of(flags: Any) -> str | None:
    """First true flag among :data:`DOMAINS` (LLaVA-Med's ``get_domain``); None when none is."""
    if not isinstance(flags, dict):
        return None
    return next((d for d in DOMAINS if flags.get(d) is True), None)


def _qid(obj: dict[str, Any], path: Path, pos: int, kind: PositionKind) -> str:
    if "question_id" not in obj:
        raise BadRecordError(
            path, pos, "missing", "question_id", kind=kind, category="missing:question_id"
        )
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int | str) or qid == "":
        raise BadRecordError(
            path, pos, f"expected an integer or string id (got {qid!r})", "question_id", kind=kind
        )
    return str(qid)


def _objects(path: Path) -> list[tuple[int, PositionKind, dict[str, Any]]]:
    out = []
    for pos, kind, obj in iter_objects(path):
        if not isinstance(obj, dict):
            raise BadRecordError(
                path, pos, "expected a JSON object", kind=kind, category="not_an_object"
            )
        out.append((pos, kind, obj))
    return out


def read_questions(path: Path) -> dict[str, dict[str, Any]]:
    """``question_id -> record`` of the benchmark question file; repeated ids are refused."""
    questions: dict[str, dict[str, Any]] = {}
    for pos, kind, obj in _objects(path):
        qid = _qid(obj, path, pos, kind)
        if qid in questions:
            raise BadRecordError(
                path,
                pos,
                f"duplicate question_id {qid!r}",
                "question_id",
                kind=kind,
                category="duplicate:question_id",
            )
        questions[qid] = obj
    return questions


def read_caption_domains(path: Path) -> dict[str, str]:
    """``pair_id -> domain`` from LLaVA-Med's caption file (a dict of domain -> figure list).

    The domain is taken from each figure's own flags (first true one), falling back to the key it
    is listed under; a figure listed twice with different domains is refused.
    """
    data = load_json(path)
    if not isinstance(data, dict):
        raise BadRecordError(path, None, "expected a JSON object keyed by domain")
    domains: dict[str, str] = {}
    for key, figures in data.items():
        if not isinstance(figures, list):
            raise BadRecordError(path, None, "expected a list of figures", key)
        for i, fig in enumerate(figures, start=1):
            if not isinstance(fig, dict) or not isinstance(fig.get("pair_id"), str):
                raise BadRecordError(path, i, "figure without a pair_id", key, kind="record")
            dom = domain_of(fig.get("domain")) or (key if key in DOMAINS else None)
            if dom is None:
                raise BadRecordError(path, i, "figure has no true domain flag", key, kind="record")
            pid = fig["pair_id"]
            if domains.setdefault(pid, dom) != dom:
                raise BadRecordError(
                    path,
                    i,
                    f"figure {pid!r} is listed with domains {domains[pid]!r} and {dom!r}",
                    key,
                    kind="record",
                )
    return domains


def _agree(
    values: dict[str, str | None], what: str, path: Path, pos: int, kind: PositionKind
) -> str:
    """The one value the sources agree on; refuse disagreement or no value at all."""
    found = {src: v for src, v in values.items() if v is not None}
    if not found:
        hint = "pass the question file" + (" or the caption file" if what == "domain" else "")
        raise BadRecordError(
            path, pos, f"no {what} for this review ({hint})", what, kind=kind, category=f"no:{what}"
        )
    if len(set(found.values())) > 1:
        shown = ", ".join(f"{src}: {v!r}" for src, v in found.items())
        raise BadRecordError(
            path, pos, f"sources disagree on the {what} ({shown})", what, kind=kind
        )
    return next(iter(found.values()))


def _norm_type(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return TYPE_ALIASES.get(value.strip(), value.strip())


def read_reviews(
    reviews: Path,
    questions: dict[str, dict[str, Any]] | None = None,
    caption_domains: dict[str, str] | None = None,
) -> list[ChatReview]:
    """Parse every review row, resolving its type and domain from all the sources given."""
    out: list[ChatReview] = []
    first_pos: dict[str, int] = {}
    for pos, kind, obj in _objects(reviews):
        qid = _qid(obj, reviews, pos, kind)
        if qid in first_pos:
            raise BadRecordError(
                reviews,
                pos,
                f"duplicate question_id {qid!r} (first at {kind} {first_pos[qid]})",
                "question_id",
                kind=kind,
                category="duplicate:question_id",
            )
        first_pos[qid] = pos
        key = next((k for k in SCORE_KEYS if k in obj), None)
        if key is None:
            raise BadRecordError(
                reviews, pos, "missing (expected 'gpt_eval' or 'result')", "result", kind=kind
            )
        text = obj[key]
        if not isinstance(text, str):
            raise BadRecordError(reviews, pos, f"expected a string (got {text!r})", key, kind=kind)
        try:
            s1, s2 = parse_scores(text)
        except ValueError as e:
            raise BadRecordError(reviews, pos, str(e), key, kind=kind, category="bad_scores") from e
        if s1 == 0:
            raise BadRecordError(
                reviews,
                pos,
                "reference score s1 is 0: the relative score s2/s1 is undefined",
                key,
                kind=kind,
                category="zero_reference",
            )
        question: dict[str, Any] = {}
        if questions is not None:
            if qid not in questions:
                raise BadRecordError(
                    reviews,
                    pos,
                    f"question_id {qid!r} is not in the question file",
                    "question_id",
                    kind=kind,
                    category="unmatched:question_id",
                )
            question = questions[qid]
        pair_id = obj.get("pair_id") or question.get("pair_id")
        qtype = _agree(
            {"review": _norm_type(obj.get("type")), "questions": _norm_type(question.get("type"))},
            "type",
            reviews,
            pos,
            kind,
        )
        domain = _agree(
            {
                "review": domain_of(obj.get("domain")),
                "questions": domain_of(question.get("domain")),
                "captions": (caption_domains or {}).get(pair_id) if pair_id else None,
            },
            "domain",
            reviews,
            pos,
            kind,
        )
        out.append(ChatReview(qid, s1, s2, qtype, domain))
    return out


def summarise(items: list[ChatReview]) -> dict[str, Any]:
    """Counts, mean scores and both relative scores (×100) of a group of reviews."""
    n = len(items)
    if n == 0:
        return {"n": 0}
    mean1 = math.fsum(r.s1 for r in items) / n
    mean2 = math.fsum(r.s2 for r in items) / n
    return {
        "n": n,
        "mean_reference": mean1,
        "mean_model": mean2,
        "relative_mean_of_ratios": math.fsum(r.s2 / r.s1 for r in items) / n * 100,
        "relative_ratio_of_means": mean2 / mean1 * 100,
    }


def _ordered(groups: dict[str, list[ChatReview]], order: tuple[str, ...]) -> list[str]:
    return [k for k in order if k in groups] + sorted(k for k in groups if k not in order)


@locks_output("out", parent=True)
def score_chat(
    reviews: Path,
    questions: Path | None = None,
    captions: Path | None = None,
    out: Path | None = None,
    store: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Relative scores of a LLaVA-Med-Bench review file, per type, per domain and overall.

    Args:
        reviews: JSONL (or JSON array) of judge reviews: ``question_id`` and the review text in
            ``result`` or ``gpt_eval``; ``type``/``domain``/``pair_id`` when present.
        questions: LLaVA-Med-Bench question file, joined by ``question_id`` for type and domain
            (and to list questions without a review).
        captions: LLaVA-Med's caption file, giving each figure's domain by ``pair_id``.
        out: also write the result here as JSON (atomically).
        store: MLflow store folder; when given, the summary is logged as a run of ``evaluation``.
        tags: extra MLflow run tags (a grid's ``grid``/``cell``/``stage``).

    Returns one dict. ``relative_mean_of_ratios`` is LLaVA-Med's published figure,
    ``relative_ratio_of_means`` LLaVA's; both in percent.
    """
    reviews = Path(reviews)
    qmap = read_questions(Path(questions)) if questions is not None else None
    cmap = read_caption_domains(Path(captions)) if captions is not None else None
    items = read_reviews(reviews, qmap, cmap)
    if not items:
        raise BadRecordError(reviews, None, "no reviews", category="empty")

    by_type: dict[str, list[ChatReview]] = {}
    by_domain: dict[str, list[ChatReview]] = {}
    for r in items:
        by_type.setdefault(r.type, []).append(r)
        by_domain.setdefault(r.domain, []).append(r)
    types = _ordered(by_type, ("conversation", "detailed_description"))
    result: dict[str, Any] = {
        "n": len(items),
        "overall": summarise(items),
        "type": {t: summarise(by_type[t]) for t in types},
        "domain": {d: summarise(by_domain[d]) for d in _ordered(by_domain, DOMAINS)},
    }
    if qmap is not None:
        reviewed = {r.question_id for r in items}
        missing = [q for q in qmap if q not in reviewed]
        result["n_questions"] = len(qmap)
        result["missing_question_ids"] = missing
        result["partial"] = bool(missing)
    result["reviews"] = {"path": str(reviews), "sha256": sha256_file(reviews)}
    if out is not None:
        write_json(out, result)
    if store is not None:
        _log(result, store, tags)
    return result


def _log(result: dict[str, Any], store: str, tags: dict[str, str] | None = None) -> None:
    from biomedvital.tracking.mlflow import PipelineRun

    with PipelineRun("evaluation", "score_chat", store, tags) as run:
        run.log_params(
            {"reviews": result["reviews"]["path"], "sha256": result["reviews"]["sha256"]}
        )
        if "partial" in result:
            run.client.set_tag(run.run_id, "partial", str(result["partial"]).lower())
        groups = {"overall": result["overall"], **result["type"], **result["domain"]}
        metrics = {}
        for name, g in groups.items():
            for key in ("n", "relative_mean_of_ratios", "relative_ratio_of_means"):
                if key in g:
                    metrics[f"score_chat/{name}/{key}"] = g[key]
        run.log_metrics(metrics)
        run.log_dict(result, "chat_scores.json")
