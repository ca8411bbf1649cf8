"""The request journal: an append-only JSONL of finished requests, the cache that makes reruns
free and resumable.

Each line is written and flushed before its request counts as done (it survives ``kill -9``);
``fsync`` runs at most every ``sync_interval_s`` and at close (what a power cut can lose). The
journal is indexed by offset, not held in memory, and locked against a second process. A torn
last line (a process killed mid-write) is cut and its request made again: the torn-line policy
and the lock of every journal (:mod:`biomedvital.data.journal`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from biomedvital.data.journal import JournalWriter, LineScan
from biomedvital.data.locks import LockBusy
from biomedvital.llm.response import is_empty_reply

log = logging.getLogger(__name__)

_KEY_PREFIX = b'{"key": "'
_OFFSET_SHIFT = 32  # index value: offset << 32 | line length


_EMPTY_CONTENT = re.compile(rb'"content": (?:null|"(?:\\[nrt]| )*")')


def _empty_entry(raw: bytes) -> bool:
    """Whether a journal line holds an empty reply (a cheap byte test, then a parse)."""
    if b'"refusal": null' not in raw or _EMPTY_CONTENT.search(raw) is None:
        return False
    try:
        resp = json.loads(raw).get("response")
    except (ValueError, AttributeError):
        return False
    return isinstance(resp, dict) and is_empty_reply(resp)


class JournalBusy(RuntimeError):
    """Another process holds the journal: two runs on one output folder would pay twice."""


class Journal:
    """Append-only JSONL of finished requests: the cache that makes reruns free and resumable.

    Only an index (key → offset and length of its line) is kept in memory; entries are read
    back from disk on demand. Lines start with the key so the index loads without parsing them.
    An existing journal is locked from the start (its torn tail cut), a new one at its first
    append.
    """

    def __init__(self, path: str | Path, sync_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        self.torn_lines = 0
        self.empty_replies = 0
        self._index: dict[str, int] = {}
        self._writer = JournalWriter(self.path)
        self._rfd: int | None = None
        self._last_sync = 0.0
        self._dirty = False
        self.auto_sync = True  # fsync from append(); the async client syncs from a thread instead
        if self.path.is_file():
            self._open_writer()
            self._load()

    # -- loading
    @staticmethod
    def _key_of(raw: bytes) -> str | None:
        if raw.startswith(_KEY_PREFIX) and raw[73:76] == b'", ' and raw.endswith(b"}\n"):
            return raw[9:73].decode("ascii", "replace")
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            return None
        if not isinstance(entry.get("response"), dict):
            return None
        return entry["key"]

    def _load(self) -> None:
        for offset, raw in LineScan(self.path):
            key = self._key_of(raw)
            if key is not None and _empty_entry(raw):
                self.empty_replies += 1  # journaled by an older version: asked again
            elif key is not None:
                self._index[key] = (offset << _OFFSET_SHIFT) | len(raw)
            elif raw.strip():
                self.torn_lines += 1
        if self.empty_replies:
            log.warning(
                "journal %s: %d empty replies (no text, no refusal) are asked again",
                self.path,
                self.empty_replies,
            )

    def _open_writer(self) -> None:
        try:
            self._writer.open()
        except LockBusy:
            raise JournalBusy(
                f"journal {self.path} is in use by another process; wait for it to finish "
                "(two runs on one output folder would send the same requests twice)"
            ) from None
        self.torn_lines += self._writer.torn_cut

    # -- reading
    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def keys(self) -> Iterator[str]:
        """The keys of all journaled requests (in no particular order)."""
        return iter(self._index)

    def get(self, key: str) -> dict[str, Any] | None:
        """The journaled entry for ``key`` (read from disk), or ``None``."""
        where = self._index.get(key)
        if where is None:
            return None
        if self._rfd is None:
            self._rfd = os.open(self.path, os.O_RDONLY)
        offset, length = where >> _OFFSET_SHIFT, where & ((1 << _OFFSET_SHIFT) - 1)
        raw = os.pread(self._rfd, length, offset)
        try:
            entry = json.loads(raw)
        except ValueError:
            log.warning("journal %s: unreadable entry at byte %d; redoing it", self.path, offset)
            del self._index[key]
            return None
        return (
            entry if isinstance(entry, dict) and isinstance(entry.get("response"), dict) else None
        )

    # -- writing
    def append(self, entry: dict[str, Any]) -> None:
        """Write one finished request (flushed at once; fsynced in groups) before it counts."""
        if self._writer.fd is None:
            self._open_writer()
        entry = {"key": entry["key"], **entry}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        if len(line) >= 1 << _OFFSET_SHIFT:  # pragma: no cover - 4 GB response
            raise ValueError("journal entry too large")
        offset = self._writer.append(line, sync=False)
        self._index[entry["key"]] = (offset << _OFFSET_SHIFT) | len(line)
        self._dirty = True
        if self.auto_sync and time.monotonic() - self._last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        """fsync what was appended since the last sync (safe to call from another thread)."""
        if self._dirty:
            self._dirty = False
            self._writer.sync()
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and release the files and the lock."""
        self.sync()
        self._writer.close()
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
