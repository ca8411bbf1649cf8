"""Writes the selector's scores as they are computed; the file appears only when complete."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from biomedvital.data.jsonio import write_json
from biomedvital.data.outputs import acquire_output, release_output
from biomedvital.data.report import BadRecordError
from biomedvital.tracking.hooks import describe


class ScoreWriter(BasePredictionWriter):
    """Streams ``{"id", "score", "logit"}`` lines to a temporary file, renamed into place at the end.

    ``score`` is the sigmoid of ``logit``; the logit is kept because the sigmoid saturates to
    exactly 1.0 in float32 and ``select`` breaks such ties by it.

    A manifest beside the output (``<output>.manifest.json``) records the checkpoint, the MLflow
    run, counts written and skipped (with reasons), and the score histogram. A NaN score (a
    diverged model; an infinite logit too, which JSON cannot hold) is refused naming the
    candidate, its line and the checkpoint, or with
    ``on_bad_record: skip`` counted as ``nan_score`` like the other records left unscored.

    Several processes (``--trainer.devices N --trainer.strategy ddp``) score alternate chunks of
    the candidate stream, each into its own temporary part; at the end rank 0 merges the parts in
    chunk order, the order of one process, keeping the first score of an id that two chunks hold
    (as one process does), and renames the result into place: the same files as one process.
    On several nodes the output folder must be one they share (as for checkpoints).

    Args:
        output: the scores JSONL to write; default ``<trainer.default_root_dir>/scores.jsonl``.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self._output = output
        self.output = Path(output) if output else Path("scores.jsonl")
        self._tmp: Path | None = None
        self._fh = None
        self._seen: set[str] = set()
        self._skipped: Counter[str] = Counter()
        # (chunk, 0 for a record the stream skipped | 1 for a duplicate, its place, message):
        # the one-process order, whichever process met it; the first 20 are kept
        self._examples: list[tuple[int, int, int, str]] = []
        self._hist = [0] * 10
        self._chunks: list[tuple[int, int]] = []  # (chunk number, lines written), in order
        self._merged: Path | None = None
        self._locked: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.predict_loop.return_predictions = False  # written here: none kept in memory
        if not self._output:
            self.output = Path(trainer.default_root_dir) / "scores.jsonl"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self._locked is None and trainer.is_global_zero:
            # one run per output folder (reentrant under the CLI's lock); taken by rank 0 only
            self._locked = acquire_output(self.output.parent)
        part = f".part{trainer.global_rank}" if trainer.world_size > 1 else ""
        self._tmp = self.output.with_name(f".{self.output.name}{part}.tmp-{os.getpid()}")
        self._fh = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - spans the predict loop
        self._seen.clear()
        self._skipped.clear()
        self._examples.clear()
        self._hist = [0] * 10
        self._chunks.clear()
        self._merged = None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._fh is not None
        chunk = batch.get("chunk", batch_idx) if isinstance(batch, dict) else batch_idx
        for n, (reason, message) in enumerate(prediction["skipped"]):
            self._skipped[reason] += 1
            if len(self._examples) < 20:
                self._examples.append((chunk, 0, n, message))
        lines = []
        scores, logits = prediction["scores"].tolist(), prediction["logits"].tolist()
        positions = _valid_positions(batch, len(prediction["ids"]))
        source = batch.get("file", "scored pool") if isinstance(batch, dict) else "scored pool"
        strict = getattr(trainer.datamodule, "on_bad_record", "raise") != "skip"
        for cid, score, logit, (pos, kind) in zip(
            prediction["ids"], scores, logits, positions, strict=True
        ):
            err = None
            if not (math.isfinite(score) and math.isfinite(logit)):
                # a diverged model: no rank can be given; its id is not taken, so a later
                # record with the same id is scored rather than called a duplicate
                ckpt = trainer.ckpt_path or "the model given (no checkpoint)"
                err = BadRecordError(
                    source,
                    pos,
                    f"candidate {cid!r}: the score is not finite (logit {logit}; checkpoint "
                    f"{ckpt}; diverged training?)",
                    kind=kind,
                    category="nan_score",
                )
            elif cid in self._seen:  # the first occurrence keeps its score
                err = BadRecordError(
                    source, pos, f"duplicate id {cid!r}", "id", kind=kind, category="duplicate_id"
                )
            if err is not None:
                if strict:
                    raise err
                self._skipped[err.category] += 1
                if len(self._examples) < 20:
                    self._examples.append((chunk, 1, pos if pos is not None else -1, str(err)))
                continue
            self._seen.add(cid)
            self._hist[min(int(score * 10), 9)] += 1
            row = {"id": cid, "score": score, "logit": logit}
            if trainer.world_size > 1:  # where the id is, should another rank hold it too
                row["at"] = [source, pos, kind]
            lines.append(json.dumps(row))
        if lines:
            self._fh.write("\n".join(lines) + "\n")
        self._chunks.append((chunk, len(lines)))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        if trainer.world_size > 1:
            self._merge_parts(trainer)
            if not trainer.is_global_zero:
                return
        dm = trainer.datamodule
        logger = trainer.logger
        self._examples.sort(key=lambda e: e[:3])
        manifest = {
            "output": str(self.output),
            "scored": len(self._seen),
            "skipped": sum(self._skipped.values()),
            "skipped_by_reason": dict(self._skipped),
            "skipped_examples": [e[3] for e in self._examples[:20]],
            "score_histogram": {
                f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(self._hist)
            },
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "mlflow_run_id": getattr(logger, "run_id", None),
            "inputs": describe(dm).get("inputs", {}),
        }
        os.replace(self._tmp, self.output)
        self._tmp = None
        write_json(self.output.with_name(self.output.name + ".manifest.json"), manifest)
        if logger is not None and hasattr(logger, "log_dict"):
            logger.log_dict(manifest, "scores.manifest.json")
            logger.log_metrics(
                {"predict/scored": len(self._seen), "predict/skipped": manifest["skipped"]}
            )
        self._release()

    def _merge_parts(self, trainer: Trainer) -> None:
        """Rank 0 joins every process's part in chunk order into its own temporary file (then
        renamed into place like a one-process file); the other ranks' parts are removed."""
        import torch.distributed as dist

        mine = (str(self._tmp), self._chunks, dict(self._skipped), self._examples)
        parts: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(parts, mine)  # returns once every part is closed and fsynced
        if not trainer.is_global_zero:
            self._tmp = None  # rank 0 reads, then removes it
            return
        merged = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")
        self._merged = merged
        strict = getattr(trainer.datamodule, "on_bad_record", "raise") != "skip"
        order = sorted((c, r, n) for r, (_, chunks, _, _) in enumerate(parts) for c, n in chunks)
        self._skipped = Counter()
        self._examples = []
        for _, _, skipped, examples in parts:
            self._skipped.update(skipped)
            self._examples += examples
        seen: set[str] = set()
        self._hist = [0] * 10
        readers = [open(path, "rb") for path, _, _, _ in parts]  # noqa: SIM115 - closed below
        try:
            with open(merged, "wb") as out:
                for chunk, rank, n in order:
                    for _ in range(n):
                        row = json.loads(readers[rank].readline())
                        source, pos, kind = row.pop("at")
                        if row["id"] in seen:  # held by an earlier chunk of another process
                            err = BadRecordError(
                                source,
                                pos,
                                f"duplicate id {row['id']!r}",
                                "id",
                                kind=kind,
                                category="duplicate_id",
                            )
                            if strict:
                                raise err
                            self._skipped[err.category] += 1
                            self._examples.append(
                                (chunk, 1, pos if pos is not None else -1, str(err))
                            )
                            continue
                        seen.add(row["id"])
                        self._hist[min(int(row["score"] * 10), 9)] += 1
                        out.write((json.dumps(row) + "\n").encode())
                out.flush()
                os.fsync(out.fileno())
        finally:
            for reader in readers:
                reader.close()
        for path, _, _, _ in parts:
            Path(path).unlink(missing_ok=True)
        self._tmp, self._merged = merged, None
        self._seen = seen  # every rank's ids, kept once

    def _release(self) -> None:
        if self._locked is not None:
            release_output(self._locked)
            self._locked = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for tmp in (self._tmp, self._merged):
            if tmp is not None and tmp.exists():
                tmp.unlink()
        self._release()


def _valid_positions(batch: Any, n: int) -> list[tuple[int | None, str]]:
    """File position of each scored id: the stream's positions, less the entries it dropped."""
    if not isinstance(batch, dict) or "positions" not in batch:
        return [(None, "line")] * n
    valid = batch["valid"].tolist()
    return [p for p, ok in zip(batch["positions"], valid, strict=True) if ok]
