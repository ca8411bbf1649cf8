"""The VQA evaluator's scoring as a pure function of the answers (no model, no Trainer)."""

from __future__ import annotations

import pytest

from biomedvital.evaluation.metrics import VQAClosedAccuracy, VQAOpenMetrics
from biomedvital.evaluation.vqa_scores import score_answers

TRUTH = [["closed", "yes"], ["open", "left lung"], ["closed", "no"], ["chat", "a caption"]]
TEXTS = ["Yes, it is.", "lung lung", "yes", "The figure shows a chest CT."]


def test_scores_are_llava_meds_metrics_with_chat_counted_only() -> None:
    got = score_answers(TRUTH, TEXTS, batch_size=2, closed_rule="llava_med")
    closed, open_ = VQAClosedAccuracy("llava_med"), VQAOpenMetrics()
    closed.update(["Yes, it is.", "yes"], ["yes", "no"])
    open_.update(["lung lung"], ["left lung"])
    want = {**open_.compute(), **closed.compute()}
    assert got["closed_acc"] == pytest.approx(50.0) and got["n_closed"] == 2
    assert got["open_recall"] == pytest.approx(float(want["open_recall"]))  # "lung" twice: 2/3
    assert got["n_open"] == 1 and got["n_chat"] == 1
    assert isinstance(got["n_closed_counted"], int)


def test_a_split_without_open_questions_has_no_open_figures() -> None:
    got = score_answers(TRUTH[:1], TEXTS[:1], batch_size=16)
    assert got["open_recall"] is None and got["n_open"] == 0 and "n_chat" not in got
    assert got == score_answers(TRUTH[:1], TEXTS[:1], batch_size=16)  # no state kept between calls
