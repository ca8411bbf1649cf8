"""``score_vqa`` on LLaVA-Med's real VQA-RAD answer files, and its refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from biomedvital.data.report import BadRecordError
from biomedvital.evaluation.score_vqa import score_vqa

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
RAD = SHARED / "vqa-rad" / "VQA_RAD Dataset Public.json"
ANSWERS = SHARED / "llava-med"

# Measured here and cross-checked against a transcription of LLaVA-Med's run_eval.py with nltk
# 3.10's sentence_bleu (agreement to 1e-12). Per file: open recall / precision / F1 / exact /
# BLEU-1 / cumulative BLEU-2, then closed accuracy and its denominator under each rule.
GOLDEN = {
    "answer-file.jsonl": {
        "open": (17.53258845437616, 2.797738330606893, 4.5396601588223255, 2.6079620270277446),
        "bleu": (2.6079620270277446, 0.27641616722384593),
        "llava_med": (47.05882352941176, 272),
        "llava_med_original": (72.72727272727273, 176),
        "strict": (32.35294117647059, 272),
    },
    "answer-file-1epoch.jsonl": {
        "open": (2.0391061452513966, 2.8864059590316575, 2.2422549517521584, 2.8864059590316575),
        "bleu": (1.7460199304569404, 0.0),
        "llava_med": (23.161764705882355, 272),
        "llava_med_original": (28.50678733031674, 221),
        "strict": (23.52941176470588, 272),
    },
    "answer-file-llava-zeorshot.jsonl": {
        "open": (12.041127437939794, 1.708161867190198, 2.8001983730216127, 1.2916670560318566),
        "bleu": (1.2916670560318566, 0.11742239142770454),
        "llava_med": (28.676470588235293, 272),
        "llava_med_original": (34.97757847533632, 223),
        "strict": (21.323529411764707, 272),
    },
}


@needs_shared
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_real_llava_med_answer_files(name: str) -> None:
    golden = GOLDEN[name]
    results = {
        rule: score_vqa("vqa_rad", RAD, ANSWERS / name, rule)
        for rule in ("llava_med", "llava_med_original", "strict")
    }
    for rule, res in results.items():
        assert (res["n_open"], res["n_closed"]) == (179, 272)
        got_open = (res["open_recall"], res["open_precision"], res["open_f1"], res["open_exact"])
        assert got_open == pytest.approx(golden["open"], abs=1e-6)
        assert (res["bleu1"], res["bleu2"]) == pytest.approx(golden["bleu"], abs=1e-6)
        assert 0 <= res["bleu3"] < 1e-90 and 0 <= res["bleu4"] < 1e-90  # no 3-gram matches
        assert (res["closed_acc"], res["n_closed_counted"]) == pytest.approx(golden[rule], abs=1e-6)
        assert res["closed_rule"] == rule
    # the pre-fix rule drops yes/no-bearing misses: a smaller denominator, a higher accuracy
    original, fixed = results["llava_med_original"], results["llava_med"]
    assert original["closed_acc"] >= fixed["closed_acc"]
    assert original["n_closed_counted"] < fixed["n_closed_counted"] == 272
    # hits are the same under both: only the denominator differs
    hits = round(fixed["closed_acc"] * 272 / 100)
    assert round(original["closed_acc"] * original["n_closed_counted"] / 100) == hits


@needs_shared
def test_golden_items_checked_by_hand(tmp_path: Path) -> None:
    # qid 263 (open): "right temporal lobe" vs a 15-word answer sharing "temporal": recall 1/3,
    # precision 1/15; qid 12 (closed, "Yes"): "Human: Yes, there is airspace consolidation ...";
    # qid 13 (closed, "yes"): "I'm sorry, I cannot see ..." contains "no" (in "cannot"): a miss
    # that the pre-fix rule does not count
    rows = [json.loads(line) for line in (ANSWERS / "answer-file.jsonl").read_text().splitlines()]
    keep = {263, 12, 13}
    subset = [r for r in rows if r["question_id"] in keep]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in subset))
    gt = json.loads(RAD.read_text())
    small = tmp_path / "rad.json"
    small.write_text(json.dumps([r for r in gt if r["qid"] in keep]))
    res = score_vqa("vqa_rad", small, preds)
    assert (res["n_open"], res["n_closed"]) == (1, 2)
    assert res["open_recall"] == pytest.approx(100 / 3)
    assert res["open_precision"] == pytest.approx(100 / 15)
    assert res["closed_acc"] == 50.0
    orig = score_vqa("vqa_rad", small, preds, "llava_med_original")
    assert (orig["closed_acc"], orig["n_closed_counted"]) == (100.0, 1)


@needs_shared
def test_all_questions_file_is_refused_for_the_test_split() -> None:
    path = ANSWERS / "answer_file_vqa_rad3_closed.jsonl"
    with pytest.raises(BadRecordError) as info:
        score_vqa("vqa_rad", RAD, path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), None, "question_id")
    msg = str(err)
    assert "1797 of 2248 predictions have ids that are not questions of vqa_rad split 'test'" in msg
    assert "(e.g. '0', '1', '2', '3', '4', ...)" in msg
    assert "have no prediction" not in msg  # every test question is answered
    # the same file covers the whole data set
    res = score_vqa("vqa_rad", RAD, path, split="all")
    assert res["n_open"] + res["n_closed"] == 2248


# ----------------------------------------------------------------------------- synthetic


def _rad_rows() -> list[dict]:
    rows = [
        {"qid": "0", "answer": "Yes", "answer_type": "CLOSED", "phrase_type": "test_para"},
        {"qid": 1, "answer": "left lung", "answer_type": "OPEN", "phrase_type": "test_freeform"},
        {"qid": 2, "answer": 4, "answer_type": "OPEN", "phrase_type": "test_freeform"},
        {"qid": 3, "answer": "No", "answer_type": "CLOSED ", "phrase_type": "test_freeform"},
        {"qid": 4, "answer": "No", "answer_type": "CLOSED", "phrase_type": "freeform"},
    ]
    for r in rows:
        r.update(image_name="synpic1.jpg", question="q?")
    return rows


def _setup(tmp_path: Path, preds: list[dict]) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    gt = tmp_path / "rad.json"
    gt.write_text(json.dumps(_rad_rows()))
    p = tmp_path / "answers.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in preds))
    return gt, p


GOOD = [
    {"question_id": 0, "text": "Yes, it is."},
    {"question_id": "1", "text": "The left lung"},
    {"question_id": 2, "text": "four"},
    {"question_id": 3, "text": "yes"},
]


def test_joins_by_id_not_position(tmp_path: Path) -> None:
    gt, preds = _setup(tmp_path, GOOD)
    res = score_vqa("vqa_rad", gt, preds)
    shuffled = list(GOOD)
    random.Random(1).shuffle(shuffled)
    assert shuffled != GOOD
    _, preds2 = _setup(tmp_path / "s", shuffled)
    res2 = score_vqa("vqa_rad", gt, preds2)
    strip = ("predictions",)
    assert {k: v for k, v in res.items() if k not in strip} == {
        k: v for k, v in res2.items() if k not in strip
    }
    # int 0 and the string "0" are the same question; "four" matches the int answer 4
    assert (res["n_open"], res["n_closed"], res["closed_acc"]) == (2, 2, 50.0)
    assert res["open_recall"] == 100.0 and res["open_exact_normalized"] == 100.0


def test_answers_cut_at_the_token_limit_are_counted_when_the_file_says(tmp_path: Path) -> None:
    """``test`` and ``answer`` mark each answer with ``hit_max_new_tokens``; re-scoring their
    file counts the cut answers, and a file that does not say (LLaVA-Med's) counts None."""
    gt, preds = _setup(tmp_path, GOOD)
    assert score_vqa("vqa_rad", gt, preds)["n_hit_max_new_tokens"] is None
    marked = [{**p, "hit_max_new_tokens": i in (1, 2)} for i, p in enumerate(GOOD)]
    _, preds = _setup(tmp_path / "marked", marked)
    assert score_vqa("vqa_rad", gt, preds)["n_hit_max_new_tokens"] == 2
    marked[3]["hit_max_new_tokens"] = "yes"
    _, preds = _setup(tmp_path / "bad", marked)
    with pytest.raises(BadRecordError, match=r"answers.jsonl:4: field 'hit_max_new_tokens'.*'yes'"):
        score_vqa("vqa_rad", gt, preds)


def test_result_is_written_as_json(tmp_path: Path) -> None:
    gt, preds = _setup(tmp_path, GOOD)
    out = tmp_path / "out" / "scores.json"
    res = score_vqa("vqa_rad", gt, preds, "strict", out=out)
    assert json.loads(out.read_text()) == res
    assert res["predictions"]["path"] == str(preds) and len(res["predictions"]["sha256"]) == 64


def test_a_split_without_open_questions_reports_none(tmp_path: Path) -> None:
    gt, preds = _setup(tmp_path, [{"question_id": 4, "text": "no"}])
    res = score_vqa("vqa_rad", gt, preds, split="train")
    assert (res["n_open"], res["n_closed"], res["closed_acc"]) == (0, 1, 100.0)
    assert res["open_recall"] is None and res["bleu1"] is None
    json.dumps(res, allow_nan=False)


@pytest.mark.parametrize(
    ("preds", "line", "field", "message"),
    [
        (
            GOOD + [{"question_id": "3", "text": "no"}],
            5,
            "question_id",
            "duplicate question_id '3'",
        ),
        (GOOD[:1] + [{"question_id": 1}] + GOOD[2:], 2, "text", "missing"),
        (GOOD[:1] + [{"question_id": 1, "text": None}] + GOOD[2:], 2, "text", "expected a string"),
        ([{"question_id": True, "text": "x"}] + GOOD[1:], 1, "question_id", "got True"),
        ([{"question_id": 0.0, "text": "x"}] + GOOD[1:], 1, "question_id", "got 0.0"),
    ],
)
def test_bad_prediction_records_are_located(
    tmp_path: Path, preds: list[dict], line: int, field: str, message: str
) -> None:
    gt, path = _setup(tmp_path, preds)
    with pytest.raises(BadRecordError) as info:
        score_vqa("vqa_rad", gt, path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert message in str(err)


def test_missing_and_extra_predictions_are_refused(tmp_path: Path) -> None:
    gt, path = _setup(tmp_path, GOOD[:2] + [{"question_id": 99, "text": "x"}])
    with pytest.raises(BadRecordError) as info:
        score_vqa("vqa_rad", gt, path)
    msg = str(info.value)
    assert (
        "1 of 3 predictions have ids that are not questions of vqa_rad split 'test' (e.g. '99')"
        in msg
    )
    assert "2 of 4 questions of vqa_rad split 'test' have no prediction (e.g. '2', '3')" in msg


def test_arguments_are_checked(tmp_path: Path) -> None:
    gt, path = _setup(tmp_path, GOOD)
    with pytest.raises(ValueError, match="closed_rule"):
        score_vqa("vqa_rad", gt, path, "lenient")  # type: ignore[arg-type]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no vqa_rad questions in split 'test'"):
        score_vqa("vqa_rad", empty, path)


def test_score_vqa_verb_prints_one_json_object(capsys) -> None:
    """``python -m biomedvital score-vqa`` prints the figures as one JSON object."""
    import json as _json

    from biomedvital.cli import main

    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data is not present")
    main(
        [
            "score-vqa",
            "--benchmark", "vqa_rad",
            "--data", str(shared / "vqa-rad" / "VQA_RAD Dataset Public.json"),
            "--predictions", str(shared / "llava-med" / "answer-file.jsonl"),
        ]
    )  # fmt: skip
    out = _json.loads(capsys.readouterr().out)
    assert (out["n_open"], out["n_closed"]) == (179, 272)
    assert out["closed_acc"] == pytest.approx(47.0588, abs=1e-3)
