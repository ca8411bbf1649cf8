"""The selector's pair sets, built from a pool's files by one function, :func:`build_pair_sets`.

It reads the ratings, joins them to the candidates (a rated candidate becomes an entry), splits
each rating level into a training and a held-out part, samples model pairs across levels, reads
the clinician preferences (two entries each) and splits them into training and held-out pairs.
It changes nothing outside itself: the entries, the pairs and the counts the run record reports
come back in a :class:`PairSets`. The sampling rules themselves are in
:mod:`biomedvital.selection.pairs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.jsonio import check_unique, handle_bad, iter_files, iter_objects, parse_record
from biomedvital.data.pool import PoolFiles
from biomedvital.data.records import Candidate, Preference, read_preferences, read_ratings
from biomedvital.data.report import BadRecordError, OnBad, RecordReport
from biomedvital.selection.batching import Entry
from biomedvital.selection.pairs import (
    CLINICIAN,
    ClinicianSplit,
    Pair,
    drop_repeats,
    preference_record,
    sample_model_pairs,
    split_clinician,
    split_levels,
)
from biomedvital.selection.text import (
    Captions,
    ClinicianText,
    TextRecipe,
    check_clinician_text,
    clinician_text,
)


@dataclass(frozen=True)
class PairSets:
    """The pairs the selector trains and validates on, the entries they index, and the counts
    the run record reports.

    Attributes:
        entries: what the pairs index (``Pair.a``, ``Pair.b``): an image and the text read.
        train: model pairs, then the clinician pairs trained on.
        val_model: held-out model pairs (``val/pair_acc``).
        val_clinician: held-out clinician pairs (``val/align_rate``).
        train_clinician: the clinician pairs of ``train``.
        val_model_repeats: held-out rated candidates left out because a training candidate has
            the same image and text.
        records: kept and skipped records by input (``ratings``, ``candidates``,
            ``unrated_candidates``, ``preferences``), for the inputs that were read.
    """

    entries: tuple[Entry, ...]
    train: tuple[Pair, ...]
    val_model: tuple[Pair, ...]
    val_clinician: tuple[Pair, ...]
    train_clinician: tuple[Pair, ...]
    val_model_repeats: int
    records: Mapping[str, RecordReport]

    def by_name(self) -> dict[str, tuple[Pair, ...]]:
        """The pair sets by name, in the order the run record lists them."""
        return {
            "train": self.train,
            "val_model": self.val_model,
            "val_clinician": self.val_clinician,
            "train_clinician": self.train_clinician,
        }


def build_pair_sets(
    files: PoolFiles,
    root: ImageRoot,
    captions: Captions,
    *,
    text_recipe: TextRecipe = "paper",
    clinician_text: ClinicianText = "candidate_recipe",
    model_pairs: int = 30000,
    val_model_pairs: int = 10000,
    train_fraction: float = 0.8,
    clinician_val_fraction: float = 0.5,
    clinician_train_pairs: int | None = None,
    clinician_split: ClinicianSplit = "image",
    seed: int = 0,
    on_bad: OnBad = "raise",
) -> PairSets:
    """Training and held-out pairs of a pool (arguments as
    :class:`~biomedvital.selection.datamodule.SelectorDataModule`'s).

    One generator seeded with ``seed`` draws, in turn, the training model pairs, the held-out
    model pairs and the clinician split. Bad records raise (naming file, line and field) or,
    with ``on_bad="skip"``, are counted in ``records``.

    ``clinician_text`` sets the text of the clinician pairs trained on (``qa_only``: question
    and answer only, as released); held-out clinician pairs always read the candidates'
    recipe, the text the selector scores.

    Raises:
        ValueError: when there is nothing to train on, or an argument is out of range.
        BadRecordError: on the first bad record, with ``on_bad="raise"``.
    """
    check_clinician_text(clinician_text)
    rng = np.random.default_rng(seed)
    records: dict[str, RecordReport] = {}
    entries = _Entries(root)
    scores, rated_in = _read_scores(files.rating_files, on_bad, records)
    rated, rated_scores = _join_candidates(
        files.candidate_files, scores, rated_in, captions, text_recipe, entries, on_bad, records
    )
    model_train, model_val, repeats = _model_pairs(
        rated, rated_scores, entries, train_fraction, model_pairs, val_model_pairs, rng
    )
    clin: list[_Clinician] = []
    groups: list[str] = []
    if files.preferences is not None:
        clin, groups = _clinician_prefs(
            files.preferences, captions, text_recipe, clinician_split, entries, on_bad, records
        )
    c_train, c_val = split_clinician(groups, clinician_val_fraction, rng, clinician_train_pairs)
    trained = set(c_train)  # entries in file order; the split picks each side's text
    clin_pairs = [
        c.pair(entries, text_recipe, clinician_text if i in trained else "candidate_recipe")
        for i, c in enumerate(clin)
    ]
    train_clinician = tuple(clin_pairs[i] for i in c_train)
    val_clinician = tuple(clin_pairs[i] for i in c_val)
    train = tuple(model_train) + train_clinician
    if not train:
        raise ValueError("no training pairs: give ratings (model pairs) or clinician preferences")
    return PairSets(
        entries=tuple(entries.items),
        train=train,
        val_model=tuple(model_val),
        val_clinician=val_clinician,
        train_clinician=train_clinician,
        val_model_repeats=repeats,
        records=records,
    )


class _Entries:
    """The entries in the order pair building meets them; an image is checked when added."""

    def __init__(self, root: ImageRoot) -> None:
        self.root = root
        self.items: list[Entry] = []

    def check(self, image: str, path: Path, line: int | None) -> Path:
        """The image's file; a bad path is a bad record (``bad_image_path``)."""
        try:
            return self.root.resolve(image)
        except (UnsafePathError, FileNotFoundError) as err:
            raise BadRecordError(path, line, str(err), "image", category="bad_image_path") from err

    def add(self, image: str, text: str, path: Path, line: int | None) -> int:
        self.check(image, path, line)
        self.items.append(Entry(image, text))
        return len(self.items) - 1

    def content(self, entry: int) -> tuple[str, str]:
        """What the selector reads of an entry: its image file and its text."""
        e = self.items[entry]
        return str(self.root.resolve(e.image)), e.text


def _report(records: dict[str, RecordReport], name: str) -> RecordReport:
    return records.setdefault(name, RecordReport())


def _read_scores(
    rating_files: Sequence[Path], on_bad: OnBad, records: dict[str, RecordReport]
) -> tuple[dict[str, float], dict[str, Path]]:
    """The score of each rated candidate id, and the file that rates it (ids unique across
    the files)."""
    scores: dict[str, float] = {}
    rated_in: dict[str, Path] = {}
    for rfile in rating_files:
        ratings = read_ratings(rfile, on_bad=on_bad, report=_report(records, "ratings"))
        ratings = check_unique(
            ratings, "candidate_id", rfile, on_bad=on_bad, report=_report(records, "ratings")
        )
        for r in ratings:
            if r.candidate_id in scores:
                err = BadRecordError(
                    rfile,
                    None,
                    f"candidate {r.candidate_id!r} is rated in {rated_in[r.candidate_id]} too",
                    "candidate_id",
                    category="duplicate:candidate_id",
                )
                handle_bad(err, on_bad, _report(records, "ratings"))
                continue
            scores[r.candidate_id] = r.score
            rated_in[r.candidate_id] = rfile
    return scores, rated_in


def _join_candidates(
    candidate_files: Sequence[Path],
    scores: dict[str, float],
    rated_in: dict[str, Path],
    captions: Captions,
    text_recipe: TextRecipe,
    entries: _Entries,
    on_bad: OnBad,
    records: dict[str, RecordReport],
) -> tuple[list[int], list[float]]:
    """Candidates with a rating become model-pair entries, in file order: their entries and
    scores. Unrated candidates are counted; ratings that name no candidate are bad records."""
    rated: list[int] = []
    rated_scores: list[float] = []
    seen: set[str] = set()
    rep = _report(records, "candidates")
    unrated = 0
    for cfile, pos, kind, obj in iter_files(candidate_files, on_bad, rep):
        try:
            cand = parse_record(obj, Candidate, cfile, pos, kind)
            if cand.id in seen:
                raise BadRecordError(
                    cfile,
                    pos,
                    f"duplicate id {cand.id!r}",
                    "id",
                    kind=kind,
                    category="duplicate_id",
                )
            seen.add(cand.id)
            if cand.id not in scores:
                unrated += 1
                continue
            text = captions.text_of(cand, text_recipe, cfile, pos)
            rated.append(entries.add(cand.image, text, cfile, pos))
            rated_scores.append(scores[cand.id])
        except BadRecordError as err:
            handle_bad(err, on_bad, rep)
            continue
        rep.kept()
    orphans = sorted(set(scores) - seen)
    if orphans:
        err = BadRecordError(
            rated_in[orphans[0]],
            None,
            f"{len(orphans)} rating(s) name no candidate, e.g. {orphans[0]!r}",
            "candidate_id",
            category="rating_without_candidate",
        )
        handle_bad(err, on_bad, _report(records, "ratings"))
    records["unrated_candidates"] = RecordReport()
    records["unrated_candidates"].kept(unrated)
    return rated, rated_scores


def _model_pairs(
    rated: list[int],
    rated_scores: list[float],
    entries: _Entries,
    train_fraction: float,
    n_train: int,
    n_val: int,
    rng: np.random.Generator,
) -> tuple[list[Pair], list[Pair], int]:
    """Training and held-out model pairs, and how many held-out candidates were left out
    because a training candidate has the same content."""
    train_levels, val_levels = split_levels(rated_scores, train_fraction)
    as_entry = lambda levels: {k: [rated[i] for i in v] for k, v in levels.items()}  # noqa: E731
    val_levels, repeats = drop_repeats(
        train_levels, val_levels, lambda i: entries.content(rated[i])
    )
    model_train = sample_model_pairs(as_entry(train_levels), n_train, rng)
    model_val = sample_model_pairs(as_entry(val_levels), n_val, rng) if len(val_levels) >= 2 else []
    return model_train, model_val, repeats


@dataclass(frozen=True)
class _Clinician:
    """A clinician preference whose image and figure text were found."""

    pref: Preference
    caption: str
    mentions: str
    path: Path

    def pair(self, entries: _Entries, recipe: TextRecipe, mode: ClinicianText) -> Pair:
        """Its (preferred, rejected) pair, the text of each side as ``mode`` says."""
        p = self.pref
        a, b = (
            entries.add(
                p.image,
                clinician_text(recipe, mode, self.caption, self.mentions, p.question, answer),
                self.path,
                None,
            )
            for answer in (p.preferred, p.rejected)
        )
        return Pair(a, b, CLINICIAN)


def _clinician_prefs(
    path: Path,
    captions: Captions,
    text_recipe: TextRecipe,
    clinician_split: ClinicianSplit,
    entries: _Entries,
    on_bad: OnBad,
    records: dict[str, RecordReport],
) -> tuple[list[_Clinician], list[str]]:
    """The clinician preferences that can become pairs, and each one's split group: its image
    file (a by-image split) or its preference record (by pair). Their entries are added once
    the split says which text each side reads."""
    rep = _report(records, "preferences")
    prefs = read_preferences(path, on_bad=on_bad, report=rep)
    prefs = check_unique(prefs, "id", path, on_bad=on_bad, report=rep)
    kept: list[_Clinician] = []
    groups: list[str] = []
    where: dict[str, tuple[int, str]] | None = None  # record positions, read on error
    dropped: set[str] = set()  # records skipped (an answer-marks record: once)
    for p in prefs:
        if preference_record(p.id) in dropped:
            continue  # its record's other pairs share its image and figure
        try:
            caption, mentions = captions.of_preference(p, text_recipe, path, None)
            image = entries.check(p.image, path, None)
        except BadRecordError as err:
            if where is None:
                where = _preference_positions(path)
            pos, kind = where.get(p.id) or where.get(p.id.split("#")[0], (None, "line"))
            err = BadRecordError(
                path,
                pos,
                f"preference {p.id!r}: {err.reason}",
                err.field,
                kind=kind,  # type: ignore[arg-type]
                category=err.category,
            )
            handle_bad(err, on_bad, rep)
            # read_preferences counted the record kept: now it is skipped instead
            rep.unkeep()
            dropped.add(preference_record(p.id))
            continue
        kept.append(_Clinician(p, caption, mentions, path))
        # one figure however its path is spelled ("a.jpg", "./a.jpg"): the file itself
        by_image = clinician_split == "image"
        groups.append(str(image) if by_image else preference_record(p.id))
    return kept, groups


def _preference_positions(path: Path) -> dict[str, tuple[int, str]]:
    """Position of each record of a preferences file by id (pairs expanded from an
    answer-marks record carry ids ``f"{id}#{i}>{j}"``, found under ``id``)."""
    where: dict[str, tuple[int, str]] = {}
    for pos, kind, obj in iter_objects(path, on_bad="skip", report=RecordReport()):
        if isinstance(obj, dict) and "id" in obj:
            where.setdefault(str(obj["id"]), (pos, kind))
    return where
