"""The annotation journal: one append-only JSONL file per annotator, fsynced line by line.

Every action on the page (a mark, a preference, a comment, a flag) appends the item's whole new
state as one line, written with a single ``O_APPEND`` write and ``fsync``ed before the page is
told it is saved. The latest line of an item wins. Nothing is ever rewritten, so closing the tab,
killing the server or losing power costs at most the line being written: on reading, an
unparsable line (the torn tail of an interrupted write) is counted and ignored, and before the
next append the torn tail is sealed with a newline so it cannot swallow the new line. An append
that fails in a running server (disk full) is cut back off the file before the page hears of it,
so the retry that follows lands on a line of its own.

Judgments are stored in the order the answers were *shown* (``A``, ``B``) together with that order
(``shown[p]`` is the item's answer index at position ``p``); the export undoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from biomedvital.data.jsonio import PathLike, fsync_dir

try:  # advisory lock: one server per annotator journal (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

JOURNAL_VERSION = 1
MAX_COMMENT = 5000
_ANNOTATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

Choice = Literal["A", "B", "equal"]


def check_annotator(name: str) -> str:
    """An annotator id usable in a file name (letters, digits, ``_ . @ -``; up to 64)."""
    if not isinstance(name, str) or not _ANNOTATOR_RE.match(name):
        raise ValueError(
            f"annotator {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-' "
            "(starting with a letter or digit)"
        )
    return name


def journal_path(out_dir: PathLike, annotator: str) -> Path:
    """Where one annotator's journal lives: ``<out_dir>/journal.<annotator>.jsonl``."""
    return Path(out_dir) / f"journal.{check_annotator(annotator)}.jsonl"


def now_iso() -> str:
    """UTC time stamp with milliseconds, for journal lines."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Judgment(BaseModel):
    """One annotator's judgment of one item, as the answers were shown (A, B)."""

    model_config = ConfigDict(extra="allow")

    v: int = JOURNAL_VERSION
    item: str
    digest: str
    annotator: str
    shown: list[int]
    acceptable: list[bool | None] = Field(default_factory=lambda: [None, None])
    preferred: Choice | None = None
    comment: str = ""
    flagged: bool = False
    time: str = ""

    @field_validator("shown")
    @classmethod
    def _permutation(cls, v: list[int]) -> list[int]:
        if sorted(v) != [0, 1]:
            raise ValueError(f"must be [0, 1] or [1, 0] (got {v})")
        return v

    @field_validator("acceptable")
    @classmethod
    def _two_marks(cls, v: list[bool | None]) -> list[bool | None]:
        if len(v) != 2:
            raise ValueError(f"must hold one mark per answer (got {len(v)})")
        return v

    @field_validator("comment")
    @classmethod
    def _short_comment(cls, v: str) -> str:
        if len(v) > MAX_COMMENT:
            raise ValueError(f"longer than {MAX_COMMENT} characters")
        return v

    @property
    def judged(self) -> bool:
        """Both answers marked and a preference given (the item needs nothing more)."""
        return all(a is not None for a in self.acceptable) and self.preferred is not None

    @property
    def done(self) -> bool:
        """Judged, or flagged as broken: the annotator does not need to come back to it."""
        return self.flagged or self.judged

    @property
    def status(self) -> str:
        """``flagged``, ``done``, ``partial`` (something marked) or ``todo``."""
        if self.flagged:
            return "flagged"
        if self.judged:
            return "done"
        if self.preferred is not None or any(a is not None for a in self.acceptable):
            return "partial"
        return "todo"

    def original_marks(self) -> list[bool | None]:
        """Acceptability per answer of the item (shown order undone)."""
        marks: list[bool | None] = [None, None]
        for pos, idx in enumerate(self.shown):
            marks[idx] = self.acceptable[pos]
        return marks

    def original_preferred(self) -> int | Literal["equal"] | None:
        """Index of the preferred answer in the item (shown order undone), ``equal`` or None."""
        if self.preferred in ("A", "B"):
            return self.shown[0 if self.preferred == "A" else 1]
        return self.preferred


@dataclass
class JournalState:
    """What a journal holds: the latest judgment per item and what could not be read."""

    path: Path
    latest: dict[str, Judgment] = field(default_factory=dict)
    lines: int = 0
    torn: int = 0
    invalid: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()  # of the bytes read (a live server appends)

    def as_dict(self) -> dict[str, int | str]:
        """Counts for reports."""
        return {
            "path": str(self.path),
            "lines": self.lines,
            "items": len(self.latest),
            "torn_lines": self.torn,
            "invalid_lines": self.invalid,
        }


def read_journal(path: PathLike) -> JournalState:
    """Latest judgment per item; torn (unparsable) lines and invalid ones are counted, skipped.

    Lines are split on ``\\n`` only (bytes), so text holding U+2028 and friends stays one line.
    A missing file is an empty journal.
    """
    state = JournalState(Path(path))
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return state
    state.sha256 = hashlib.sha256(data).hexdigest()
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        state.lines += 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            state.torn += 1
            continue
        try:
            j = Judgment.model_validate(obj)
        except ValidationError:
            state.invalid += 1
            continue
        state.latest[j.item] = j
    return state


class JournalLockedError(RuntimeError):
    """Another process already appends to this annotator's journal."""


class Journal:
    """Appends judgments to one annotator's journal file (thread-safe, one writer process)."""

    def __init__(self, path: PathLike, *, lock: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._want_lock = lock
        self._torn = False  # a failed append may have left part of a line at the end

    def open(self) -> Journal:
        """Open for appending: take the file lock, seal a torn tail, make the file durable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if self._want_lock and fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise JournalLockedError(
                        f"{self.path} is in use by another annotate server "
                        "(one server per annotator)"
                    ) from None
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _write_all(fd, b"\n")  # torn tail: keep it a line of its own
                os.fsync(fd)
            if created:
                os.fsync(fd)
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def append(self, judgment: Judgment) -> None:
        """Write one complete line and fsync it; returns only once it is on disk."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        line = judgment.model_dump_json() + "\n"
        data = line.encode("utf-8")
        with self._lock:
            fd = self._fd
            if self._torn:  # seal what a failed append left, or this line would join it
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    _write_all(fd, b"\n")
                self._torn = False
            start = os.fstat(fd).st_size  # one writer (the file lock): the end stays ours
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                # disk full, I/O error: drop the partial line now, else seal it next time
                self._torn = True
                try:
                    os.ftruncate(fd, start)
                    self._torn = False
                except OSError:
                    pass
                raise

    def close(self) -> None:
        """Close the file (releases the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    # One write() with O_APPEND puts the whole line at the end; loop only for short writes.
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
