"""Where the selector's inputs come from: files on disk, or the embedded demo.

A pool is injected into the data module by ``class_path`` so that the same config shape
points at the demo, at a lab's own files, or at the paper's data.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    extra_candidates: tuple[Path, ...] = ()  # more candidate files (generated), same image root
    extra_ratings: tuple[Path, ...] = ()  # more rating files (e.g. a judge model's)

    @property
    def candidate_files(self) -> tuple[Path, ...]:
        """Every candidate file, the first one first."""
        return (self.candidates, *self.extra_candidates)

    @property
    def rating_files(self) -> tuple[Path, ...]:
        """Every rating file, the first one first."""
        return ((self.ratings,) if self.ratings is not None else ()) + self.extra_ratings


def _paths(value: str | Sequence[str] | None) -> list[Path]:
    if value is None:
        return []
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(v) for v in value]


class FilePool:
    """A pool on disk.

    Args:
        candidates: candidate conversations, LLaVA layout with ``pair_id``; a list of files joins
            several pools (ids must stay unique across them).
        image_root: folder the ``image`` fields are relative to.
        figures: source figures (captions, in-text mentions); needed by the ``paper`` text recipe.
        ratings: judge-model ratings; needed to train (model pairs); one file or a list.
        preferences: clinician preferences; needed to train with ``w > 0`` and to measure alignment.
    """

    def __init__(
        self,
        candidates: str | list[str],
        image_root: str,
        figures: str | None = None,
        ratings: str | list[str] | None = None,
        preferences: str | None = None,
    ) -> None:
        cands, rates = _paths(candidates), _paths(ratings)
        if not cands:
            raise ValueError("FilePool needs at least one candidates file")
        self.files = PoolFiles(
            candidates=cands[0],
            image_root=Path(image_root),
            figures=Path(figures) if figures else None,
            ratings=rates[0] if rates else None,
            preferences=Path(preferences) if preferences else None,
            extra_candidates=tuple(cands[1:]),
            extra_ratings=tuple(rates[1:]),
        )

    def prepare(self) -> PoolFiles:
        """Check that every named file exists; the error lists all that are missing."""
        f = self.files
        named = [*f.candidate_files, f.image_root, f.figures, *f.rating_files, f.preferences]
        missing = [str(p) for p in named if p is not None and not p.exists()]
        if missing:
            raise FileNotFoundError(f"pool inputs not found: {', '.join(missing)}")
        return f


class DemoPool:
    """The embedded demo: real medical images shipped inside pydicom and scikit-image, with
    hand-written captions, candidates of varied quality, ratings and clinician pairs.

    Args:
        root: folder the demo is written to on first use (idempotent, atomic).
        extra_candidates / extra_ratings: more candidate and rating files joining the demo's
            (e.g. ``generate`` and ``rate`` outputs for the demo figures, images under the
            demo's ``images/``).
    """

    def __init__(
        self,
        root: str = "data/demo",
        extra_candidates: list[str] | None = None,
        extra_ratings: list[str] | None = None,
    ) -> None:
        self.root = root
        self.extra_candidates = tuple(_paths(extra_candidates))
        self.extra_ratings = tuple(_paths(extra_ratings))

    def prepare(self) -> PoolFiles:
        from biomedvital.data.demo import materialize_demo

        d = materialize_demo(self.root)
        missing = [str(p) for p in self.extra_candidates + self.extra_ratings if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"pool inputs not found: {', '.join(missing)}")
        return PoolFiles(
            candidates=Path(d.candidates),
            image_root=Path(d.images),
            figures=Path(d.figures),
            ratings=Path(d.ratings),
            preferences=Path(d.preferences),
            extra_candidates=self.extra_candidates,
            extra_ratings=self.extra_ratings,
        )
