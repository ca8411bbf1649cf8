"""Answers of an evaluation run journaled batch by batch, so that a killed run resumes.

Greedy decoding a benchmark with a 13B model takes a long while (PathVQA: 6,761 questions); a
preempted or killed run should not answer again what it had answered. Each process appends one
line per batch to its own file in the run folder, flushed and fsynced before the next batch:
``answers.journal-<key>-rank<r>.jsonl``. ``key`` hashes everything the answers depend on (model
and its files, generation settings, data file, batch size), so answers of another model or
setting are never mixed in: their journal is ignored. Batches are the one-process batches of
the split (:mod:`.sharding`), so a resumed run, with any number of processes, answers the
remaining batches exactly as an uninterrupted run would. A torn last line (a kill mid-write) is
cut before the file is appended to again, and its batch is answered again (the torn-line policy
of every journal, :mod:`biomedvital.data.journal`). The journal is removed once the run's
predictions are written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from biomedvital.data.journal import JournalWriter, LineScan

PREFIX = "answers.journal-"


def journal_key(fingerprint: dict[str, Any]) -> str:
    """Twelve hex digits of the fingerprint's SHA-256 (canonical JSON)."""
    canonical = json.dumps(fingerprint, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def files_signature(path: str | os.PathLike[str]) -> list[tuple[str, int, int]] | None:
    """Name, size and modification time of a weights file, or of the files of a model folder:
    a re-exported or re-trained model changes them (hashing 26 GB of weights would not pay)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [(p.name, st.st_size, st.st_mtime_ns)]
    if p.is_dir():
        return [
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(p.iterdir())
            if f.is_file()
        ]
    return None


def _is_entry(entry: Any) -> bool:
    """A batch line as :meth:`AnswerJournal.append` writes it: as many indices, rows (each with
    its answer ``text``) and truths."""
    if not (isinstance(entry, dict) and isinstance(entry.get("batch"), int)):
        return False
    parts = [entry.get(k) for k in ("indices", "rows", "truth")]
    if not all(isinstance(p, list) for p in parts) or len({len(p) for p in parts}) != 1:
        return False
    return all(
        isinstance(r, dict) and isinstance(r.get("text"), str) for r in entry["rows"]
    ) and all(isinstance(i, int) for i in entry["indices"])


class AnswerJournal:
    """One process's journal of answered batches, and the reader of every process's.

    Args:
        folder: the run folder (``trainer.default_root_dir``).
        fingerprint: what the answers depend on; journals of another fingerprint are ignored.
        rank: this process's global rank (each process appends to its own file).
    """

    def __init__(
        self, folder: str | os.PathLike[str], fingerprint: dict[str, Any], rank: int
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.key = journal_key(fingerprint)
        self.path = self.folder / f"{PREFIX}{self.key}-rank{rank}.jsonl"
        self.torn_lines = 0
        self._writer: JournalWriter | None = None

    def files(self) -> list[Path]:
        """This fingerprint's journals (every rank's, of this run and of killed ones)."""
        return sorted(self.folder.glob(f"{PREFIX}{self.key}-rank*.jsonl"))

    def foreign(self) -> list[Path]:
        """Journals of another fingerprint (another model or setting): never read."""
        mine = set(self.files())
        return sorted(p for p in self.folder.glob(f"{PREFIX}*.jsonl") if p not in mine)

    def load(self) -> dict[int, dict[str, Any]]:
        """Answered batches: ``batch -> {"indices", "rows", "truth"}``; unreadable lines (a torn
        last line, or a damaged one lacking a field) are skipped, counted in ``torn_lines``, and
        their batches answered again."""
        done: dict[int, dict[str, Any]] = {}
        self.torn_lines = 0
        for path in self.files():
            scan = LineScan(path)
            for _, raw in scan:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = None
                if isinstance(entry, dict) and "fingerprint" in entry:
                    continue  # the header line
                if not _is_entry(entry):
                    self.torn_lines += 1
                    continue
                done[entry["batch"]] = entry
            self.torn_lines += scan.torn_tail
        return done

    def append(
        self, batch: int, indices: list[int], rows: list[dict[str, Any]], truth: list[Any]
    ) -> None:
        """Record one answered batch; it is on disk (fsynced) when this returns."""
        if self._writer is None:
            self._open()
        line = json.dumps(
            {"batch": batch, "indices": indices, "rows": rows, "truth": truth}, ensure_ascii=False
        )
        assert self._writer is not None
        self._writer.append((line + "\n").encode("utf-8"), sync=True)

    def _open(self) -> None:
        # no lock file: the run folder is locked by its verb, and each rank appends to its own
        fresh = not self.path.exists()
        self._writer = JournalWriter(self.path, lock=False).open()
        if fresh:
            header = {"fingerprint": self.fingerprint}
            self._writer.append((json.dumps(header, default=str) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def remove(self) -> None:
        """Delete this fingerprint's journals (their answers are in the predictions file)."""
        self.close()
        for path in self.files():
            path.unlink(missing_ok=True)
