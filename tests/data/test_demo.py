"""The embedded demo pool: real bundled images, hand-written records, atomic idempotent writes."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from biomedvital.data import demo
from biomedvital.data.demo import DemoFiles, materialize_demo

QUALITY_BANDS = {"excellent": (9, 10), "good": (7, 8), "mediocre": (4, 6), "poor": (0, 3)}
FIGURE_KEYS = {"pair_id", "fig_caption", "fig_label", "in_text_mention", "domain", "pmid"}
PREFERENCE_KEYS = {
    "id",
    "image",
    "question",
    "preferred",
    "rejected",
    "fig_caption",
    "in_text_mention",
    "pair_id",
    "annotator",
}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of the root and everything under it."""
    paths = [root, *sorted(root.rglob("*"))]
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in paths
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DemoFiles:
    return materialize_demo(tmp_path_factory.mktemp("demo") / "pool")


@pytest.fixture(scope="module")
def records(files: DemoFiles) -> dict[str, list[dict]]:
    return {
        "figures": read_jsonl(files.figures),
        "candidates": read_jsonl(files.candidates),
        "ratings": read_jsonl(files.ratings),
        "preferences": read_jsonl(files.preferences),
    }


def test_layout(files: DemoFiles) -> None:
    assert files == DemoFiles.at(files.root)
    assert files.images.is_dir()
    for path in (files.figures, files.candidates, files.ratings, files.preferences, files.manifest):
        assert path.is_file() and path.stat().st_size > 0
    # Nothing but the demo itself next to it: the temp directory was renamed into place.
    assert [p.name for p in files.root.parent.iterdir()] == [files.root.name]


def test_every_image_opens_and_is_the_bundled_original(files: DemoFiles) -> None:
    images = sorted(files.images.iterdir())
    assert len(images) >= 6
    by_name = {img["file"]: img for img in demo.DEMO_CONTENT["images"]}
    assert sorted(p.name for p in images) == sorted(by_name)
    for path in images:
        if path.suffix == ".dcm":
            pixels = pydicom.dcmread(path).pixel_array
            assert pixels.ndim == 2 and pixels.size > 0 and pixels.max() > pixels.min()
        else:
            with Image.open(path) as im:
                assert im.format in {"PNG", "JPEG"}
                im.load()
                assert im.width > 0 and im.height > 0
        source = by_name[path.name]["source"]
        original = demo.source_path(source["package"], source["file"])
        assert path.read_bytes() == original.read_bytes()


def test_dicom_modalities_match_the_content(files: DemoFiles) -> None:
    expected = {"CT": "CT", "MRI": "MR"}
    for img in demo.DEMO_CONTENT["images"]:
        if img["file"].endswith(".dcm"):
            assert pydicom.dcmread(files.images / img["file"]).Modality == expected[img["modality"]]


def test_counts(records: dict[str, list[dict]]) -> None:
    figures, candidates = records["figures"], records["candidates"]
    ratings, preferences = records["ratings"], records["preferences"]
    assert len(figures) >= 6
    per_image = Counter(c["pair_id"] for c in candidates)
    assert set(per_image) == {f["pair_id"] for f in figures}
    assert set(per_image.values()) == {8}
    assert sorted(r["candidate_id"] for r in ratings) == sorted(c["id"] for c in candidates)
    for r in ratings:
        assert isinstance(r["score"], int) and 0 <= r["score"] <= 10
    prefs_per_image = Counter(p["pair_id"] for p in preferences)
    assert set(prefs_per_image) == set(per_image)
    assert min(prefs_per_image.values()) >= 4
    for p in preferences:
        assert p["preferred"].strip() != p["rejected"].strip()


def test_figures_use_the_llava_med_layout(records: dict[str, list[dict]]) -> None:
    for fig in records["figures"]:
        assert set(fig) == FIGURE_KEYS
        assert fig["pmid"] is None
        assert set(fig["domain"]) == set(demo.DOMAIN_KEYS)
        assert all(isinstance(v, bool) for v in fig["domain"].values())
        assert fig["fig_caption"].strip() and fig["fig_label"].strip()
        assert fig["in_text_mention"]
        for mention in fig["in_text_mention"]:
            assert set(mention) == {"tokens", "entities"} and mention["tokens"].strip()
    flagged = {m for fig in records["figures"] for m, v in fig["domain"].items() if v}
    assert {"ct_scan", "mri", "histology"} <= flagged


def test_conversations_alternate_and_reference_the_image(
    files: DemoFiles, records: dict[str, list[dict]]
) -> None:
    for cand in records["candidates"]:
        turns = cand["conversations"]
        assert turns and len(turns) % 2 == 0, cand["id"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2), cand["id"]
        assert "<image>" in turns[0]["value"], cand["id"]
        assert all("<image>" not in t["value"] for t in turns[1:]), cand["id"]
        assert all(t["value"].strip() for t in turns), cand["id"]
        assert (files.images / cand["image"]).is_file()
        assert cand["generator"]["model"] == demo.GENERATOR_MODEL
        assert cand["generator"]["quality"] in demo.QUALITIES
        assert cand["id"].startswith(cand["image"].rsplit(".", 1)[0] + "-c")


def test_ratings_span_levels_and_agree_with_quality_notes(records: dict[str, list[dict]]) -> None:
    score = {r["candidate_id"]: r["score"] for r in records["ratings"]}
    levels: dict[str, set[int]] = defaultdict(set)
    qualities: dict[str, Counter] = defaultdict(Counter)
    for cand in records["candidates"]:
        s, quality = score[cand["id"]], cand["generator"]["quality"]
        lo, hi = QUALITY_BANDS[quality]
        assert lo <= s <= hi, (cand["id"], quality, s)
        levels[cand["pair_id"]].add(s)
        qualities[cand["pair_id"]][quality] += 1
    for pair_id, seen in levels.items():
        assert len(seen) >= 3, pair_id
        assert set(qualities[pair_id]) == set(QUALITY_BANDS), pair_id
    for r in records["ratings"]:
        assert r["judge"] == demo.JUDGE
        first, reason = r["raw"].split("\n")
        assert int(first) == r["score"] and reason.strip()


def test_ids_unique(records: dict[str, list[dict]]) -> None:
    for kind, key in [
        ("figures", "pair_id"),
        ("candidates", "id"),
        ("ratings", "candidate_id"),
        ("preferences", "id"),
    ]:
        ids = [r[key] for r in records[kind]]
        assert len(ids) == len(set(ids)), kind


def test_wording_is_not_templated(records: dict[str, list[dict]]) -> None:
    answers = [t["value"] for c in records["candidates"] for t in c["conversations"][1::2]]
    assert len(answers) == len(set(answers))
    openings = Counter(" ".join(a.split()[:4]) for a in answers)
    assert openings.most_common(1)[0][1] <= 3


def test_preferences_carry_figure_context(records: dict[str, list[dict]]) -> None:
    figures = {f["pair_id"]: f for f in records["figures"]}
    images = {c["pair_id"]: c["image"] for c in records["candidates"]}
    for p in records["preferences"]:
        assert set(p) == PREFERENCE_KEYS
        fig = figures[p["pair_id"]]
        assert p["fig_caption"] == fig["fig_caption"]
        assert p["in_text_mention"] == fig["in_text_mention"]
        assert p["image"] == images[p["pair_id"]]
        assert p["annotator"] == demo.ANNOTATOR
        assert p["question"].strip() and p["preferred"].strip() and p["rejected"].strip()


def test_manifest_lists_every_file_with_its_hash(
    files: DemoFiles, records: dict[str, list[dict]]
) -> None:
    manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    assert manifest["kind"] == demo.MANIFEST_KIND
    assert len(manifest["content_hash"]) == 64
    written = sorted(str(p.relative_to(files.root)) for p in files.root.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [r for r in written if r != "manifest.json"]
    for rel, entry in manifest["files"].items():
        data = (files.root / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["counts"] == {
        "images": len(manifest["images"]),
        "figures": len(records["figures"]),
        "candidates": len(records["candidates"]),
        "ratings": len(records["ratings"]),
        "preferences": len(records["preferences"]),
    }
    assert set(manifest["sources"]) == {"pydicom", "scikit-image"}
    assert all(manifest["sources"].values())


def test_second_call_is_a_noop(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = materialize_demo(out)
    before = snapshot(out)
    second = materialize_demo(str(out))
    assert second == first
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_force_rewrites(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    materialize_demo(out)
    inode = out.stat().st_ino
    materialize_demo(out, force=True)
    assert out.stat().st_ino != inode
    assert demo._is_current(out, json.loads((out / "manifest.json").read_text())["content_hash"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_damaged_demo_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    files = materialize_demo(out)
    good = files.ratings.read_bytes()
    files.ratings.write_bytes(good.replace(b'"score": 10', b'"score": 3', 1))
    (files.images / "cell.png").unlink()
    materialize_demo(out)
    assert files.ratings.read_bytes() == good
    assert (files.images / "cell.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_crash_mid_write_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = demo._write_file
    calls = []

    def flaky_write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(demo, "_write_file", flaky_write)
    out = tmp_path / "demo"
    with pytest.raises(OSError, match="simulated"):
        materialize_demo(out)
    assert len(calls) == 4
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_during_rebuild_keeps_the_previous_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    materialize_demo(out)
    before = snapshot(out)

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_install", boom)
    with pytest.raises(KeyboardInterrupt):
        materialize_demo(out, force=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_stale_leftovers_are_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    stale = tmp_path / ".demo.tmp-deadbeef0000"
    stale.mkdir()
    (stale / "figures.jsonl").write_text("{}\n")
    old = os.path.getmtime(stale) - 2 * 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".demo.tmp-0123456789ab"  # a concurrent writer's work in progress
    fresh.mkdir()
    materialize_demo(out)
    assert not stale.exists()
    assert fresh.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        materialize_demo(out)
    with pytest.raises(FileExistsError):
        materialize_demo(out, force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    files = materialize_demo(out)
    assert files.manifest.is_file()


def test_concurrent_calls_agree(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: materialize_demo(out), range(8)))
    assert all(r == results[0] for r in results)
    manifest = json.loads((out / "manifest.json").read_text())
    assert demo._is_current(out, manifest["content_hash"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda c: c["images"][0]["candidates"].pop(), "exactly 8 candidates"),
        (lambda c: c["images"][1]["candidates"][2]["conversations"].reverse(), "must be from"),
        (lambda c: c["images"][2]["candidates"][0].update(rating=11), "integer 0-10"),
        (lambda c: c["images"][3]["preferences"][1].update(rejected=""), "non-empty"),
        (lambda c: c["images"][4].update(file="../escape.jpg"), "plain file name"),
        (lambda c: c["images"][5].update(pair_id=c["images"][0]["pair_id"]), "duplicate"),
    ],
)
def test_malformed_content_is_rejected(
    monkeypatch: pytest.MonkeyPatch, breakage, message: str
) -> None:
    content = demo.load_demo_content()
    breakage(content)
    monkeypatch.setattr(demo, "_content_bytes", lambda: json.dumps(content).encode())
    with pytest.raises(ValueError, match=message):
        demo.load_demo_content()


def test_content_is_a_fresh_copy() -> None:
    content = demo.load_demo_content()
    content["images"].clear()
    assert demo.load_demo_content()["images"] == demo.DEMO_CONTENT["images"]
    assert len(demo.DEMO_CONTENT["images"]) >= 6


def test_written_files_validate_against_the_record_models(files: DemoFiles) -> None:
    from biomedvital.data.jsonio import iter_jsonl
    from biomedvital.data.records import Candidate, Preference, Rating, SourceFigure

    figures = list(iter_jsonl(files.figures, SourceFigure))
    candidates = list(iter_jsonl(files.candidates, Candidate))
    ratings = list(iter_jsonl(files.ratings, Rating))
    preferences = list(iter_jsonl(files.preferences, Preference))
    assert len(figures) >= 6
    assert len(candidates) == 8 * len(figures) == len(ratings)
    assert len(preferences) >= 4 * len(figures)
    assert {c.pair_id for c in candidates} == {f.pair_id for f in figures}
    assert all(f.mentions_text() for f in figures)
    assert all(c.first_qa()[0] and c.first_qa()[1] for c in candidates)
    assert all(p.mentions_text() for p in preferences)
    assert {r.candidate_id for r in ratings} == {c.id for c in candidates}


def test_cli_entry_point_summarises_the_pool(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = demo.demo(str(out))
    assert summary["root"] == str(out.absolute())
    assert summary["counts"]["candidates"] == 8 * summary["counts"]["figures"]
    assert Path(summary["candidates"]).is_file()
    assert demo.demo(str(out))["content_hash"] == summary["content_hash"]
