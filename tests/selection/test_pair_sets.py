"""Pair building as a function of the pool's files: no data module state, no Trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from biomedvital.data.images import ImageRoot
from biomedvital.data.pool import FilePool, PoolFiles
from biomedvital.data.records import read_figures
from biomedvital.selection.datamodule import SelectorDataModule
from biomedvital.selection.pair_sets import PairSets, build_pair_sets
from biomedvital.selection.pairs import CLINICIAN, MODEL
from biomedvital.selection.text import Captions, clinician_text


def _build(pool: dict[str, Path], **kw: Any) -> PairSets:
    files = FilePool(**{k: str(v) for k, v in pool.items()}).prepare()
    captions = Captions(read_figures(files.figures)) if files.figures else Captions([])
    args: dict[str, Any] = {"model_pairs": 16, "val_model_pairs": 4, **kw}
    return build_pair_sets(files, ImageRoot(files.image_root), captions, **args)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_index_the_entries_they_name(pool: dict[str, Path]) -> None:
    sets = _build(pool, seed=0)
    ratings = _lines(pool["ratings"])
    n_rated, n_prefs = len(ratings), len(_lines(pool["preferences"]))
    # every candidate is rated: its entries come first, in file order, then two per preference
    assert len(sets.entries) == n_rated + 2 * n_prefs
    score = {i: r["score"] for i, r in enumerate(ratings)}
    model = [p for p in sets.train if p.kind == MODEL]
    assert len(model) == 16 and len(sets.val_model) == 4
    for p in model + list(sets.val_model):
        assert score[p.a] > score[p.b], p  # the better-rated side first
    # held-out model pairs draw on other candidates than training pairs
    trained = {i for p in model for i in (p.a, p.b)}
    assert not trained & {i for p in sets.val_model for i in (p.a, p.b)}
    # clinician pairs: the training ones end ``train``; with the held-out ones, one per preference
    assert sets.train[len(model) :] == sets.train_clinician
    clinician = sets.train_clinician + sets.val_clinician
    assert len(clinician) == n_prefs and all(p.kind == CLINICIAN for p in clinician)
    assert {i for p in clinician for i in (p.a, p.b)} == set(range(n_rated, len(sets.entries)))
    assert sets.val_model_repeats == 0
    assert list(sets.by_name()) == ["train", "val_model", "val_clinician", "train_clinician"]
    counts = {k: (r.as_dict()["kept"], r.as_dict()["skipped"]) for k, r in sets.records.items()}
    assert counts == {
        "ratings": (n_rated, 0),
        "candidates": (n_rated, 0),
        "unrated_candidates": (0, 0),
        "preferences": (n_prefs, 0),
    }


def test_same_inputs_same_pairs_and_the_seed_matters(pool: dict[str, Path]) -> None:
    # nothing is carried from one call to the next: a second build is the first one again
    one, two = _build(pool, seed=3), _build(pool, seed=3)
    assert (one.entries, one.by_name()) == (two.entries, two.by_name())
    other = _build(pool, seed=4)
    assert other.entries == one.entries  # the entries follow the files, not the seed
    assert other.train != one.train


def test_preferences_alone_train_without_ratings(pool: dict[str, Path]) -> None:
    del pool["ratings"]
    sets = _build(pool, model_pairs=0, val_model_pairs=0, seed=0)
    assert sets.train == sets.train_clinician and sets.val_clinician
    assert sets.val_model == ()
    assert "ratings" not in sets.records  # no rating file was read
    assert sets.records["unrated_candidates"].as_dict()["kept"] == len(_lines(pool["candidates"]))


def test_nothing_to_train_on_is_refused(pool: dict[str, Path]) -> None:
    del pool["ratings"], pool["preferences"]
    with pytest.raises(ValueError, match="no training pairs"):
        _build(pool, model_pairs=0, seed=0)


def test_a_skipped_preference_is_counted_not_paired(pool: dict[str, Path]) -> None:
    rows = _lines(pool["preferences"])
    rows[1]["image"] = "nowhere.png"
    pool["preferences"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = _build(pool, seed=0, on_bad="skip")
    prefs = sets.records["preferences"].as_dict()
    assert (prefs["kept"], prefs["skipped_by_reason"]) == (len(rows) - 1, {"bad_image_path": 1})
    assert len(sets.train_clinician + sets.val_clinician) == len(rows) - 1


def test_the_data_module_keeps_what_build_pair_sets_returns(pool: dict[str, Path]) -> None:
    dm = SelectorDataModule(
        FilePool(**{k: str(v) for k, v in pool.items()}),
        model_pairs=16,
        val_model_pairs=4,
        clinician_split="pair",
        seed=7,
        num_workers=0,
    )
    assert dm.sets == {} and dm.entries == () and dm.describe()["val_model_repeats"] == 0
    dm.setup("fit")
    want = _build(pool, clinician_split="pair", seed=7)
    assert (dm.entries, dm.sets) == (want.entries, want.by_name())
    record = dm.describe()
    assert list(record["records"]) == [
        "figures",
        "ratings",
        "candidates",
        "unrated_candidates",
        "preferences",
    ]
    assert record["pairs"] == {k: len(v) for k, v in want.by_name().items()}
    assert isinstance(dm.files, PoolFiles)


def test_clinician_text_qa_only_as_released() -> None:
    """``qa_only`` drops caption and mentions from a clinician pair's text, in the recipe's own
    Question/Answer layout; ``candidate_recipe`` keeps them."""
    args = ("Cap.", "Mention.", "What is shown? <image>", "A lesion.")
    assert clinician_text("paper", "candidate_recipe", *args) == (
        "Cap.Mention.Question:What is shown?Answer:A lesion."
    )
    assert clinician_text("paper", "qa_only", *args) == "Question:What is shown?Answer:A lesion."
    assert clinician_text("conversation", "qa_only", *args) == (
        "Question: What is shown? Answer: A lesion."
    )
    with pytest.raises(ValueError, match="clinician_text must be 'candidate_recipe' or 'qa_only'"):
        clinician_text("paper", "question_answer", *args)  # type: ignore[arg-type]


def test_qa_only_changes_the_clinician_training_texts_only(pool: dict[str, Path]) -> None:
    """Same seed, same pairs; under ``qa_only`` the clinician pairs trained on read question and
    answer only, while the held-out clinician pairs and the candidates keep the recipe."""
    recipe = _build(pool, seed=0)
    qa = _build(pool, seed=0, clinician_text="qa_only")
    text = lambda sets, i: sets.entries[i].text  # noqa: E731
    assert recipe.train_clinician and recipe.val_clinician
    for r, q in zip(recipe.train_clinician, qa.train_clinician, strict=True):
        for side in ("a", "b"):
            full, short = text(recipe, getattr(r, side)), text(qa, getattr(q, side))
            assert short != full and short.startswith("Question:") and full.endswith(short)
            assert recipe.entries[getattr(r, side)].image == qa.entries[getattr(q, side)].image
    for r, q in zip(recipe.val_clinician, qa.val_clinician, strict=True):
        assert (text(recipe, r.a), text(recipe, r.b)) == (text(qa, q.a), text(qa, q.b))
        assert not text(qa, q.a).startswith("Question:")  # caption and mentions first
    n_model = len(recipe.train) - len(recipe.train_clinician)
    assert recipe.train[:n_model] == qa.train[:n_model] and recipe.val_model == qa.val_model
    rated = range(len(_lines(pool["ratings"])))
    assert [recipe.entries[i] for i in rated] == [qa.entries[i] for i in rated]


def test_a_bad_clinician_text_is_one_error_naming_the_key(pool: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="clinician_text must be .* got 'qa'"):
        _build(pool, seed=0, clinician_text="qa")
    with pytest.raises(ValueError, match="clinician_text must be"):
        SelectorDataModule(FilePool(**{k: str(v) for k, v in pool.items()}), clinician_text="qa")
