"""Instruction-tuning data: LLaVA-format JSON (``select``'s ``selected.json``) and an image root."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from pydantic import ValidationError
from torch.utils.data import DataLoader

from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.jsonio import bad_from_validation, handle_bad, iter_objects
from biomedvital.data.loaders import trained_batches
from biomedvital.data.records import Turn
from biomedvital.data.report import BadRecordError, RecordReport
from biomedvital.tracking.mlflow import upstream_run_of
from biomedvital.tuning.batching import (
    GroupedBatchSampler,
    GroupedLoader,
    PadCollate,
    Sample,
    TuningDataset,
)
from biomedvital.tuning.conversation import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    ConversationError,
    encode,
    render,
)
from biomedvital.tuning.image_aspect import (
    ImageAspectRatio,
    check_image_aspect_ratio,
    set_image_aspect_ratio,
)
from biomedvital.tuning.models import image_token_count

OnBad = Literal["raise", "skip"]


class TunerDataModule(LightningDataModule):
    """LLaVA-format samples, tokenised once at setup, batched by modality and length.

    Args:
        data: a JSON array (or JSONL) of ``{id, image, conversations}`` records, as written by
            ``select`` (``selected.json``); extra fields are ignored.
        image_root: folder the ``image`` paths are relative to (escapes are refused).
        max_length: longest token sequence (image placeholders included; LLaVA: 2048). Longer
            samples are cut at the end and counted (``truncated``), unless the cut would reach
            the image or leave no answer token: then the sample is bad.
        system_prompt: text before the first ``USER:`` (LLaVA-1.5's vicuna_v1 system by
            default; ``""`` for none, as llava-hf's chat template).
        batch_size: samples per process per step (the global batch is this times the number
            of processes times ``trainer.accumulate_grad_batches``).
        group_by: ``modality_length`` (batches of one modality and similar length, as LLaVA's
            ``group_by_modality_length``), ``length`` (ignore modality) or ``none`` (plain
            shuffle, for measuring what grouping saves).
        modality_field: record field naming a sample's modality (records without it count as
            ``image``).
        megabatch: global batches sorted together when grouping by length; larger groups pad
            less but make batch order less random.
        batch_split: how a length-sorted megabatch is cut into batches: ``fixed`` (every batch
            ``batch_size``, LLaVA's way) or ``min_padding`` (the same number of batches, sizes
            from 1 to ``batch_size`` chosen to pad least: same steps and schedule, fewer wasted
            tokens; with several processes the cut depends on their count).
        val_fraction: share of images held out (all of an image's samples on one side) for
            ``val/loss``; 0 trains on everything, as the paper.
        num_workers: DataLoader worker processes (image decoding and preprocessing).
        seed: seed of batch order and the validation split.
        on_bad_record: ``raise`` on the first bad sample (naming file, record and field) or
            ``skip`` it and count it in the run's report. Bad: turns not alternating, an
            unanswered question, no or several ``<image>`` tokens, a missing or escaping image,
            an over-long sample that cannot be truncated.
        verify_images: decode every image at setup so undecodable ones are found before
            training (otherwise they are met, raised or counted, while training).
        image_aspect_ratio: ``pad`` (LLaVA-1.5's: each image centred on a square of the image
            processor's mean colour, then resized) or ``crop`` (resized, then centre-cropped:
            a non-square image loses its edges). Set on the model's processor
            (:mod:`~biomedvital.tuning.image_aspect`), so the export's
            ``processor_config.json`` records it and the evaluator preprocesses alike.
    """

    def __init__(
        self,
        data: str,
        image_root: str,
        max_length: int = 2048,
        system_prompt: str = VICUNA_V1_SYSTEM,
        batch_size: int = 16,
        group_by: Literal["modality_length", "length", "none"] = "modality_length",
        modality_field: str = "modality",
        megabatch: int = 8,
        batch_split: Literal["fixed", "min_padding"] = "fixed",
        val_fraction: float = 0.0,
        num_workers: int = 2,
        seed: int = 0,
        on_bad_record: OnBad = "raise",
        verify_images: bool = False,
        image_aspect_ratio: ImageAspectRatio = "pad",
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_image_aspect_ratio(image_aspect_ratio)
        self.data, self.image_root = Path(data), image_root
        self.max_length, self.system_prompt = max_length, system_prompt
        self.batch_size, self.group_by, self.modality_field = batch_size, group_by, modality_field
        self.megabatch, self.val_fraction = megabatch, val_fraction
        self.batch_split = batch_split
        self.num_workers, self.seed = num_workers, seed
        self.on_bad_record, self.verify_images = on_bad_record, verify_images
        self.image_aspect_ratio = image_aspect_ratio
        self.processor: Any = None
        self.report = RecordReport()
        self.sets: dict[str, list[Sample]] = {}
        self._plan: tuple[int, list[int]] | None = None  # (epoch, supervised tokens per step)

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        if self.processor is None:
            self.processor = self.trainer.lightning_module.processor  # type: ignore[union-attr]
        # the model's own processor: what the export saves beside the weights
        set_image_aspect_ratio(self.processor, self.image_aspect_ratio)
        self.root = ImageRoot(self.image_root)
        samples = self.read()
        self.sets = self._split(samples)
        if not self.sets["train"]:
            raise ValueError(f"no usable training samples in {self.data} ({self.report!r})")

    def supervised_tokens(
        self, epoch: int, batch: int, accumulate: int, n_batches: int | None = None
    ) -> tuple[int, int]:
        """Supervised tokens (those the loss counts) of training step ``batch`` of ``epoch``
        over all processes, and of its gradient-accumulation window (``accumulate``
        micro-batches; the epoch's last window, cut at ``n_batches``, may be shorter), read
        from the batch plan: the loss can then weight every token of an optimiser step alike,
        as one large batch would, without waiting for the window's later batches
        (``LlavaTuner.training_step``). Samples whose image fails to load while training
        still count (their tokens are planned, not trained): a rare, small under-weighting."""
        if self._plan is None or self._plan[0] != epoch:
            sampler = self.sampler("train", shuffle=True)
            sampler.set_epoch(epoch)
            samples = self.sets["train"]
            counts = [int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples]
            self._plan = (epoch, [sum(counts[i] for i in b) for b in sampler.step_batches()])
        plan = self._plan[1]
        start = batch // accumulate * accumulate
        end = start + accumulate if n_batches is None else min(start + accumulate, n_batches)
        return plan[batch], sum(plan[start:end])

    def train_batches(self) -> int:
        """This process's training batches per epoch (``len`` of its loader), without building
        the loader (see ``LlavaTuner.total_steps``)."""
        return len(self.sampler("train", shuffle=True))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader("val", shuffle=False)] if self.sets.get("val") else []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of the data (the evaluator of a tuner checkpoint reads the
        image preprocessing the model was trained with from it)."""
        return {"image_aspect_ratio": self.image_aspect_ratio}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run: warn when its images are preprocessed unlike the run it continues."""
        trained = state_dict.get("image_aspect_ratio")
        if trained is not None and trained != self.image_aspect_ratio:
            rank_zero_warn(
                f"data.init_args.image_aspect_ratio is {self.image_aspect_ratio!r}, but the "
                f"checkpoint's run trained with {trained!r}: the resumed steps see other pixels"
            )

    # -- reading ---------------------------------------------------------------------------

    def read(self) -> list[Sample]:
        """Every usable sample of the file, tokenised; bad ones raised or counted."""
        tok = self.processor.tokenizer
        n_image = image_token_count(self.processor)
        samples: list[Sample] = []
        seen: set[str] = set()
        on_bad = self.on_bad_record
        for pos, kind, obj in iter_objects(self.data, on_bad=on_bad, report=self.report):
            try:
                sample, truncated = self._sample(obj, pos, kind, tok, n_image, seen)
            except BadRecordError as err:
                handle_bad(err, on_bad, self.report)
                continue
            if truncated:
                self.report.repair("truncated", example=f"{self.data}: record {pos} truncated")
            self.report.kept()
            samples.append(sample)
        return samples

    def _sample(
        self, obj: Any, pos: int, kind: Any, tok: Any, n_image: int, seen: set[str]
    ) -> tuple[Sample, bool]:
        def bad(reason: str, field: str | None, category: str) -> BadRecordError:
            return BadRecordError(self.data, pos, reason, field, kind=kind, category=category)

        if not isinstance(obj, dict):
            raise bad("expected an object", None, "invalid_record")
        sid = obj.get("id")
        if sid is None or isinstance(sid, bool):
            raise bad("missing id", "id", "invalid:id")
        sid = str(sid)
        if sid in seen:
            raise bad(f"duplicate id {sid!r}", "id", "duplicate_id")
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise bad(f"sample {sid!r} has no image", "image", "missing_image")
        try:
            turns = [Turn.model_validate(t) for t in obj.get("conversations") or []]
        except ValidationError as exc:
            raise bad_from_validation(
                exc, self.data, pos, kind=kind, field_prefix="conversations"
            ) from exc
        try:
            self.root.resolve(image)
            if self.verify_images:
                self.root.load(image)
        except (UnsafePathError, FileNotFoundError, OSError, ValueError) as err:
            raise bad(f"sample {sid!r}: {err}", "image", "bad_image") from err
        try:
            rendered = render(turns, self.system_prompt)
            enc = encode(rendered, tok, n_image, self.max_length)
        except ConversationError as err:
            raise bad(f"sample {sid!r}: {err}", err.field, err.category) from err
        seen.add(sid)
        modality = str(obj.get(self.modality_field) or "image")
        return Sample(sid, image, enc.input_ids, enc.labels, modality, pos), enc.truncated

    def _split(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        if not self.val_fraction:
            return {"train": samples, "val": []}
        images = sorted({s.image for s in samples})
        rng = np.random.default_rng(self.seed)
        n_val = max(1, round(len(images) * self.val_fraction))
        held = set(rng.permutation(images)[:n_val].tolist())
        return {
            "train": [s for s in samples if s.image not in held],
            "val": [s for s in samples if s.image in held],
        }

    # -- loaders ---------------------------------------------------------------------------

    def sampler(self, name: str, shuffle: bool) -> GroupedBatchSampler:
        """The batch order of a split (rank-aware: Lightning must not add its own sampler)."""
        samples = self.sets[name]
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if world > 1 and trainer._accelerator_connector.use_distributed_sampler:  # type: ignore[union-attr]
            raise ValueError(
                "the tuner's batch sampler splits batches between processes itself: set "
                "trainer.use_distributed_sampler: false (conf/strategy/*.yaml do)"
            )
        by_length = self.group_by != "none"
        return GroupedBatchSampler(
            [len(s) if by_length else 1 for s in samples],
            [s.modality if self.group_by == "modality_length" else "all" for s in samples],
            self.batch_size,
            seed=self.seed,
            megabatch=self.megabatch if by_length else 1,
            shuffle=shuffle,
            longest_first=by_length,
            num_replicas=world,
            rank=rank,
            split=self.batch_split if by_length else "fixed",
        )

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds = TuningDataset(
            self.sets[name],
            self.root,
            self.processor.image_processor,
            skip_bad=self.on_bad_record == "skip",
        )
        kwargs: dict[str, Any] = {
            "batch_sampler": self.sampler(name, shuffle),
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": PadCollate(self.processor.tokenizer.pad_token_id),
        }
        trainer = getattr(self, "trainer", None)
        if name != "train" or trainer is None:
            return DataLoader(ds, **kwargs)
        return GroupedLoader(ds, progress=partial(trained_batches, trainer), **kwargs)

    # -- what the run records --------------------------------------------------------------

    def upstream_runs(self) -> dict[str, list[str]]:
        """The ``select`` run that wrote the data (its manifest beside it), for lineage tags."""
        run_id = upstream_run_of(self.data)
        return {"selected": [run_id]} if run_id else {}

    def describe(self) -> dict[str, Any]:
        """Input (hash, upstream selection run), kept/skipped/truncated counts, token totals."""
        inputs: dict[str, Any] = {"image_root": str(self.image_root)}
        if self.data.is_file():
            inputs["data"] = {"path": str(self.data), "sha256": sha256_file(self.data)}
            manifest = self.data.parent / "manifest.json"
            if manifest.is_file():
                try:
                    m = json.loads(manifest.read_text())
                    inputs["selection_manifest"] = {
                        "path": str(manifest),
                        "upstream_run": m.get("mlflow_run_id") or m.get("run_id"),
                        "kept": m.get("kept"),
                    }
                except (ValueError, AttributeError):
                    inputs["selection_manifest"] = {"path": str(manifest), "readable": False}
        tokens = {}
        for name, samples in self.sets.items():
            lengths = [len(s) for s in samples]
            tokens[name] = {
                "samples": len(samples),
                "tokens": int(sum(lengths)),
                "supervised_tokens": int(sum((s.labels != IGNORE_INDEX).sum() for s in samples)),
                "max_length": max(lengths, default=0),
            }
        return {
            "inputs": inputs,
            "records": {"data": self.report.as_dict()},
            "truncated": self.report.repaired_by_reason.get("truncated", 0),
            "tokens": tokens,
            "max_length": self.max_length,
            "group_by": self.group_by,
            "image_aspect_ratio": self.image_aspect_ratio,
        }
