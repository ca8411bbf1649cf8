"""Medical VQA evaluation of a LLaVA model through ``python -m biomedvital test``.

:class:`VQADataModule` serves a benchmark split (``load_benchmark``) with its images;
:class:`VQAEvaluator` answers every question by batched greedy decoding (left padding), writes
``predictions.jsonl`` (``question_id``, ``prompt``, ``text``, ``model_id``, as LLaVA-Med's
``model_vqa`` writes it) and ``scores.json`` into the run folder (``trainer.default_root_dir``),
and logs ``test/<name>/<metric>`` (LLaVA-Med's metrics, :mod:`.metrics`) and the predictions to
MLflow.

Which weights are evaluated:

* ``model: local-dir:PATH`` (or ``hf:ID``): a Hugging Face LLaVA folder, e.g. the tuner's
  ``export/merged`` (the recommended way: the merged model is what is shipped);
* ``checkpoint: FILE`` (``--model.init_args.checkpoint``) with ``model`` unset: a ``LlavaTuner``
  checkpoint. Such a checkpoint holds only the trainable tensors (LoRA adapters, projector), so
  the evaluator rebuilds the very same ``LlavaTuner`` from the checkpoint's hyper-parameters (base
  model, LoRA rank, targets...), checks that every checkpoint tensor has a place and every
  trainable tensor is present, and loads them. ``base_model`` replaces the checkpoint's
  base-model name (e.g. a ``local-dir:`` copy of the ``hf:`` base on an offline cluster); giving
  both ``model`` and a checkpoint is refused, since one of them would be silently ignored.
  The same happens for Lightning's ``--ckpt_path`` (``on_load_checkpoint``), but LightningCLI
  replaces the configured model class by the checkpoint's own (``LlavaTuner``) before that, so
  through the CLI use ``checkpoint`` (or a CLI that keeps the configured class).

Several processes (``--trainer.devices 8 --trainer.strategy ddp``, or ``torchrun``) answer
whole batches dealt round-robin (:class:`.sharding.BatchShards`: no question repeated or
dropped, every batch as one process would form it); the answers are gathered, and the metrics
computed from them in the benchmark's order, batch by batch, as one process would. So the files
and scores are those of a one-process run (a test runs 2 processes against 1).

Answers are journaled batch by batch in the run folder (:mod:`.answer_journal`): a killed run,
rerun with the same command (and any number of processes), answers only the batches it had not
answered, and writes what an uninterrupted run writes (tests kill it at random instants).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset

from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.jsonio import write_json, write_jsonl
from biomedvital.data.report import BadRecordError

from . import prompting
from .answer_journal import AnswerJournal, files_signature
from .benchmarks import BENCHMARKS, VQAItem, benchmark_files, load_benchmark, split_stats
from .metrics import CLOSED_RULES, ClosedRule, VQAClosedAccuracy, VQAOpenMetrics
from .sharding import BatchShards, batches_to_answer

DType = Literal["float32", "bfloat16", "float16"]
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


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
        world, rank, done = 1, 0, frozenset()
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
            done = getattr(trainer.lightning_module, "done_batches", frozenset())
        # whole batches per process, none padded or repeated; those a killed run answered skipped
        sampler = BatchShards(dataset, self.batch_size, world, rank, done)
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
        # PIL images and question records: the processor's tensors are moved in ``VQAEvaluator.answer``
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


def is_tuner_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """A ``LlavaTuner`` checkpoint: its hyper-parameters name a model and a tuning mode."""
    hp = checkpoint.get("hyper_parameters") or {}
    return "model" in hp and hp.get("mode") in ("lora", "full") and "state_dict" in checkpoint


def tuner_from_hparams(hparams: dict[str, Any], base_model: str | None = None) -> Any:
    """The ``LlavaTuner`` a checkpoint was written by (its init arguments only)."""
    from biomedvital.tuning import LlavaTuner

    accepted = set(inspect.signature(LlavaTuner.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    if base_model is not None:
        kwargs["model"] = base_model
    return LlavaTuner(**kwargs)


class VQAEvaluator(LightningModule):
    """Greedy answers of a LLaVA model to VQA questions, scored with LLaVA-Med's metrics.

    Args:
        model: ``local-dir:PATH`` / ``hf:ID`` / ``tiny:NAME`` (tuning registry); leave unset to
            evaluate a tuner checkpoint.
        checkpoint: a ``LlavaTuner`` checkpoint (``.ckpt``) to evaluate, rebuilt from its
            hyper-parameters (see the module docstring).
        base_model: with a checkpoint: replaces the base model named in the checkpoint.
        max_new_tokens: generation budget per answer.
        prompt_suffix: appended to every question (after a space), e.g. an answer-format hint.
        closed_prompt_suffix: appended to closed questions only (LLaVA-Med's "Please choose from
            the following two options: [yes, no]"); empty by default.
        system_prompt: text before ``USER:``; by default the one the model was tuned with, as
            its export records it (``run.json``), else LLaVA-1.5's vicuna_v1 system.
        closed_rule: ``llava_med`` · ``llava_med_original`` · ``strict`` (see ``metrics``).
        dtype: dtype the weights are loaded in (``None``: the checkpoint's; float32 for tiny).
        seed: seed of random weights (``tiny:`` only).
        write_predictions: write ``predictions.jsonl`` and ``scores.json`` into the run folder
            and log them to MLflow.
        resume: journal the answers batch by batch in the run folder, and take those of a killed
            run with the same model, settings and data instead of answering them again.
    """

    def __init__(
        self,
        model: str | None = None,
        checkpoint: str | None = None,
        base_model: str | None = None,
        max_new_tokens: int = 64,
        prompt_suffix: str = "",
        closed_prompt_suffix: str = "",
        system_prompt: str | None = None,
        closed_rule: ClosedRule = "llava_med",
        dtype: DType | None = None,
        seed: int = 0,
        write_predictions: bool = True,
        resume: bool = True,
    ) -> None:
        super().__init__()
        if closed_rule not in CLOSED_RULES:
            raise ValueError(f"closed_rule must be one of {CLOSED_RULES}, got {closed_rule!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.save_hyperparameters()
        self.model: Any = None
        self.processor: Any = None
        self.source: str | None = None
        # computed from every answer on each process (never summed across processes)
        self.open_metric = VQAOpenMetrics(sync_on_compute=False)
        self.closed_metric = VQAClosedAccuracy(closed_rule, sync_on_compute=False)
        self.rows: list[dict[str, Any]] = []
        self.indices: list[int] = []  # each row's place in the split (rows of several ranks merge)
        self.truth: list[list[str]] = []  # each row's [answer type, reference answer]
        self.journal: AnswerJournal | None = None
        self.journaled: dict[int, dict[str, Any]] = {}  # batches a killed run answered
        self.resumed: dict[str, Any] | None = None  # what was taken from the journal (run record)
        self.upstream_run: str | None = None
        self.trained_system: str | None = None  # the export's training system prompt

    # -- building ----------------------------------------------------------------------------

    def _torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.hparams.dtype) if self.hparams.dtype else None

    def build(self) -> None:
        """Load ``model`` from the registry (done in ``setup``; call it when used without a
        Trainer)."""
        from biomedvital.tracking.checkpoints import load_checkpoint
        from biomedvital.tuning.models import create_llava

        if self.model is not None:
            return
        if self.hparams.checkpoint:
            path = self.hparams.checkpoint
            ckpt = load_checkpoint(path, mmap=True)  # weights_only: never runs pickled code
            self.load_tuner_checkpoint(ckpt, str(path))
            self.load_state_dict(ckpt["state_dict"], strict=False)  # keys checked above
            self.upstream_run = ckpt.get("mlflow_run_id")
            return
        if not self.hparams.model:
            return
        bundle = create_llava(self.hparams.model, seed=self.hparams.seed, dtype=self._torch_dtype())
        self._attach(bundle.model, bundle.processor, self.hparams.model)
        self.upstream_run = exported_by(self.hparams.model)
        self.trained_system = _export_record(self.hparams.model).get("system_prompt")

    def _attach(self, model: Any, processor: Any, source: str) -> None:
        model.eval()
        tok = processor.tokenizer
        tok.padding_side = "left"  # generation continues every row from its last token
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        self.model, self.processor, self.source = model, processor, source

    def load_tuner_checkpoint(self, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
        """Rebuild the checkpoint's ``LlavaTuner`` (weights are then loaded by Lightning, or by
        :meth:`load_state_dict` when called by hand) and check the tensors fit it."""
        if not is_tuner_checkpoint(checkpoint):
            raise ValueError(
                f"{source}: not a LlavaTuner checkpoint (no 'model'/'mode' hyper-parameters); "
                "evaluate a Hugging Face folder with model: local-dir:PATH instead"
            )
        if self.hparams.model:
            raise ValueError(
                f"both model={self.hparams.model!r} and a tuner checkpoint ({source}) were given; "
                "set one (base_model= replaces the checkpoint's base model name)"
            )
        hp = dict(checkpoint["hyper_parameters"])
        if self.hparams.dtype:
            hp["dtype"] = self.hparams.dtype
        tuner = tuner_from_hparams(hp, self.hparams.base_model)
        state = checkpoint["state_dict"]
        ours = set(tuner.state_dict())
        unexpected = sorted(set(state) - ours)
        if unexpected:
            raise KeyError(
                f"{source}: {len(unexpected)} tensor(s) have no place in the rebuilt "
                f"{hp.get('model')!r} ({hp.get('mode')}) model, e.g. {unexpected[0]}"
            )
        missing = sorted(tuner.trainable_keys() - set(state))
        if missing:
            raise KeyError(f"{source}: lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}")
        # keys are "model.…" in both modules: Lightning's load fills self.model's trained tensors
        self.strict_loading = False
        name = self.hparams.base_model or str(hp.get("model"))
        self._attach(tuner.model, tuner.processor, f"{name} + {source}")

    def setup(self, stage: str) -> None:
        self.build()
        logger = self.logger
        if self.upstream_run and logger is not None and hasattr(logger, "run_id"):
            logger.experiment.set_tag(logger.run_id, "upstream_run", self.upstream_run)
        hp = self.hparams
        journaled = hp.resume and hp.write_predictions
        if stage == "test" and journaled and isinstance(self.trainer.datamodule, VQADataModule):
            self.open_journal()

    # -- resuming ----------------------------------------------------------------------------

    @property
    def done_batches(self) -> frozenset[int]:
        """Batches answered by a killed run (the DataModule's sampler skips them)."""
        return frozenset(self.journaled)

    def fingerprint(self) -> dict[str, Any]:
        """What the answers depend on: a journal of another fingerprint is never resumed."""
        hp, trainer = self.hparams, self.trainer
        dm = trainer.datamodule
        ckpt = trainer.ckpt_path
        paths = [hp.checkpoint, ckpt]
        if hp.model and hp.model.startswith("local-dir:"):
            paths.append(Path(hp.model.removeprefix("local-dir:")).expanduser())
        described = dm.describe()
        return {
            "model": hp.model,
            "checkpoint": hp.checkpoint,
            "base_model": hp.base_model,
            "ckpt_path": str(ckpt) if ckpt else None,
            "weights": [files_signature(p) for p in paths if p],
            # hf: models: the hub snapshot's commit (a model updated on the hub between a kill
            # and its resume must not have its answers mixed with the old weights')
            "revision": getattr(getattr(self.model, "config", None), "_commit_hash", None),
            "generation": {
                **{
                    k: hp[k]
                    for k in ("max_new_tokens", "prompt_suffix", "closed_prompt_suffix")
                    + ("system_prompt", "dtype", "seed")
                },
                "system_prompt_used": self.system_prompt(),
            },
            "precision": str(trainer.precision),
            "data": {k: described[k] for k in ("benchmark", "split", "data", "limit")},
            "image_root": described["image_root"],
            "batch_size": dm.batch_size,
        }

    def open_journal(self) -> None:
        """Read every process's journal of this fingerprint (a killed run's answers); then, and
        only then, may any process append to its own."""
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

        trainer = self.trainer
        self.journal = AnswerJournal(
            trainer.default_root_dir, self.fingerprint(), trainer.global_rank
        )
        self.journaled = self.journal.load()
        for path in self.journal.foreign():
            rank_zero_warn(f"{path}: answers of another model, setting or data file; ignored")
        if self.journaled:
            n = sum(len(e["rows"]) for e in self.journaled.values())
            rank_zero_info(
                f"resuming: {len(self.journaled)} batch(es), {n} answer(s) from "
                f"{len(self.journal.files())} journal file(s) in {trainer.default_root_dir}"
            )
        if trainer.world_size > 1:
            trainer.strategy.barrier("vqa_journal_read")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's ``ckpt_path``: rebuild the tuner, then Lightning loads its tensors."""
        if self.hparams.checkpoint:
            raise ValueError("both checkpoint= and a Lightning ckpt_path were given; set one")
        self.load_tuner_checkpoint(checkpoint, "ckpt_path")

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

    @torch.no_grad()
    def answer(self, images: list[Any], questions: list[str]) -> list[str]:
        """Greedy answers to a batch of (image, question) pairs, left-padded, decoded."""
        from biomedvital.tuning.conversation import prompt

        if self.model is None:
            raise RuntimeError(
                "no model: set model (local-dir:PATH, hf:ID, tiny:NAME) or checkpoint (a tuner .ckpt)"
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
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        items: list[VQAItem] = batch["items"]
        prompts = [self.question_text(it) for it in items]
        texts = self.answer(batch["images"], prompts)
        indices = batch.get("indices")
        if not indices or None in indices:  # a batch collated by hand: in arrival order
            indices = list(range(len(self.indices), len(self.indices) + len(items)))
        rows = [
            {"question_id": it.question_id, "prompt": p, "text": text, "model_id": self.source}
            for it, p, text in zip(items, prompts, texts, strict=True)
        ]
        truth = [[it.answer_type, it.answer] for it in items]
        self.rows += rows
        self.indices += indices
        self.truth += truth
        if self.journal is not None:
            size = self.trainer.datamodule.batch_size
            first = indices[0] // size
            if list(indices) != list(range(first * size, first * size + len(indices))):
                raise RuntimeError("journaled batches must be whole one-process batches")
            self.journal.append(first, list(indices), rows, truth)

    def on_test_epoch_start(self) -> None:
        self.rows, self.indices, self.truth = [], [], []
        self.resumed = None
        if not self.journaled or not self.trainer.is_global_zero:
            return
        # rank 0 holds the killed run's answers, but for the batches answered again this run
        dm = self.trainer.datamodule
        n_batches = math.ceil(len(dm.load_items()) / dm.batch_size)
        again = set(batches_to_answer(n_batches, self.journaled, self.trainer.world_size))
        kept = [b for b in sorted(self.journaled) if b not in again]
        for b in kept:
            entry = self.journaled[b]
            self.rows += entry["rows"]
            self.indices += entry["indices"]
            self.truth += entry["truth"]
        self.resumed = {
            "batches": len(kept),
            "answers": len(self.rows),
            "torn_journal_lines": self.journal.torn_lines if self.journal else 0,
        }

    def on_test_epoch_end(self) -> None:
        if self.journal is not None:
            self.journal.close()
        dm = self.trainer.datamodule
        name = getattr(dm, "name", "vqa")
        rows, truth = self.gathered()
        scores = self.score(truth, [r["text"] for r in rows], getattr(dm, "batch_size", 1))
        logged = {f"test/{name}/{k}": float(v) for k, v in scores.items() if v is not None}
        # every process computed the same values from all the answers
        self.log_dict(logged, batch_size=max(len(rows), 1), sync_dist=self.trainer.world_size > 1)
        if self.resumed and self.logger is not None and hasattr(self.logger, "log_hyperparams"):
            self.logger.log_hyperparams({"resumed_batches": self.resumed["batches"]})
        total = len(dm.load_items()) if hasattr(dm, "load_items") else len(rows)
        # the benchmark's questions: a run limited by ``limit`` covers fewer, not its figure
        full = getattr(dm, "n_benchmark", None) or total
        if len(rows) < total:  # limit_test_batches, fast_dev_run: not the benchmark's figures
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{len(rows)} of {total} questions answered (trainer limits): the scores are "
                "marked partial and the answer journal is kept for a full run to resume"
            )
        if self.hparams.write_predictions and self.trainer.is_global_zero:
            self._write(name, scores, rows, answered=(len(rows), full))
            if self.journal is not None and len(rows) == total:
                self.journal.remove()  # its answers are in the predictions file now

    def score(
        self, truth: list[list[str]], texts: list[str], batch_size: int
    ) -> dict[str, float | int | None]:
        """LLaVA-Med's metrics over the answers in the split's order, added batch by batch as
        one uninterrupted process adds them (so the sums, and the scores, are bit-identical
        whatever the number of processes or restarts); chat answers are counted only."""
        self.open_metric.reset()
        self.closed_metric.reset()
        size = max(batch_size, 1)
        for start in range(0, len(texts), size):
            chunk = list(zip(truth[start : start + size], texts[start : start + size], strict=True))
            for kind, metric in (("open", self.open_metric), ("closed", self.closed_metric)):
                pairs = [(text, answer) for (k, answer), text in chunk if k == kind]
                if pairs:
                    metric.update([t for t, _ in pairs], [a for _, a in pairs])
        with warnings.catch_warnings():
            # a split without open (or closed) questions is legitimate: its figures are NaN
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            values = {**self.open_metric.compute(), **self.closed_metric.compute()}
        scores: dict[str, float | int | None] = {}
        for key, value in values.items():
            v = float(value)
            scores[key] = int(v) if key.startswith("n_") else (None if math.isnan(v) else v)
        n_chat = sum(1 for kind, _ in truth if kind == "chat")
        if n_chat:  # open-ended answers: written for ``judge``, scored there
            scores["n_chat"] = n_chat
        return scores

    def gathered(self) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """Every process's answers and their truth, in the split's order (one process: its own,
        sorted)."""
        world = self.trainer.world_size
        parts: list[Any] = [(self.indices, self.rows, self.truth)]
        if world > 1:
            import torch.distributed as dist

            parts = [None] * world
            dist.all_gather_object(parts, (self.indices, self.rows, self.truth))
        merged = sorted(
            (
                (i, row, truth)
                for indices, rows, truths in parts
                for i, row, truth in zip(indices, rows, truths, strict=True)
            ),
            key=lambda entry: entry[0],
        )
        order = [i for i, _, _ in merged]
        if len(set(order)) != len(order):
            raise RuntimeError(
                "a question was answered twice: the test DataLoader's sampler was replaced "
                "(keep VQADataModule's BatchShards)"
            )
        return [row for _, row, _ in merged], [truth for _, _, truth in merged]

    def _write(
        self,
        name: str,
        scores: dict[str, Any],
        rows: list[dict[str, Any]],
        answered: tuple[int, int],
    ) -> None:
        out = Path(self.trainer.default_root_dir)
        preds = out / PREDICTIONS_FILE
        write_jsonl(preds, rows)
        dm = self.trainer.datamodule
        result = {
            "name": name,
            "closed_rule": self.hparams.closed_rule,
            "model": self.source,
            **scores,
            "answered": answered[0],
            "partial": answered[0] < answered[1],
            "data": dm.describe() if hasattr(dm, "describe") else None,
            "predictions": {"path": str(preds), "sha256": sha256_file(preds)},
        }
        write_json(out / SCORES_FILE, result)
        logger = self.logger
        if logger is not None and hasattr(logger, "run_id") and hasattr(logger, "experiment"):
            # as for judge / pairwise: a run over part of the benchmark says so in the store
            logger.experiment.set_tag(logger.run_id, "partial", str(result["partial"]).lower())
            logger.experiment.log_artifact(logger.run_id, str(preds), f"eval/{name}")
            logger.experiment.log_artifact(logger.run_id, str(out / SCORES_FILE), f"eval/{name}")


def _export_record(model: str) -> dict[str, Any]:
    """``run.json`` beside or above a ``local-dir:`` model's weights, as ``ExportTuned``
    writes it; ``{}`` when there is none or it cannot be read."""
    if not model.startswith("local-dir:"):
        return {}
    return prompting.export_record(model.removeprefix("local-dir:"))


def exported_by(model: str) -> str | None:
    """The tuning run that exported a ``local-dir:`` model (``run.json`` beside or above the
    merged weights, as ``ExportTuned`` writes), for the evaluation run's lineage tag."""
    run_id = _export_record(model).get("mlflow_run_id")
    return run_id if isinstance(run_id, str) else None
