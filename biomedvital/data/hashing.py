"""File hashes: the SHA-256 that manifests, cache keys and image references record."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20
"""Bytes read at a time: a large file never sits in memory whole."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks so large files do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
