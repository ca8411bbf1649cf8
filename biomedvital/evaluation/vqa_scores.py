"""The VQA evaluator's scores: LLaVA-Med's metrics over answers in the split's order."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import ClosedRule, VQAClosedAccuracy, VQAOpenMetrics

Scores = dict[str, float | int | None]


def score_answers(
    truth: Sequence[Sequence[str]],
    texts: Sequence[str],
    batch_size: int,
    closed_rule: ClosedRule = "llava_med",
) -> Scores:
    """LLaVA-Med's metrics of ``texts`` against ``truth`` (``[answer type, reference]`` per
    answer), both in the split's order.

    The sums are added batch by batch of ``batch_size``, as one uninterrupted process adds them,
    so the scores are bit-identical whatever the number of processes or restarts that produced
    the answers. A figure with no question of its kind is ``None``; chat answers are only
    counted (``n_chat``: they are written for ``judge``, scored there)."""
    open_metric = VQAOpenMetrics(sync_on_compute=False)
    closed_metric = VQAClosedAccuracy(closed_rule, sync_on_compute=False)
    size = max(batch_size, 1)
    for start in range(0, len(texts), size):
        chunk = list(zip(truth[start : start + size], texts[start : start + size], strict=True))
        for kind, metric in (("open", open_metric), ("closed", closed_metric)):
            pairs = [(text, answer) for (k, answer), text in chunk if k == kind]
            if pairs:
                metric.update([t for t, _ in pairs], [a for _, a in pairs])
    with warnings.catch_warnings():
        # a split without open (or closed) questions is legitimate: its figures are NaN
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        values = {**open_metric.compute(), **closed_metric.compute()}
    scores: Scores = {}
    for key, value in values.items():
        v = float(value)
        scores[key] = int(v) if key.startswith("n_") else (None if math.isnan(v) else v)
    n_chat = sum(1 for kind, _ in truth if kind == "chat")
    if n_chat:
        scores["n_chat"] = n_chat
    return scores


def n_hit_max_new_tokens(rows: Sequence[Mapping[str, Any]]) -> int:
    """How many answers ran to the length limit without ending (their
    ``hit_max_new_tokens``): a figure that moves with ``max_new_tokens`` says so here."""
    return sum(1 for row in rows if row.get("hit_max_new_tokens"))
