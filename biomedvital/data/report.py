"""Bad-record errors and the report that accounts for every record read.

Loaders either raise on the first bad record (``on_bad="raise"``) or skip it and count it in a
:class:`RecordReport` (``on_bad="skip"``), so a run can say exactly how much data it dropped and why
instead of losing records silently.
"""

from __future__ import annotations

from typing import Any, Literal

OnBad = Literal["raise", "skip"]
"""What a loader does with a bad record: raise :class:`BadRecordError`, or skip and count it."""

PositionKind = Literal["line", "record"]

MAX_EXAMPLES = 20


class BadRecordError(ValueError):
    """A record that cannot be used, located precisely enough to fix the file by hand.

    ``line`` is the 1-based line number in a JSONL file (``kind="line"``) or the 1-based index of
    the element in a JSON array (``kind="record"``); ``None`` when the problem concerns the whole
    file. ``category`` is a short machine-friendly key used to group skips in a report.
    """

    def __init__(
        self,
        path: str | Any,
        line: int | None,
        reason: str,
        field: str | None = None,
        *,
        kind: PositionKind = "line",
        category: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        self.kind: PositionKind = kind
        self.category = category or (f"invalid:{field}" if field else "invalid_record")
        super().__init__(self._format())

    def _format(self) -> str:
        if self.line is None:
            where = f"{self.path}:"
        elif self.kind == "record":
            where = f"{self.path}: record {self.line}:"
        else:
            where = f"{self.path}:{self.line}:"
        what = f" field '{self.field}':" if self.field else ""
        return f"{where}{what} {self.reason}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable (multiprocessing workers) despite the custom signature.
        return (
            _rebuild_bad_record,
            (self.path, self.line, self.reason, self.field, self.kind, self.category),
        )


def _rebuild_bad_record(
    path: str,
    line: int | None,
    reason: str,
    field: str | None,
    kind: PositionKind,
    category: str,
) -> BadRecordError:
    return BadRecordError(path, line, reason, field, kind=kind, category=category)


class RecordReport:
    """Counts of records kept, skipped (by reason) and repaired, so no data is dropped silently."""

    def __init__(self, max_examples: int = MAX_EXAMPLES) -> None:
        self.max_examples = max_examples
        self.n_kept = 0
        self.n_skipped = 0
        self.skipped_by_reason: dict[str, int] = {}
        self.repaired_by_reason: dict[str, int] = {}
        self.examples: list[str] = []

    def kept(self, n: int = 1) -> None:
        """Count ``n`` records that were read and kept."""
        self.n_kept += n

    def unkeep(self, n: int = 1) -> None:
        """Take back ``n`` records counted as kept that a later check dropped (and counts as
        skipped), so no record is counted both kept and skipped."""
        if n > self.n_kept:
            raise ValueError(
                f"cannot take back {n} kept record(s): only {self.n_kept} counted as kept"
            )
        self.n_kept -= n

    def skip(self, err: BadRecordError) -> None:
        """Count one skipped record under its category and keep the first few messages."""
        self.n_skipped += 1
        self.skipped_by_reason[err.category] = self.skipped_by_reason.get(err.category, 0) + 1
        self._example(str(err))

    def repair(self, category: str, n: int = 1, example: str | None = None) -> None:
        """Count records that were kept only after an automatic fix, so the fix stays visible."""
        self.repaired_by_reason[category] = self.repaired_by_reason.get(category, 0) + n
        if example is not None:
            self._example(example)

    def _example(self, text: str) -> None:
        if len(self.examples) < self.max_examples:
            self.examples.append(text)

    @property
    def n_repaired(self) -> int:
        return sum(self.repaired_by_reason.values())

    def merge(self, other: RecordReport) -> RecordReport:
        """Add another report's counts into this one (e.g. one report per input file)."""
        self.n_kept += other.n_kept
        self.n_skipped += other.n_skipped
        for k, v in other.skipped_by_reason.items():
            self.skipped_by_reason[k] = self.skipped_by_reason.get(k, 0) + v
        for k, v in other.repaired_by_reason.items():
            self.repaired_by_reason[k] = self.repaired_by_reason.get(k, 0) + v
        for ex in other.examples:
            self._example(ex)
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary for run logs and manifests."""
        return {
            "kept": self.n_kept,
            "skipped": self.n_skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "repaired": dict(sorted(self.repaired_by_reason.items())),
            "examples": list(self.examples),
        }

    def __repr__(self) -> str:
        return (
            f"RecordReport(kept={self.n_kept}, skipped={self.n_skipped}, "
            f"skipped_by_reason={self.skipped_by_reason})"
        )
