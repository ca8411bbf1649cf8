"""PathVQA's Hugging Face parquet layout: ids, image cache, split files, bad rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from biomedvital.data.report import BadRecordError  # noqa: E402
from biomedvital.evaluation.benchmarks import (  # noqa: E402
    load_benchmark,
    load_pathvqa,
    split_stats,
)


def _jpeg(name: str) -> bytes:
    import skimage

    return (Path(skimage.__file__).parent / "data" / name).read_bytes()


def _write(path: Path, rows: list[tuple[bytes | None, str | None, object]]) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [None if b is None else {"bytes": b, "path": None} for b, _, _ in rows],
                type=image_type,
            ),
            "question": pa.array([q for _, q, _ in rows], type=pa.string()),
            "answer": pa.array([a for _, _, a in rows], type=pa.string()),
        }
    )
    pq.write_table(table, path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "path-vqa" / "data"
    data.mkdir(parents=True)
    retina, rocket = _jpeg("retina.jpg"), _jpeg("rocket.jpg")
    _write(
        data / "test-00000-of-00002.parquet",
        [
            (retina, "is there fibrosis?", "yes"),
            (retina, "what does this image show?", "retina"),
        ],
    )
    _write(data / "test-00001-of-00002.parquet", [(rocket, "is this a nucleus?", "No")])
    _write(data / "train-00000-of-00001.parquet", [(rocket, "train question?", "yes")])
    return tmp_path / "path-vqa"


def test_parquet_folder(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    items = load_benchmark("pathvqa", folder, "test", image_cache=cache)
    assert [it.question_id for it in items] == [
        "test-00000-of-00002_0",
        "test-00000-of-00002_1",
        "test-00001-of-00002_0",
    ]
    assert [it.answer_type for it in items] == ["closed", "open", "closed"]
    assert items[1].answer == "retina" and items[2].question == "is this a nucleus?"
    assert {it.split for it in items} == {"test"}
    retina_name = hashlib.sha256(_jpeg("retina.jpg")).hexdigest() + ".jpg"
    assert items[0].image == items[1].image == retina_name
    assert sorted(p.name for p in cache.iterdir()) == sorted({it.image for it in items})
    assert (cache / retina_name).read_bytes() == _jpeg("retina.jpg")
    assert split_stats(items) == {"images": 2, "qa": 3, "open": 1, "closed": 2}

    # a reload gives the same ids and does not rewrite the images
    mtime = (cache / retina_name).stat().st_mtime_ns
    assert load_pathvqa(folder / "data", "test", cache) == items
    assert (cache / retina_name).stat().st_mtime_ns == mtime
    # the images open as JPEGs
    from PIL import Image

    with Image.open(cache / retina_name) as im:
        assert im.format == "JPEG"


def test_single_file_and_default_cache(folder: Path) -> None:
    file = folder / "data" / "train-00000-of-00001.parquet"
    items = load_pathvqa(file, "train")
    assert [it.question_id for it in items] == ["train-00000-of-00001_0"]
    assert (folder / "data" / "images" / items[0].image).is_file()
    with pytest.raises(ValueError, match="file name says split 'train'"):
        load_pathvqa(file, "test")


def test_bad_row_names_file_and_row(tmp_path: Path) -> None:
    good = _jpeg("rocket.jpg")
    path = tmp_path / "test-00000-of-00001.parquet"
    _write(path, [(good, "fine?", "yes"), (None, "no image?", "yes")])
    with pytest.raises(
        BadRecordError, match=r"test-00000-of-00001\.parquet: record 2:.*image"
    ) as e:
        load_pathvqa(path, "test", tmp_path / "cache")
    assert e.value.line == 2 and e.value.field == "image.bytes"

    _write(path, [(good, None, "yes")])
    with pytest.raises(BadRecordError, match="record 1: field 'question'"):
        load_pathvqa(path, "test", tmp_path / "cache")

    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), path)
    with pytest.raises(BadRecordError, match="field 'image': missing column"):
        load_pathvqa(path, "test", tmp_path / "cache")


def test_json_layout_still_preferred(tmp_path: Path) -> None:
    import json

    (tmp_path / "pvqa_test.json").write_text(
        json.dumps([{"img_id": "t1", "labelf": {"pvqa": [{"yes": 1}]}, "sentf": {"pvqa": ["q?"]}}])
    )
    _write(tmp_path / "test-00000-of-00001.parquet", [(_jpeg("rocket.jpg"), "q?", "yes")])
    items = load_pathvqa(tmp_path, "test")
    assert [it.question_id for it in items] == ["t1_0"]
    assert not (tmp_path / "images").exists()


def test_a_folders_provenance_hashes_the_shards_it_reads(folder: Path, tmp_path: Path) -> None:
    """A folder given as ``data`` is hashed by the files read from it, so that a changed shard
    changes ``run.test.json``'s hash and the answer journal's key (which reads it)."""
    from biomedvital.evaluation.vqa_eval import VQADataModule

    def described() -> dict:
        return VQADataModule("pathvqa", str(folder), str(tmp_path / "cache")).describe()["data"]

    before = described()
    assert before["files"] == [
        "data/test-00000-of-00002.parquet",
        "data/test-00001-of-00002.parquet",
    ]  # the train shard is not read, so not hashed
    _write(folder / "data" / "train-00000-of-00001.parquet", [(_jpeg("retina.jpg"), "q?", "no")])
    assert described() == before
    _write(folder / "data" / "test-00001-of-00002.parquet", [(_jpeg("retina.jpg"), "q?", "no")])
    after = described()
    assert after["files"] == before["files"] and after["sha256"] != before["sha256"]


def test_scoring_writes_no_image_and_the_evaluator_writes_them_under_its_image_root(
    folder: Path, tmp_path: Path
) -> None:
    """``score-vqa`` reads the parquet files for the answers only: nothing is written beside
    them (a read-only mount would fail). The evaluator writes the images where it reads them
    from, its ``image_root``, not into the data folder."""
    import json

    from biomedvital.evaluation.score_vqa import score_vqa
    from biomedvital.evaluation.vqa_eval import VQADataModule

    items = load_benchmark("pathvqa", folder, "test", write_images=False)
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "".join(
            json.dumps({"question_id": it.question_id, "text": it.answer}) + "\n" for it in items
        )
    )
    scores = score_vqa("pathvqa", folder, preds)
    assert scores["closed_acc"] == 100.0
    assert not (folder / "data" / "images").exists() and not (folder / "images").exists()
    root = tmp_path / "extracted"
    dm = VQADataModule("pathvqa", str(folder), str(root))
    dm.setup("test")  # checks every question's image under the root
    assert sorted(p.name for p in root.iterdir()) == sorted({it.image for it in items})
    assert not (folder / "data" / "images").exists()
