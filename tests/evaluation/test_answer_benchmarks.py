"""``answer`` on the four benchmarks' real question files (``../shared/data``) against a loopback
fake endpoint that echoes what it was sent: every question of the split goes out once, with its
own image as a data URL (the shipped VQA-RAD images; stand-ins elsewhere), the system prompt and
question text of ``test``, the closed-question suffix where configured; the files and counts
match the split's statistics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from answer_helpers import (
    BENCHMARK_FILES,
    CONF,
    SHIPPED_IMAGES,
    echo_api,
    file_digest,
    predictions,
    run_answer,
    sent_parts,
    write_stand_ins,
)
from fakeapi import FakeAPI, running_api

from biomedvital.evaluation.benchmarks import load_benchmark, split_stats
from biomedvital.evaluation.prompting import question_text
from biomedvital.evaluation.score_vqa import score_vqa
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM

SPLITS = {  # images / QA / open / closed (and chat), as published
    "vqa_rad": {"images": 203, "qa": 451, "open": 179, "closed": 272},
    "slake": {"images": 96, "qa": 1061, "open": 645, "closed": 416},
    "pathvqa": {"images": 858, "qa": 6761, "open": 3370, "closed": 3391},
    "llava_med_bench": {"images": 50, "qa": 193, "open": 0, "closed": 0, "chat": 193},
}
LLAVA_MED_CLOSED = "Please choose from the following two options: [yes, no]"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    for served in running_api(monkeypatch):
        yield echo_api(served)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlruns")


def _needs(benchmark: str) -> None:
    if not BENCHMARK_FILES[benchmark].is_file():
        pytest.skip(f"{BENCHMARK_FILES[benchmark]} is not present (../shared/data)")


def _check_run(
    benchmark: str, api: FakeAPI, out: Path, images: dict[str, Path], limit: int | None = None,
    closed_suffix: str = "",
) -> list:  # fmt: skip
    """Every question answered once in the split's order, by the request of its own image and
    text; requests: one per distinct (image, question)."""
    items = load_benchmark(benchmark, BENCHMARK_FILES[benchmark], "test")  # type: ignore[arg-type]
    assert split_stats(items) == SPLITS[benchmark]
    items = items[:limit] if limit else items
    rows = predictions(out)
    assert [r["question_id"] for r in rows] == [it.question_id for it in items]
    sent = set()
    for row, it in zip(rows, items, strict=True):
        text = question_text(it.question, it.answer_type, "", closed_suffix)
        assert row["prompt"] == text and row["model_id"] == "m"
        assert row["text"] == f"{file_digest(images[it.image])[:16]} | {text}", it.question_id
        sent.add((file_digest(images[it.image]), text))
    bodies = [sent_parts(b) for b in api.seen]
    assert {system for system, _, _ in bodies} == {VICUNA_V1_SYSTEM}
    assert sorted((image, text) for _, image, text in bodies) == sorted(sent)  # each once
    scores = json.loads((out / "scores.json").read_text())
    stats = split_stats(items)
    assert scores["answered"] == len(items) and scores["partial"] is bool(limit)
    assert scores.get("n_chat", 0) == stats.get("chat", 0)
    if benchmark != "llava_med_bench":
        assert (scores["n_open"], scores["n_closed"]) == (stats["open"], stats["closed"])
    return items


def test_vqa_rad_sends_each_question_with_its_image(api: FakeAPI, tmp_path: Path, store) -> None:
    """The shipped VQA-RAD images go out byte for byte; the config as shipped, overridden by
    the flags ``test`` takes; scores are ``score-vqa``'s of the file written."""
    _needs("vqa_rad")
    names = {it.image for it in load_benchmark("vqa_rad", BENCHMARK_FILES["vqa_rad"], "test")}
    images = write_stand_ins(tmp_path / "images", names, shipped=SHIPPED_IMAGES)
    real = [n for n in names if (SHIPPED_IMAGES / n).is_file()]
    assert len(real) == 8 and all(file_digest(images[n]) == file_digest(SHIPPED_IMAGES / n)
                                  for n in real)  # fmt: skip
    out = tmp_path / "out"
    record = run_answer(
        CONF / "vqa_rad.yaml", api.base_url, out, store,
        "--data.init_args.data", str(BENCHMARK_FILES["vqa_rad"]),
        "--data.init_args.image_root", str(tmp_path / "images"),
    )  # fmt: skip
    _check_run("vqa_rad", api, out, images)
    assert record["counts"]["asked"] == 451 and record["counts"]["failed"] == 0
    assert record["ledger"]["requests_sent"] == 451
    ref = score_vqa("vqa_rad", BENCHMARK_FILES["vqa_rad"], out / "predictions.jsonl")
    got = json.loads((out / "scores.json").read_text())
    for key in ("open_recall", "open_f1", "closed_acc", "bleu1", "n_open", "n_closed"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12)


def test_slake_with_the_closed_question_suffix(api: FakeAPI, tmp_path: Path, store) -> None:
    """LLaVA-Med's closed-question suffix, set as the config's comment says, goes out after
    every closed question and after no open one."""
    _needs("slake")
    names = {it.image for it in load_benchmark("slake", BENCHMARK_FILES["slake"], "test")}
    images = write_stand_ins(tmp_path / "images", names)
    out = tmp_path / "out"
    overlay = tmp_path / "llava_med_suffix.yaml"  # the suffix's brackets need YAML quoting
    overlay.write_text(
        json.dumps({"model": {"init_args": {"closed_prompt_suffix": LLAVA_MED_CLOSED}}})
    )
    run_answer(
        CONF / "slake.yaml", api.base_url, out, store,
        "--config", str(overlay),
        "--data.init_args.data", str(BENCHMARK_FILES["slake"]),
        "--data.init_args.image_root", str(tmp_path / "images"),
    )  # fmt: skip
    items = _check_run("slake", api, out, images, closed_suffix=LLAVA_MED_CLOSED)
    texts = [t for _, _, t in map(sent_parts, api.seen)]
    assert sum(t.endswith(LLAVA_MED_CLOSED) for t in texts) == 416
    assert sum(it.answer_type == "closed" for it in items) == 416


def test_llava_med_bench_chat_answers(api: FakeAPI, tmp_path: Path, store) -> None:
    """Open-ended chat: answered and written for ``judge``, counted (``n_chat``), not scored."""
    _needs("llava_med_bench")
    file = BENCHMARK_FILES["llava_med_bench"]
    names = {it.image for it in load_benchmark("llava_med_bench", file, "test")}
    images = write_stand_ins(tmp_path / "images", names)
    out = tmp_path / "out"
    run_answer(
        CONF / "llava_med_bench.yaml", api.base_url, out, store,
        "--data.init_args.data", str(file), "--data.init_args.image_root", str(tmp_path / "images"),
    )  # fmt: skip
    _check_run("llava_med_bench", api, out, images)
    assert "<image>" not in "".join(t for _, _, t in map(sent_parts, api.seen))


def test_pathvqa_first_questions_and_the_whole_split_in_a_dry_run(
    api: FakeAPI, tmp_path: Path, store, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first 300 questions go out (a duplicate question on one image once); the dry run
    counts the whole split (6,761 questions) and sends and writes nothing."""
    _needs("pathvqa")
    file = BENCHMARK_FILES["pathvqa"]
    names = {it.image for it in load_benchmark("pathvqa", file, "test")}
    images = write_stand_ins(tmp_path / "images", names)
    common = ("--data.init_args.data", str(file), "--data.init_args.image_root",
              str(tmp_path / "images"))  # fmt: skip
    dry = tmp_path / "dry"
    from answer_helpers import main

    main(["answer", "--config", str(CONF / "pathvqa.yaml"), *common, "--dry_run", "true",
          "--client.base_url", api.base_url, "--client.model", "m",
          "--trainer.default_root_dir", str(dry)])  # fmt: skip
    shown = capsys.readouterr().out
    assert "6761 questions to m" in shown and api.n_requests == 0 and not dry.exists()
    out = tmp_path / "out"
    record = run_answer(
        CONF / "pathvqa.yaml", api.base_url, out, store, *common, "--data.init_args.limit", "300"
    )
    _check_run("pathvqa", api, out, images, limit=300)
    assert record["partial"] is True and record["counts"]["benchmark_questions"] == 6761


@pytest.mark.slow
def test_pathvqa_whole_split(api: FakeAPI, tmp_path: Path, store) -> None:
    """All 6,761 PathVQA questions: 6,176 requests (428 questions repeat one on the same
    image and share its answer)."""
    _needs("pathvqa")
    file = BENCHMARK_FILES["pathvqa"]
    names = {it.image for it in load_benchmark("pathvqa", file, "test")}
    images = write_stand_ins(tmp_path / "images", names)
    out = tmp_path / "out"
    run_answer(
        CONF / "pathvqa.yaml", api.base_url, out, store,
        "--data.init_args.data", str(file), "--data.init_args.image_root", str(tmp_path / "images"),
    )  # fmt: skip
    _check_run("pathvqa", api, out, images)
    assert api.n_requests == 6176
