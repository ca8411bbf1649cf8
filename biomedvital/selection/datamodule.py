"""The selector's data: pairs to train on, held-out pairs to validate on, a stream to score."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)

from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.jsonio import (
    check_unique,
    handle_bad,
    iter_objects,
    parse_record,
    sha256_file,
)
from biomedvital.data.loaders import ResumableLoader, trained_batches
from biomedvital.data.pool import DemoPool, FilePool, PoolFiles
from biomedvital.data.records import (
    Candidate,
    Preference,
    SourceFigure,
    read_figures,
    read_preferences,
    read_ratings,
)
from biomedvital.data.report import BadRecordError, RecordReport
from biomedvital.selection.batching import BadImage, Codec, Entry, PairCollate
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
from biomedvital.selection.seeds import resolve_seed
from biomedvital.selection.text import TextRecipe, candidate_text
from biomedvital.tracking.mlflow import upstream_run_of

OnBad = Literal["raise", "skip"]


class _Pairs(Dataset):
    """Positions in a pair set: the collate looks the pairs up, and a dropped pair is named by
    its position, so that it is counted once however many epochs meet it."""

    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> int:
        return i


class EpochShuffle(DistributedSampler):
    """A permutation that depends only on (seed, epoch), so a run resumed from a checkpoint
    sees the same batches as one that never stopped (Lightning calls ``set_epoch``).

    With several processes each takes every ``num_replicas``-th index of the permutation,
    padded with its first indices to an equal share (as ``DistributedSampler`` does): being a
    ``DistributedSampler``, Lightning leaves it unwrapped, so that :meth:`resume` can skip the
    batches a process already trained.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.n, self.seed, self.epoch = n, seed, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """Continue ``epoch`` after ``samples_done`` of this process's samples: the next
        iteration yields the rest; a finished epoch resumes at the start of the next."""
        if samples_done >= self.num_samples:
            epoch, samples_done = epoch + 1, 0
        self.epoch, self._skip = epoch, samples_done

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas > 1 and order:
            pad = self.total_size - len(order)
            order += (order * -(-pad // len(order)))[:pad]
        skip, self._skip = self._skip, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])


class _PairLoader(ResumableLoader):
    """The selector's training loader: resumable (:class:`~biomedvital.data.loaders.
    ResumableLoader`) over an :class:`EpochShuffle`, which skips the samples already trained."""

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, progress=progress, **kwargs)
        if not isinstance(self.sampler, EpochShuffle):
            raise TypeError("_PairLoader needs an EpochShuffle sampler")

    def resume(self, epoch: int, batches_done: int) -> None:
        self.sampler.resume(epoch, batches_done * int(self.batch_size or 1))  # type: ignore[attr-defined]


class _Tagged:
    """Adds the name of the pair set to each batch so metrics know what they measure, and the
    positions (in that set) and kinds of the pairs dropped for unreadable images, so the model
    can count each dropped pair once per set."""

    def __init__(self, collate: PairCollate, source: str, pairs: list[Pair]) -> None:
        self.collate, self.source, self.pairs = collate, source, pairs

    def __call__(self, positions: list[int]) -> dict[str, Any]:
        pairs = [self.pairs[i] for i in positions]
        batch = self.collate(pairs)
        dropped = batch.pop("dropped")
        batch["source"] = self.source
        batch["dropped_index"] = [positions[n] for n in dropped]
        batch["dropped_kind"] = [pairs[n].kind for n in dropped]
        return batch


class Captions:
    """Caption and in-text mentions of each source figure, by ``pair_id``."""

    def __init__(self, figures: list[SourceFigure]) -> None:
        self.by_pair = {f.pair_id: (f.fig_caption, f.mentions_text()) for f in figures}

    def text_of(self, cand: Candidate, recipe: TextRecipe, path: Path, line: int | None) -> str:
        caption, mentions = "", ""
        if cand.pair_id is not None and cand.pair_id in self.by_pair:
            caption, mentions = self.by_pair[cand.pair_id]
        elif recipe == "paper":
            raise BadRecordError(
                path,
                line,
                f"candidate {cand.id!r}: its pair_id {cand.pair_id!r} is not among the source "
                "figures, and the 'paper' text recipe needs the caption and mentions",
                "pair_id",
                category="unknown_figure",
            )
        return candidate_text(recipe, caption, mentions, cand.qa_pairs())

    def of_preference(
        self, pref: Preference, recipe: TextRecipe, path: Path, line: int | None
    ) -> tuple[str, str]:
        """Caption and mentions of a clinician preference: its own, else its figure's. Under
        the ``paper`` recipe one with neither is refused as a candidate is (``unknown_figure``):
        its text would lack the caption and mentions that every scored text has."""
        if pref.fig_caption:
            return pref.fig_caption, pref.mentions_text()
        if pref.pair_id is not None and pref.pair_id in self.by_pair:
            return self.by_pair[pref.pair_id]
        if recipe == "paper":
            raise BadRecordError(
                path,
                line,
                f"it has no fig_caption and its pair_id {pref.pair_id!r} is not among the source "
                "figures, and the 'paper' text recipe needs the caption and mentions",
                "pair_id",
                category="unknown_figure",
            )
        return "", pref.mentions_text()


class _Unreadable(RecordReport):
    """Keeps the unreadable lines a skip-mode read meets, to hand them on in file order."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BadRecordError] = []

    def skip(self, err: BadRecordError) -> None:
        super().skip(err)
        self.errors.append(err)

    def drain(self) -> Iterator[tuple[int, str, BadRecordError]]:
        errors, self.errors = self.errors, []
        for err in errors:
            yield (err.line or 0, err.kind, err)


class CandidateStream(IterableDataset):
    """Streams candidate files (one, or several in turn) in encoded chunks; processes (ranks)
    and their workers take alternate chunks, and a chunk never spans two files (errors name the
    file and its line). Every batch carries its chunk number, by which the ranks' scores merge
    back into the one-process order.

    Memory stays flat whatever the pool size: only one chunk per worker is held.
    """

    def __init__(
        self,
        path: Path | Sequence[Path],
        captions: Captions,
        recipe: TextRecipe,
        chunk_size: int,
        codec: Codec,
        on_bad: OnBad,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.paths = (Path(path),) if isinstance(path, (str, Path)) else tuple(map(Path, path))
        self.path = self.paths[0]
        self.captions, self.recipe = captions, recipe
        self.chunk_size, self.codec, self.on_bad = chunk_size, codec, on_bad
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)

        def mine(n: int) -> bool:  # chunk n: rank n % world, then that rank's workers in turn
            return n % self.world_size == self.rank and (n // self.world_size) % nw == wid

        n_chunk = 0
        for path in self.paths:
            self.path = path
            chunk: list[tuple[int, str, Any]] = []
            for item in self._items():
                chunk.append(item)
                if len(chunk) == self.chunk_size:
                    if mine(n_chunk):
                        yield self._encode(chunk, n_chunk)
                    chunk, n_chunk = [], n_chunk + 1
            if chunk:
                if mine(n_chunk):
                    yield self._encode(chunk, n_chunk)
                n_chunk += 1

    def _items(self) -> Iterator[tuple[int, str, Any]]:
        """``(position, kind, value)`` of each record; in skip mode an unreadable line (bad
        JSON or UTF-8) comes through in its place as its BadRecordError, so that it is counted
        once, by the worker that owns its chunk."""
        if self.on_bad == "raise":
            yield from iter_objects(self.path, on_bad="raise")
            return
        unreadable = _Unreadable()
        for item in iter_objects(self.path, on_bad="skip", report=unreadable):
            yield from unreadable.drain()
            yield item
        yield from unreadable.drain()

    def _encode(self, chunk: list[tuple[int, str, Any]], number: int = 0) -> dict[str, Any]:
        ids, entries, skipped, positions = [], [], [], []
        for pos, kind, obj in chunk:
            if isinstance(obj, BadRecordError):  # an unreadable line (skip mode only)
                skipped.append((obj.category, str(obj)))
                continue
            try:
                cand = parse_record(obj, Candidate, self.path, pos, kind)
                text = self.captions.text_of(cand, self.recipe, self.path, pos)
            except BadRecordError as err:
                if self.on_bad == "raise":
                    raise
                skipped.append((err.category or "invalid_record", str(err)))
                continue
            ids.append(cand.id)
            positions.append((pos, kind))
            entries.append(Entry(cand.image, text))
        try:
            batch = self.codec.encode(entries)
        except BadImage as err:  # raise mode: name the first candidate that uses the image
            i = next(i for i, e in enumerate(entries) if e.image == err.image)
            pos, kind = positions[i]
            raise BadRecordError(
                self.path,
                pos,
                f"candidate {ids[i]!r}: {err}",
                "image",
                kind=kind,
                category="bad_image",
            ) from err
        bad = batch.pop("bad_entries")
        skipped += [("bad_image", f"candidate {ids[i]}: {why}") for i, why in bad.items()]
        batch["ids"] = ids
        batch["positions"] = positions  # where each id is in the file, for the writer's errors
        batch["file"] = str(self.path)
        batch["valid"] = torch.tensor([i not in bad for i in range(len(ids))], dtype=torch.bool)
        batch["skipped"] = skipped
        batch["chunk"] = number
        return batch


class SelectorDataModule(LightningDataModule):
    """Pairs for training the selector and a candidate stream for scoring.

    Args:
        pool: where candidates, ratings, preferences, figures and images come from
            (``biomedvital.data.pool.FilePool`` or ``DemoPool``).
        text_recipe: ``paper`` (faithful: caption + mentions + first QA) or ``conversation``.
        model_pairs: training pairs drawn across rating levels (paper: 30000).
        val_model_pairs: held-out model pairs for ``val/pair_acc`` (paper: 10000).
        train_fraction: share of each rating level that feeds training pairs (paper: 0.8).
        clinician_val_fraction: share of clinician pairs held out to measure alignment.
        clinician_train_pairs: train on this many clinician pairs and hold out the rest,
            instead of ``clinician_val_fraction`` (paper: 50, with 2,000 held out; whole
            groups of the split, so at least this many when several pairs share a group).
        clinician_split: hold out clinician pairs by ``image`` (no figure on both sides) or by
            ``pair`` (by preference record: the pairs expanded from one answer-marks record,
            ``id#i>j``, share its question and answers and stay on one side).
        batch_size: pairs per training batch (paper: 64).
        predict_chunk: candidates per scoring batch; images shared inside a chunk are decoded
            and encoded once.
        num_workers: DataLoader worker processes (decode and tokenise off the main process).
        image_cache_size: decoded images each worker keeps (LRU).
        seed: seed of pair sampling, the clinician split and the training order. ``None``
            (default): the run's ``seed_everything`` (0 when unset), as the model's
            ``init_seed``; the run record keeps the seed used.
        on_bad_record: ``raise`` on the first bad record (naming file, line and field) or
            ``skip`` it and count it in the run's report.
    """

    def __init__(
        self,
        pool: FilePool | DemoPool,
        text_recipe: TextRecipe = "paper",
        model_pairs: int = 30000,
        val_model_pairs: int = 10000,
        train_fraction: float = 0.8,
        clinician_val_fraction: float = 0.5,
        clinician_train_pairs: int | None = None,
        clinician_split: ClinicianSplit = "image",
        batch_size: int = 64,
        predict_chunk: int = 256,
        num_workers: int = 2,
        image_cache_size: int = 256,
        seed: int | None = None,
        on_bad_record: OnBad = "raise",
    ) -> None:
        super().__init__()
        self.pool = pool
        self.text_recipe = text_recipe
        self.model_pairs = model_pairs
        self.val_model_pairs = val_model_pairs
        self.train_fraction = train_fraction
        self.clinician_val_fraction = clinician_val_fraction
        self.clinician_train_pairs = clinician_train_pairs
        self.clinician_split = clinician_split
        self.batch_size = batch_size
        self.predict_chunk = predict_chunk
        self.num_workers = num_workers
        self.image_cache_size = image_cache_size
        self.seed = resolve_seed(seed)
        self.on_bad_record = on_bad_record
        self.files: PoolFiles | None = None
        self.report: dict[str, RecordReport] = {}
        self.entries: list[Entry] = []
        self.sets: dict[str, list[Pair]] = {}
        self._codec: Codec | None = None

    # -- Lightning hooks -------------------------------------------------------------------

    def prepare_data(self) -> None:
        self.pool.prepare()

    def setup(self, stage: str) -> None:
        self.files = self.pool.prepare()
        self.root = ImageRoot(self.files.image_root)
        figures = (
            read_figures(self.files.figures, on_bad=self.on_bad_record, report=self._rep("figures"))
            if self.files.figures
            else []
        )
        figures = check_unique(
            figures,
            "pair_id",
            self.files.figures or "figures",
            on_bad=self.on_bad_record,
            report=self._rep("figures"),
        )
        self.captions = Captions(figures)
        if stage in ("fit", "validate", "test") and not self.sets:
            self._build_pairs()

    def train_dataloader(self) -> DataLoader:
        return self._pair_loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._pair_loader(name) for name in ("val_model", "val_clinician") if self.sets[name]
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        assert self.files is not None
        trainer = self.trainer  # several processes score alternate chunks
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        stream = CandidateStream(
            self.files.candidate_files,
            self.captions,
            self.text_recipe,
            self.predict_chunk,
            self.codec(),
            self.on_bad_record,
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            collate_fn=_identity,
        )

    # -- what the run records --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Inputs (with hashes), kept/dropped counts and pair counts, for the run's records."""
        inputs = {}
        if self.files is not None:
            for name in ("candidates", "figures", "ratings", "preferences"):
                p = getattr(self.files, name)
                if p is not None and Path(p).is_file():
                    inputs[name] = {"path": str(p), "sha256": sha256_file(p)}
            for name in ("extra_candidates", "extra_ratings"):
                extra = getattr(self.files, name)
                if extra:
                    inputs[name] = [{"path": str(p), "sha256": sha256_file(p)} for p in extra]
            inputs["image_root"] = str(self.files.image_root)
        return {
            "inputs": inputs,
            "upstream_runs": self.upstream_runs(),
            "records": {k: r.as_dict() for k, r in self.report.items()},
            "pairs": {k: len(v) for k, v in self.sets.items()},
            # held-out rated candidates left out: a training candidate has the same input
            "val_model_repeats": getattr(self, "val_model_repeats", 0),
            "entries": len(self.entries),
            "seed": self.seed,
            "truncation": getattr(self, "truncation", None),
        }

    def upstream_runs(self) -> dict[str, list[str]]:
        """MLflow runs that wrote the pool's candidate and rating files (``generate``, ``rate``),
        read from the manifests beside them: ``{"candidates": [...], "ratings": [...]}``."""
        if self.files is None:
            return {}
        found = {
            "candidates": [upstream_run_of(p) for p in self.files.candidate_files],
            "ratings": [upstream_run_of(p) for p in self.files.rating_files],
        }
        return {role: [r for r in runs if r] for role, runs in found.items() if any(runs)}

    def check_truncation(self, tokenizer: Any, sample: int = 256) -> dict[str, Any]:
        """Count pairs whose two sides become identical once cut to the context length.

        The ``paper`` recipe puts caption and mentions before the answer: with a short context
        (77 tokens for OpenAI-style CLIP) the answers can be cut away entirely, and the
        selector then sees the same input on both sides of a pair. Counted, never silent.
        """
        result: dict[str, Any] = {}
        rng = np.random.default_rng(self.seed)
        for name in ("train", "val_model", "val_clinician"):
            pairs = self.sets.get(name, [])
            if not pairs:
                continue
            idx = rng.choice(len(pairs), size=min(sample, len(pairs)), replace=False)
            chosen = [pairs[i] for i in idx]
            ta = tokenizer([self.entries[p.a].text for p in chosen])
            tb = tokenizer([self.entries[p.b].text for p in chosen])
            same_text = (ta == tb).all(dim=-1).tolist()
            same = [
                st and self.entries[p.a].image == self.entries[p.b].image
                for st, p in zip(same_text, chosen, strict=True)
            ]
            result[name] = {"checked": len(chosen), "identical_after_truncation": int(sum(same))}
        self.truncation = result
        return result

    # -- internals -------------------------------------------------------------------------

    def codec(self) -> Codec:
        """The backbone's preprocessing, taken from the model being trained or scored."""
        if self._codec is None:
            model = self.trainer.lightning_module  # type: ignore[union-attr]
            self._codec = model.make_codec(
                self.root,
                skip_bad_images=self.on_bad_record == "skip",
                image_cache_size=self.image_cache_size,
            )
        return self._codec

    def _rep(self, name: str) -> RecordReport:
        return self.report.setdefault(name, RecordReport())

    def _pair_loader(self, name: str, shuffle: bool = False) -> DataLoader:
        pairs = _Pairs(self.sets[name])
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": _Tagged(PairCollate(self.entries, self.codec()), name, pairs.pairs),
        }
        if not shuffle:
            return DataLoader(pairs, **kwargs)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochShuffle(len(pairs), self.seed, num_replicas=world, rank=rank)
        if trainer is None:
            return DataLoader(pairs, sampler=sampler, **kwargs)
        return _PairLoader(
            pairs, sampler=sampler, progress=partial(trained_batches, trainer), **kwargs
        )

    def _content(self, entry: int) -> tuple[str, str]:
        """What the selector reads of an entry: its image file and its text."""
        e = self.entries[entry]
        return str(self.root.resolve(e.image)), e.text

    def _entry(self, image: str, text: str, path: Path, line: int | None) -> int:
        try:
            self.root.resolve(image)
        except (UnsafePathError, FileNotFoundError) as err:
            raise BadRecordError(path, line, str(err), "image", category="bad_image_path") from err
        self.entries.append(Entry(image, text))
        return len(self.entries) - 1

    def _build_pairs(self) -> None:
        files = self.files
        assert files is not None
        rng = np.random.default_rng(self.seed)
        on_bad = self.on_bad_record

        scores: dict[str, float] = {}
        rated_in: dict[str, Path] = {}
        for rfile in files.rating_files:
            ratings = read_ratings(rfile, on_bad=on_bad, report=self._rep("ratings"))
            ratings = check_unique(
                ratings, "candidate_id", rfile, on_bad=on_bad, report=self._rep("ratings")
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
                    handle_bad(err, on_bad, self._rep("ratings"))
                    continue
                scores[r.candidate_id] = r.score
                rated_in[r.candidate_id] = rfile

        # candidates with a rating become model-pair entries, in file order
        rated: list[int] = []
        rated_scores: list[float] = []
        seen: set[str] = set()
        rep = self._rep("candidates")
        unrated = 0
        for cfile, pos, kind, obj in _iter_files(files.candidate_files, on_bad, rep):
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
                text = self.captions.text_of(cand, self.text_recipe, cfile, pos)
                rated.append(self._entry(cand.image, text, cfile, pos))
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
            handle_bad(err, on_bad, self._rep("ratings"))
        self.report["unrated_candidates"] = RecordReport()
        self.report["unrated_candidates"].kept(unrated)

        train_levels, val_levels = split_levels(rated_scores, self.train_fraction)
        as_entry = lambda levels: {k: [rated[i] for i in v] for k, v in levels.items()}  # noqa: E731
        val_levels, self.val_model_repeats = drop_repeats(
            train_levels, val_levels, lambda i: self._content(rated[i])
        )
        model_train = sample_model_pairs(as_entry(train_levels), self.model_pairs, rng)
        model_val = (
            sample_model_pairs(as_entry(val_levels), self.val_model_pairs, rng)
            if len(val_levels) >= 2
            else []
        )

        clin_pairs: list[Pair] = []
        groups: list[str] = []
        if files.preferences is not None:
            prefs = read_preferences(
                files.preferences, on_bad=on_bad, report=self._rep("preferences")
            )
            prefs = check_unique(
                prefs, "id", files.preferences, on_bad=on_bad, report=self._rep("preferences")
            )
            where: dict[str, tuple[int, str]] | None = None  # record positions, read on error
            dropped: set[str] = set()  # records skipped (an answer-marks record: once)
            for p in prefs:
                if preference_record(p.id) in dropped:
                    continue  # its record's other pairs share its image and figure
                try:
                    caption, mentions = self.captions.of_preference(
                        p, self.text_recipe, files.preferences, None
                    )
                    a = self._entry(
                        p.image,
                        candidate_text(
                            self.text_recipe, caption, mentions, [(p.question, p.preferred)]
                        ),
                        files.preferences,
                        None,
                    )
                    b = self._entry(
                        p.image,
                        candidate_text(
                            self.text_recipe, caption, mentions, [(p.question, p.rejected)]
                        ),
                        files.preferences,
                        None,
                    )
                except BadRecordError as err:
                    if where is None:
                        where = _preference_positions(files.preferences)
                    pos, kind = where.get(p.id) or where.get(p.id.split("#")[0], (None, "line"))
                    err = BadRecordError(
                        files.preferences,
                        pos,
                        f"preference {p.id!r}: {err.reason}",
                        err.field,
                        kind=kind,  # type: ignore[arg-type]
                        category=err.category,
                    )
                    handle_bad(err, on_bad, self._rep("preferences"))
                    # read_preferences counted the record kept: now it is skipped instead
                    self._rep("preferences").unkeep()
                    dropped.add(preference_record(p.id))
                    continue
                clin_pairs.append(Pair(a, b, CLINICIAN))
                # one figure however its path is spelled ("a.jpg", "./a.jpg"): the file itself
                by_image = self.clinician_split == "image"
                groups.append(
                    str(self.root.resolve(p.image)) if by_image else preference_record(p.id)
                )
        c_train, c_val = split_clinician(
            groups, self.clinician_val_fraction, rng, self.clinician_train_pairs
        )
        self.sets = {
            "train": model_train + [clin_pairs[i] for i in c_train],
            "val_model": model_val,
            "val_clinician": [clin_pairs[i] for i in c_val],
        }
        self.sets["train_clinician"] = [clin_pairs[i] for i in c_train]
        if not self.sets["train"]:
            raise ValueError(
                "no training pairs: give ratings (model pairs) or clinician preferences"
            )


def _identity(x: Any) -> Any:
    return x


def _iter_files(
    paths: Sequence[Path], on_bad: OnBad, report: RecordReport
) -> Iterator[tuple[Path, int, str, Any]]:
    """``(file, position, kind, record)`` of each record of several files, in turn."""
    for path in paths:
        for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
            yield path, pos, kind, obj


def _preference_positions(path: Path) -> dict[str, tuple[int, str]]:
    """Position of each record of a preferences file by id (pairs expanded from an
    answer-marks record carry ids ``f"{id}#{i}>{j}"``, found under ``id``)."""
    where: dict[str, tuple[int, str]] = {}
    for pos, kind, obj in iter_objects(path, on_bad="skip", report=RecordReport()):
        if isinstance(obj, dict) and "id" in obj:
            where.setdefault(str(obj["id"]), (pos, kind))
    return where
