"""Writes the selector's scores as they are computed; the file appears only when complete."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from biomedvital.data.jsonio import write_json
from biomedvital.data.outputs import acquire_output, release_output
from biomedvital.data.report import BadRecordError


class ScoreWriter(BasePredictionWriter):
    """Streams ``{"id", "score", "logit"}`` lines to a temporary file, renamed into place at the end.

    ``score`` is the sigmoid of ``logit``; the logit is kept because the sigmoid saturates to
    exactly 1.0 in float32 and ``select`` breaks such ties by it.

    A manifest beside the output (``<output>.manifest.json``) records the checkpoint, the MLflow
    run, counts written and skipped (with reasons), and the score histogram.

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
        self._examples: list[str] = []
        self._hist = [0] * 10
        self._locked: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("ScoreWriter writes from one process; score with devices: 1")
        if not self._output:
            self.output = Path(trainer.default_root_dir) / "scores.jsonl"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self._locked is None:  # one run per output folder (reentrant under the CLI's lock)
            self._locked = acquire_output(self.output.parent)
        self._tmp = self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")
        self._fh = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - spans the predict loop
        self._seen.clear()
        self._skipped.clear()
        self._examples.clear()
        self._hist = [0] * 10

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
        for reason, message in prediction["skipped"]:
            self._skipped[reason] += 1
            if len(self._examples) < 20:
                self._examples.append(message)
        lines = []
        scores, logits = prediction["scores"].tolist(), prediction["logits"].tolist()
        positions = _valid_positions(batch, len(prediction["ids"]))
        source = batch.get("file", "scored pool") if isinstance(batch, dict) else "scored pool"
        for cid, score, logit, (pos, kind) in zip(
            prediction["ids"], scores, logits, positions, strict=True
        ):
            if cid in self._seen:
                err = BadRecordError(
                    source,
                    pos,
                    f"duplicate id {cid!r}",
                    "id",
                    kind=kind,
                    category="duplicate_id",
                )
                if getattr(trainer.datamodule, "on_bad_record", "raise") != "skip":
                    raise err
                self._skipped[err.category] += 1  # the first occurrence keeps its score
                if len(self._examples) < 20:
                    self._examples.append(str(err))
                continue
            self._seen.add(cid)
            self._hist[min(int(score * 10), 9)] += 1
            lines.append(json.dumps({"id": cid, "score": score, "logit": logit}))
        if lines:
            self._fh.write("\n".join(lines) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        dm = trainer.datamodule
        logger = trainer.logger
        manifest = {
            "output": str(self.output),
            "scored": len(self._seen),
            "skipped": sum(self._skipped.values()),
            "skipped_by_reason": dict(self._skipped),
            "skipped_examples": self._examples,
            "score_histogram": {
                f"{i / 10:.1f}-{(i + 1) / 10:.1f}": n for i, n in enumerate(self._hist)
            },
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "mlflow_run_id": getattr(logger, "run_id", None),
            "inputs": dm.describe()["inputs"] if hasattr(dm, "describe") else {},
        }
        os.replace(self._tmp, self.output)
        write_json(self.output.with_name(self.output.name + ".manifest.json"), manifest)
        if logger is not None and hasattr(logger, "log_dict"):
            logger.log_dict(manifest, "scores.manifest.json")
            logger.log_metrics(
                {"predict/scored": len(self._seen), "predict/skipped": manifest["skipped"]}
            )
        self._release()

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
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._release()


def _valid_positions(batch: Any, n: int) -> list[tuple[int | None, str]]:
    """File position of each scored id: the stream's positions, less the entries it dropped."""
    if not isinstance(batch, dict) or "positions" not in batch:
        return [(None, "line")] * n
    valid = batch["valid"].tolist()
    return [p for p, ok in zip(batch["positions"], valid, strict=True) if ok]
