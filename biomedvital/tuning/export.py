"""Export at the end of training: adapter, merged model, and what is needed to trust them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from biomedvital.data.jsonio import write_json
from biomedvital.tracking.provenance import git_state


class ExportTuned(Callback):
    """Writes ``dirpath/`` when training ends (rank zero; with FSDP2 every rank helps gather
    the full tensors first, so the export loads in one process like an unsharded run's):

    ``adapter/`` (PEFT, LoRA mode; ``PeftModel.from_pretrained``), ``merged/`` (model +
    processor; ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor``),
    ``config.yaml`` (the resolved run config), ``data_manifest.json`` (input hash, upstream
    selection run, samples kept / skipped / truncated and why, token counts) and ``run.json``
    (MLflow run id, git state, final metrics).

    Args:
        dirpath: the export folder.
        adapter: write the PEFT adapter (LoRA mode).
        merged: write the merged model (needs host memory for a second copy of the model).
    """

    def __init__(self, dirpath: str, adapter: bool = True, merged: bool = True) -> None:
        self.dirpath, self.adapter, self.merged = Path(dirpath), adapter, merged

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.dirpath
        sharded = getattr(pl_module, "is_sharded", lambda: False)()
        if not sharded and not trainer.is_global_zero:
            return
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
        # sharded (FSDP2): every rank takes part in gathering the full tensors; rank 0 writes
        written = pl_module.export(out, adapter=self.adapter, merged=self.merged)  # type: ignore[operator]
        if not trainer.is_global_zero:
            trainer.strategy.barrier("export")
            return
        config = Path(trainer.default_root_dir) / "config.fit.yaml"
        if config.is_file():
            shutil.copyfile(config, out / "config.yaml")
        dm = trainer.datamodule
        manifest: dict[str, Any] = dm.describe() if hasattr(dm, "describe") else {}
        manifest["bad_images_during_training"] = getattr(pl_module, "bad_images", 0)
        write_json(out / "data_manifest.json", manifest)
        write_json(
            out / "run.json",
            {
                "mlflow_run_id": getattr(trainer.logger, "run_id", None),
                "git": git_state(),
                "model": pl_module.hparams.get("model"),
                "mode": pl_module.hparams.get("mode"),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "written": written,
            },
        )
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_dict"):
            logger.log_dict(manifest, "export/data_manifest.json")
        if sharded:
            trainer.strategy.barrier("export")
