"""Output folders: one run at a time, and no temporary file of a crashed run left behind.

A run that writes an output folder holds the lock of ``<folder>/.biomedvital.lock`` (a
``fcntl.lockf`` record lock on a file of its own, :mod:`.locks`) for as long as it writes. A
second run pointed at the same folder fails at once with :class:`OutputFolderBusy`, naming the
folder and the holder (pid, host, start time, command). The kernel drops the lock when its
process dies, however it dies (SIGKILL included), so a crashed run never blocks its rerun;
record locks are not inherited by forked children (DataLoader workers), so orphaned workers
cannot hold a folder either.

Taking a folder's lock also removes the temporary files a killed run left in it (atomic writes
go to ``.<name>.<random>.tmp`` and are renamed into place), which is safe precisely because no
other run can be writing there.

Locks are reentrant inside a process: the CLI locks the trainer's folder and the callbacks that
write into it (``ScoreWriter``, ``ExportTuned``) take the same lock again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .locks import LockBusy, acquire_lock, describe_holder, holds_lock, is_locked, release_lock

F = TypeVar("F", bound=Callable[..., Any])

LOCK_NAME = ".biomedvital.lock"
_TMP = re.compile(r"^\..+\.(?:[0-9a-f]{12}\.tmp|tmp-\d+|tmp-[0-9a-f]{12})$")
"""Temporary names of atomic writes: ``atomic_write``, ``ScoreWriter``, the tuner export."""


class OutputFolderBusy(RuntimeError):
    """Another live run writes the same output folder."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder, self.holder = folder, holder
        super().__init__(
            f"output folder {folder} is in use by another run ({describe_holder(holder)}); "
            "wait for it to finish or choose another output folder"
        )


def is_rank_zero() -> bool:
    """True outside multi-process launches and on their global rank 0 (the process that locks)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def remove_stale_temporaries(folder: Path, depth: int = 1) -> list[Path]:
    """Delete ``.<name>.<random>.tmp``-style leftovers of killed runs in ``folder`` and in its
    subfolders down to ``depth`` levels; call only while holding the folder's lock."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if _TMP.match(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        elif depth > 0 and entry.is_dir(follow_symlinks=False) and not _in_use(path):
            removed += remove_stale_temporaries(path, depth - 1)
    return removed


def _in_use(folder: Path) -> bool:
    """Whether a live run (this process or another) holds ``folder``'s lock: the temporaries
    in it may be its writes in progress, not a killed run's."""
    return is_locked(folder / LOCK_NAME)


def acquire_output(folder: str | os.PathLike[str]) -> Path:
    """Lock ``folder`` (created if missing) for this process; raise :class:`OutputFolderBusy`
    when another process holds it. Returns the resolved folder."""
    path = Path(folder).resolve()
    lock = path / LOCK_NAME
    fresh = not holds_lock(lock)
    try:
        acquire_lock(lock, reentrant=True)
    except LockBusy as busy:
        raise OutputFolderBusy(path, busy.holder) from None
    if fresh:
        remove_stale_temporaries(path)
    return path


def release_output(folder: str | os.PathLike[str]) -> None:
    """Undo one :func:`acquire_output`; the last release removes the lock file."""
    release_lock(Path(folder).resolve() / LOCK_NAME)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """Hold ``folder``'s lock for the ``with`` block (``None``: nothing to lock)."""
    if folder is None:
        yield None
        return
    path = acquire_output(folder)
    try:
        yield path
    finally:
        release_output(path)


def locks_output(arg: str = "out", *, parent: bool = False) -> Callable[[F], F]:
    """Decorate a pipeline verb so that the folder named by its ``arg`` argument (the file's
    folder with ``parent=True``; nothing when the argument is ``None``) is locked during the
    call. Signature and docstring are kept, so the verb's command line is unchanged."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            value = bound.arguments.get(arg, sig.parameters[arg].default)
            folder = None
            if value is not None and value is not inspect.Parameter.empty:
                folder = Path(value).parent if parent else Path(value)
            with output_lock(folder):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
