"""Reading/writing JSON and JSONL: located errors, skip accounting, streaming, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import (
    atomic_write,
    check_unique,
    iter_jsonl,
    read_records,
    write_json,
    write_jsonl,
)
from biomedvital.data.records import Candidate, Rating, Turn
from biomedvital.data.report import BadRecordError, RecordReport


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    path.write_bytes(data)
    return path


def _rating(cid: int, score: object = 5.0) -> str:
    return json.dumps({"candidate_id": cid, "score": score, "judge": "gpt-4"})


# ----------------------------------------------------------------------------- reading JSONL


def test_iter_jsonl_dicts_ignores_blank_lines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\r\n')
    assert list(iter_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_iter_jsonl_validates_with_model(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "r.jsonl", [_rating(1, 7), _rating(2, "8.5")])
    ratings = list(iter_jsonl(path, Rating))
    assert [r.candidate_id for r in ratings] == ["1", "2"]
    assert [r.score for r in ratings] == [7.0, 8.5]


def test_error_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "x.jsonl", [_rating(1), "", _rating(2, 12.5)])
    with pytest.raises(BadRecordError) as info:
        list(iter_jsonl(path, Rating))
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, "score")
    assert str(err) == f"{path}:3: field 'score': must be between 0 and 10 (got 12.5)"
    assert isinstance(err, ValueError)


def test_nested_field_path_in_error(tmp_path: Path) -> None:
    bad = {
        "id": 1,
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],
    }
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps(bad)])
    with pytest.raises(BadRecordError) as info:
        list(iter_jsonl(path, Candidate))
    assert info.value.field == "conversations.1.from"
    assert "'bot'" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "reason", "category"),
    [
        (b'{"a": "caf\xe9"}', "invalid UTF-8", "invalid_utf8"),
        (b'{"a": 1, "b": "trunc', "invalid JSON", "invalid_json"),
        (b"[1, 2]", "expected a JSON object, got array", "not_an_object"),
        (b'"just a string"', "expected a JSON object, got string", "not_an_object"),
    ],
)
def test_bad_lines_raise_located_errors(
    tmp_path: Path, raw: bytes, reason: str, category: str
) -> None:
    path = _write_lines(tmp_path / "x.jsonl", ['{"ok": 1}', raw])
    with pytest.raises(BadRecordError) as info:
        list(iter_jsonl(path))
    assert info.value.line == 2
    assert info.value.category == category
    assert str(info.value).startswith(f"{path}:2:")
    assert reason in str(info.value)


def test_skip_mode_counts_every_bad_record(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "x.jsonl",
        [
            _rating(1),
            b"\xff\xfe",
            "{broken",
            _rating(2, 11),
            _rating(3, "abc"),
            json.dumps({"score": 1, "judge": "j"}),
            _rating(4),
        ],
    )
    report = RecordReport()
    got = list(iter_jsonl(path, Rating, on_bad="skip", report=report))
    assert [r.candidate_id for r in got] == ["1", "4"]
    d = report.as_dict()
    assert d["kept"] == 2
    assert d["skipped"] == 5
    assert d["skipped_by_reason"] == {
        "invalid_utf8": 1,
        "invalid_json": 1,
        "invalid:score": 2,
        "missing:candidate_id": 1,
    }
    assert len(d["examples"]) == 5
    assert any(":5: field 'score': must be a number (got 'abc')" in e for e in d["examples"])
    json.dumps(d)  # serialisable


def test_skip_mode_requires_a_report(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "x.jsonl", ['{"a": 1}'])
    with pytest.raises(ValueError, match="RecordReport"):
        iter_jsonl(path, on_bad="skip")  # refused at call time, not at first next()
    with pytest.raises(ValueError, match="on_bad"):
        read_records(path, on_bad="ignore")  # type: ignore[arg-type]


def test_iter_jsonl_streams_before_later_corruption(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "x.jsonl", [_rating(1), _rating(2), '{"truncated": '])
    it = iter_jsonl(path, Rating)
    assert next(it).candidate_id == "1"
    assert next(it).candidate_id == "2"
    with pytest.raises(BadRecordError, match=":3:"):
        next(it)


def test_iter_jsonl_reads_lazily(tmp_path: Path) -> None:
    # A loader that read the whole file up front would never see the line appended later.
    path = _write_lines(tmp_path / "x.jsonl", [_rating(1)])
    it = iter_jsonl(path, Rating)
    assert next(it).candidate_id == "1"
    with path.open("a") as f:
        f.write(_rating(2) + "\n")
    assert [r.candidate_id for r in it] == ["2"]


# ----------------------------------------------------------------------------- JSON arrays


def test_read_records_accepts_jsonl_and_arrays(tmp_path: Path) -> None:
    recs = [{"candidate_id": i, "score": i, "judge": "j"} for i in range(3)]
    jsonl = tmp_path / "r.jsonl"
    write_jsonl(jsonl, recs)
    arr = tmp_path / "r.json"
    arr.write_text("\n  " + json.dumps(recs, indent=2))
    a = read_records(jsonl, Rating)
    b = read_records(arr, Rating)
    assert a == b
    assert [r.score for r in a] == [0.0, 1.0, 2.0]
    assert read_records(arr) == recs


def test_array_errors_name_record_index(tmp_path: Path) -> None:
    recs = [
        {"candidate_id": 1, "score": 1, "judge": "j"},
        {"candidate_id": 2, "score": 99, "judge": "j"},
        7,
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(BadRecordError) as info:
        read_records(path, Rating)
    assert info.value.line == 2
    assert info.value.kind == "record"
    assert (
        str(info.value) == f"{path}: record 2: field 'score': must be between 0 and 10 (got 99.0)"
    )

    report = RecordReport()
    assert len(read_records(path, Rating, on_bad="skip", report=report)) == 1
    assert report.as_dict()["skipped_by_reason"] == {"invalid:score": 1, "not_an_object": 1}
    assert "record 3: expected a JSON object, got number" in report.examples[1]


def test_broken_array_file_raises_even_in_skip_mode(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('[{"a": 1},\n {"a": ')
    with pytest.raises(BadRecordError, match="invalid JSON") as info:
        read_records(path, on_bad="skip", report=RecordReport())
    assert info.value.line == 2


def test_empty_file_gives_no_records(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("\n \n")
    assert read_records(path) == []


# ----------------------------------------------------------------------------- duplicates


def test_check_unique_names_both_positions(tmp_path: Path) -> None:
    recs = [{"id": "a"}, {"id": "b"}, {"id": "a"}]
    with pytest.raises(BadRecordError) as info:
        check_unique(recs, "id", "data/c.jsonl")
    err = info.value
    assert err.line == 3 and err.field == "id"
    assert "record 3 repeats record 1" in str(err)
    assert str(err).startswith("data/c.jsonl: record 3: field 'id': duplicate id 'a'")


def test_check_unique_skip_keeps_first_and_counts(tmp_path: Path) -> None:
    models = [Rating(candidate_id=str(i % 2), score=1, judge="j") for i in range(4)]
    report = RecordReport()
    kept = check_unique(
        models, "candidate_id", "r.jsonl", on_bad="skip", report=report, counted=False
    )
    assert kept == models[:2]
    assert report.skipped_by_reason == {"duplicate:candidate_id": 2}
    assert report.n_kept == 0  # nothing was counted as kept, so nothing is taken back


def _dup_file(tmp_path: Path) -> Path:
    """Ratings with a blank line, an invalid line and a repeated id: positions != indices."""
    return _write_lines(
        tmp_path / "r.jsonl",
        [_rating(1), "", "{broken", _rating(2), _rating(1, 7.0)],
    )


def test_check_unique_names_the_file_line_of_a_read_record(tmp_path: Path) -> None:
    path = _dup_file(tmp_path)
    recs = read_records(path, Rating, on_bad="skip", report=RecordReport())
    with pytest.raises(BadRecordError) as info:
        check_unique(recs, "candidate_id", path)
    err = info.value
    assert (err.line, err.kind, err.category) == (5, "line", "duplicate:candidate_id")
    assert str(err) == (
        f"{path}:5: field 'candidate_id': duplicate candidate_id '1' (line 5 repeats line 1)"
    )
    # the position follows the record, not its slot in the list
    recs.sort(key=lambda r: -r.score)
    with pytest.raises(BadRecordError, match=r"\(line 1 repeats line 5\)"):
        check_unique(recs, "candidate_id", path)


def test_check_unique_names_the_array_element(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"id": "a"}, 3, {"id": "b"}, {"id": "a"}]))
    recs = read_records(path, on_bad="skip", report=RecordReport())
    with pytest.raises(BadRecordError) as info:
        check_unique(recs, "id", path)
    assert str(info.value).startswith(f"{path}: record 4: field 'id': duplicate id 'a'")
    assert "(record 4 repeats record 1)" in str(info.value)


def test_check_unique_skip_moves_the_duplicate_from_kept_to_skipped(tmp_path: Path) -> None:
    path = _dup_file(tmp_path)
    report = RecordReport()
    recs = read_records(path, Rating, on_bad="skip", report=report)
    assert (report.n_kept, report.n_skipped) == (3, 1)
    kept = check_unique(recs, "candidate_id", path, on_bad="skip", report=report)
    assert [r.candidate_id for r in kept] == ["1", "2"]
    # 4 non-blank lines: 2 kept, 1 invalid, 1 duplicate
    assert (report.n_kept, report.n_skipped) == (len(kept), 2)
    assert report.skipped_by_reason == {"invalid_json": 1, "duplicate:candidate_id": 1}
    assert report.examples[-1].startswith(f"{path}:5: field 'candidate_id'")


def test_check_unique_takes_positions_given(tmp_path: Path) -> None:
    recs = [{"id": "a"}, {"id": "b"}, {"id": "a"}]
    with pytest.raises(BadRecordError, match=r"c\.jsonl:9: .*\(line 9 repeats line 2\)"):
        check_unique(recs, "id", "c.jsonl", where=[(2, "line"), (4, "line"), (9, "line")])
    with pytest.raises(ValueError, match="2 positions for 3 records"):
        check_unique(recs, "id", "c.jsonl", where=[(2, "line"), (4, "line")])


def test_a_duplicate_never_counted_as_kept_is_not_taken_back(tmp_path: Path) -> None:
    # counted=True on records no reader counted would make the kept count negative
    with pytest.raises(ValueError, match="only 0 counted as kept"):
        check_unique(
            [{"id": "a"}, {"id": "a"}], "id", "c.jsonl", on_bad="skip", report=RecordReport()
        )


# ----------------------------------------------------------------------------- writing


def test_atomic_write_success(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"
    with atomic_write(path) as f:
        f.write("hello")
        assert not path.exists()  # nothing visible until the block ends
    assert path.read_text() == "hello"
    assert os.listdir(path.parent) == ["out.txt"]


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_write(path, "wb") as f:
        f.write(b"partial")
        raise RuntimeError("writer crashed")
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("new but incomplete")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_jsonl_generator_failure_leaves_nothing(tmp_path: Path) -> None:
    def records():
        yield {"a": 1}
        yield {"a": 2}
        raise OSError("source died midway")

    path = tmp_path / "out.jsonl"
    with pytest.raises(OSError, match="midway"):
        write_jsonl(path, records())
    assert os.listdir(tmp_path) == []


def test_write_jsonl_round_trips_models_with_aliases(tmp_path: Path) -> None:
    cand = Candidate(
        id="c1",
        image="img.jpg",
        conversations=[Turn(from_="human", value="<image>\nWhat?"), Turn(from_="gpt", value="CT")],
        generator={"model": "gpt-4v"},
        note="kept extra",  # type: ignore[call-arg]
    )
    path = tmp_path / "c.jsonl"
    assert write_jsonl(path, (c for c in [cand, cand.model_dump(by_alias=True)])) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["conversations"][0]["from"] == "human"
    assert json.loads(lines[0])["note"] == "kept extra"
    back = list(iter_jsonl(path, Candidate))
    assert back == [cand, cand]


def test_write_json_is_atomic_and_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, {"models": [Rating(candidate_id="1", score=2, judge="j")], "p": Path("a/b")})
    assert json.loads(path.read_text())["models"][0]["score"] == 2.0
    assert json.loads(path.read_text())["p"] == "a/b"
    bad = tmp_path / "nan.json"
    with pytest.raises(ValueError):
        write_json(bad, {"x": float("nan")})
    assert not bad.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "b"
    data = os.urandom(3 * 1024 + 7)
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- report


def test_report_merge_and_example_cap() -> None:
    a, b = RecordReport(), RecordReport()
    a.kept(3)
    for i in range(15):
        a.skip(BadRecordError("a.jsonl", i + 1, "bad", category="x"))
    b.kept()
    for i in range(10):
        b.skip(BadRecordError("b.jsonl", i + 1, "bad", "f"))
    b.repair("whitespace", 2)
    d = a.merge(b).as_dict()
    assert d["kept"] == 4 and d["skipped"] == 25
    assert d["skipped_by_reason"] == {"invalid:f": 10, "x": 15}
    assert d["repaired"] == {"whitespace": 2}
    assert len(d["examples"]) == 20
    assert d["examples"][0] == "a.jsonl:1: bad"


def test_bad_record_error_pickles_and_formats() -> None:
    err = BadRecordError("x.json", 4, "nope", "a.b", kind="record", category="c")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.line, back.field, back.reason, back.kind, back.category) == (
        "x.json",
        4,
        "a.b",
        "nope",
        "record",
        "c",
    )
    assert str(back) == "x.json: record 4: field 'a.b': nope"
    assert str(BadRecordError("x.json", None, "empty file")) == "x.json: empty file"
