"""The annotation journal: one append-only JSONL file per annotator, fsynced line by line.

Every action on the page (a mark, a preference, a comment, a flag) appends the item's whole new
state as one line, written with a single ``O_APPEND`` write and ``fsync``ed before the page is
told it is saved. The latest line of an item wins. Nothing is ever rewritten, so closing the tab,
killing the server or losing power costs at most the line being written. The torn-line policy is
every journal's (:mod:`biomedvital.data.journal`): on reading, an unparsable line or the torn
tail of an interrupted write is counted and ignored; before the next append the server cuts the
torn tail off, so it cannot swallow the new line; an append that fails in a running server
(disk full) is cut back off the file before the page hears of it, so the retry that follows
lands on a line of its own. One server writes an annotator's journal: it holds the journal's
lock file (:mod:`biomedvital.data.locks`), so it may read the journal as it likes.

Judgments are stored in the order the answers were *shown* (``A``, ``B``) together with that order
(``shown[p]`` is the item's answer index at position ``p``); the export undoes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from biomedvital.data.journal import JournalWriter, LineScan
from biomedvital.data.jsonio import PathLike
from biomedvital.data.locks import LockBusy

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
    scan = LineScan(path, digest=True)
    for _, raw in scan:
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
    state.lines += scan.torn_tail
    state.torn += scan.torn_tail
    state.sha256 = scan.sha256 or state.sha256
    return state


class JournalLockedError(RuntimeError):
    """Another process already appends to this annotator's journal."""


class Journal:
    """Appends judgments to one annotator's journal file (thread-safe, one writer process)."""

    def __init__(self, path: PathLike, *, lock: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._writer = JournalWriter(self.path, lock=lock)

    @property
    def torn_cut(self) -> int:
        """Torn tails cut off before appending (each counted once, when cut)."""
        return self._writer.torn_cut

    def open(self) -> Journal:
        """Open for appending: take the journal's lock, cut a torn tail, make the file durable."""
        try:
            self._writer.open()
        except LockBusy:
            raise JournalLockedError(
                f"{self.path} is in use by another annotate server (one server per annotator)"
            ) from None
        return self

    def append(self, judgment: Judgment) -> None:
        """Write one complete line and fsync it; returns only once it is on disk."""
        if self._writer.fd is None:
            raise RuntimeError("journal is not open")
        line = judgment.model_dump_json() + "\n"
        with self._lock:
            self._writer.append(line.encode("utf-8"), sync=True)

    def close(self) -> None:
        """Close the file (releases the lock)."""
        self._writer.close()

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
