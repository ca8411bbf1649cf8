"""The selector's data: pairs to train on, held-out pairs to validate on, a stream to score.

The data module holds the Lightning hooks; the pairs come from
:func:`~biomedvital.selection.pair_sets.build_pair_sets`, the training order from
:mod:`~biomedvital.selection.samplers` and the scoring stream from
:mod:`~biomedvital.selection.stream`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import ImageRoot
from biomedvital.data.jsonio import check_unique
from biomedvital.data.loaders import trained_batches
from biomedvital.data.pool import DemoPool, FilePool, PoolFiles
from biomedvital.data.records import read_figures
from biomedvital.data.report import OnBad, RecordReport
from biomedvital.selection.batching import Codec, Entry, PairCollate, TaggedCollate
from biomedvital.selection.pair_sets import PairSets, build_pair_sets
from biomedvital.selection.pairs import ClinicianSplit, Pair
from biomedvital.selection.samplers import EpochShuffle, PairLoader, PairPositions
from biomedvital.selection.seeds import resolve_seed
from biomedvital.selection.stream import CandidateStream
from biomedvital.selection.text import Captions, ClinicianText, TextRecipe, check_clinician_text
from biomedvital.tracking.mlflow import upstream_run_of


class SelectorDataModule(LightningDataModule):
    """Pairs for training the selector and a candidate stream for scoring.

    Args:
        pool: where candidates, ratings, preferences, figures and images come from
            (``biomedvital.data.pool.FilePool`` or ``DemoPool``).
        text_recipe: ``paper`` (faithful: caption + mentions + first QA) or ``conversation``.
        clinician_text: the text of the clinician pairs trained on: ``candidate_recipe``
            (default: ``text_recipe``, caption and mentions included, as the selector scores)
            or ``qa_only`` (the released code: question and answer only). Held-out clinician
            pairs read ``text_recipe`` either way, as the released alignment test did.
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
        clinician_text: ClinicianText = "candidate_recipe",
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
        check_clinician_text(clinician_text)
        self.text_recipe = text_recipe
        self.clinician_text = clinician_text
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
        self.root: ImageRoot | None = None  # the pool's image root, from setup
        self.captions: Captions | None = None  # the pool's figures, from setup
        self.report: dict[str, RecordReport] = {}
        self.pair_sets: PairSets | None = None  # built by setup for fit, validate or test
        self.truncation: dict[str, Any] | None = None  # from check_truncation
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
        if stage in ("fit", "validate", "test") and self.pair_sets is None:
            self.pair_sets = build_pair_sets(
                self.files,
                self.root,
                self.captions,
                text_recipe=self.text_recipe,
                clinician_text=self.clinician_text,
                model_pairs=self.model_pairs,
                val_model_pairs=self.val_model_pairs,
                train_fraction=self.train_fraction,
                clinician_val_fraction=self.clinician_val_fraction,
                clinician_train_pairs=self.clinician_train_pairs,
                clinician_split=self.clinician_split,
                seed=self.seed,
                on_bad=self.on_bad_record,
            )
            self.report.update(self.pair_sets.records)

    def train_dataloader(self) -> DataLoader:
        return self._pair_loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._pair_loader(name) for name in ("val_model", "val_clinician") if self.sets[name]
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        assert self.files is not None and self.captions is not None
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

    # -- the pairs ---------------------------------------------------------------------------

    @property
    def sets(self) -> dict[str, tuple[Pair, ...]]:
        """The pair sets by name; empty until set up for fit, validate or test."""
        return self.pair_sets.by_name() if self.pair_sets is not None else {}

    @property
    def entries(self) -> tuple[Entry, ...]:
        """What the pairs index (an image and a text each); empty until the pairs are built."""
        return self.pair_sets.entries if self.pair_sets is not None else ()

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
            "val_model_repeats": self.pair_sets.val_model_repeats if self.pair_sets else 0,
            "entries": len(self.entries),
            "seed": self.seed,
            "truncation": self.truncation,
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
            assert self.root is not None, "the data module is not set up"
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
        pairs = PairPositions(self.sets[name])
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": TaggedCollate(PairCollate(self.entries, self.codec()), name, pairs.pairs),
        }
        if not shuffle:
            return DataLoader(pairs, **kwargs)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = EpochShuffle(len(pairs), self.seed, num_replicas=world, rank=rank)
        if trainer is None:
            return DataLoader(pairs, sampler=sampler, **kwargs)
        return PairLoader(
            pairs, sampler=sampler, progress=partial(trained_batches, trainer), **kwargs
        )


def _identity(x: Any) -> Any:
    return x
