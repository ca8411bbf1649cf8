"""Pools of several candidate and rating files (e.g. the demo's hand-written ones plus
``generate`` / ``rate`` outputs): same pairs as one file, ids unique across files, the scoring
stream and ``select`` read every file, and the runs that wrote them become lineage tags."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from biomedvital.data.pool import DemoPool, FilePool
from biomedvital.data.report import BadRecordError
from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.select import select
from biomedvital.selection.stream import CandidateStream
from biomedvital.tracking.callbacks import lineage_tags
from biomedvital.tracking.mlflow import upstream_run_of


def _split(path: Path, at: int, a: Path, b: Path) -> tuple[Path, Path]:
    lines = path.read_text().splitlines(keepends=True)
    a.parent.mkdir(parents=True, exist_ok=True)
    b.parent.mkdir(parents=True, exist_ok=True)
    a.write_text("".join(lines[:at]))
    b.write_text("".join(lines[at:]))
    return a, b


def _dm(pool: FilePool) -> SelectorDataModule:
    dm = SelectorDataModule(pool, model_pairs=32, val_model_pairs=8, num_workers=0)
    dm.setup("fit")
    return dm


@pytest.fixture
def split(pool: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """The conftest pool with candidates and ratings cut in two files each (a second 'stage')."""
    ca, cb = _split(pool["candidates"], 10, tmp_path / "c1.jsonl", tmp_path / "gen" / "cands.jsonl")
    ra, rb = _split(pool["ratings"], 7, tmp_path / "r1.jsonl", tmp_path / "rate" / "ratings.jsonl")
    common = {k: str(pool[k]) for k in ("image_root", "figures", "preferences")}
    return {"candidates": [str(ca), str(cb)], "ratings": [str(ra), str(rb)], **common}


def test_split_files_give_the_same_pairs(pool: dict[str, Path], split: dict[str, Any]) -> None:
    one = _dm(FilePool(**{k: str(v) for k, v in pool.items()}))
    two = _dm(FilePool(**split))
    assert two.files is not None and len(two.files.candidate_files) == 2
    assert [e.text for e in two.entries] == [e.text for e in one.entries]
    assert two.sets == one.sets
    inputs = two.describe()["inputs"]
    assert inputs["candidates"]["path"] == split["candidates"][0]
    assert [x["path"] for x in inputs["extra_candidates"]] == split["candidates"][1:]
    assert [x["path"] for x in inputs["extra_ratings"]] == split["ratings"][1:]


def test_ids_stay_unique_across_files(split: dict[str, Any]) -> None:
    second = Path(split["candidates"][1])
    first_id = json.loads(Path(split["candidates"][0]).read_text().splitlines()[0])["id"]
    rows = second.read_text().splitlines()
    rows[0] = json.dumps({**json.loads(rows[0]), "id": first_id})
    second.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadRecordError, match="duplicate id") as err:
        _dm(FilePool(**split))
    assert str(second) in str(err.value)


def test_a_candidate_rated_in_two_files_is_refused(split: dict[str, Any]) -> None:
    dup = Path(split["ratings"][0]).read_text().splitlines()[0]
    with open(split["ratings"][1], "a") as f:
        f.write(dup + "\n")
    with pytest.raises(BadRecordError, match="rated in .*r1.jsonl too"):
        _dm(FilePool(**split))


def test_missing_extra_files_are_listed(split: dict[str, Any], tmp_path: Path) -> None:
    split["candidates"].append(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FilePool(**split).prepare()
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        DemoPool(str(tmp_path / "demo"), extra_ratings=[str(tmp_path / "gone.jsonl")]).prepare()


class _Codec:
    def encode(self, entries: list[Any]) -> dict[str, Any]:
        return {"bad_entries": {}, "n": torch.tensor(len(entries))}


def test_scoring_stream_reads_every_file_chunk_by_file(split: dict[str, Any]) -> None:
    dm = _dm(FilePool(**split))
    paths = [Path(p) for p in split["candidates"]]
    stream = CandidateStream(paths, dm.captions, "paper", 4, _Codec(), "raise")  # type: ignore[arg-type]
    batches = list(stream)
    ids = [i for b in batches for i in b["ids"]]
    want = [json.loads(x)["id"] for p in paths for x in p.read_text().splitlines()]
    assert ids == want
    # 10 + 14 candidates in chunks of 4: a chunk never spans two files
    assert [(Path(b["file"]).name, len(b["ids"])) for b in batches] == [
        ("c1.jsonl", 4),
        ("c1.jsonl", 4),
        ("c1.jsonl", 2),
    ] + [("cands.jsonl", 4)] * 3 + [("cands.jsonl", 2)]
    assert batches[3]["positions"][0][0] == 1  # positions restart in each file


def test_select_reads_a_list_of_candidate_files(split: dict[str, Any], tmp_path: Path) -> None:
    cands = [Path(p) for p in split["candidates"]]
    ids = [json.loads(x)["id"] for p in cands for x in p.read_text().splitlines()]
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        "".join(json.dumps({"id": c, "score": i / 100}) + "\n" for i, c in enumerate(ids))
    )
    m = select(scores, cands, tmp_path / "sel", top_n=5, store=str(tmp_path / "mlruns"))
    kept = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert [c["id"] for c in kept] == ids[-5:]  # the best five are all in the second file
    assert m["kept"] == 5 and [x["path"] for x in m["inputs"]["candidates"]] == list(
        map(str, cands)
    )


def test_lineage_from_the_manifests_beside_the_files(split: dict[str, Any]) -> None:
    gen, rat = Path(split["candidates"][1]), Path(split["ratings"][1])
    (gen.parent / "manifest.json").write_text(json.dumps({"mlflow_run_id": "g1"}))
    (rat.parent / "manifest.json").write_text(json.dumps({"mlflow_run_id": "r1"}))
    assert upstream_run_of(gen) == "g1" and upstream_run_of(Path(split["candidates"][0])) is None
    dm = _dm(FilePool(**split))
    assert dm.upstream_runs() == {"candidates": ["g1"], "ratings": ["r1"]}

    class Client:
        def get_run(self, run_id: str) -> Any:
            if run_id == "r1":
                raise LookupError("not in this store")
            return SimpleNamespace(info=SimpleNamespace(run_name="generate"))

    assert lineage_tags(dm.upstream_runs(), Client()) == {
        "upstream_generate": "g1",
        "upstream_ratings": "r1",  # a run of another store: named by the file's role
    }
