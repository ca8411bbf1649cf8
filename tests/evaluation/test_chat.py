"""``score_chat`` on LLaVA-Med's real GPT-4 review file, on hand-computed files, and its refusals."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from biomedvital.data.report import BadRecordError
from biomedvital.evaluation.chat import parse_scores, score_chat

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
LLAVA = SHARED / "llava-med"
REVIEWS = LLAVA / "llava_med_eval_qa50_qa_ans.jsonl"
QUESTIONS = LLAVA / "llava_med_eval_qa50_qa.jsonl"
CAPTIONS = LLAVA / "llava_med_eval_qa50_fig_captions.json"

# Measured on the real review file (LLaVA-Med 7B vs GPT-4, 192 reviews):
# group -> (n, mean s1, mean s2, mean of ratios ×100, ratio of means ×100).
GOLDEN = {
    "overall": (192, 8.744791666666666, 3.8854166666666665, 46.214037698412696, 44.43120905300774),
    "conversation": (
        143,
        8.993006993006993,
        4.244755244755245,
        47.92735042735043,
        47.20062208398134,
    ),
    "detailed_description": (
        49,
        8.020408163265307,
        2.836734693877551,
        41.21396177518626,
        35.36895674300254,
    ),
    "chest_xray": (37, 8.216216216216216, 4.648648648648648, 58.5006435006435, 56.57894736842105),
    "mri": (38, 8.973684210526315, 3.0526315789473686, 35.08458646616541, 34.017595307917894),
    "histology": (44, 8.75, 4.0227272727272725, 47.018398268398265, 45.97402597402597),
    "gross": (33, 8.696969696969697, 3.787878787878788, 46.553631553631554, 43.55400696864112),
    "ct_scan": (40, 9.05, 3.9, 44.25694444444444, 43.093922651933696),
}


def _group(res: dict[str, Any], name: str) -> dict[str, Any]:
    if name == "overall":
        return res["overall"]
    return res["type"].get(name) or res["domain"][name]


def _figures(g: dict[str, Any]) -> tuple:
    return (
        g["n"],
        g["mean_reference"],
        g["mean_model"],
        g["relative_mean_of_ratios"],
        g["relative_ratio_of_means"],
    )


@needs_shared
def test_real_review_file_golden() -> None:
    alone = score_chat(REVIEWS)
    joined = score_chat(REVIEWS, QUESTIONS, CAPTIONS)
    for res in (alone, joined):
        assert res["n"] == 192
        assert list(res["type"]) == ["conversation", "detailed_description"]
        assert list(res["domain"]) == ["chest_xray", "mri", "histology", "gross", "ct_scan"]
        for name, golden in GOLDEN.items():
            assert _figures(_group(res, name)) == pytest.approx(golden, abs=1e-9), name
    # the question file has 193 questions: question 183 was never reviewed
    assert joined["n_questions"] == 193 and joined["missing_question_ids"] == ["183"]
    assert joined["partial"] is True  # 192 of 193: not the whole benchmark
    assert "missing_question_ids" not in alone and "partial" not in alone


@needs_shared
def test_real_groups_checked_by_hand() -> None:
    # Recomputed from the raw first lines with exact fractions, independently of the module:
    # detailed_description: 49 reviews, s1 sums to 393, s2 to 139, per-item ratios to 254455/6174;
    # ct_scan: 40 reviews, 362, 156, 6373/144. Question 15 (gross; histology false) reads "8 7".
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines()]
    detail = [r for r in rows if r["type"] == "detailed_description"]
    pairs = [tuple(int(x) for x in r["result"].split("\n")[0].split(" ")) for r in detail]
    assert (len(pairs), sum(a for a, _ in pairs), sum(b for _, b in pairs)) == (49, 393, 139)
    assert sum(Fraction(b, a) for a, b in pairs) / 49 * 100 == Fraction(254455, 6174)

    res = score_chat(REVIEWS)
    d, ct = res["type"]["detailed_description"], res["domain"]["ct_scan"]
    assert d["relative_ratio_of_means"] == pytest.approx(139 / 393 * 100, abs=1e-12)
    assert d["relative_mean_of_ratios"] == pytest.approx(254455 / 6174, abs=1e-12)
    assert (ct["mean_reference"], ct["mean_model"]) == pytest.approx((362 / 40, 156 / 40))
    assert ct["relative_mean_of_ratios"] == pytest.approx(6373 / 144, abs=1e-12)
    assert ct["relative_ratio_of_means"] == pytest.approx(156 / 362 * 100, abs=1e-12)


# ----------------------------------------------------------------------------- synthetic


def _dom(name: str) -> dict[str, bool]:
    return {d: d == name for d in ("chest_xray", "mri", "ct_scan", "histology", "gross")}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _review(qid: int, text: str, **extra: Any) -> dict[str, Any]:
    return {"question_id": qid, "result": text, **extra}


def test_hand_computed_small_file(tmp_path: Path) -> None:
    rows = [
        _review(0, "8 4\n\nwhy", type="conversation", domain=_dom("chest_xray")),
        # LLaVA's key, LLaVA's type name, a comma between the scores
        {
            "question_id": 1,
            "gpt_eval": "10,5\nwhy",
            "type": "detail",
            "domain": {**_dom("mri"), "ct_scan": True},  # first true flag in LLaVA-Med order: mri
        },
        _review(2, " 5, 5 \n", type="conversation", domain=_dom("mri")),
    ]
    res = score_chat(_write(tmp_path / "r.jsonl", rows), out=tmp_path / "o" / "chat.json")
    assert res["overall"]["n"] == 3
    assert res["overall"]["relative_mean_of_ratios"] == pytest.approx((0.5 + 0.5 + 1) / 3 * 100)
    assert res["overall"]["relative_ratio_of_means"] == pytest.approx(14 / 23 * 100)
    assert res["overall"]["mean_reference"] == pytest.approx(23 / 3)
    assert res["type"]["conversation"]["relative_mean_of_ratios"] == pytest.approx(75.0)
    assert res["type"]["conversation"]["relative_ratio_of_means"] == pytest.approx(9 / 13 * 100)
    assert res["type"]["detailed_description"]["n"] == 1
    assert res["domain"]["mri"]["relative_mean_of_ratios"] == pytest.approx(75.0)
    assert set(res["domain"]) == {"chest_xray", "mri"}
    assert json.loads((tmp_path / "o" / "chat.json").read_text()) == res


def test_type_and_domain_from_question_and_caption_files(tmp_path: Path) -> None:
    reviews = _write(
        tmp_path / "r.jsonl", [_review(0, "10 5"), _review("1", "4 4"), _review(2, "8 2")]
    )
    questions = _write(
        tmp_path / "q.jsonl",
        [
            {"question_id": 0, "pair_id": "p0", "type": "conversation", "domain": _dom("gross")},
            {"question_id": 1, "pair_id": "p1", "type": "detailed_description"},
            {"question_id": 2, "pair_id": "p0", "type": "conversation"},
            {"question_id": 3, "pair_id": "p1", "type": "conversation"},
        ],
    )
    captions = tmp_path / "c.json"
    captions.write_text(
        json.dumps(
            {
                "gross": [{"pair_id": "p0", "domain": _dom("gross")}],
                "ct_scan": [{"pair_id": "p1", "domain": _dom("ct_scan")}],
            }
        )
    )
    res = score_chat(reviews, questions, captions)
    assert res["domain"]["gross"]["n"] == 2 and res["domain"]["ct_scan"]["n"] == 1
    assert res["domain"]["gross"]["relative_mean_of_ratios"] == pytest.approx(37.5)
    assert res["type"]["detailed_description"]["relative_ratio_of_means"] == pytest.approx(100.0)
    assert res["missing_question_ids"] == ["3"] and res["partial"] is True
    complete = _write(
        tmp_path / "q3.jsonl", [json.loads(x) for x in questions.read_text().splitlines()[:3]]
    )
    assert score_chat(reviews, complete, captions)["partial"] is False
    with pytest.raises(BadRecordError, match=r"r\.jsonl:2: field 'domain': no domain"):
        score_chat(reviews, questions)  # question 1 has no domain without the caption file


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8 7", (8, 7)), ("8,7", (8, 7)), ("8, 7\n\nx", (8, 7)), ("\n9.5  6\r\nx", (9.5, 6))],
)
def test_parse_scores(text: str, expected: tuple[float, float]) -> None:
    assert parse_scores(text) == expected


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (_review(0, "8\n\nonly one"), r"r\.jsonl:2: field 'result': first line is not two scores"),
        (_review(0, "Assistant 1: 8\nAssistant 2: 7"), r"r\.jsonl:2: field 'result'"),
        (_review(0, "8 7 6"), "not two scores"),
        (_review(0, ""), "not two scores"),
        (_review(0, "0 5"), r"r\.jsonl:2: field 'result': reference score s1 is 0"),
        (_review(0, "80 7"), "outside the judge's 0-10 scale"),
        ({"question_id": 0, "text": "8 7"}, "expected 'gpt_eval' or 'result'"),
        (_review(0, "8 7", type="conversation"), r"r\.jsonl:2: field 'domain': no domain"),
    ],
)
def test_bad_review_lines_are_refused(tmp_path: Path, row: dict[str, Any], match: str) -> None:
    good = _review(9, "8 7", type="conversation", domain=_dom("mri"))
    row = {"type": "conversation", "domain": _dom("mri"), **row} if "domain" not in match else row
    with pytest.raises(BadRecordError, match=match):
        score_chat(_write(tmp_path / "r.jsonl", [good, row]))


def test_duplicates_and_disagreements_are_refused(tmp_path: Path) -> None:
    ok = {"type": "conversation", "domain": _dom("mri")}
    dup = _write(tmp_path / "r.jsonl", [_review(1, "8 7", **ok), _review("1", "9 9", **ok)])
    with pytest.raises(BadRecordError, match=r"r\.jsonl:2: field 'question_id': duplicate"):
        score_chat(dup)
    rev = _write(tmp_path / "r2.jsonl", [_review(1, "8 7", **ok)])
    q = _write(
        tmp_path / "q.jsonl", [{"question_id": 1, "type": "detail", "domain": _dom("ct_scan")}]
    )
    with pytest.raises(BadRecordError, match=r"sources disagree on the type"):
        score_chat(rev, q)
    q2 = _write(tmp_path / "q2.jsonl", [{"question_id": 2, "type": "conversation"}])
    with pytest.raises(BadRecordError, match="not in the question file"):
        score_chat(rev, q2)
    with pytest.raises(BadRecordError, match="no reviews"):
        score_chat(_write(tmp_path / "empty.jsonl", []))


def test_logs_to_mlflow_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from biomedvital.tracking.mlflow import tracking_uri

    rows = [_review(0, "8 4", type="conversation", domain=_dom("mri"))]
    store = str(tmp_path / "mlruns")
    score_chat(_write(tmp_path / "r.jsonl", rows), store=store)
    client = MlflowClient(tracking_uri=tracking_uri(store))
    exp = client.get_experiment_by_name("evaluation")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["score_chat/overall/relative_mean_of_ratios"] == pytest.approx(50.0)
    assert run.data.metrics["score_chat/mri/n"] == 1
