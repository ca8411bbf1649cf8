"""``iter_array``: a JSON array read element by element, equal to ``json.load`` for any
document and any buffer size, with ``json``'s error positions, in flat memory."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from biomedvital.data.jsonio import iter_array, iter_objects
from biomedvital.data.report import BadRecordError

CHUNKS = (1, 2, 3, 7, 64, 1 << 20)


def _value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice(
            [0, -12, 3.5e-7, 1e21, 123456789, True, False, None, 'a]b,"c', "é 漢 \\n", "", "[{"]
        )
    if r < 0.65:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_equals_json_load_at_any_buffer_size(tmp_path: Path) -> None:
    rng = random.Random(0)
    path = tmp_path / "a.json"
    for _ in range(120):
        data = [_value(rng) for _ in range(rng.randint(0, 10))]
        text = json.dumps(data, indent=rng.choice([None, 0, 2]), ensure_ascii=rng.random() < 0.5)
        text = rng.choice(["", "\n  "]) + text + rng.choice(["", "\n\n "])
        text = rng.choice(["", "\ufeff"]) + text
        path.write_text(text, encoding="utf-8")
        for chunk in CHUNKS:
            got = list(iter_array(path, chunk_chars=chunk))
            assert got == list(enumerate(data, start=1)), (chunk, text[:120])


BROKEN = [
    "[1,2,]",
    "[1 2]",
    "[1,2",
    "[1,2] x",
    '[1,{"a":}]',
    "[\n1,\n  tru]",
    '[\n  {"a": 1},\n  {"b": 2,}\n]',
    "[\n 1,\n 2\n",
    '["\\x"]',
    "",
    '{"a": 1}',
]


def _json_position(text: str) -> tuple[int, int]:
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.lineno, e.colno
    return 1, 1  # valid JSON but not an array: refused at its first character


@pytest.mark.parametrize("text", BROKEN)
def test_errors_name_json_s_line_and_column(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    line, column = _json_position(text)
    for chunk in CHUNKS:
        with pytest.raises(BadRecordError) as info:
            list(iter_array(path, chunk_chars=chunk))
        assert info.value.line == line, chunk
        assert f"at column {column})" in str(info.value), (chunk, str(info.value))
        assert info.value.category == "invalid_json"


def test_elements_before_an_error_are_yielded(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"id": 1}, {"id": 2}, {"id": ', encoding="utf-8")
    got = []
    with pytest.raises(BadRecordError, match="invalid JSON"):
        for _, obj in iter_array(path, chunk_chars=4):
            got.append(obj["id"])
    assert got == [1, 2]


def test_invalid_utf8_names_the_byte_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bytes.json"
    head = b'[{"caption": "' + b"x" * 5000
    path.write_bytes(head + b'\xff"}]')
    for chunk in (100, 1 << 20):
        with pytest.raises(BadRecordError, match=f"invalid UTF-8 at byte {len(head)}"):
            list(iter_array(path, chunk_chars=chunk))


def test_memory_stays_flat(tmp_path: Path) -> None:
    """20 MB of figures: reading them one by one holds a buffer, not the document."""
    fig = {"pair_id": "", "fig_caption": "A CT scan of the chest with a lesion. " * 20}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{**fig, "pair_id": f"PMC{i}"} for i in range(20_000)]))
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_objects(path))
        _, streamed = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with path.open() as f:
            whole = len(json.load(f))
        _, loaded = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == whole == 20_000
    assert streamed < loaded / 5, (streamed, loaded)


@pytest.mark.parametrize("chunk", [1, 6, 100])
def test_invalid_utf8_after_a_bom_and_a_split_character_names_its_byte_and_line(
    tmp_path: Path, chunk: int
) -> None:
    """The offset counts every byte of the file, the BOM included, whatever the chunking (a
    two-byte character split across chunks used to shift it), and the line is named."""
    from biomedvital.data.jsonio import load_json

    path = tmp_path / "bom.json"
    head = b"\xef\xbb\xbf" + '[{"a": "café"},\n {"b": "'.encode()
    path.write_bytes(head + b'\xff"}]')
    for read in (lambda: list(iter_array(path, chunk_chars=chunk)), lambda: load_json(path)):
        with pytest.raises(BadRecordError, match=rf"bom.json:2: invalid UTF-8 at byte {len(head)}"):
            read()
