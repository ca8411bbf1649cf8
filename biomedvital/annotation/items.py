"""The paired-answer items clinicians judge: ``generate --answers 2`` output, or the demo's.

An item is one question about one image with exactly two answers, in the layout
:func:`biomedvital.generation.parse.pair_records` writes (``id, image, question, answers: [a, b],
fig_caption, in_text_mention, pair_id, generator``). A bad file fails on its first bad record with
an error naming the file, the line and the field, like every other reader in the suite.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from biomedvital.data.jsonio import PathLike, check_unique, read_records, write_jsonl
from biomedvital.data.records import (
    IdStr,
    MentionText,
    Text,
    read_preferences,
    strip_image_token,
)
from biomedvital.data.report import BadRecordError


class AnnotationItem(BaseModel):
    """One question with two answers to be judged (extra fields are kept, never shown)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: IdStr
    image: str
    # bounded like every record the export writes, so what is judged can always be exported
    question: Text
    answers: list[Text]
    fig_caption: Text = ""
    in_text_mention: MentionText = ""
    pair_id: IdStr | None = None

    @field_validator("image")
    @classmethod
    def _image_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("question")
    @classmethod
    def _question_given(cls, v: str) -> str:
        if not strip_image_token(v):
            raise ValueError("must not be empty")
        return v

    @field_validator("answers")
    @classmethod
    def _two_answers(cls, v: list[str]) -> list[str]:
        if len(v) != 2:
            raise ValueError(f"must hold exactly two answers (got {len(v)})")
        if not all(a.strip() for a in v):
            raise ValueError("answers must not be empty")
        if v[0].strip() == v[1].strip():
            raise ValueError("the two answers are identical")
        return v

    def display_question(self) -> str:
        """The question as shown: LLaVA's ``<image>`` placeholder removed."""
        return strip_image_token(self.question)

    def digest(self) -> str:
        """Short hash of what a judgment is about (image, question, answers).

        Stored with every judgment, so a judgment is never applied to an item whose text was
        regenerated under the same id.
        """
        blob = json.dumps([self.image, self.question, self.answers], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_items(path: PathLike) -> list[AnnotationItem]:
    """Read items from JSONL or a JSON array; the first bad record or repeated id raises.

    Raises :class:`BadRecordError` naming the file and line (or record) and the field.
    """
    items = read_records(path, AnnotationItem)
    items = check_unique(items, "id", path)
    if not items:
        raise BadRecordError(path, None, "no items to annotate", category="empty")
    return items


def shown_order(item_id: str, annotator: str, seed: int = 0) -> list[int]:
    """The order in which one annotator sees an item's answers: ``[0, 1]`` or ``[1, 0]``.

    Derived from a hash (not a random generator) so it is the same after a restart, differs
    between annotators (position bias averages out), and needs no state to be reproduced.
    """
    h = hashlib.sha256(f"{seed}\0{annotator}\0{item_id}".encode()).digest()
    return [1, 0] if h[0] & 1 else [0, 1]


# ----------------------------------------------------------------------------- demo


def demo_items(demo_root: PathLike) -> list[dict[str, Any]]:
    """Paired-answer items built from the demo's clinician preference pairs.

    ``answers[0]`` is the demo's hand-written preferred answer; the page shows the two in a
    per-annotator random order, so that does not leak to the annotator.
    """
    root = Path(demo_root)
    prefs = read_preferences(root / "preferences.jsonl")
    return [
        {
            "id": p.id,
            "image": p.image,
            "question": p.question,
            "answers": [p.preferred, p.rejected],
            "fig_caption": p.fig_caption,
            "in_text_mention": p.in_text_mention,
            "pair_id": p.pair_id,
            "generator": {"model": "demo-handwritten", "source": "demo preferences"},
        }
        for p in prefs
    ]


def write_demo_items(demo_dir: PathLike, items_file: PathLike) -> tuple[Path, Path]:
    """Write the embedded demo (when missing) and its paired-answer items; atomic.

    Returns ``(items_file, image_root)``.
    """
    from biomedvital.data.demo import materialize_demo

    files = materialize_demo(demo_dir)
    items_file = Path(items_file)
    write_jsonl(items_file, demo_items(files.root))
    return items_file, files.images
