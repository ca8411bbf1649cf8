"""Exclusive locks between processes: one style for output folders, journals and stores.

A lock is a POSIX record lock (``fcntl.lockf``) on a lock file of its own, which nothing but this
module opens. Both choices matter:

* ``lockf`` rather than ``flock``: record locks belong to a process and are not inherited by
  forked children, so a DataLoader worker orphaned by a killed run cannot keep holding a folder;
  the kernel drops the lock when its process dies, however it dies (SIGKILL included), so a
  crashed run never blocks its rerun.
* a separate lock file: a record lock is dropped when its process closes *any* descriptor of the
  locked file. Locking a journal itself, a server that reads that journal while appending to it
  (the annotation server reads every journal for its progress) would lose the lock the first
  time it closed the file after a read.

The holder (pid, host, start time, command) is written into the lock file, so a refused run can
say who holds it. The last release removes the file. Locks are tracked per process: a
``reentrant`` lock is counted (the CLI locks a trainer's folder and the callbacks writing into it
take it again); a second take of a non-reentrant one is refused like another process's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LockBusy(RuntimeError):
    """Another process (or, for a non-reentrant lock, this one) holds the lock."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe_holder(holder)}")


@dataclass
class _Held:
    fd: int
    count: int
    pid: int


_HELD: dict[Path, _Held] = {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid N on HOST, started T: COMMAND``, from what the holder wrote."""
    who = f"pid {holder.get('pid', '?')}"
    if holder.get("host"):
        who += f" on {holder['host']}"
    if holder.get("started"):
        who += f", started {holder['started']}"
    if holder.get("command"):
        who += f": {holder['command']}"
    return who


def _command() -> str:
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
    return text if len(text) <= 200 else text[:197] + "..."


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _held_here(path: Path) -> _Held | None:
    held = _HELD.get(path)
    return held if held is not None and held.pid == os.getpid() else None


def acquire_lock(
    path: str | os.PathLike[str], *, reentrant: bool = False, wait: bool = False
) -> Path:
    """Lock the lock file ``path`` (created if missing) for this process; returns it resolved.

    Raises :class:`LockBusy` when another process holds it (``wait``: block until it is free
    instead), or when this process holds a non-reentrant lock already.
    """
    path = Path(path).resolve()
    held = _held_here(path)
    if held is not None:
        if not reentrant:
            raise LockBusy(path, {"pid": os.getpid(), "command": "this process"})
        held.count += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise LockBusy(path, holder) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
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
    return path


def release_lock(path: str | os.PathLike[str]) -> None:
    """Undo one :func:`acquire_lock`; the last release removes the lock file."""
    path = Path(path).resolve()
    held = _held_here(path)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[path]
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(held.fd)  # closing drops the record lock


def holds_lock(path: str | os.PathLike[str]) -> bool:
    """Whether this process holds the lock file ``path``."""
    return _held_here(Path(path).resolve()) is not None


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether a live process (this one included) holds the lock file ``path``."""
    path = Path(path).resolve()
    if _held_here(path) is not None:
        return True  # never reopen a lock this process holds: closing the fd would drop it
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: count it as held
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock (never one this process held)
    return False


@contextlib.contextmanager
def held_lock(
    path: str | os.PathLike[str], *, reentrant: bool = False, wait: bool = False
) -> Iterator[Path]:
    """Hold the lock file ``path`` for the ``with`` block (see :func:`acquire_lock`)."""
    locked = acquire_lock(path, reentrant=reentrant, wait=wait)
    try:
        yield locked
    finally:
        release_lock(locked)


def lock_file_for(path: str | os.PathLike[str]) -> Path:
    """The lock file that guards ``path``: ``.<name>.lock`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")
