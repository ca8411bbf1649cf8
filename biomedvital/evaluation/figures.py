"""The figure a vision judge is shown, checked before any request is paid for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomedvital.data.images import ImageRoot, UnsafePathError
from biomedvital.data.report import BadRecordError
from biomedvital.llm.images import image_ref


def judge_request(
    system: str, system_vision: str, body: str, image_url: str | None
) -> list[dict[str, Any]]:
    """A judge's messages: the text-only system prompt and body, or, with ``image_url``, the
    vision system prompt and the body followed by the figure."""
    if image_url is None:
        return [{"role": "system", "content": system}, {"role": "user", "content": body}]
    parts = [{"type": "text", "text": body}, {"type": "image_url", "image_url": {"url": image_url}}]
    return [{"role": "system", "content": system_vision}, {"role": "user", "content": parts}]


def figure_ref(image_root: str | Path, image: Any, source: Path, question_id: str) -> str:
    """The image reference (path and content hash, inlined when sent) of a question's figure
    under ``image_root``; a missing, unreadable or escaping path raises naming the question."""
    if not isinstance(image, str) or not image:
        raise BadRecordError(
            source, None, f"question_id {question_id!r}: no image name", "image",
            category="missing:image",
        )  # fmt: skip
    try:
        return image_ref(ImageRoot(Path(image_root)).resolve(image))
    except (UnsafePathError, OSError, ValueError) as err:
        raise BadRecordError(
            source, None, f"question_id {question_id!r}: {err}", "image", category="bad_image"
        ) from err
