"""Export at the end of training: adapter, merged model, and what is needed to trust them."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from biomedvital.data.jsonio import write_json
from biomedvital.data.outputs import LOCK_NAME, acquire_output, release_output
from biomedvital.tracking.callbacks import EndOfFit
from biomedvital.tracking.hooks import describe
from biomedvital.tracking.provenance import git_state
from biomedvital.tuning.conversation import VICUNA_V1_SYSTEM, chat_template


class ExportTuned(EndOfFit):
    """Writes ``dirpath/`` when training ends (rank zero; with FSDP2 every rank helps gather
    the full tensors first, so the export loads in one process like an unsharded run's):

    ``adapter/`` (PEFT, LoRA mode; ``PeftModel.from_pretrained``), ``merged/`` (model +
    processor; ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor``),
    ``config.yaml`` (the resolved run config), ``data_manifest.json`` (input hash, upstream
    selection run, samples kept / skipped / truncated and why, token counts) and ``run.json``
    (MLflow run id, git state, final metrics, the system prompt and ``image_aspect_ratio``
    trained with).

    Args:
        dirpath: the export folder (default ``<trainer.default_root_dir>/export``, so a run
            moved elsewhere by ``--trainer.default_root_dir`` exports there too).
        adapter: write the PEFT adapter (LoRA mode).
        merged: write the merged model (needs host memory for a second copy of the model).
    """

    def __init__(
        self, dirpath: str | None = None, adapter: bool = True, merged: bool = True
    ) -> None:
        self.dirpath = Path(dirpath) if dirpath else None  # type: ignore[assignment]
        self.adapter, self.merged = adapter, merged
        self._locked: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "export"
        # one run per export folder, checked before training rather than after it
        if stage == "fit" and trainer.is_global_zero and self._locked is None:
            self._locked = acquire_output(self.dirpath)
            for stale in self.dirpath.parent.glob(f".{self.dirpath.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed run's unfinished export

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._locked is not None:
            release_output(self._locked)
            self._locked = None

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    def end_of_fit(
        self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]
    ) -> None:
        out = self.dirpath
        seen = getattr(pl_module, "bad_images_seen", None)
        bad_ids = seen() if seen is not None else []  # collective: before any rank returns
        sharded = getattr(pl_module, "is_sharded", lambda: False)()
        if not sharded and not trainer.is_global_zero:
            return
        # written in full beside the export folder, then swapped in: a killed run leaves the
        # previous export (or none) and a temporary folder the next run removes
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
        if trainer.is_global_zero:
            tmp.mkdir(parents=True)
        # sharded (FSDP2): every rank takes part in gathering the full tensors; rank 0 writes
        with serving_processor(pl_module.processor, _system_prompt(trainer)):
            written = pl_module.export(tmp, adapter=self.adapter, merged=self.merged)  # type: ignore[operator]
        if not trainer.is_global_zero:
            trainer.strategy.barrier("export")
            return
        written = {k: str(out / Path(v).relative_to(tmp)) for k, v in written.items()}
        config = Path(trainer.default_root_dir) / "config.fit.yaml"
        if config.is_file():
            shutil.copyfile(config, tmp / "config.yaml")
        dm = trainer.datamodule
        manifest: dict[str, Any] = describe(dm)
        # samples kept by the data module whose image then failed to load: trained on by none
        manifest["bad_images_during_training"] = {"count": len(bad_ids), "ids": bad_ids}
        write_json(tmp / "data_manifest.json", manifest)
        write_json(
            tmp / "run.json",
            {
                "mlflow_run_id": getattr(trainer.logger, "run_id", None),
                "git": git_state(),
                "model": pl_module.hparams.get("model"),
                "mode": pl_module.hparams.get("mode"),
                # the evaluator asks with it (a tuned model must be prompted as it was trained)
                "system_prompt": _system_prompt(trainer),
                # as the merged model's processor_config.json records it
                "image_aspect_ratio": getattr(trainer.datamodule, "image_aspect_ratio", None),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "metrics": metrics,
                "written": written,
            },
        )
        _swap_in(tmp, out)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_dict"):
            logger.log_dict(manifest, "export/data_manifest.json")
        if sharded:
            trainer.strategy.barrier("export")


def _system_prompt(trainer: Trainer) -> str:
    """The system prompt the model was trained with (the data module's)."""
    return getattr(trainer.datamodule, "system_prompt", VICUNA_V1_SYSTEM)


@contextmanager
def serving_processor(processor: Any, system: str) -> Iterator[Any]:
    """The processor as it is saved with the model: its chat template renders the training
    conversation (:func:`~biomedvital.tuning.conversation.chat_template`; a base model's own,
    e.g. llava-hf's, has no system prompt and no ``</s>`` after answers), and its tokenizer
    pads on the left, as batched generation needs (training pads by itself). Restored after."""
    tok = processor.tokenizer
    saved = processor.chat_template, tok.padding_side
    processor.chat_template, tok.padding_side = chat_template(system), "left"
    try:
        yield processor
    finally:
        processor.chat_template, tok.padding_side = saved


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in the place of ``out`` (two renames, old one removed).
    The folder's lock file moves along (same inode, still locked), so the lock is never lost."""
    if (out / LOCK_NAME).exists():
        os.rename(out / LOCK_NAME, tmp / LOCK_NAME)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
