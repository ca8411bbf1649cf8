"""``import-preferences``: turn clinicians' annotations into :class:`Preference` records.

Annotations arrive as spreadsheets or JSON, in one of three layouts:

* pairs: ``id, image, question, preferred, rejected`` (+ optional ``fig_caption``,
  ``in_text_mention``, ``pair_id``, ``annotator``);
* per-answer marks: one row per answer, ``id, image, question, answer, acceptable``; rows with
  the same ``id`` are one question (CSV), or ``answers: [{"text", "acceptable"}, ...]`` (JSON);
* generated answer pairs after marking: ``generate --answers 2`` records with
  ``answers: [a, b]`` plus ``acceptable: [bool, bool]``.

Marks become one preference per (acceptable, not acceptable) answer pair; a question whose
answers are all marked alike teaches nothing and is counted as ``no_contrast``. Every error names
the file and the line (CSV: the physical line, header = 1) so it can be fixed by hand.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import (
    bad_from_validation,
    check_unique,
    handle_bad,
    iter_objects,
    write_json,
    write_jsonl,
)
from biomedvital.data.records import AnswerMarks, Preference
from biomedvital.data.report import BadRecordError, RecordReport

_TRUE = {"1", "true", "yes", "y", "accept", "accepted", "acceptable", "ok"}
_FALSE = {"0", "false", "no", "n", "reject", "rejected", "unacceptable", "not acceptable"}
_OPTIONAL = ("fig_caption", "in_text_mention", "pair_id", "annotator")


def parse_mark(value: Any) -> bool:
    """An accept/reject mark from a bool, 0/1 or words such as ``yes``/``reject``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not an accept/reject mark: {value!r} (use yes/no, true/false, 1/0)")


def _validate(model: type[BaseModel], obj: dict[str, Any], path: Path, pos: int, kind: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise bad_from_validation(exc, path, pos, kind=kind) from None


def _from_object(obj: Any, path: Path, pos: int, kind: str) -> list[Preference] | None:
    """Preferences from one JSON record; ``None`` when its marks have no contrast."""
    if not isinstance(obj, dict):
        raise BadRecordError(path, pos, "expected an object", kind=kind, category="not_an_object")
    if "answers" not in obj:
        if "preferred" not in obj or "rejected" not in obj:
            raise BadRecordError(
                path,
                pos,
                "expected preferred/rejected, or answers with accept/reject marks",
                kind=kind,
                category="unknown_layout",
            )
        return [_validate(Preference, obj, path, pos, kind)]
    answers = obj["answers"]
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        marks = obj.get("acceptable")
        if not isinstance(marks, list) or len(marks) != len(answers):
            raise BadRecordError(
                path,
                pos,
                f"'acceptable' must list one mark per answer ({len(answers)})",
                "acceptable",
                kind=kind,
            )
        try:
            parsed = [parse_mark(m) for m in marks]
        except ValueError as exc:
            raise BadRecordError(path, pos, str(exc), "acceptable", kind=kind) from None
        obj = {k: v for k, v in obj.items() if k not in ("acceptable", "generator")}
        obj["answers"] = [
            {"text": a, "acceptable": m} for a, m in zip(answers, parsed, strict=True)
        ]
    rec = _validate(AnswerMarks, obj, path, pos, kind)
    return rec.to_pairs() or None


def _read_csv(path: Path, on_bad: str, report: RecordReport) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) from a CSV: pair rows as is, mark rows grouped by ``id``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        pair_layout = {"preferred", "rejected"} <= cols
        marks_layout = {"answer", "acceptable"} <= cols
        missing = {"id", "image", "question"} - cols
        if missing or not (pair_layout or marks_layout):
            need = sorted(missing) or ["preferred+rejected or answer+acceptable"]
            raise BadRecordError(
                path, 1, f"missing column(s): {', '.join(need)}", category="missing_columns"
            )
        out: list[tuple[int, dict[str, Any]]] = []
        groups: dict[str, tuple[int, dict[str, Any]]] = {}
        for row in reader:
            line = reader.line_num
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            try:
                if not row.get("id"):
                    raise BadRecordError(path, line, "empty id", "id", category="invalid:id")
                base = {k: row[k] for k in ("id", "image", "question") if k in row}
                base.update({k: row[k] for k in _OPTIONAL if row.get(k)})
                if pair_layout:
                    out.append(
                        (line, {**base, "preferred": row["preferred"], "rejected": row["rejected"]})
                    )
                    continue
                try:
                    mark = parse_mark(row["acceptable"])
                except ValueError as exc:
                    raise BadRecordError(path, line, str(exc), "acceptable") from None
                if row["id"] not in groups:
                    groups[row["id"]] = (line, {**base, "answers": []})
                    out.append(groups[row["id"]])
                first = groups[row["id"]][1]
                if first["question"] != row.get("question") or first["image"] != row.get("image"):
                    raise BadRecordError(
                        path,
                        line,
                        f"id {row['id']!r} was used with another question or image "
                        f"(first on line {groups[row['id']][0]})",
                        "id",
                    )
                first["answers"].append({"text": row["answer"], "acceptable": mark})
            except BadRecordError as err:
                handle_bad(err, on_bad, report)
        return out


def import_preferences(
    src: Path,
    out: Path,
    on_bad_record: Literal["raise", "skip"] = "raise",
    annotator: str | None = None,
) -> dict:
    """Convert clinician annotations (CSV, JSONL or a JSON array) into a preferences JSONL.

    Args:
        src: the annotations (layouts in the module docstring); ``.csv`` is read as CSV.
        out: the Preference JSONL to write (``<out>.manifest.json`` beside it).
        on_bad_record: ``raise`` on the first bad row (error names file and line) or ``skip``
            it and count it in the manifest.
        annotator: fills ``annotator`` where a record has none.
    """
    src, out = Path(src), Path(out)
    report = RecordReport()
    no_contrast = 0
    prefs: list[Preference] = []
    where: list[tuple[int, Any]] = []  # the file line (or element) of each pair
    if src.suffix.lower() == ".csv":
        rows = [(line, "line", obj) for line, obj in _read_csv(src, on_bad_record, report)]
    else:
        rows = list(iter_objects(src, on_bad=on_bad_record, report=report))
    for pos, kind, obj in rows:
        try:
            got = _from_object(obj, src, pos, kind)
        except BadRecordError as err:
            handle_bad(err, on_bad_record, report)
            continue
        if got is None:
            no_contrast += 1
            continue
        report.kept()
        for p in got:
            if annotator and not p.annotator:
                p.annotator = annotator
            prefs.append(p)
            where.append((pos, kind))
    prefs = check_unique(prefs, "id", src, on_bad=on_bad_record, report=report, where=where)
    n = write_jsonl(out, prefs)
    manifest = {
        "preferences": n,
        "no_contrast": no_contrast,
        "records": report.as_dict(),
        "inputs": {"src": {"path": str(src), "sha256": sha256_file(src)}},
        "config": {"src": str(src), "out": str(out), "on_bad_record": on_bad_record},
    }
    write_json(out.with_name(out.name + ".manifest.json"), manifest)
    return manifest
