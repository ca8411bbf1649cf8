"""Turning entries (image + text) into model inputs, inside DataLoader workers.

Each batch decodes every distinct image once, however many candidates or pairs use it, and —
with a frozen backbone and its cache — decodes or tokenises nothing whose features are stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from biomedvital.data.images import ImageLoadError, ImageRoot, UnsafePathError, image_digest
from biomedvital.selection.cache import EmbeddingCache, content_key
from biomedvital.selection.pairs import Pair

IMAGE_ERRORS = (ImageLoadError, UnsafePathError, FileNotFoundError, OSError)


class BadImage(ValueError):
    """An image that cannot be used; carries its path so callers can name the record."""

    def __init__(self, image: str, cause: BaseException) -> None:
        super().__init__(f"image {image!r}: {type(cause).__name__}: {cause}")
        self.image = image


@dataclass(frozen=True)
class Entry:
    """One thing the selector scores: an image (relative to the root) and a text."""

    image: str
    text: str


class Codec:
    """Image decoding, tokenisation and cache keys, shared by every loader of the selector.

    Args:
        root: where images live; paths escaping it are refused.
        preprocess: the backbone's image transform.
        tokenizer: the backbone's tokenizer.
        fingerprint: the backbone's weight hash (cache keys).
        cache: embedding cache, only with a frozen backbone.
        skip_bad_images: count and drop entries whose image cannot be read, instead of failing.
        image_cache_size: decoded images kept per worker (LRU) — images recur across batches.
    """

    def __init__(
        self,
        root: ImageRoot,
        preprocess: Callable,
        tokenizer: Callable,
        fingerprint: str,
        cache: EmbeddingCache | None = None,
        skip_bad_images: bool = False,
        image_cache_size: int = 256,
    ) -> None:
        self.root = root
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.cache = cache
        self.skip_bad_images = skip_bad_images
        self.image_cache_size = image_cache_size
        self._digests: dict[str, str] = {}
        self._pixels: OrderedDict[str, torch.Tensor] = OrderedDict()

    def image_key(self, rel: str) -> str:
        if self.cache is None:  # keys only address the cache: check the path, skip the hash
            self.root.resolve(rel)
            return rel
        digest = self._digests.get(rel)
        if digest is None:
            digest = image_digest(self.root.resolve(rel))
            self._digests[rel] = digest
        return content_key(self.fingerprint, "img", digest)

    def text_key(self, text: str) -> str:
        return content_key(self.fingerprint, "txt", text)

    def pixels(self, rel: str) -> torch.Tensor:
        hit = self._pixels.get(rel)
        if hit is not None:
            self._pixels.move_to_end(rel)
            return hit
        tensor = self.preprocess(self.root.load(rel))
        if self.image_cache_size > 0:
            self._pixels[rel] = tensor
            if len(self._pixels) > self.image_cache_size:
                self._pixels.popitem(last=False)
        return tensor

    def encode(self, entries: Sequence[Entry]) -> dict[str, Any]:
        """Model inputs for ``entries``: unique images and texts, with cache hits left out.

        Returns a dict with ``entry_image``/``entry_text`` (row of each entry in the unique
        lists), ``image_keys``/``text_keys``, ``pixels`` + ``pixel_rows`` and ``tokens`` +
        ``token_rows`` (only what must be encoded), and ``bad_entries`` {entry index: reason};
        an image that cannot be read or decoded has the empty key (no features exist for it).
        """
        images = list(dict.fromkeys(e.image for e in entries))
        texts = list(dict.fromkeys(e.text for e in entries))
        img_row = {p: i for i, p in enumerate(images)}
        txt_row = {t: i for i, t in enumerate(texts)}

        bad_images: dict[str, str] = {}
        image_keys: list[str] = []
        for rel in images:
            try:
                image_keys.append(self.image_key(rel))
            except IMAGE_ERRORS as err:
                if not self.skip_bad_images:
                    raise BadImage(rel, err) from err
                bad_images[rel] = f"{type(err).__name__}: {err}"
                image_keys.append("")
        text_keys = [self.text_key(t) for t in texts]
        known = self.cache.known(image_keys + text_keys) if self.cache is not None else set()

        pixel_rows, pixels = [], []
        for i, rel in enumerate(images):
            if rel in bad_images or image_keys[i] in known:
                continue
            try:
                pixels.append(self.pixels(rel))
                pixel_rows.append(i)
            except IMAGE_ERRORS as err:
                if not self.skip_bad_images:
                    raise BadImage(rel, err) from err
                bad_images[rel] = f"{type(err).__name__}: {err}"
                # no pixels, so no features will ever be stored under its key: an empty key
                # marks it bad, and the model does not look it up in the cache
                image_keys[i] = ""
        token_rows = [i for i, k in enumerate(text_keys) if k not in known]
        return {
            "entry_image": torch.tensor([img_row[e.image] for e in entries], dtype=torch.long),
            "entry_text": torch.tensor([txt_row[e.text] for e in entries], dtype=torch.long),
            "image_keys": image_keys,
            "text_keys": text_keys,
            "pixels": torch.stack(pixels) if pixels else torch.empty(0),
            "pixel_rows": torch.tensor(pixel_rows, dtype=torch.long),
            "tokens": self.tokenizer([texts[i] for i in token_rows])
            if token_rows
            else torch.empty(0, dtype=torch.long),
            "token_rows": torch.tensor(token_rows, dtype=torch.long),
            "bad_entries": {
                i: f"image {e.image}: {bad_images[e.image]}"
                for i, e in enumerate(entries)
                if e.image in bad_images
            },
        }


class PairCollate:
    """Collate pairs of entry indices into one encoded batch of their unique entries."""

    def __init__(self, entries: Sequence[Entry], codec: Codec) -> None:
        self.entries = entries
        self.codec = codec

    def __call__(self, pairs: list[Pair]) -> dict[str, Any]:
        uniq = list(dict.fromkeys(i for p in pairs for i in (p.a, p.b)))
        row = {e: i for i, e in enumerate(uniq)}
        batch = self.codec.encode([self.entries[i] for i in uniq])
        bad = set(batch.pop("bad_entries"))
        ok = [row[p.a] not in bad and row[p.b] not in bad for p in pairs]
        kept = [p for p, good in zip(pairs, ok, strict=True) if good]
        batch["pair_a"] = torch.tensor([row[p.a] for p in kept], dtype=torch.long)
        batch["pair_b"] = torch.tensor([row[p.b] for p in kept], dtype=torch.long)
        batch["kind"] = torch.tensor([p.kind for p in kept], dtype=torch.long)
        # which of ``pairs`` were dropped: the model counts each pair once, however many
        # epochs meet it again
        batch["dropped"] = [n for n, good in enumerate(ok) if not good]
        return batch


class TaggedCollate:
    """Adds the name of the pair set to each batch so metrics know what they measure, and the
    positions (in that set) and kinds of the pairs dropped for unreadable images, so the model
    can count each dropped pair once per set."""

    def __init__(self, collate: PairCollate, source: str, pairs: Sequence[Pair]) -> None:
        self.collate, self.source, self.pairs = collate, source, pairs

    def __call__(self, positions: list[int]) -> dict[str, Any]:
        pairs = [self.pairs[i] for i in positions]
        batch = self.collate(pairs)
        dropped = batch.pop("dropped")
        batch["source"] = self.source
        batch["dropped_index"] = [positions[n] for n in dropped]
        batch["dropped_kind"] = [pairs[n].kind for n in dropped]
        return batch
