"""Checkpoints inside the run's own output folder, written atomically and read without pickle."""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import time
from pathlib import Path
from typing import Any
from weakref import proxy

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class UnsafeCheckpointError(ValueError):
    """A checkpoint holding Python objects that only a full (code-running) unpickle could load."""


def unsafe_checkpoint_message(path: Any, err: BaseException) -> str:
    """A short reason naming the checkpoint and the first object ``weights_only`` refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next(
        (line for line in lines if "global" in line.lower()),
        lines[0] if lines else type(err).__name__,
    )
    return (
        f"{path}: refused to load: it holds Python objects beyond tensors and plain containers "
        f"({detail}). Checkpoints are read with torch.load(weights_only=True), which never runs "
        "code from the file; if you trust the file, pass --weights_only false"
    )


def load_checkpoint(
    path: str | os.PathLike[str], *, mmap: bool = False, trusted: bool = False
) -> dict[str, Any]:
    """``torch.load`` on CPU with ``weights_only=True`` (``trusted=True``: the user's explicit
    opt-in to a full unpickle); a file that needs more raises :class:`UnsafeCheckpointError`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(unsafe_checkpoint_message(path, e)) from e


class Checkpoints(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose folder defaults to ``<default_root_dir>/checkpoints``.

    With MLflow, Lightning would otherwise put checkpoints under a per-run id, where
    ``--ckpt_path last`` cannot find them after a restart and a grid cannot tell its cells apart.
    Checkpoints are written to a temporary file (or folder, for sharded strategies) beside the
    target and renamed onto it (Lightning's own transaction stages them in the system temp
    folder, which is a copy, not a rename, when that is another file system; and rewrites a
    sharded folder in place): a killed run leaves the previous checkpoint whole. Every argument
    is ``ModelCheckpoint``'s; ``enable_version_counter`` defaults to ``False`` here: the folder
    belongs to one run at a time (a lock; an earlier run's files are set aside), so a file
    already named as the one being written is a leftover of this run's killed attempt (killed
    between its best and its ``last`` save), and is replaced; Lightning's ``-v1`` copy beside it
    would make a resumed run's folder differ from an uninterrupted one's.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def _default_dir(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._default_dir(trainer)
        recover_swaps(self.dirpath)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after any restore, before the first save: ``trainer.ckpt_path`` tells a resume apart
        if trainer.ckpt_path is None and trainer.is_global_zero:
            self._set_aside_earlier_run()
        _close_restart(trainer)
        super().on_train_start(trainer, pl_module)
        self._restored_is_saved(trainer)

    def _restored_is_saved(self, trainer: Trainer) -> None:
        # A checkpoint of this folder that the run resumed from is this step's save, as it was
        # for the run that wrote it: nothing is saved again at its step. Otherwise a rerun that
        # finds training finished (a last checkpoint written at the final batch's end, as step
        # checkpoints are) closes the epoch and Lightning's ``on_train_end`` writes ``last``
        # again, with the epoch counted once more.
        ckpt = trainer.ckpt_path
        if ckpt is None or Path(ckpt).resolve().parent != Path(self.dirpath).resolve():
            return
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = str(ckpt)

    def _set_aside_earlier_run(self) -> None:
        # A fit from scratch into a folder holding an earlier run's checkpoints would get
        # ``last-v1.ckpt`` (Lightning's version counter) while ``last.ckpt`` stays the old run's,
        # which ``--ckpt_path last``, ``predict`` and make targets then read. The earlier files
        # are moved (never deleted) into a ``superseded-<time>/`` folder beside them.
        folder = Path(self.dirpath)
        if not (folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}").exists():
            # no earlier ``last``: nothing stale for ``--ckpt_path last`` or make to pick up (and
            # a run killed before its first ``last`` keeps Lightning's own handling)
            return
        old = sorted(folder.glob("*.ckpt"))
        dest = folder / f"superseded-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        dest.mkdir()
        for p in old:
            os.replace(p, dest / p.name)
        rank_zero_warn(
            f"{len(old)} checkpoint(s) of an earlier run in {folder} moved to {dest}: this fit "
            "starts from scratch (pass --ckpt_path last to resume instead)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batch_end_step": self._batch_end_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._batch_end_step = state_dict.get("batch_end_step")
        # Lightning restores the best scores but not the latest one, which its own state holds:
        # a resumed run's checkpoints would say None where an uninterrupted run's hold a score
        if self.dirpath == state_dict.get("dirpath", self.dirpath):
            self.current_score = state_dict.get("current_score", self.current_score)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # ``--ckpt_path last`` is resolved before ``setup``: the folder must be known here too
        self._default_dir(trainer)
        recover_swaps(self.dirpath)
        return super()._find_last_checkpoints(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_anyway(trainer)

    # A step checkpoint at an epoch's last batch is written before that epoch's validation, at
    # the step the validation ends on; Lightning then saves nothing after the validation (one
    # save a step), so its results would be neither ranked against the monitor nor kept in
    # ``last`` (from which a rerun that finds training done writes the run's final metrics).
    # Each batch end's step is kept, in the checkpoint too (a run resumed from one validates
    # that epoch again): a validation ending at the step a batch end saved saves once more.
    _batch_end_step: int | None = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batch_end_step = trainer.global_step  # in what this batch end may save
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            step, self._batch_end_step = self._batch_end_step, None
            if step == trainer.global_step == self._last_global_step_saved:
                self._last_global_step_saved = -1  # this validation's results are new
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_anyway(trainer)

    def _save_last_anyway(self, trainer: Trainer) -> None:
        # Lightning 2.5+ writes ``last`` only at steps where a top-k checkpoint was written: with
        # a monitor that did not improve, ``--ckpt_path last`` would resume from an older epoch
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        target = Path(filepath)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        tmp = Path(trainer.strategy.broadcast(str(tmp)))  # one name for every rank's shards
        trainer.save_checkpoint(tmp, self.save_weights_only)
        trainer.strategy.barrier("checkpoint_written")
        if trainer.is_global_zero:
            _swap_in(tmp, target)
        trainer.strategy.barrier("checkpoint")
        # what ModelCheckpoint._save_checkpoint does after writing
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put a checkpoint written in full at ``tmp`` in place of ``target``. A file is renamed
    onto it; a folder (the shards of FSDP2 and other sharded strategies) cannot be, so the
    previous one is first renamed to ``.<name>.old``: a kill at any instant leaves one whole
    checkpoint, under its name or under that one (put back by :func:`recover_swaps`)."""
    if not tmp.is_dir():
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return
    old = _old(target)
    if target.exists():
        if old.exists():
            _remove(old)
        os.rename(target, old)
    os.rename(tmp, target)
    _remove(old)


def recover_swaps(folder: str | os.PathLike[str]) -> None:
    """Finish the swaps a killed run left in ``folder``: a ``.<name>.old`` checkpoint goes back
    under its name when that is missing (killed between the two renames), else it is removed.
    Several ranks may call it at once."""
    root = Path(folder)
    if not root.is_dir():
        return
    for old in root.glob(".*.old"):
        target = root / old.name[1:-4]
        try:
            if target.exists():
                _remove(old)
            else:
                os.rename(old, target)
        except OSError:  # another rank got there first
            pass


def _close_restart(trainer: Trainer) -> None:
    """Let the first epoch of a run resumed from an epoch's end start as any epoch does.

    A checkpoint written at the end of validation holds an epoch that Lightning counts as not
    yet processed: on resume it treats the restart as mid-epoch, closes that epoch, and keeps
    the "restarted mid-epoch" stage into the next, whose start it then skips (its
    ``on_train_epoch_start`` hooks and its ready/started counters). The checkpoints of that
    epoch then differ from an uninterrupted run's, and a run killed again after one of its
    step checkpoints resumed at the epoch's first batch, training its first steps twice. Once
    every epoch started is completed nothing is under way, and the stage is cleared.
    """
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if loop.restarting and progress.ready == progress.completed:
        loop.reset_restart_stage()
