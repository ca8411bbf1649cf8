"""On-disk embedding cache for a frozen backbone, keyed by content hash.

A frozen backbone turns every ablation run into "train a small MLP": features of an image or
text are computed once, ever, and then read back. sqlite gives atomic, crash-safe writes, many
concurrent readers (DataLoader workers, parallel grid cells) and lookups without holding the
whole table in memory, so scoring 100,000 candidates stays flat in memory.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


def content_key(fingerprint: str, kind: str, content: str | bytes) -> str:
    """Cache key: backbone fingerprint + kind (``img``/``txt``) + the content (or its digest)."""
    h = hashlib.sha256(f"{fingerprint}\0{kind}\0".encode())
    h.update(content.encode() if isinstance(content, str) else content)
    return h.hexdigest()


class EmbeddingCache:
    """A key → float32 vector table in one sqlite file."""

    def __init__(self, path: str | Path, memory_items: int = 32768) -> None:
        self.path = Path(path)
        self.memory_items = memory_items
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        # in-process layer in front of sqlite: entries never change once written, so a key
        # seen stored stays stored and a vector read once can be served again (bounded LRU)
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._seen: set[str] = set()

    # connections are opened lazily and per process: forked DataLoader workers get their own
    @property
    def conn(self) -> sqlite3.Connection:
        import os

        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
            conn.commit()
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_conn": None, "_pid": None, "_mem": OrderedDict(), "_seen": set()}

    def _remember(self, key: str, vec: np.ndarray) -> None:
        if self.memory_items <= 0:
            return
        self._mem[key] = vec
        self._mem.move_to_end(key)
        while len(self._mem) > self.memory_items:
            self._mem.popitem(last=False)

    def known(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` are stored."""
        found = {k for k in keys if k in self._seen or k in self._mem}
        ask = [k for k in dict.fromkeys(keys) if k not in found]
        for chunk in _chunks(ask, 500):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT key FROM emb WHERE key IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        if len(self._seen) > 4 * max(self.memory_items, 1):
            self._seen.clear()  # bounded: a pool larger than this is streamed, not revisited
        self._seen.update(found)
        return found

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Vectors for ``keys`` in order; raises KeyError naming a missing key."""
        out: dict[str, np.ndarray] = {k: self._mem[k] for k in keys if k in self._mem}
        ask = [k for k in dict.fromkeys(keys) if k not in out]
        for chunk in _chunks(ask, 500):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk)
            for k, v in rows:
                out[k] = np.frombuffer(v, dtype=np.float32)
                self._remember(k, out[k])
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"{len(missing)} embeddings missing from {self.path}, e.g. {missing[0]}")
        return torch.from_numpy(np.stack([out[k] for k in keys]))

    def put(self, keys: Sequence[str], vectors: torch.Tensor) -> None:
        """Store vectors (one transaction: all or nothing)."""
        data = vectors.detach().to("cpu", torch.float32).numpy()
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
                ((k, data[i].tobytes()) for i, k in enumerate(keys)),
            )
        for i, k in enumerate(keys):
            self._remember(k, data[i].copy())
            self._seen.add(k)

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM emb").fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _chunks(items: Iterable[str], n: int) -> Iterable[list[str]]:
    items = list(items)
    for i in range(0, len(items), n):
        yield items[i : i + n]
