"""Where the selector's inputs come from: files on disk, or the embedded demo.

A pool is injected into the data module by ``class_path`` so that the same config shape
points at the demo, at a lab's own files, or at the paper's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PoolFiles:
    """The concrete files of a candidate pool."""

    candidates: Path  # LLaVA-layout candidate conversations (JSONL or JSON array)
    image_root: Path  # candidate and preference images are relative to it
    figures: Path | None = None  # LLaVA-Med figure layout: captions and mentions by pair_id
    ratings: Path | None = None  # model ratings (0-10) of candidates
    preferences: Path | None = None  # clinician pairs or per-answer marks


class FilePool:
    """A pool on disk.

    Args:
        candidates: candidate conversations, LLaVA layout with ``pair_id``.
        image_root: folder the ``image`` fields are relative to.
        figures: source figures (captions, in-text mentions); needed by the ``paper`` text recipe.
        ratings: judge-model ratings; needed to train (model pairs).
        preferences: clinician preferences; needed to train with ``w > 0`` and to measure alignment.
    """

    def __init__(
        self,
        candidates: str,
        image_root: str,
        figures: str | None = None,
        ratings: str | None = None,
        preferences: str | None = None,
    ) -> None:
        self.files = PoolFiles(
            candidates=Path(candidates),
            image_root=Path(image_root),
            figures=Path(figures) if figures else None,
            ratings=Path(ratings) if ratings else None,
            preferences=Path(preferences) if preferences else None,
        )

    def prepare(self) -> PoolFiles:
        """Check that every named file exists; the error lists all that are missing."""
        f = self.files
        named = [f.candidates, f.image_root, f.figures, f.ratings, f.preferences]
        missing = [str(p) for p in named if p is not None and not p.exists()]
        if missing:
            raise FileNotFoundError(f"pool inputs not found: {', '.join(missing)}")
        return f


class DemoPool:
    """The embedded demo: real medical images shipped inside pydicom and scikit-image, with
    hand-written captions, candidates of varied quality, ratings and clinician pairs.

    Args:
        root: folder the demo is written to on first use (idempotent, atomic).
    """

    def __init__(self, root: str = "data/demo") -> None:
        self.root = root

    def prepare(self) -> PoolFiles:
        from biomedvital.data.demo import materialize_demo

        d = materialize_demo(self.root)
        return PoolFiles(
            candidates=Path(d.candidates),
            image_root=Path(d.images),
            figures=Path(d.figures),
            ratings=Path(d.ratings),
            preferences=Path(d.preferences),
        )
