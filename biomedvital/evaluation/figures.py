"""The figure a vision judge is shown, checked before any request is paid for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.report import BadRecordError
from biomedvital.generation.prompts import image_ref


def figure_ref(image_root: str | Path | None, image: Any, source: Path, question_id: str) -> str:
    """The image reference (path and content hash, inlined when sent) of a question's figure
    under ``image_root``; a missing, unreadable or escaping path raises naming the question."""
    if not isinstance(image, str) or not image:
        raise BadRecordError(
            source, None, f"question_id {question_id!r}: no image name", "image",
            category="missing:image",
        )  # fmt: skip
    try:
        return image_ref(ImageRoot(Path(image_root or ".")).resolve(image))
    except (UnsafePathError, OSError, ValueError) as err:
        raise BadRecordError(
            source, None, f"question_id {question_id!r}: {err}", "image", category="bad_image"
        ) from err
