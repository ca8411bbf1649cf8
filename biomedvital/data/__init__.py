"""data stage: record models, streaming JSON/JSONL I/O with located errors, and image loading."""

from .hashing import sha256_file
from .images import ImageLoadError, ImageRoot, UnsafePathError, image_digest, load_image
from .jsonio import (
    atomic_write,
    check_unique,
    iter_jsonl,
    read_records,
    write_json,
    write_jsonl,
)
from .records import (
    AnswerMarks,
    Candidate,
    Demonstration,
    MarkedAnswer,
    Mention,
    Preference,
    Rating,
    SourceFigure,
    Turn,
    read_candidates,
    read_demonstrations,
    read_figures,
    read_preferences,
    read_ratings,
)
from .report import BadRecordError, OnBad, RecordReport

__all__ = [
    "AnswerMarks",
    "BadRecordError",
    "Candidate",
    "Demonstration",
    "ImageLoadError",
    "ImageRoot",
    "MarkedAnswer",
    "Mention",
    "OnBad",
    "Preference",
    "Rating",
    "RecordReport",
    "SourceFigure",
    "Turn",
    "UnsafePathError",
    "atomic_write",
    "check_unique",
    "image_digest",
    "iter_jsonl",
    "load_image",
    "read_candidates",
    "read_demonstrations",
    "read_figures",
    "read_preferences",
    "read_ratings",
    "read_records",
    "sha256_file",
    "write_json",
    "write_jsonl",
]
