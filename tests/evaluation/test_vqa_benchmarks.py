"""Benchmark loaders: published split statistics on the real files, quirks, and located errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from biomedvital.data.report import BadRecordError
from biomedvital.evaluation.benchmarks import (
    VQAItem,
    load_benchmark,
    load_llava_vqa,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
    split_stats,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


def _write(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


# ----------------------------------------------------------------------------- real files


@needs_shared
@pytest.mark.parametrize(
    ("benchmark", "folder", "expected"),
    [
        ("vqa_rad", "vqa-rad", (203, 451, 179, 272)),
        ("slake", "slake", (96, 1061, 645, 416)),
        ("pathvqa", "pathvqa", (858, 6761, 3370, 3391)),
    ],
)
def test_published_test_split_statistics(benchmark: str, folder: str, expected: tuple) -> None:
    items = load_benchmark(benchmark, SHARED / folder, "test")  # type: ignore[arg-type]
    stats = split_stats(items)
    assert (stats["images"], stats["qa"], stats["open"], stats["closed"]) == expected
    assert len({it.question_id for it in items}) == len(items)
    assert {it.split for it in items} == {"test"}


@needs_shared
def test_vqa_rad_quirks() -> None:
    path = SHARED / "vqa-rad" / "VQA_RAD Dataset Public.json"
    raw = json.loads(path.read_text())
    every = {it.question_id: it for it in load_vqa_rad(path, "all")}
    assert len(every) == 2248
    # qid 0 is the string "0", the rest ints: all become strings
    assert raw[0]["qid"] == "0" and every["0"].answer == "Yes"
    # int answers become strings
    int_answers = {str(r["qid"]): str(r["answer"]) for r in raw if isinstance(r["answer"], int)}
    assert len(int_answers) == 5
    assert {q: every[q].answer for q in int_answers} == int_answers
    # "CLOSED " (trailing space) is closed
    padded = [str(r["qid"]) for r in raw if r["answer_type"] == "CLOSED "]
    assert len(padded) == 2 and all(every[q].answer_type == "closed" for q in padded)
    # records without question_rephrase load like the others
    assert all(str(r["qid"]) in every for r in raw if "question_rephrase" not in r)
    # train is the rest; test + train = all
    train, test = load_vqa_rad(path, "train"), load_vqa_rad(path, "test")
    assert len(train) + len(test) == 2248 and {it.split for it in train} == {"train"}
    assert not {it.question_id for it in train} & {it.question_id for it in test}
    # not every closed test answer is yes/no (21 of 272)
    closed = [it for it in test if it.answer_type == "closed"]
    assert sum(it.answer.strip().lower() not in ("yes", "no") for it in closed) == 21
    assert load_vqa_rad(SHARED / "vqa-rad") == test  # the folder works too


@needs_shared
def test_slake_languages_key_orders_and_splits() -> None:
    raw = json.loads((SHARED / "slake" / "test.json").read_text())
    assert len(Counter(tuple(r) for r in raw)) == 2  # two key orders in the release
    both = load_slake(SHARED / "slake", "test", lang=None)
    assert len(both) == len(raw) == 2094
    english = load_slake(SHARED / "slake" / "test.json")
    assert len(english) == 1061
    closed = [it for it in english if it.answer_type == "closed"]
    assert sum(it.answer.strip().lower() not in ("yes", "no") for it in closed) == 61
    val = load_slake(SHARED / "slake", "val")
    assert val and {it.split for it in val} == {"validate"}
    # a file whose name says another split is refused rather than scored as the wrong split
    with pytest.raises(ValueError, match="file name says split 'validate'"):
        load_slake(SHARED / "slake" / "validate.json", "test")
    with pytest.raises(FileNotFoundError, match=r"train\.json"):
        load_slake(SHARED / "slake", "train")


@needs_shared
def test_pathvqa_ids_align_answers_by_index() -> None:
    items = {it.question_id: it for it in load_pathvqa(SHARED / "pathvqa")}
    first = items["test_0001_0"]
    assert first.answer == "squamous cell carcinoma" and first.answer_type == "open"
    assert first.image == "test/test_0001.jpg"
    assert first.question.startswith("What is composed of nests of malignant cells")
    assert (items["test_0001_1"].answer, items["test_0001_1"].answer_type) == ("yes", "closed")
    assert (items["test_0001_2"].answer, items["test_0001_2"].answer_type) == ("no", "closed")
    assert not any(q.startswith("test_0000_") for q in items)  # an image without questions


# ----------------------------------------------------------------------------- layouts


def _llava(i: object, answer: object, kind: str = "CLOSED", conv: str = "conversations") -> dict:
    return {
        "id": i,
        "image": f"img{i}.jpg",
        "answer_type": kind,
        conv: [
            {"from": "human", "value": "<image>\nIs there a mass?"},
            {"from": "gpt", "value": answer},
        ],
    }


def test_llava_layout_is_detected_for_any_benchmark(tmp_path: Path) -> None:
    # LLaVA-Med's converted test.json; its evaluation script also accepts the typo "conversatons"
    rows = [_llava(0, "yes"), _llava("7", "left lung", "OPEN", conv="conversatons"), _llava(9, 3)]
    path = _write(tmp_path / "test.json", rows)
    expected = [
        VQAItem("0", "img0.jpg", "Is there a mass?", "yes", "closed", "test"),
        VQAItem("7", "img7.jpg", "Is there a mass?", "left lung", "open", "test"),
        VQAItem("9", "img9.jpg", "Is there a mass?", "3", "closed", "test"),
    ]
    assert load_llava_vqa(path) == expected
    for benchmark in ("vqa_rad", "slake", "pathvqa"):
        assert load_benchmark(benchmark, path) == expected  # type: ignore[arg-type]
        assert load_benchmark(benchmark, tmp_path) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("benchmark", ["vqa_rad", "slake", "pathvqa"])
def test_llava_layout_file_of_another_split_is_refused(tmp_path: Path, benchmark: str) -> None:
    """A converted file holds one split, named by its file name: ``train.json`` passed as the
    test data must not be scored as the test split (VQA-RAD used to accept it)."""
    path = _write(tmp_path / "train.json", [_llava(0, "yes")])
    with pytest.raises(ValueError, match="file name says split 'train' but split='test'"):
        load_benchmark(benchmark, path)  # type: ignore[arg-type]
    assert [it.split for it in load_benchmark(benchmark, path, "train")] == ["train"]  # type: ignore[arg-type]


def test_llava_layout_refuses_repeated_ids(tmp_path: Path) -> None:
    # a conversion that reuses the PathVQA image id for every question cannot be joined by id
    path = _write(tmp_path / "test.json", [_llava("test_0001", "yes"), _llava("test_0001", "no")])
    with pytest.raises(BadRecordError) as info:
        load_llava_vqa(path)
    assert (info.value.line, info.value.kind) == (2, "record")
    assert "duplicate question id 'test_0001' (first at record 1)" in str(info.value)


# ----------------------------------------------------------------------------- located errors


def _rad(qid: object = 1, **over: object) -> dict:
    row = {
        "qid": qid,
        "phrase_type": "test_freeform",
        "image_name": "synpic1.jpg",
        "question": "Is this normal?",
        "answer": "Yes",
        "answer_type": "CLOSED",
    }
    row.update(over)
    return row


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (_rad(answer_type="MAYBE"), "answer_type", "expected 'OPEN' or 'CLOSED' (got 'MAYBE')"),
        (_rad(answer=True), "answer", "expected a string or integer answer (got True)"),
        (_rad(qid=1.5), "qid", "expected an integer or non-empty string id (got 1.5)"),
        (_rad(phrase_type="dev"), "phrase_type", "unknown phrase_type 'dev'"),
        ({k: v for k, v in _rad().items() if k != "image_name"}, "image_name", "missing"),
    ],
)
def test_vqa_rad_errors_name_file_record_and_field(
    tmp_path: Path, row: dict, field: str, message: str
) -> None:
    path = _write(tmp_path / "rad.json", [_rad(0), row])
    with pytest.raises(BadRecordError) as info:
        load_vqa_rad(path)
    err = info.value
    assert (err.path, err.line, err.kind, err.field) == (str(path), 2, "record", field)
    assert message in str(err) and str(err).startswith(f"{path}: record 2: field '{field}':")


def test_vqa_rad_refuses_duplicate_ids_and_bad_splits(tmp_path: Path) -> None:
    path = _write(tmp_path / "rad.json", [_rad("3"), _rad(3)])
    with pytest.raises(BadRecordError, match=r"record 2: duplicate question id '3'"):
        load_vqa_rad(path)
    with pytest.raises(ValueError, match="VQA-RAD split"):
        load_vqa_rad(path, "validate")
    with pytest.raises(ValueError, match="benchmark must be one of"):
        load_benchmark("vqa_med", path)  # type: ignore[arg-type]


def _pvqa(img_id: str, labels: list, questions: list) -> dict:
    return {"img_id": img_id, "labelf": {"pvqa": labels}, "sentf": {"pvqa": questions}}


def test_pathvqa_grouped_layout_and_errors(tmp_path: Path) -> None:
    rows = [
        _pvqa("val_0000", [], []),
        _pvqa("val_0001", [{"Yes ": 1}, {"apoptosis ": 1}], ["Is it?", "What is it?"]),
    ]
    items = load_pathvqa(_write(tmp_path / "pvqa_val.json", rows), "val")
    assert [(it.question_id, it.answer_type, it.image, it.split) for it in items] == [
        ("val_0001_0", "closed", "val/val_0001.jpg", "val"),
        ("val_0001_1", "open", "val/val_0001.jpg", "val"),
    ]
    assert items[1].answer == "apoptosis "  # kept as published; normalisation strips it

    bad = [_pvqa("t1", [{"yes": 1}], ["Is it?", "Is it not?"])]
    with pytest.raises(BadRecordError) as info:
        load_pathvqa(_write(tmp_path / "pvqa_test.json", bad))
    assert (info.value.line, info.value.field) == (1, "labelf.pvqa")
    assert "1 answers for 2 questions" in str(info.value)

    bad = [_pvqa("t1", [{"yes": 1}, {"no": 1, "yes": 0}], ["Is it?", "Is it not?"])]
    with pytest.raises(BadRecordError) as info:
        load_pathvqa(_write(tmp_path / "pvqa_test.json", bad))
    assert info.value.field == "labelf.pvqa.1"

    with pytest.raises(ValueError, match="file name says split 'val'"):
        load_pathvqa(tmp_path / "pvqa_val.json", "test")
    with pytest.raises(ValueError, match="PathVQA split"):
        load_pathvqa(tmp_path, "validate")


# ----------------------------------------------------------------------------- LLaVA-Med-Bench


@needs_shared
def test_llava_med_bench_real_file() -> None:
    """193 open-ended questions on 50 figures; the folder resolves to the question file; the
    reference answer is gpt4_answer; no ``<image>`` token left in a question."""
    from biomedvital.evaluation.benchmarks import load_llava_med_bench

    folder = SHARED / "llava-med"
    items = load_benchmark("llava_med_bench", folder)
    assert items == load_llava_med_bench(folder / "llava_med_eval_qa50_qa.jsonl")
    assert split_stats(items) == {"images": 50, "qa": 193, "open": 0, "closed": 0, "chat": 193}
    assert len({it.question_id for it in items}) == 193
    assert all("<image>" not in it.question and it.question == it.question.strip() for it in items)
    first = json.loads((folder / "llava_med_eval_qa50_qa.jsonl").open().readline())
    assert items[0].question_id == str(first["question_id"])
    assert items[0].answer == first["gpt4_answer"] and items[0].image == first["image"]


@pytest.mark.parametrize(
    ("row", "field", "category"),
    [
        ({"question_id": 1, "image": "a.jpg", "gpt4_answer": "x"}, "text", "missing:text"),
        ({"question_id": 1, "image": "a.jpg", "text": "<image>\n ", "gpt4_answer": "x"}, "text", "empty:text"),
        ({"question_id": 1, "image": "a.jpg", "text": "q?"}, "gpt4_answer", "missing:gpt4_answer"),
        ({"question_id": None, "image": "a.jpg", "text": "q?", "gpt4_answer": "x"}, "question_id", None),
    ],
)  # fmt: skip
def test_llava_med_bench_errors_name_the_field(
    tmp_path: Path, row: dict, field: str, category: str | None
) -> None:
    from biomedvital.evaluation.benchmarks import load_llava_med_bench

    good = {
        "question_id": 0,
        "image": "a.jpg",
        "text": "What is shown?\n<image>",
        "gpt4_answer": "x",
    }
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRecordError) as err:
        load_llava_med_bench(path)
    assert err.value.field == field and err.value.line == 2
    if category:
        assert err.value.category == category


def test_llava_med_bench_duplicate_ids_and_splits(tmp_path: Path) -> None:
    from biomedvital.evaluation.benchmarks import load_llava_med_bench

    row = {"question_id": 3, "image": "a.jpg", "text": "q?", "gpt4_answer": "x"}
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "question_id": "3"}) + "\n")
    with pytest.raises(BadRecordError, match="duplicate question id '3'"):
        load_llava_med_bench(path)
    with pytest.raises(ValueError, match="one split"):
        load_llava_med_bench(path, "train")


def test_score_vqa_refuses_chat_answers(tmp_path: Path) -> None:
    """Chat answers have no VQA score: the library says where they are scored instead."""
    from biomedvital.evaluation.score_vqa import score_vqa

    with pytest.raises(ValueError, match="judge"):
        score_vqa("llava_med_bench", tmp_path, tmp_path / "p.jsonl")  # type: ignore[arg-type]
