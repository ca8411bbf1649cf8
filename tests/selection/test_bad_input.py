"""Bad input: a clear error naming file, line and field, or a counted skip in the run's report.

Also: a run that fails midway leaves no half-written output behind.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from biomedvital.cli import main
from biomedvital.data.images import ImageLoadError
from biomedvital.data.pool import FilePool
from biomedvital.data.report import BadRecordError
from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.module import SelectorModule
from biomedvital.selection.select import select
from biomedvital.selection.writer import ScoreWriter

# ----------------------------------------------------------------------------- helpers


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _edit(path: Path, line: int, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Replace the 1-based ``line`` of a JSONL file by ``fn(record)`` (a dict or a raw string)."""
    rows = _lines(path)
    new = fn(json.loads(rows[line - 1]))
    rows[line - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(rows) + "\n")


def _set(**fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda rec: {**rec, **fields}


def _truncate(rec: dict[str, Any]) -> str:
    return json.dumps(rec)[:25]


def _corrupt_jpeg(pool: dict[str, Path], name: str = "broken.jpg") -> str:
    data = (pool["image_root"] / "retina.jpg").read_bytes()
    (pool["image_root"] / name).write_bytes(data[: len(data) // 3])
    return name


def _dm(pool: dict[str, Path], on_bad: str = "raise", **kw: Any) -> SelectorDataModule:
    return SelectorDataModule(
        FilePool(**{k: str(v) for k, v in pool.items()}),
        model_pairs=16,
        val_model_pairs=4,
        num_workers=0,
        on_bad_record=on_bad,  # type: ignore[arg-type]
        **kw,
    )


def _no_question(rec: dict[str, Any]) -> dict[str, Any]:
    turns = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "An answer."}]
    return {**rec, "conversations": turns}


# (file, line, edit, field, skip category) — one bad record each
CASES: dict[str, tuple[str, int, Callable[[dict[str, Any]], Any], str | None, str]] = {
    "missing_image": ("candidates", 2, _set(image="nowhere.png"), "image", "bad_image_path"),
    "escaping_path": ("candidates", 3, _set(image="../outside.png"), "image", "bad_image_path"),
    "no_qa_turn": ("candidates", 4, _no_question, "conversations", "invalid:conversations"),
    "no_turns": ("candidates", 4, _set(conversations=[]), "conversations", "invalid:conversations"),
    "unanswered": (
        "candidates",
        4,
        _set(conversations=[{"from": "human", "value": "<image>\nWhat?"}]),
        "conversations",
        "invalid:conversations",
    ),
    "rating_not_a_number": ("ratings", 3, _set(score="high"), "score", "invalid:score"),
    "rating_above_10": ("ratings", 3, _set(score=11), "score", "invalid:score"),
    "rating_below_0": ("ratings", 5, _set(score=-0.5), "score", "invalid:score"),
    "rating_bool": ("ratings", 5, _set(score=True), "score", "invalid:score"),
    "duplicate_id": ("candidates", 5, _set(id="fig0-c3"), "id", "duplicate_id"),
    "truncated_candidates": ("candidates", 6, _truncate, None, "invalid_json"),
    "truncated_ratings": ("ratings", 6, _truncate, None, "invalid_json"),
}


def _apply(pool: dict[str, Path], case: str) -> tuple[Path, int, str | None, str]:
    name, line, edit, field, category = CASES[case]
    (pool["image_root"].parent / "outside.png").write_bytes(
        (pool["image_root"] / "cell.png").read_bytes()
    )  # the escaping path points at a real file
    _edit(pool[name], line, edit)
    return pool[name], line, field, category


# ----------------------------------------------------------------------------- data module


@pytest.mark.parametrize("case", sorted(CASES))
def test_raise_names_file_line_field(pool: dict[str, Path], case: str) -> None:
    path, line, field, category = _apply(pool, case)
    dm = _dm(pool)
    with pytest.raises(BadRecordError) as e:
        dm.setup("fit")
    err = e.value
    assert (err.path, err.line, err.field, err.category) == (str(path), line, field, category)
    msg = str(err)
    assert msg.startswith(f"{path}:{line}:")
    if field:
        assert f"field '{field}'" in msg


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_is_counted(pool: dict[str, Path], case: str) -> None:
    n_cands = len(_lines(pool["candidates"]))
    path, line, _field, category = _apply(pool, case)
    name = CASES[case][0]
    dm = _dm(pool, "skip")
    dm.setup("fit")
    records = dm.describe()["records"]
    assert records[name]["skipped_by_reason"] == {category: 1}
    assert records[name]["examples"][0].startswith(f"{path}:{line}:")
    if name == "candidates":
        # the skipped candidate is the only one missing; its rating names no candidate now
        assert records["candidates"]["kept"] == n_cands - 1
        if category != "duplicate_id":
            assert len(dm.entries) == n_cands - 1 + 2 * len(_lines(pool["preferences"]))
    else:
        assert records["ratings"]["kept"] == n_cands - 1
        assert records["unrated_candidates"]["kept"] == 1
    assert dm.sets["train"] and dm.sets["val_model"]


def test_duplicate_id_skip_also_reports_orphan_rating(pool: dict[str, Path]) -> None:
    _apply(pool, "duplicate_id")
    dm = _dm(pool, "skip")
    dm.setup("fit")
    ratings = dm.describe()["records"]["ratings"]
    # the duplicate's own rating (fig0-c4) now names no candidate
    assert ratings["skipped_by_reason"] == {"rating_without_candidate": 1}
    assert "'fig0-c4'" in ratings["examples"][0]


def test_absolute_image_path_refused_even_inside_root(pool: dict[str, Path]) -> None:
    inside = str((pool["image_root"] / "retina.jpg").resolve())
    _edit(pool["candidates"], 2, _set(image=inside))
    with pytest.raises(BadRecordError, match="absolute image path") as e:
        _dm(pool).setup("fit")
    assert (e.value.line, e.value.field) == (2, "image")
    dm = _dm(pool, "skip")
    dm.setup("fit")
    assert dm.describe()["records"]["candidates"]["skipped_by_reason"] == {"bad_image_path": 1}


def test_bad_preference_image_names_file_line_field(pool: dict[str, Path]) -> None:
    _edit(pool["preferences"], 2, _set(image="../outside.png"))
    with pytest.raises(BadRecordError) as e:
        _dm(pool).setup("fit")
    err = e.value
    assert (err.path, err.line, err.field) == (str(pool["preferences"]), 2, "image")
    assert "preference 'fig0-p1'" in str(err) and "escapes the image root" in str(err)
    dm = _dm(pool, "skip")
    dm.setup("fit")
    prefs = dm.describe()["records"]["preferences"]
    assert prefs["skipped_by_reason"] == {"bad_image_path": 1}
    assert len(dm.sets["train_clinician"]) + len(dm.sets["val_clinician"]) == 11


def test_bad_image_in_answer_marks_names_its_line(pool: dict[str, Path]) -> None:
    marks = {
        "id": "m1",
        "image": "gone.png",
        "question": "What is seen?",
        "pair_id": "fig0",  # a known figure: the paper recipe needs its caption
        "answers": [
            {"text": "A finding.", "acceptable": True},
            {"text": "Nothing.", "acceptable": False},
        ],
    }
    with pool["preferences"].open("a") as f:
        f.write(json.dumps(marks) + "\n")
    line = len(_lines(pool["preferences"]))
    with pytest.raises(BadRecordError) as e:
        _dm(pool).setup("fit")
    assert (e.value.line, e.value.field) == (line, "image")
    assert "'m1#0>1'" in str(e.value) and "gone.png" in str(e.value)


@pytest.mark.parametrize("marks", [False, True])
def test_preference_without_figure_is_refused_under_paper_recipe(
    pool: dict[str, Path], marks: bool
) -> None:
    # as a candidate: no caption of its own and a pair_id that names no figure
    if marks:  # an answer-marks record (two pairs): refused, and counted, once
        record = {
            "id": "m1",
            "image": "cell.png",
            "question": "What is seen?",
            "pair_id": "fig9",
            "answers": [
                {"text": "A finding.", "acceptable": True},
                {"text": "Another finding.", "acceptable": True},
                {"text": "Nothing.", "acceptable": False},
            ],
        }
        with pool["preferences"].open("a") as f:
            f.write(json.dumps(record) + "\n")
        line, pref = len(_lines(pool["preferences"])), "m1#0>2"
    else:
        _edit(pool["preferences"], 2, _set(pair_id="typo-fig0"))
        line, pref = 2, "fig0-p1"
    n_records = len(_lines(pool["preferences"]))
    with pytest.raises(BadRecordError) as e:
        _dm(pool).setup("fit")
    err = e.value
    assert (err.path, err.line, err.field) == (str(pool["preferences"]), line, "pair_id")
    assert err.category == "unknown_figure" and f"preference {pref!r}" in str(err)

    dm = _dm(pool, "skip")
    dm.setup("fit")
    prefs = dm.describe()["records"]["preferences"]
    assert prefs["skipped_by_reason"] == {"unknown_figure": 1}
    assert prefs["kept"] == n_records - 1
    clinician = dm.sets["train_clinician"] + dm.sets["val_clinician"]
    assert len(clinician) == 12 - (not marks)
    texts = [dm.entries[p.a].text for p in clinician]
    assert all(t.startswith("Figure ") for t in texts)  # every one has its caption

    # the conversation recipe needs no figure: the preference is kept, without a caption
    dm = _dm(pool, text_recipe="conversation")
    dm.setup("fit")
    prefs = dm.describe()["records"]["preferences"]
    assert (prefs["kept"], prefs["skipped"]) == (n_records, 0)
    clinician = dm.sets["train_clinician"] + dm.sets["val_clinician"]
    assert len(clinician) == 12 + 2 * marks  # a marks record gives two pairs


def test_preference_with_its_own_caption_needs_no_figure(pool: dict[str, Path]) -> None:
    _edit(pool["preferences"], 2, _set(pair_id="typo-fig0", fig_caption="Own caption."))
    dm = _dm(pool)
    dm.setup("fit")
    clinician = dm.sets["train_clinician"] + dm.sets["val_clinician"]
    assert len(clinician) == 12
    assert sum(dm.entries[p.a].text.startswith("Own caption.") for p in clinician) == 1


# ----------------------------------------------------------------------------- CLI


def _config(tmp: Path, pool: dict[str, Path], on_bad: str, **data: Any) -> tuple[Path, Path]:
    out = tmp / "out"
    cfg = {
        "seed_everything": 0,
        "model": {
            "class_path": "biomedvital.selection.SelectorModule",
            "init_args": {
                "backbone": "tiny:tiny-clip",
                "head_hidden": [16],
                "cache_dir": str(tmp / "cache"),
            },
        },
        "data": {
            "class_path": "biomedvital.selection.SelectorDataModule",
            "init_args": {
                "pool": {
                    "class_path": "biomedvital.data.pool.FilePool",
                    "init_args": {k: str(v) for k, v in pool.items()},
                },
                "model_pairs": 32,
                "val_model_pairs": 8,
                "batch_size": 32,
                "num_workers": 0,
                "on_bad_record": on_bad,
                **data,
            },
        },
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "default_root_dir": str(out),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "biomedvital.selection.ScoreWriter",
                    "init_args": {"output": str(out / "scores.jsonl")},
                },
            ],
        },
    }
    path = tmp / f"selector-{on_bad}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``main`` as the shell would call it (pytest's own arguments hidden from LightningCLI)."""
    monkeypatch.setattr(sys, "argv", ["biomedvital"])
    return main


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module's ``select`` runs (creating one takes seconds)."""
    return str(tmp_path_factory.mktemp("mlruns"))


def test_cli_fit_skip_lists_skips_in_run_record(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    _apply(pool, "missing_image")
    _apply(pool, "rating_not_a_number")
    _edit(pool["candidates"], 7, _truncate)
    _corrupt_jpeg(pool, "ihc.png")  # decoded only in batches: its pairs are dropped and counted
    cfg, out = _config(tmp_path, pool, "skip")
    cli(["fit", "--config", str(cfg)])
    record = json.loads((out / "run.fit.json").read_text())
    assert record["dropped_pairs"]["train"] > 0
    records = record["data"]["records"]
    assert records["candidates"]["skipped_by_reason"] == {"bad_image_path": 1, "invalid_json": 1}
    assert records["ratings"]["skipped_by_reason"] == {
        "invalid:score": 1,
        "rating_without_candidate": 1,  # the truncated candidate's rating
    }
    assert any(f"{pool['candidates']}:7:" in ex for ex in records["candidates"]["examples"])


def test_cli_fit_raise_names_file_line_field(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    _apply(pool, "rating_above_10")
    cfg, out = _config(tmp_path, pool, "raise")
    with pytest.raises(BadRecordError) as e:
        cli(["fit", "--config", str(cfg)])
    assert str(e.value).startswith(f"{pool['ratings']}:3: field 'score':")
    assert "between 0 and 10" in str(e.value)
    assert not (out / "run.fit.json").exists()


def test_cli_fit_counts_dropped_pairs_once_per_set(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    # the file exists but will not decode: its pairs are dropped batch by batch, in training
    # and in validation, and must be counted once per pair set however many epochs meet them
    (pool["image_root"] / "cell.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg, out = _config(tmp_path, pool, "skip")
    with pytest.warns(UserWarning, match="val_clinician pair.s. dropped for unreadable images"):
        cli(["fit", "--config", str(cfg), "--trainer.max_epochs", "2"])
    record = json.loads((out / "run.fit.json").read_text())

    dm = SelectorDataModule(  # the run's pairs
        FilePool(**{k: str(v) for k, v in pool.items()}),
        model_pairs=32,
        val_model_pairs=8,
        num_workers=0,
        seed=0,
        on_bad_record="skip",
    )
    dm.setup("fit")
    assert record["data"]["pairs"] == {k: len(v) for k, v in dm.sets.items()}
    expected = {
        name: sum("cell.png" in (dm.entries[p.a].image, dm.entries[p.b].image) for p in pairs)
        for name, pairs in dm.sets.items()
    }
    assert expected["train"] and expected["val_clinician"]
    assert record["dropped_pairs"] == expected
    metrics = record["metrics"]
    assert metrics["train/dropped_pairs"] == expected["train"]
    assert metrics["train/dropped_pairs_clinician"] == expected["train_clinician"]
    assert metrics["val/dropped_pairs_model"] == expected["val_model"]
    assert metrics["val/dropped_pairs_clinician"] == expected["val_clinician"]


def test_rerun_of_a_finished_fit_reports_its_dropped_pairs(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    # a rerun with --ckpt_path last of a fit that had finished runs no epoch: the counts come
    # from the checkpoint
    from test_selector_cli import _config as _tracked_config

    (pool["image_root"] / "cell.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = _tracked_config(tmp_path, pool)
    args = ["--config", str(cfg), "--data.init_args.on_bad_record", "skip"]
    args += ["--trainer.max_epochs", "1"]
    cli(["fit", *args])
    record = tmp_path / "out" / "run.fit.json"
    first = json.loads(record.read_text())["dropped_pairs"]
    assert first["train"] and first["val_clinician"]
    record.unlink()
    cli(["fit", *args, "--ckpt_path", "last"])
    assert json.loads(record.read_text())["dropped_pairs"] == first


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_scores_name_the_candidate_or_are_counted(
    tmp_path: Path, pool: dict[str, Path], bad: float
) -> None:
    # a diverged fine-tune: its checkpoint's weights are NaN (every score NaN) or infinite
    # (every logit infinite: the score saturates to 1.0, and JSON has no infinity)
    def model() -> SelectorModule:
        return SelectorModule(backbone="tiny:tiny-clip", head_hidden=[16], cache_dir=str(tmp_path))

    diverged = model()
    with torch.no_grad():
        diverged.head[-1].bias.fill_(bad)
    ckpt = tmp_path / "diverged.ckpt"
    state = {
        "state_dict": diverged.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(state, ckpt)
    first = json.loads(_lines(pool["candidates"])[0])["id"]
    n = len(_lines(pool["candidates"]))

    def predict(on_bad: str) -> Path:
        out = tmp_path / on_bad
        trainer = Trainer(
            accelerator="cpu", logger=False, callbacks=[ScoreWriter(str(out / "scores.jsonl"))],
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        )  # fmt: skip
        trainer.predict(model(), datamodule=_dm(pool, on_bad), ckpt_path=str(ckpt))
        return out

    with pytest.raises(BadRecordError) as e:
        predict("raise")
    err = e.value
    assert (err.path, err.line, err.category) == (str(pool["candidates"]), 1, "nan_score")
    assert f"candidate {first!r}" in str(err) and str(ckpt) in str(err)
    assert not list((tmp_path / "raise").glob("*scores.jsonl*"))

    out = predict("skip")
    manifest = json.loads((out / "scores.jsonl.manifest.json").read_text())
    assert manifest["skipped_by_reason"] == {"nan_score": n}
    assert manifest["scored"] == 0 and _lines(out / "scores.jsonl") == []
    assert f"candidate {first!r}" in manifest["skipped_examples"][0]


def _scores(out: Path) -> dict[str, float]:
    return {r["id"]: r["score"] for r in map(json.loads, _lines(out / "scores.jsonl")) if r}


@pytest.mark.parametrize("workers", [0, 2])
def test_cli_predict_skip_counts_bad_records(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None], workers: int
) -> None:
    ids = [json.loads(x)["id"] for x in _lines(pool["candidates"])]
    broken = _corrupt_jpeg(pool)
    _edit(pool["candidates"], 2, _set(image=broken))  # corrupt image
    _edit(pool["candidates"], 5, _set(image="../outside.png"))  # escaping path
    _edit(pool["candidates"], 9, _no_question)  # no QA turn
    _edit(pool["candidates"], 13, _truncate)  # truncated line
    # with workers, each bad line is still counted once (by the worker owning its chunk)
    cfg, out = _config(tmp_path, pool, "skip", predict_chunk=4, num_workers=workers)
    cli(["predict", "--config", str(cfg)])
    manifest = json.loads((out / "scores.jsonl.manifest.json").read_text())
    assert manifest["skipped_by_reason"] == {
        "bad_image": 2,
        "invalid:conversations": 1,
        "invalid_json": 1,
    }
    assert manifest["skipped"] == 4 and manifest["scored"] == len(ids) - 4
    examples = "\n".join(manifest["skipped_examples"])
    assert broken in examples and "outside.png" in examples
    assert f"{pool['candidates']}:13:" in examples
    scored = _scores(out)
    assert set(scored) == set(ids) - {ids[1], ids[4], ids[8], ids[12]}


def test_frozen_backbone_skips_an_image_that_will_not_decode(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    # the file exists (its hash is a cache key) but decoding fails: no features are ever
    # stored for it, so it must count as a bad image, not be looked up in the cache
    (pool["image_root"] / "cell.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ids = [json.loads(x)["id"] for x in _lines(pool["candidates"])]
    on_cell = {json.loads(x)["id"] for x in _lines(pool["candidates"]) if "cell.png" in x}
    cfg, out = _config(tmp_path, pool, "skip")
    frozen = ["--model.init_args.backbone_mode", "frozen"]
    cli(["fit", "--config", str(cfg), *frozen])
    assert json.loads((out / "run.fit.json").read_text())["dropped_pairs"]["train"] > 0
    cli(["predict", "--config", str(cfg), *frozen])
    manifest = json.loads((out / "scores.jsonl.manifest.json").read_text())
    assert manifest["skipped_by_reason"] == {"bad_image": len(on_cell)}
    assert set(_scores(out)) == set(ids) - on_cell


def test_cli_predict_raise_on_corrupt_image_leaves_nothing(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = len(_lines(pool["candidates"]))
    broken = _corrupt_jpeg(pool)
    _edit(pool["candidates"], n, _set(image=broken))  # in the last chunk
    cfg, out = _config(tmp_path, pool, "raise", predict_chunk=3)
    # what the writer had written when the failure reached it
    at_failure: list[int] = []
    real = ScoreWriter.on_exception

    def spy(self: ScoreWriter, *args: Any) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.flush()
        at_failure.append(len(_lines(self._tmp)))
        real(self, *args)

    monkeypatch.setattr(ScoreWriter, "on_exception", spy)
    with pytest.raises(BadRecordError, match=broken) as e:
        cli(["predict", "--config", str(cfg)])
    # the error names the candidates file, the line and the field, and keeps the image error
    assert (e.value.path, e.value.line, e.value.field) == (str(pool["candidates"]), n, "image")
    assert isinstance(e.value.__cause__.__cause__, ImageLoadError)
    # it failed midway: all chunks but the last two (one is prefetched) were in the temp file
    assert at_failure and n - 2 * 3 <= at_failure[0] < n
    # the resolved config is there; no scores, no temp file, no manifest
    assert sorted(p.name for p in out.iterdir()) == ["config.predict.yaml"]


def test_cli_predict_duplicate_ids(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    ids = [json.loads(x)["id"] for x in _lines(pool["candidates"])]
    _edit(pool["candidates"], 9, _set(id=ids[1]))  # repeats line 2, in another chunk
    cfg, out = _config(tmp_path, pool, "raise", predict_chunk=4)
    with pytest.raises(BadRecordError) as e:
        cli(["predict", "--config", str(cfg)])
    assert str(e.value).startswith(f"{pool['candidates']}:9: field 'id': duplicate id")
    assert not (out / "scores.jsonl").exists()

    cfg, out = _config(tmp_path, pool, "skip", predict_chunk=4)
    cli(["predict", "--config", str(cfg)])
    manifest = json.loads((out / "scores.jsonl.manifest.json").read_text())
    assert manifest["skipped_by_reason"] == {"duplicate_id": 1}
    assert manifest["scored"] == len(ids) - 1
    rows = [json.loads(x) for x in _lines(out / "scores.jsonl")]
    assert len(rows) == len({r["id"] for r in rows}) == len(ids) - 1


def test_cli_predict_raise_on_truncated_line(
    tmp_path: Path, pool: dict[str, Path], cli: Callable[..., None]
) -> None:
    _edit(pool["candidates"], 10, _truncate)
    cfg, out = _config(tmp_path, pool, "raise", predict_chunk=4)
    with pytest.raises(BadRecordError) as e:
        cli(["predict", "--config", str(cfg)])
    assert str(e.value).startswith(f"{pool['candidates']}:10: invalid JSON")
    assert not (out / "scores.jsonl").exists()
    assert not list(out.glob(".scores.jsonl*"))


# ----------------------------------------------------------------------------- select


def _write_scores(path: Path, pool: dict[str, Path]) -> list[str]:
    ids = [json.loads(x)["id"] for x in _lines(pool["candidates"])]
    path.write_text(
        "".join(
            json.dumps({"id": c, "score": (i + 1) / (len(ids) + 1)}) + "\n"
            for i, c in enumerate(ids)
        )
    )
    return ids


def test_select_failure_leaves_no_output(tmp_path: Path, pool: dict[str, Path], store: str) -> None:
    scores = tmp_path / "scores.jsonl"
    _write_scores(scores, pool)
    _edit(scores, 4, _set(score="0.9"))
    out = tmp_path / "selected"
    with pytest.raises(BadRecordError) as e:
        select(scores, pool["candidates"], out, top_percent=50, store=store)
    assert str(e.value).startswith(f"{scores}:4: field 'score':")
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []

    # an invalid candidate (here the best-scored one) is refused before anything is written
    _write_scores(scores, pool)
    n = len(_lines(pool["candidates"]))
    _edit(pool["candidates"], n, _set(conversations=[]))
    with pytest.raises(BadRecordError) as e:
        select(scores, pool["candidates"], out, top_percent=50, store=store)
    assert str(e.value).startswith(f"{pool['candidates']}:{n}: field 'conversations':")
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_select_failure_after_writing_removes_temp(
    tmp_path: Path, pool: dict[str, Path], store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = tmp_path / "scores.jsonl"
    _write_scores(scores, pool)
    out = tmp_path / "selected"

    def boom(self: Any, params: dict[str, Any]) -> None:  # after every record is written
        assert len(list(out.glob(".selected.json.*.tmp"))) == 1
        raise RuntimeError("tracking store went away")

    monkeypatch.setattr("biomedvital.selection.select.PipelineRun.log_params", boom)
    with pytest.raises(RuntimeError, match="went away"):
        select(scores, pool["candidates"], out, top_percent=50, store=store)
    assert sorted(p.name for p in out.iterdir()) == []


def test_select_skip_counts_bad_lines(tmp_path: Path, pool: dict[str, Path], store: str) -> None:
    scores = tmp_path / "scores.jsonl"
    ids = _write_scores(scores, pool)
    _edit(scores, 2, _set(score=None))
    _edit(scores, 3, _truncate)
    _edit(scores, 4, _set(id=ids[4]))  # duplicate of line 5
    manifest = select(
        scores, pool["candidates"], tmp_path / "sel", top_n=5, on_bad_record="skip", store=store
    )
    assert manifest["records"]["scores"]["skipped_by_reason"] == {
        "duplicate_id": 1,
        "invalid:score": 1,
        "invalid_json": 1,
    }
    assert manifest["kept"] == 5
    on_disk = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert on_disk["records"] == manifest["records"]
    selected = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert [c["id"] for c in selected] == ids[-5:]


def test_select_skip_counts_bad_candidates(
    tmp_path: Path, pool: dict[str, Path], store: str
) -> None:
    scores = tmp_path / "scores.jsonl"
    ids = _write_scores(scores, pool)  # the later the line, the better the score
    n = len(ids)
    _edit(pool["candidates"], n, _set(conversations=[]))  # best-scored, but invalid
    _edit(pool["candidates"], n - 1, _set(id=ids[n - 3]))  # repeats line n-2
    _edit(pool["candidates"], n - 4, _truncate)
    manifest = select(
        scores, pool["candidates"], tmp_path / "sel", top_n=3, on_bad_record="skip", store=store
    )
    assert manifest["records"]["candidates"]["skipped_by_reason"] == {
        "duplicate_id": 1,
        "invalid:conversations": 1,
        "invalid_json": 1,
    }
    # the scores of the three skipped lines name no (valid) candidate: counted, not lost
    assert manifest["orphan_scores"] == 3
    selected = json.loads((tmp_path / "sel" / "selected.json").read_text())
    # the best valid ones, first occurrence of the repeated id, in file order
    assert [c["id"] for c in selected] == [ids[n - 6], ids[n - 4], ids[n - 3]]


def test_select_counts_scores_naming_no_candidate(
    tmp_path: Path, pool: dict[str, Path], store: str
) -> None:
    scores = tmp_path / "scores.jsonl"
    ids = _write_scores(scores, pool)
    with scores.open("a") as f:  # scores of candidates that are not in the pool
        f.writelines(json.dumps({"id": f"stray{i}", "score": 0.99}) + "\n" for i in range(2))
    manifest = select(scores, pool["candidates"], tmp_path / "sel", top_n=3, store=store)
    assert manifest["orphan_scores"] == 2
    assert manifest["orphan_score_examples"] == ["stray0", "stray1"]
    assert manifest["kept"] == 3 and manifest["unscored_candidates"] == 0
    selected = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert [c["id"] for c in selected] == ids[-3:]


@pytest.mark.parametrize("on_bad", ["raise", "skip"])
def test_select_refuses_scores_of_another_pool(
    tmp_path: Path, pool: dict[str, Path], store: str, on_bad: str
) -> None:
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        "".join(json.dumps({"id": f"other{i}", "score": 0.5}) + "\n" for i in range(24))
    )
    out = tmp_path / "sel"
    with pytest.raises(ValueError, match="names a candidate") as e:
        select(scores, pool["candidates"], out, top_percent=80, on_bad_record=on_bad, store=store)
    assert str(scores) in str(e.value) and str(pool["candidates"]) in str(e.value)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_select_top_percent_is_exact(tmp_path: Path, store: str) -> None:
    # in floats 100000 * 1.1 / 100 is 1100.0000000000002, whose ceiling kept one too many
    n = 100_000
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    cands, scores = tmp_path / "candidates.jsonl", tmp_path / "scores.jsonl"
    cands.write_text(
        "".join(
            json.dumps({"id": f"c{i}", "image": "x.png", "conversations": turns}) + "\n"
            for i in range(n)
        )
    )
    scores.write_text("".join(json.dumps({"id": f"c{i}", "score": i / n}) + "\n" for i in range(n)))
    manifest = select(scores, cands, tmp_path / "sel", top_percent=1.1, store=store)
    assert manifest["kept"] == 1100 and manifest["dropped"] == n - 1100


@pytest.mark.parametrize(
    ("name", "line", "edit", "category"),
    [
        ("ratings", 4, _set(candidate_id="fig0-c2"), "duplicate:candidate_id"),
        ("preferences", 2, _set(id="fig0-p0"), "duplicate:id"),
        ("figures", 2, _set(pair_id="fig0"), "duplicate:pair_id"),
    ],
)
def test_duplicate_keys_in_ratings_preferences_figures(
    pool: dict[str, Path], name: str, line: int, edit: Callable, category: str
) -> None:
    _edit(pool[name], line, edit)
    with pytest.raises(BadRecordError) as e:
        _dm(pool).setup("fit")
    assert e.value.category == category and str(pool[name]) in str(e.value)
    dm = _dm(pool, "skip")
    dm.setup("fit")
    assert dm.describe()["records"][name]["skipped_by_reason"] == {category: 1}
