"""AnswerJournal: one line per answered batch, torn tails cut, other settings kept apart."""

from __future__ import annotations

import os
from pathlib import Path

from biomedvital.evaluation.answer_journal import AnswerJournal, files_signature, journal_key
from biomedvital.evaluation.sharding import BatchShards, batches_to_answer

FP = {"model": "local-dir:/m", "generation": {"max_new_tokens": 64}, "batch_size": 4}


def _rows(*qids: str) -> list[dict]:
    return [{"question_id": q, "text": f"answer {q}"} for q in qids]


def test_append_load_and_a_torn_tail_cut_before_appending(tmp_path: Path) -> None:
    j = AnswerJournal(tmp_path, FP, rank=0)
    j.append(0, [0, 1], _rows("a", "b"), [["open", "x"], ["closed", "yes"]])
    j.close()
    with j.path.open("ab") as f:
        f.write(b'{"batch": 1, "indices": [2')  # killed mid-write
    again = AnswerJournal(tmp_path, FP, rank=0)
    assert set(again.load()) == {0} and again.torn_lines == 1
    again.append(1, [2, 3], _rows("c", "d"), [["open", "y"], ["open", "z"]])
    again.close()
    done = AnswerJournal(tmp_path, FP, rank=0).load()
    assert sorted(done) == [0, 1]  # the new line stands alone: the torn one was cut
    assert done[1]["rows"] == _rows("c", "d") and done[0]["truth"][1] == ["closed", "yes"]


def test_a_damaged_line_is_skipped_and_its_batch_answered_again(tmp_path: Path) -> None:
    j = AnswerJournal(tmp_path, FP, rank=0)
    j.append(0, [0, 1], _rows("a", "b"), [["open", "x"], ["closed", "yes"]])
    j.close()
    damaged = [
        '{"batch": 1, "indices": [2, 3], "rows": []}',  # no truth, fewer rows than indices
        '{"batch": 2, "indices": [4], "rows": [{"question_id": "e"}], "truth": [["open", "v"]]}',
        '{"batch": 3, "indices": ["5"], "rows": [{"text": "t"}], "truth": [["open", "w"]]}',
    ]
    with j.path.open("a") as f:
        f.write("\n".join(damaged) + "\n")
    again = AnswerJournal(tmp_path, FP, rank=0)
    assert set(again.load()) == {0} and again.torn_lines == 3


def test_every_rank_is_read_and_other_settings_are_foreign(tmp_path: Path) -> None:
    AnswerJournal(tmp_path, FP, rank=0).append(0, [0], _rows("a"), [["open", "x"]])
    AnswerJournal(tmp_path, FP, rank=1).append(1, [1], _rows("b"), [["open", "y"]])
    other = {**FP, "generation": {"max_new_tokens": 8}}
    AnswerJournal(tmp_path, other, rank=0).append(0, [0], _rows("z"), [["open", "x"]])
    mine = AnswerJournal(tmp_path, FP, rank=3)
    assert sorted(mine.load()) == [0, 1] and mine.load()[0]["rows"] == _rows("a")
    assert [p.name for p in mine.foreign()] == [f"answers.journal-{journal_key(other)}-rank0.jsonl"]
    mine.remove()
    assert mine.files() == [] and len(mine.foreign()) == 1
    assert journal_key(FP) != journal_key(other) and len(journal_key(FP)) == 12


def test_files_signature_sees_a_new_export(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = files_signature(tmp_path)
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert files_signature(tmp_path) != before
    assert files_signature(tmp_path / "model.safetensors") == [("model.safetensors", 4, 1)]
    assert files_signature(tmp_path / "missing") is None


def test_batches_to_answer_skips_done_but_leaves_every_process_one() -> None:
    assert batches_to_answer(8, {0, 1, 2}, 1) == [3, 4, 5, 6, 7]
    assert batches_to_answer(8, set(range(8)), 1) == [7]
    assert batches_to_answer(8, set(range(7)), 3) == [5, 6, 7]
    data = list(range(30))
    shares = [list(BatchShards(data, 4, 2, r, done={0, 1, 5})) for r in range(2)]
    assert shares == [[8, 9, 10, 11, 16, 17, 18, 19, 28, 29], [12, 13, 14, 15, 24, 25, 26, 27]]
