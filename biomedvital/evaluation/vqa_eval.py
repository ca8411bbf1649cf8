"""Medical VQA evaluation of a LLaVA model through ``python -m biomedvital test``.

:class:`VQADataModule` serves a benchmark split (``load_benchmark``) with its images;
:class:`VQAEvaluator` answers every question by batched decoding (left padding), greedy or
sampled as its ``decoding`` block says (:mod:`.decoding`); its
:class:`~.answer_writer.AnswerWriter` journals the answers, writes ``predictions.jsonl``
(``question_id``, ``prompt``, ``text``, ``model_id``, as LLaVA-Med's ``model_vqa`` writes it, and
``hit_max_new_tokens``) and ``scores.json`` into the run folder (``trainer.default_root_dir``),
and logs ``test/<name>/<metric>`` (LLaVA-Med's metrics, :mod:`.vqa_scores`) and the predictions
to MLflow.

Which weights are evaluated (loaded by :mod:`biomedvital.tuning.models`):

* ``model: local-dir:PATH`` (or ``hf-hub:ID``): a Hugging Face LLaVA folder, e.g. the tuner's
  ``export/merged`` (the recommended way: the merged model is what is shipped);
* ``checkpoint: FILE`` (``--model.init_args.checkpoint``) with ``model`` unset: a ``LlavaTuner``
  checkpoint, rebuilt from its hyper-parameters with its trained tensors. ``base_model``
  replaces the checkpoint's base-model name; giving both ``model`` and a checkpoint is refused,
  since one of them would be silently ignored. The same happens for Lightning's ``--ckpt_path``
  (``on_load_checkpoint``), but LightningCLI replaces the configured model class by the
  checkpoint's own (``LlavaTuner``) before that, so through the CLI use ``checkpoint`` (or a CLI
  that keeps the configured class).

Several processes (``--trainer.devices 8 --trainer.strategy ddp``, or ``torchrun``) answer
whole batches dealt round-robin (:class:`.sharding.BatchShards`: no question repeated or
dropped, every batch as one process would form it); the files and scores are those of a
one-process run, and a killed run resumes from its journal (see :mod:`.answer_writer`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.model_names import parse_model_name
from biomedvital.data.report import BadRecordError
from biomedvital.tuning.models import (
    PREFIXES,
    ImageAspectRatio,
    LoadedLlava,
    check_image_aspect_ratio,
    checkpoint_source,
    load_llava,
    load_tuner_checkpoint,
    prompt,
    recorded_image_aspect_ratio,
    set_image_aspect_ratio,
    tuner_from_checkpoint,
)

from . import prompting
from .answer_journal import files_signature
from .answer_writer import AnswerWriter
from .benchmarks import BENCHMARKS, VQAItem, benchmark_files, load_benchmark, split_stats
from .decoding import Decoding, hit_limit
from .metrics import CLOSED_RULES, ClosedRule
from .sharding import BatchShards

DType = Literal["float32", "bfloat16", "float16"]


# ----------------------------------------------------------------------------- data


class _VQADataset(Dataset):
    def __init__(self, items: list[VQAItem], root: ImageRoot) -> None:
        self.items, self.root = items, root

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"item": item, "image": self.root.load(item.image), "index": i}


def collate_vqa(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Questions, decoded images and their places in the split, as lists; tokenisation belongs
    to the model's processor."""
    return {
        "items": [r["item"] for r in rows],
        "images": [r["image"] for r in rows],
        "indices": [r.get("index") for r in rows],
    }


class VQADataModule(LightningDataModule):
    """One split of a medical VQA benchmark and the folder its images are under.

    Args:
        benchmark: file layout: ``vqa_rad``, ``slake`` (English) or ``pathvqa`` (see
            ``benchmarks``; LLaVA-Med's converted layout is recognised by any of them), or
            ``llava_med_bench`` (open-ended chat: answers are written for ``judge``, not scored).
        data: the benchmark's published file, or the folder holding it.
        image_root: folder the questions' image paths are relative to (escapes are refused);
            for PathVQA's parquet files, where their images are written as they are read.
        split: benchmark split (``test``).
        name: name in metric keys (``test/<name>/<metric>``); default the benchmark's.
        batch_size: questions per generation batch.
        num_workers: DataLoader workers decoding images.
        limit: evaluate only the first ``limit`` questions (smoke tests; recorded).
    """

    def __init__(
        self,
        benchmark: str,
        data: str,
        image_root: str,
        split: str = "test",
        name: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.benchmark, self.data, self.image_root = benchmark, Path(data), Path(image_root)
        self.split, self.name = split, name or benchmark
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.items: list[VQAItem] | None = None
        self.n_benchmark: int | None = None
        # batches a killed run answered: the answer writer sets them, the sampler skips them
        self.done_batches: frozenset[int] = frozenset()
        self._described: dict[str, Any] | None = None

    def load_items(self) -> list[VQAItem]:
        """The questions (loaded once); a file of another layout raises naming the file."""
        if self.items is None:
            # PathVQA's parquet images are written where they are read from (the data folder
            # may be read-only); other layouts ignore it
            items = load_benchmark(
                self.benchmark,  # type: ignore[arg-type]
                self.data,
                self.split,
                image_cache=self.image_root,
            )
            if not items:
                raise ValueError(f"{self.data}: no {self.benchmark} questions in {self.split!r}")
            self.n_benchmark = len(items)  # the split's questions, before ``limit``
            self.items = items[: self.limit] if self.limit is not None else items
        return self.items

    def setup(self, stage: str) -> None:
        self.check_images(self.load_items())

    def check_images(self, items: list[VQAItem]) -> None:
        """Every question's image path stays under the image root and exists: checked before
        any answer is generated, naming the benchmark file and the question."""
        root = ImageRoot(self.image_root)
        for item in items:
            try:
                root.resolve(item.image)
            except (UnsafePathError, FileNotFoundError) as err:
                raise BadRecordError(
                    self.data,
                    None,
                    f"question_id {item.question_id!r}: {err}",
                    "image",
                    category="bad_image",
                ) from err

    def test_dataloader(self) -> DataLoader:
        dataset = _VQADataset(self.load_items(), ImageRoot(self.image_root))
        trainer = self.trainer  # None when the DataModule is used without a Trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # whole batches per process, none padded or repeated; those a killed run answered skipped
        sampler = BatchShards(dataset, self.batch_size, world, rank, self.done_batches)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_vqa,
        )

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # PIL images and question records: the processor's tensors are moved in
        # ``VQAEvaluator.answer``
        return batch

    def describe(self) -> dict[str, Any]:
        """What was evaluated: input hash and split counts (``run.test.json``, ``scores.json``
        and the answer journal's key read it: the file is hashed once)."""
        if self._described is None:
            self._described = {
                "benchmark": self.benchmark,
                "name": self.name,
                "split": self.split,
                "data": _data_files(self.benchmark, self.data, self.split),
                "image_root": str(self.image_root),
                "limit": self.limit,
                "counts": split_stats(self.load_items()),
            }
        return self._described


def _data_files(benchmark: str, data: Path, split: str) -> dict[str, Any]:
    """The benchmark's path and the SHA-256 of what is read from it: the file's own hash, or
    for a folder the files picked in it (one hash over PathVQA's parquet shards)."""
    if data.is_file():
        return {"path": str(data), "sha256": sha256_file(data)}
    files = benchmark_files(benchmark, data, split)  # type: ignore[arg-type]
    hashes = [(str(f.relative_to(data)), sha256_file(f)) for f in files]
    joint = hashes[0][1] if len(hashes) == 1 else _joint_sha(hashes)
    return {"path": str(data), "files": [name for name, _ in hashes], "sha256": joint}


def _joint_sha(hashes: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in hashes:
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Answer:
    """One generated answer: its decoded text, and whether it ran to ``max_new_tokens``
    without an end-of-sequence token."""

    text: str
    hit_max_new_tokens: bool


class VQAEvaluator(LightningModule):
    """A LLaVA model's answers to VQA questions, scored with LLaVA-Med's metrics.

    Args:
        model: ``local-dir:PATH`` / ``hf-hub:ID`` / ``tiny:NAME`` (tuning registry); leave
            unset to evaluate a tuner checkpoint.
        checkpoint: a ``LlavaTuner`` checkpoint (``.ckpt``) to evaluate, rebuilt from its
            hyper-parameters (see the module docstring).
        base_model: with a checkpoint: replaces the base model named in the checkpoint.
        decoding: how answers are decoded (:class:`~.decoding.Decoding`): ``greedy`` (default)
            or ``sample`` (seeded per question), and the answer's length limit
            ``max_new_tokens``.
        prompt_suffix: appended to every question (after a space), e.g. an answer-format hint.
        closed_prompt_suffix: appended to closed questions only (LLaVA-Med's "Please choose from
            the following two options: [yes, no]"); empty by default.
        system_prompt: text before ``USER:``; by default the one the model was tuned with, as
            its export records it (``run.json``), else LLaVA-1.5's vicuna_v1 system.
        closed_rule: ``llava_med`` · ``llava_med_original`` · ``strict`` (see ``metrics``).
        dtype: dtype the weights are loaded in (``None``: the checkpoint's; float32 for tiny).
        image_aspect_ratio: ``pad`` (each image centred on a square of the processor's mean
            colour, then resized: LLaVA-1.5's) or ``crop`` (resized, then centre-cropped).
            ``None``: as the model was trained, when its export or checkpoint records it
            (the tuner's ``image_aspect_ratio``), else ``pad``. A value that differs from the
            recorded one is used, with a warning.
        seed: seed of random weights (``tiny:`` only).
        write_predictions: write ``predictions.jsonl`` and ``scores.json`` into the run folder
            and log them to MLflow.
        resume: journal the answers batch by batch in the run folder, and take those of a killed
            run with the same model, settings and data instead of answering them again.
    """

    MOVED_ARGS: ClassVar[dict[str, str]] = {"max_new_tokens": "decoding.max_new_tokens"}
    """Flat keys of older configs, refused naming their new place."""

    def __init__(
        self,
        model: str | None = None,
        checkpoint: str | None = None,
        base_model: str | None = None,
        decoding: Decoding = Decoding(),  # noqa: B008 - frozen: a default is never changed
        prompt_suffix: str = "",
        closed_prompt_suffix: str = "",
        system_prompt: str | None = None,
        closed_rule: ClosedRule = "llava_med",
        dtype: DType | None = None,
        image_aspect_ratio: ImageAspectRatio | None = None,
        seed: int = 0,
        write_predictions: bool = True,
        resume: bool = True,
    ) -> None:
        super().__init__()
        if image_aspect_ratio is not None:
            check_image_aspect_ratio(image_aspect_ratio)
        if closed_rule not in CLOSED_RULES:
            raise ValueError(f"closed_rule must be one of {CLOSED_RULES}, got {closed_rule!r}")
        self.decoding = Decoding.of(decoding)
        self.save_hyperparameters()
        self.hparams["decoding"] = self.decoding.public()
        self.model: Any = None
        self.processor: Any = None
        self.source: str | None = None  # the model's name beside each answer
        self.upstream_run: str | None = None
        self.trained_system: str | None = None  # the export's training system prompt
        # the image preprocessing used, and the one the model's export or checkpoint records
        self.image_aspect_ratio: str | None = None
        self.trained_image_aspect_ratio: str | None = None
        self.writer: AnswerWriter | None = None

    # -- building ----------------------------------------------------------------------------

    def _torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.hparams.dtype) if self.hparams.dtype else None

    def build(self) -> None:
        """Load ``model`` or ``checkpoint`` (done in ``setup``; call it when used without a
        Trainer)."""
        hp = self.hparams
        if self.model is not None:
            return
        if hp.checkpoint:
            self._refuse_model_with(str(hp.checkpoint))
            loaded = load_tuner_checkpoint(hp.checkpoint, base_model=hp.base_model, dtype=hp.dtype)
            self._attach(loaded)
        elif hp.model:
            self._attach(load_llava(hp.model, seed=hp.seed, dtype=self._torch_dtype()))

    def _refuse_model_with(self, source: str) -> None:
        if self.hparams.model:
            raise ValueError(
                f"both model={self.hparams.model!r} and a tuner checkpoint ({source}) were given; "
                "set one (base_model= replaces the checkpoint's base model name)"
            )

    def _attach(self, loaded: LoadedLlava) -> None:
        loaded.model.eval()
        tok = loaded.processor.tokenizer
        tok.padding_side = "left"  # generation continues every row from its last token
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        self.model, self.processor, self.source = loaded.model, loaded.processor, loaded.source
        self.upstream_run, self.trained_system = loaded.upstream_run, loaded.trained_system
        self._set_image_aspect_ratio()

    def _set_image_aspect_ratio(self) -> None:
        """Preprocess images as configured, else as the model was trained (else ``pad``); warn
        when the configured value is not the trained one."""
        asked = self.hparams.image_aspect_ratio
        trained = recorded_image_aspect_ratio(self.processor.image_processor)
        if asked is not None and trained is not None and asked != trained:
            rank_zero_warn(
                f"model.init_args.image_aspect_ratio is {asked!r}, but {self.source} was trained "
                f"with {trained!r}: its images are preprocessed unlike in training (leave it "
                "unset to use the trained one)"
            )
        self.image_aspect_ratio = asked or trained or "pad"
        self.trained_image_aspect_ratio = trained
        set_image_aspect_ratio(self.processor, self.image_aspect_ratio)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's ``ckpt_path``: rebuild the tuner, then Lightning loads its tensors (keys
        are ``model.…`` in both modules)."""
        hp = self.hparams
        if hp.checkpoint:
            raise ValueError("both checkpoint= and a Lightning ckpt_path were given; set one")
        self._refuse_model_with("ckpt_path")
        tuner = tuner_from_checkpoint(
            checkpoint, "ckpt_path", base_model=hp.base_model, dtype=hp.dtype or None
        )
        self.strict_loading = False  # only the trained tensors are in the checkpoint
        name = checkpoint_source(checkpoint, "ckpt_path", hp.base_model)
        self._attach(LoadedLlava(tuner.model, tuner.processor, name))

    def configure_callbacks(self) -> list[Callback]:
        """The :class:`~.answer_writer.AnswerWriter` that journals, scores and writes."""
        hp = self.hparams
        self.writer = AnswerWriter(hp.closed_rule, hp.write_predictions, hp.resume)
        return [self.writer]

    def setup(self, stage: str) -> None:
        self.build()
        logger = self.logger
        if logger is not None and hasattr(logger, "run_id"):
            if self.upstream_run:
                logger.experiment.set_tag(logger.run_id, "upstream_run", self.upstream_run)
            if self.image_aspect_ratio:
                logger.experiment.set_tag(
                    logger.run_id, "image_aspect_ratio", self.image_aspect_ratio
                )

    # -- resuming ----------------------------------------------------------------------------

    @property
    def resumed(self) -> dict[str, Any] | None:
        """What this run took from a killed run's journal (``run.test.json`` records it)."""
        return self.writer.resumed if self.writer is not None else None

    @property
    def resolved(self) -> dict[str, Any] | None:
        """The image preprocessing used and the one the model records (``run.test.json``)."""
        if self.image_aspect_ratio is None:
            return None
        return {
            "image_aspect_ratio": self.image_aspect_ratio,
            "trained_image_aspect_ratio": self.trained_image_aspect_ratio,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What the answers depend on: a journal of another fingerprint is never resumed."""
        hp, trainer = self.hparams, self.trainer
        dm = trainer.datamodule
        ckpt = trainer.ckpt_path
        paths = [hp.checkpoint, ckpt]
        parsed = parse_model_name(hp.model, PREFIXES) if hp.model else None
        if parsed is not None and parsed.prefix == "local-dir:":
            paths.append(Path(parsed.value).expanduser())
        described = dm.describe()
        return {
            "model": hp.model,
            "checkpoint": hp.checkpoint,
            "base_model": hp.base_model,
            "ckpt_path": str(ckpt) if ckpt else None,
            "weights": [files_signature(p) for p in paths if p],
            # hub models: the snapshot's commit (a model updated on the hub between a kill and
            # its resume must not have its answers mixed with the old weights')
            "revision": getattr(getattr(self.model, "config", None), "_commit_hash", None),
            "image_aspect_ratio": self.image_aspect_ratio,
            "generation": {
                "decoding": self.decoding.public(),
                **{
                    k: hp[k]
                    for k in ("prompt_suffix", "closed_prompt_suffix")
                    + ("system_prompt", "dtype", "seed")
                },
                "system_prompt_used": self.system_prompt(),
            },
            "precision": str(trainer.precision),
            "data": {k: described[k] for k in ("benchmark", "split", "data", "limit")},
            "image_root": described["image_root"],
            "batch_size": dm.batch_size,
        }

    # -- generation --------------------------------------------------------------------------

    def system_prompt(self) -> str:
        """The system prompt asked with: as configured, else the one the model was tuned with
        (a model tuned without one must not be asked with vicuna_v1's)."""
        return prompting.system_prompt(self.hparams.system_prompt, self.trained_system)

    def question_text(self, item: VQAItem) -> str:
        hp = self.hparams
        return prompting.question_text(
            item.question, item.answer_type, hp.prompt_suffix, hp.closed_prompt_suffix
        )

    def answer(
        self, images: list[Any], questions: list[str], question_ids: list[str] | None = None
    ) -> list[str]:
        """The answers' texts (:meth:`answer_batch`)."""
        return [a.text for a in self.answer_batch(images, questions, question_ids)]

    @torch.no_grad()
    def answer_batch(
        self, images: list[Any], questions: list[str], question_ids: list[str] | None = None
    ) -> list[Answer]:
        """Answers to a batch of (image, question) pairs, left-padded, decoded as ``decoding``
        says (sampling needs the questions' ids: each seeds its own question's draws)."""
        if self.model is None:
            raise RuntimeError(
                "no model: set model (local-dir:PATH, hf-hub:ID, tiny:NAME) or checkpoint "
                "(a tuner .ckpt)"
            )
        system = self.system_prompt()
        texts = [prompt(q, system) for q in questions]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        vision_dtype = next(self.model.parameters()).dtype
        inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
        tok = self.processor.tokenizer
        out = self.model.generate(
            **inputs,
            **self.decoding.generate_kwargs(question_ids),
            use_cache=True,
            pad_token_id=tok.pad_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        hit = hit_limit(new, self._eos_ids(), self.decoding.max_new_tokens)
        return [Answer(t, h) for t, h in zip(texts, hit, strict=True)]

    def _eos_ids(self) -> list[int]:
        """The tokens that end an answer (the generation config's, else the tokenizer's)."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        """Answer a batch and hand it to the :class:`~.answer_writer.AnswerWriter`: the rows of
        ``predictions.jsonl``, each question's ``[answer type, reference]`` and place in the
        split (``None`` for a batch collated by hand)."""
        items: list[VQAItem] = batch["items"]
        prompts = [self.question_text(it) for it in items]
        ids = [it.question_id for it in items]
        answers = self.answer_batch(batch["images"], prompts, ids)
        rows = [
            {
                "question_id": it.question_id,
                "prompt": p,
                "text": a.text,
                "model_id": self.source,
                "hit_max_new_tokens": a.hit_max_new_tokens,
            }
            for it, p, a in zip(items, prompts, answers, strict=True)
        ]
        truth = [[it.answer_type, it.answer] for it in items]
        if self.writer is not None:
            self.writer.add_batch(self.trainer, rows, truth, batch.get("indices"))
