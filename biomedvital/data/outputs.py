"""Output folders: one run at a time, and no temporary file of a crashed run left behind.

A run that writes an output folder holds an exclusive POSIX record lock (``fcntl.lockf``) on
``<folder>/.biomedvital.lock`` for as long as it writes. A second run pointed at the same folder
fails at once with :class:`OutputFolderBusy`, naming the folder and the holder (pid, host, start
time, command). The kernel drops the lock when its process dies, however it dies (SIGKILL
included), so a crashed run never blocks its rerun; record locks are not inherited by forked
children (DataLoader workers), so orphaned workers cannot hold a folder either.

Taking a folder's lock also removes the temporary files a killed run left in it (atomic writes
go to ``.<name>.<random>.tmp`` and are renamed into place), which is safe precisely because no
other run can be writing there.

Locks are reentrant inside a process: the CLI locks the trainer's folder and the callbacks that
write into it (``ScoreWriter``, ``ExportTuned``) take the same lock again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

LOCK_NAME = ".biomedvital.lock"
_TMP = re.compile(r"^\..+\.(?:[0-9a-f]{12}\.tmp|tmp-\d+|tmp-[0-9a-f]{12})$")
"""Temporary names of atomic writes: ``atomic_write``, ``ScoreWriter``, the tuner export."""


class OutputFolderBusy(RuntimeError):
    """Another live run writes the same output folder."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder, self.holder = folder, holder
        who = f"pid {holder.get('pid', '?')}"
        if holder.get("host"):
            who += f" on {holder['host']}"
        if holder.get("started"):
            who += f", started {holder['started']}"
        if holder.get("command"):
            who += f": {holder['command']}"
        super().__init__(
            f"output folder {folder} is in use by another run ({who}); wait for it to finish "
            "or choose another output folder"
        )


@dataclass
class _Held:
    fd: int
    count: int
    pid: int


_HELD: dict[Path, _Held] = {}


def is_rank_zero() -> bool:
    """True outside multi-process launches and on their global rank 0 (the process that locks)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _command() -> str:
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
    return text if len(text) <= 200 else text[:197] + "..."


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
    if folder.resolve() in _HELD:
        return True  # never reopen a lock this process holds: closing the fd would drop it
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave the folder alone
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock (never one this process held)
    return False


def acquire_output(folder: str | os.PathLike[str]) -> Path:
    """Lock ``folder`` (created if missing) for this process; raise :class:`OutputFolderBusy`
    when another process holds it. Returns the resolved folder."""
    path = Path(folder).resolve()
    held = _HELD.get(path)
    if held is not None and held.pid == os.getpid():
        held.count += 1
        return path
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise OutputFolderBusy(path, holder) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file as we opened it: take the new one
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": _command(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = _Held(fd, 1, os.getpid())
    remove_stale_temporaries(path)
    return path


def release_output(folder: str | os.PathLike[str]) -> None:
    """Undo one :func:`acquire_output`; the last release removes the lock file."""
    path = Path(folder).resolve()
    held = _HELD.get(path)
    if held is None or held.pid != os.getpid():
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[path]
    with contextlib.suppress(OSError):
        (path / LOCK_NAME).unlink()
    os.close(held.fd)  # closing drops the record lock


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
