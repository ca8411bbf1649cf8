"""Append-only JSONL journals, with one policy for a torn last line.

The request journal (:mod:`biomedvital.llm.journal`), the annotation journals and the VQA answer
journals are files of lines that are only ever appended, so that a killed run resumes from what
it wrote. A process killed mid-write, or a power cut, can leave the last line unfinished. The
policy, the same for every journal:

* a line counts once it ends with a newline; what it holds, and whether it parses, is for its
  reader to judge (and to count when it does not);
* a reader never changes a journal: it reads the complete lines and reports an unterminated
  tail (:class:`LineScan`), which may be a line that a live writer is still writing;
* a writer (:class:`JournalWriter`) is the journal's only writer: it holds the journal's lock (a
  lock file beside it, :mod:`.locks`) unless its caller guarantees that otherwise. Before its
  first append it cuts an unterminated tail off, so that its line stands alone; an append that
  fails half-way (disk full) is cut back off the same way. A cut is counted (``torn_cut``) and
  logged: the bytes it drops never were an entry, and whatever they were for is done again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .jsonio import fsync_dir
from .locks import acquire_lock, lock_file_for, release_lock

log = logging.getLogger(__name__)


class LineScan:
    """The complete lines of a journal with their offsets, read once, front to back.

    Iterating yields ``(offset, line)`` for every line that ends with a newline (the newline
    included). An unterminated tail is not yielded: ``torn_tail`` is 1 after the scan when there
    was one. ``end`` is the offset after the last complete line; with ``digest``, ``sha256`` is
    the hash of every byte read, the tail included. A missing file is an empty journal.
    """

    def __init__(self, path: str | os.PathLike[str], *, digest: bool = False) -> None:
        self.path = Path(path)
        self.torn_tail = 0
        self.end = 0
        self._hash = hashlib.sha256() if digest else None

    @property
    def sha256(self) -> str | None:
        return self._hash.hexdigest() if self._hash is not None else None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, also on a break
        except FileNotFoundError:
            return
        with f:
            offset = 0
            for raw in f:
                if self._hash is not None:
                    self._hash.update(raw)
                if not raw.endswith(b"\n"):
                    self.torn_tail = 1
                    break
                self.end = offset + len(raw)
                yield offset, raw
                offset += len(raw)


class JournalWriter:
    """Appends whole lines to one journal: each line one ``write`` on an ``O_APPEND``
    descriptor, an unterminated tail cut first (see the module docstring).

    Args:
        path: the journal.
        lock: hold the journal's lock file while open (:class:`~.locks.LockBusy` when another
            writer holds it). ``False`` only where the caller guarantees a single writer.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock: bool = True) -> None:
        self.path = Path(path)
        self.lock = lock
        self.torn_cut = 0
        self.fd: int | None = None
        self._lock_path: Path | None = None
        self._dirty_tail = False  # a failed append may have left part of a line at the end

    @property
    def size(self) -> int:
        """Bytes in the journal (its end, where the next line goes)."""
        assert self.fd is not None, "journal is not open"
        return os.fstat(self.fd).st_size

    def open(self) -> JournalWriter:
        """Take the lock, open for appending, cut a torn tail, make a new file durable."""
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.lock:
            self._lock_path = acquire_lock(lock_file_for(self.path))
        try:
            created = not self.path.exists()
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            self._cut_tail()
            if created:
                os.fsync(self.fd)
                fsync_dir(self.path.parent)
        except BaseException:
            self.close()
            raise
        return self

    def append(self, line: bytes, *, sync: bool = True) -> int:
        """Write one complete line (``fsync`` it with ``sync``); returns where it starts."""
        if self.fd is None:
            raise RuntimeError(f"journal {self.path} is not open")
        if not line.endswith(b"\n"):
            raise ValueError("a journal line ends with a newline")
        if self._dirty_tail:
            self._cut_tail()
        start = self.size  # the only writer: the end stays ours
        try:
            view = memoryview(line)
            while view:  # one write() with O_APPEND puts the line at the end; loop on short ones
                view = view[os.write(self.fd, view) :]
            if sync:
                os.fsync(self.fd)
        except BaseException:
            # disk full, I/O error: drop the partial line now, else before the next append
            self._dirty_tail = True
            try:
                os.ftruncate(self.fd, start)
                self._dirty_tail = False
            except OSError:
                pass
            raise
        return start

    def sync(self) -> None:
        """``fsync`` what was appended."""
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        """Close the file and release the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._lock_path is not None:
            release_lock(self._lock_path)
            self._lock_path = None

    def _cut_tail(self) -> None:
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        if not size or os.pread(self.fd, 1, size - 1) == b"\n":
            self._dirty_tail = False
            return
        end = _last_newline_end(self.fd, size)
        os.ftruncate(self.fd, end)
        os.fsync(self.fd)
        self._dirty_tail = False
        self.torn_cut += 1
        log.warning(
            "journal %s: cut an unfinished last line (%d bytes) before appending; what it was "
            "for is done again",
            self.path,
            size - end,
        )


def _last_newline_end(fd: int, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline of the first ``size`` bytes (0 if none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - block)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0
