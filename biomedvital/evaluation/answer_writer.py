"""The VQA evaluator's answers from generation to files: journaled batch by batch, gathered
from every process in the split's order, scored, logged and written (as ``ScoreWriter`` is for
the selector's scores).

Answers are journaled in the run folder (:mod:`.answer_journal`): a killed run, rerun with the
same command (and any number of processes), answers only the batches it had not answered, and
writes what an uninterrupted run writes. Several processes answer whole batches dealt
round-robin (:class:`.sharding.BatchShards`); the answers are gathered and scored in the
benchmark's order, batch by batch, as one process would, so the files and scores are those of
a one-process run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import write_json, write_jsonl

from .answer_journal import AnswerJournal
from .benchmarks import VQAItem
from .metrics import ClosedRule
from .sharding import batches_to_answer
from .vqa_scores import Scores, n_hit_max_new_tokens, score_answers

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@runtime_checkable
class QuestionSplit(Protocol):
    """What the writer reads of the data module (``VQADataModule``'s shape): a named split
    served in batches of ``batch_size``, and the batches a killed run answered, which the
    writer sets before the loader is built and its sampler skips."""

    name: str
    batch_size: int
    n_benchmark: int | None
    done_batches: frozenset[int]

    def load_items(self) -> list[VQAItem]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Answerer(Protocol):
    """What the writer asks of the model (``VQAEvaluator``'s shape): to be built before the
    journal is keyed, what its answers depend on, and the name written beside them."""

    source: str | None

    def build(self) -> None: ...

    def fingerprint(self) -> dict[str, Any]: ...


class AnswerWriter(Callback):
    """Collects the batches ``test_step`` answers (:meth:`add_batch`); at the epoch's end
    logs ``test/<name>/<metric>`` and, with ``write``, writes ``predictions.jsonl`` and
    ``scores.json`` into ``trainer.default_root_dir`` and logs them to MLflow with the
    ``partial`` tag.

    Args:
        closed_rule: the closed-question rule scores are computed with (see ``metrics``).
        write: write the files and log them to MLflow (the metrics are logged either way).
        resume: with ``write``, journal the answers batch by batch in the run folder, and take
            those of a killed run with the same model, settings and data instead of answering
            them again.
    """

    def __init__(
        self, closed_rule: ClosedRule = "llava_med", write: bool = True, resume: bool = True
    ) -> None:
        self.closed_rule, self.write, self.resume = closed_rule, write, resume
        self.journal: AnswerJournal | None = None
        self.journaled: dict[int, dict[str, Any]] = {}  # batches a killed run answered
        self.resumed: dict[str, Any] | None = None  # what was taken from the journal (run record)
        self.rows: list[dict[str, Any]] = []
        self.indices: list[int] = []  # each row's place in the split (rows of several ranks merge)
        self.truth: list[list[str]] = []  # each row's [answer type, reference answer]

    # -- resuming ----------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, QuestionSplit):
            return
        self.journal, self.journaled = None, {}
        if stage == "test" and self.write and self.resume and isinstance(pl_module, Answerer):
            pl_module.build()  # the journal's key names the weights that answer
            self.open_journal(trainer, pl_module.fingerprint())
        dm.done_batches = frozenset(self.journaled)

    def open_journal(self, trainer: Trainer, fingerprint: dict[str, Any]) -> None:
        """Read every process's journal of this fingerprint (a killed run's answers); then, and
        only then, may any process append to its own."""
        self.journal = AnswerJournal(trainer.default_root_dir, fingerprint, trainer.global_rank)
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

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Rank 0 starts from the killed run's answers, but for the batches answered again."""
        self.rows, self.indices, self.truth = [], [], []
        self.resumed = None
        dm = trainer.datamodule
        if not self.journaled or not trainer.is_global_zero or not isinstance(dm, QuestionSplit):
            return
        n_batches = math.ceil(len(dm.load_items()) / dm.batch_size)
        again = set(batches_to_answer(n_batches, self.journaled, trainer.world_size))
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

    # -- collecting --------------------------------------------------------------------------

    def add_batch(
        self,
        trainer: Trainer,
        rows: list[dict[str, Any]],
        truth: list[list[str]],
        indices: list[int | None] | None,
    ) -> None:
        """One answered batch: kept, and journaled (on disk when this returns). Called by the
        model's ``test_step`` itself rather than from ``on_test_batch_end``, which runs after
        the other callbacks': an answered batch is journaled before any of them can fail."""
        if not indices or None in indices:  # a batch collated by hand: in arrival order
            indices = list(range(len(self.indices), len(self.indices) + len(rows)))
        self.rows += rows
        self.indices += indices
        self.truth += truth
        if self.journal is not None:
            size = trainer.datamodule.batch_size
            first = indices[0] // size
            if list(indices) != list(range(first * size, first * size + len(indices))):
                raise RuntimeError("journaled batches must be whole one-process batches")
            self.journal.append(first, list(indices), rows, truth)

    def gathered(self, trainer: Trainer) -> tuple[list[dict[str, Any]], list[list[str]]]:
        """Every process's answers and their truth, in the split's order (one process: its own,
        sorted)."""
        world = trainer.world_size
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

    # -- writing -----------------------------------------------------------------------------

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.journal is not None:
            self.journal.close()
        dm = trainer.datamodule
        split = dm if isinstance(dm, QuestionSplit) else None
        name = split.name if split else "vqa"
        rows, truth = self.gathered(trainer)
        texts = [r["text"] for r in rows]
        scores = score_answers(truth, texts, split.batch_size if split else 1, self.closed_rule)
        scores["n_hit_max_new_tokens"] = n_hit_max_new_tokens(rows)
        logged = {f"test/{name}/{k}": float(v) for k, v in scores.items() if v is not None}
        # every process computed the same values from all the answers
        pl_module.log_dict(logged, batch_size=max(len(rows), 1), sync_dist=trainer.world_size > 1)
        logger = trainer.logger
        if self.resumed and logger is not None and hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams({"resumed_batches": self.resumed["batches"]})
        total = len(split.load_items()) if split else len(rows)
        # the benchmark's questions: a run limited by ``limit`` covers fewer, not its figure
        full = (split.n_benchmark if split else None) or total
        if len(rows) < total:  # limit_test_batches, fast_dev_run: not the benchmark's figures
            rank_zero_warn(
                f"{len(rows)} of {total} questions answered (trainer limits): the scores are "
                "marked partial and the answer journal is kept for a full run to resume"
            )
        if self.write and trainer.is_global_zero:
            source = pl_module.source if isinstance(pl_module, Answerer) else None
            self.write_files(trainer, name, scores, rows, (len(rows), full), source)
            if self.journal is not None and len(rows) == total:
                self.journal.remove()  # its answers are in the predictions file now

    def write_files(
        self,
        trainer: Trainer,
        name: str,
        scores: Scores,
        rows: list[dict[str, Any]],
        answered: tuple[int, int],
        source: str | None,
    ) -> None:
        """``predictions.jsonl`` and ``scores.json`` (``answered`` of how many questions), as
        files and MLflow artifacts, and the ``partial`` tag."""
        out = Path(trainer.default_root_dir)
        preds = out / PREDICTIONS_FILE
        write_jsonl(preds, rows)
        dm = trainer.datamodule
        result = {
            "name": name,
            "closed_rule": self.closed_rule,
            "model": source,
            **scores,
            "answered": answered[0],
            "partial": answered[0] < answered[1],
            "data": dm.describe() if isinstance(dm, QuestionSplit) else None,
            "predictions": {"path": str(preds), "sha256": sha256_file(preds)},
        }
        write_json(out / SCORES_FILE, result)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id") and hasattr(logger, "experiment"):
            # as for judge / pairwise: a run over part of the benchmark says so in the store
            logger.experiment.set_tag(logger.run_id, "partial", str(result["partial"]).lower())
            logger.experiment.log_artifact(logger.run_id, str(preds), f"eval/{name}")
            logger.experiment.log_artifact(logger.run_id, str(out / SCORES_FILE), f"eval/{name}")
