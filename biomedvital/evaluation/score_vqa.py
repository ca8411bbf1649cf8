"""``score_vqa``: score a model's answers on a medical VQA benchmark the way LLaVA-Med does.

LLaVA-Med's own script pairs ground truth and predictions by position (after asserting the id
lists are equal); here they are joined by question id, and any prediction without a question, any
question without a prediction and any repeated id is refused, so a shuffled, partial or padded
answer file cannot yield a plausible-looking score.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import iter_objects, write_json
from biomedvital.data.outputs import locks_output
from biomedvital.data.report import BadRecordError

from .benchmarks import VQABenchmark, VQAItem, load_benchmark
from .metrics import CLOSED_RULES, ClosedRule, VQAClosedAccuracy, VQAOpenMetrics

_N_EXAMPLES = 5


def read_predictions(path: Path) -> dict[str, str]:
    """``question_id -> text`` from a LLaVA-Med answer file (JSONL, or a JSON array).

    Ids may be ints or strings (compared as strings); a repeated id is an error, since which of
    the two answers counts would otherwise depend on file order.
    """
    texts: dict[str, str] = {}
    first_pos: dict[str, int] = {}
    for pos, kind, obj in iter_objects(path):
        if not isinstance(obj, dict):
            raise BadRecordError(
                path, pos, "expected a JSON object", kind=kind, category="not_an_object"
            )
        for key in ("question_id", "text"):
            if key not in obj:
                raise BadRecordError(
                    path, pos, "missing", key, kind=kind, category=f"missing:{key}"
                )
        qid, text = obj["question_id"], obj["text"]
        if isinstance(qid, bool) or not isinstance(qid, int | str) or qid == "":
            raise BadRecordError(
                path,
                pos,
                f"expected an integer or string id (got {qid!r})",
                "question_id",
                kind=kind,
            )
        if not isinstance(text, str):
            raise BadRecordError(path, pos, f"expected a string (got {text!r})", "text", kind=kind)
        qid = str(qid)
        if qid in texts:
            raise BadRecordError(
                path,
                pos,
                f"duplicate question_id {qid!r} (first at {kind} {first_pos[qid]})",
                "question_id",
                kind=kind,
                category="duplicate:question_id",
            )
        texts[qid] = text
        first_pos[qid] = pos
    return texts


def count_hit_max_new_tokens(path: Path) -> int | None:
    """How many predictions say their answer stopped at the token limit (``hit_max_new_tokens``,
    as ``test`` and ``answer`` write it); ``None`` for a file that does not say (LLaVA-Med's own
    answer files), rather than a count of 0 that would claim no answer was cut."""
    said = []
    for pos, kind, obj in iter_objects(path):
        flag = obj.get("hit_max_new_tokens") if isinstance(obj, dict) else None
        if flag is not None and not isinstance(flag, bool):
            raise BadRecordError(
                path, pos, f"expected true or false (got {flag!r})", "hit_max_new_tokens",
                kind=kind,
            )  # fmt: skip
        said.append(flag)
    if all(flag is None for flag in said):
        return None
    return sum(1 for flag in said if flag)


def _examples(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_N_EXAMPLES])
    return shown + (", ..." if len(ids) > _N_EXAMPLES else "")


def join_predictions(
    items: list[VQAItem], predictions: dict[str, str], path: Path, what: str
) -> list[tuple[VQAItem, str]]:
    """Pair each question with its prediction by id; refuse unmatched ids on either side."""
    question_ids = {it.question_id for it in items}
    extra = [qid for qid in predictions if qid not in question_ids]
    missing = [it.question_id for it in items if it.question_id not in predictions]
    if extra or missing:
        parts = []
        if extra:
            parts.append(
                f"{len(extra)} of {len(predictions)} predictions have ids that are not questions "
                f"of {what} (e.g. {_examples(extra)})"
            )
        if missing:
            parts.append(
                f"{len(missing)} of {len(items)} questions of {what} have no prediction "
                f"(e.g. {_examples(missing)})"
            )
        raise BadRecordError(
            path, None, "; ".join(parts), "question_id", category="unmatched:question_id"
        )
    return [(it, predictions[it.question_id]) for it in items]


def _number(value: Any) -> float | int | None:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and math.isnan(value):
        return None  # no item of that kind: JSON has no NaN
    return value


@locks_output("out", parent=True)
def score_vqa(
    benchmark: VQABenchmark,
    data: Path,
    predictions: Path,
    closed_rule: ClosedRule = "llava_med",
    split: str = "test",
    out: Path | None = None,
) -> dict:
    """Score a LLaVA-Med answer file on a benchmark split with LLaVA-Med's VQA metrics.

    Args:
        benchmark: ``vqa_rad``, ``slake`` (English) or ``pathvqa``.
        data: the benchmark's published file, or the folder holding it (see ``benchmarks``).
        predictions: JSONL of ``{"question_id", "text"}`` as LLaVA-Med's ``model_vqa`` writes it.
        closed_rule: ``llava_med`` (current), ``llava_med_original`` (pre-fix: yes/no misses not
            counted) or ``strict`` (first yes/no word must match; other answers exact).
        split: benchmark split (``test`` by default).
        out: also write the result here as JSON (atomically).

    Returns one dict: counts, ``open_*`` scores (LLaVA-Med recall is the published "open"
    figure), ``closed_acc`` and BLEU, all percentages; a figure with no question is None.
    """
    data, predictions = Path(data), Path(predictions)
    if closed_rule not in CLOSED_RULES:
        raise ValueError(f"closed_rule must be one of {CLOSED_RULES}, got {closed_rule!r}")
    if benchmark == "llava_med_bench":
        raise ValueError(
            "llava_med_bench answers are open-ended chat, not VQA: score them with "
            "`judge --answers FILE` and `score-chat`"
        )
    items = load_benchmark(benchmark, data, split, write_images=False)  # names only
    if not items:
        raise ValueError(f"{data}: no {benchmark} questions in split {split!r}")
    pairs = join_predictions(
        items, read_predictions(predictions), predictions, f"{benchmark} split {split!r}"
    )

    open_metric = VQAOpenMetrics()
    closed_metric = VQAClosedAccuracy(closed_rule)
    open_pairs = [(it.answer, text) for it, text in pairs if it.answer_type == "open"]
    closed_pairs = [(it.answer, text) for it, text in pairs if it.answer_type == "closed"]
    if open_pairs:
        open_metric.update([p for _, p in open_pairs], [a for a, _ in open_pairs])
    if closed_pairs:
        closed_metric.update([p for _, p in closed_pairs], [a for a, _ in closed_pairs])
    open_res = _compute(open_metric)
    closed_res = _compute(closed_metric)

    result: dict[str, Any] = {
        "benchmark": benchmark,
        "split": split,
        "closed_rule": closed_rule,
        "n_open": len(open_pairs),
        "n_closed": len(closed_pairs),
        "n_closed_counted": closed_res.pop("n_closed_counted"),
        "open_recall": open_res.pop("open_recall"),
        "open_precision": open_res.pop("open_precision"),
        "open_f1": open_res.pop("open_f1"),
        "open_exact": open_res.pop("open_exact"),
        "closed_acc": closed_res.pop("closed_acc"),
    }
    for key in ("bleu1", "bleu2", "bleu3", "bleu4"):
        result[key] = open_res.pop(key)
    del open_res["n_open"], closed_res["n_closed"]
    result.update(open_res)  # open_exact_normalized, open_hit, LLaVA-Med's single-order BLEU
    result["n_hit_max_new_tokens"] = count_hit_max_new_tokens(predictions)
    result["predictions"] = {"path": str(predictions), "sha256": sha256_file(predictions)}
    if out is not None:
        write_json(out, result)
    return result


def _compute(metric: VQAOpenMetrics | VQAClosedAccuracy) -> dict[str, Any]:
    """The metric's figures as plain numbers (None where it saw no item)."""
    with warnings.catch_warnings():
        # a split without open (or closed) questions is legitimate: its figures are None
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        return {k: _number(v) for k, v in metric.compute().items()}
