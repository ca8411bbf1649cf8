"""The candidate stream the selector scores: candidate files read in encoded chunks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from biomedvital.data.jsonio import iter_objects, parse_record
from biomedvital.data.records import Candidate
from biomedvital.data.report import BadRecordError, OnBad, RecordReport
from biomedvital.selection.batching import BadImage, Codec, Entry
from biomedvital.selection.text import Captions, TextRecipe


class _Unreadable(RecordReport):
    """Keeps the unreadable lines a skip-mode read meets, to hand them on in file order."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BadRecordError] = []

    def skip(self, err: BadRecordError) -> None:
        super().skip(err)
        self.errors.append(err)

    def drain(self) -> Iterator[tuple[int, str, BadRecordError]]:
        errors, self.errors = self.errors, []
        for err in errors:
            yield (err.line or 0, err.kind, err)


class CandidateStream(IterableDataset):
    """Streams candidate files (one, or several in turn) in encoded chunks; processes (ranks)
    and their workers take alternate chunks, and a chunk never spans two files (errors name the
    file and its line). Every batch carries its chunk number, by which the ranks' scores merge
    back into the one-process order.

    Memory stays flat whatever the pool size: only one chunk per worker is held.
    """

    def __init__(
        self,
        path: Path | Sequence[Path],
        captions: Captions,
        recipe: TextRecipe,
        chunk_size: int,
        codec: Codec,
        on_bad: OnBad,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.paths = (Path(path),) if isinstance(path, (str, Path)) else tuple(map(Path, path))
        self.path = self.paths[0]
        self.captions, self.recipe = captions, recipe
        self.chunk_size, self.codec, self.on_bad = chunk_size, codec, on_bad
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)

        def mine(n: int) -> bool:  # chunk n: rank n % world, then that rank's workers in turn
            return n % self.world_size == self.rank and (n // self.world_size) % nw == wid

        n_chunk = 0
        for path in self.paths:
            self.path = path
            chunk: list[tuple[int, str, Any]] = []
            for item in self._items():
                chunk.append(item)
                if len(chunk) == self.chunk_size:
                    if mine(n_chunk):
                        yield self._encode(chunk, n_chunk)
                    chunk, n_chunk = [], n_chunk + 1
            if chunk:
                if mine(n_chunk):
                    yield self._encode(chunk, n_chunk)
                n_chunk += 1

    def _items(self) -> Iterator[tuple[int, str, Any]]:
        """``(position, kind, value)`` of each record; in skip mode an unreadable line (bad
        JSON or UTF-8) comes through in its place as its BadRecordError, so that it is counted
        once, by the worker that owns its chunk."""
        if self.on_bad == "raise":
            yield from iter_objects(self.path, on_bad="raise")
            return
        unreadable = _Unreadable()
        for item in iter_objects(self.path, on_bad="skip", report=unreadable):
            yield from unreadable.drain()
            yield item
        yield from unreadable.drain()

    def _encode(self, chunk: list[tuple[int, str, Any]], number: int = 0) -> dict[str, Any]:
        ids, entries, skipped, positions = [], [], [], []
        for pos, kind, obj in chunk:
            if isinstance(obj, BadRecordError):  # an unreadable line (skip mode only)
                skipped.append((obj.category, str(obj)))
                continue
            try:
                cand = parse_record(obj, Candidate, self.path, pos, kind)
                text = self.captions.text_of(cand, self.recipe, self.path, pos)
            except BadRecordError as err:
                if self.on_bad == "raise":
                    raise
                skipped.append((err.category or "invalid_record", str(err)))
                continue
            ids.append(cand.id)
            positions.append((pos, kind))
            entries.append(Entry(cand.image, text))
        try:
            batch = self.codec.encode(entries)
        except BadImage as err:  # raise mode: name the first candidate that uses the image
            i = next(i for i, e in enumerate(entries) if e.image == err.image)
            pos, kind = positions[i]
            raise BadRecordError(
                self.path,
                pos,
                f"candidate {ids[i]!r}: {err}",
                "image",
                kind=kind,
                category="bad_image",
            ) from err
        bad = batch.pop("bad_entries")
        skipped += [("bad_image", f"candidate {ids[i]}: {why}") for i, why in bad.items()]
        batch["ids"] = ids
        batch["positions"] = positions  # where each id is in the file, for the writer's errors
        batch["file"] = str(self.path)
        batch["valid"] = torch.tensor([i not in bad for i in range(len(ids))], dtype=torch.bool)
        batch["skipped"] = skipped
        batch["chunk"] = number
        return batch
