"""Streaming JSON/JSONL reading with precise errors, and atomic writing.

Records are validated one by one so a bad line is reported with its file, line and field instead of
failing somewhere downstream; outputs are written to a temporary file and renamed, so a crashed run
never leaves a half-written file that a later stage would trust.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from .report import BadRecordError, OnBad, PositionKind, RecordReport

PathLike = str | os.PathLike[str]
M = TypeVar("M", bound=BaseModel)

_BOM = b"\xef\xbb\xbf"
_MESSAGE_PREFIXES = ("Value error, ", "Assertion failed, ")


# ----------------------------------------------------------------------------- errors


def _check_on_bad(on_bad: OnBad, report: RecordReport | None) -> None:
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    if on_bad == "skip" and report is None:
        raise ValueError("on_bad='skip' needs a RecordReport so skipped records are counted")


def handle_bad(err: BadRecordError, on_bad: OnBad, report: RecordReport | None) -> None:
    """Raise ``err`` or count it as skipped, according to ``on_bad``."""
    if on_bad == "raise" or report is None:
        raise err
    report.skip(err)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_from_validation(
    exc: ValidationError,
    path: PathLike,
    line: int | None,
    *,
    kind: PositionKind = "line",
    field_prefix: str | None = None,
) -> BadRecordError:
    """Turn a pydantic error into a :class:`BadRecordError` naming the field path of the first error."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if field_prefix:
        loc = (field_prefix, *loc)
    field = ".".join(str(p) for p in loc) or None
    msg = str(first.get("msg", "invalid value"))
    for prefix in _MESSAGE_PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    etype = str(first.get("type", ""))
    inp = first.get("input")
    if etype not in ("value_error", "assertion_error", "missing") and isinstance(
        inp, str | int | float | bool | type(None)
    ):
        msg += f" (got {_short(inp)})"
    if len(errors) > 1:
        msg += f" [+{len(errors) - 1} more error(s)]"
    # Group list positions together so categories do not explode per index.
    cat_field = ".".join("*" if isinstance(p, int) else str(p) for p in loc)
    if etype == "missing":
        category = f"missing:{cat_field}"
    else:
        category = f"invalid:{cat_field}" if cat_field else "invalid_record"
    return BadRecordError(path, line, msg, field, kind=kind, category=category)


@overload
def parse_record(
    obj: Any, model: type[M], path: PathLike, line: int | None, kind: PositionKind = ...
) -> M: ...
@overload
def parse_record(
    obj: Any, model: None, path: PathLike, line: int | None, kind: PositionKind = ...
) -> dict[str, Any]: ...
def parse_record(
    obj: Any,
    model: type[BaseModel] | None,
    path: PathLike,
    line: int | None,
    kind: PositionKind = "line",
) -> BaseModel | dict[str, Any]:
    """Check that ``obj`` is a JSON object and validate it, raising a located BadRecordError."""
    if not isinstance(obj, dict):
        raise BadRecordError(
            path,
            line,
            f"expected a JSON object, got {_json_type(obj)}",
            kind=kind,
            category="not_an_object",
        )
    if model is None:
        return obj
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise bad_from_validation(exc, path, line, kind=kind) from exc


# ----------------------------------------------------------------------------- reading


def detect_format(path: PathLike) -> str:
    """Return ``"array"`` when the first non-space character is ``[``, ``"empty"`` for a blank file,
    else ``"jsonl"``; reads only as far as that character."""
    with open(path, "rb") as f:
        first = True
        while chunk := f.read(4096):
            if first and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            first = False
            stripped = chunk.lstrip()
            if stripped:
                return "array" if stripped[:1] == b"[" else "jsonl"
    return "empty"


def iter_jsonl_objects(
    path: PathLike, *, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_json)`` for each non-blank line, one line at a time.

    Undecodable or unparsable lines are raised or skipped per ``on_bad``; the value is not checked
    to be an object (see :func:`parse_record`).
    """
    _check_on_bad(on_bad, report)
    return _iter_jsonl_objects(path, on_bad, report)


def _iter_jsonl_objects(
    path: PathLike, on_bad: OnBad, report: RecordReport | None
) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                handle_bad(
                    BadRecordError(
                        path,
                        lineno,
                        f"invalid UTF-8 at byte {e.start} of the line",
                        category="invalid_utf8",
                    ),
                    on_bad,
                    report,
                )
                continue
            text = text.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                handle_bad(
                    BadRecordError(
                        path,
                        lineno,
                        f"invalid JSON ({e.msg} at column {e.colno})",
                        category="invalid_json",
                    ),
                    on_bad,
                    report,
                )
                continue
            yield lineno, obj


def iter_jsonl(
    path: PathLike,
    model: type[BaseModel] | None = None,
    *,
    on_bad: OnBad = "raise",
    report: RecordReport | None = None,
) -> Iterator[Any]:
    """Stream records from a JSONL file: model instances if ``model`` is given, else dicts.

    Never holds more than one line in memory, so multi-GB generation outputs can be filtered.
    Kept records are counted in ``report`` when one is given.
    """
    _check_on_bad(on_bad, report)
    return _iter_jsonl(path, model, on_bad, report)


def _iter_jsonl(
    path: PathLike, model: type[BaseModel] | None, on_bad: OnBad, report: RecordReport | None
) -> Iterator[Any]:
    for lineno, obj in _iter_jsonl_objects(path, on_bad, report):
        try:
            rec = parse_record(obj, model, path, lineno)
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        if report is not None:
            report.kept()
        yield rec


def _utf8_error(path: PathLike) -> BadRecordError:
    """The error for a file that is not UTF-8, naming the first bad byte's offset in the file
    (a BOM counted, as any byte) and its line; found by a second, streaming pass, since a
    decoder's own offsets are relative to whatever chunk it was given."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines of the chunks decoded before this one
    with open(path, "rb") as f:
        while True:
            raw = f.read(1 << 20)
            pending = decoder.getstate()[0]  # an unfinished character's first bytes
            try:
                decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset - len(pending) + e.start
                line = lines + raw[: max(at - offset, 0)].count(b"\n") + 1
                return BadRecordError(
                    path, line, f"invalid UTF-8 at byte {at}", category="invalid_utf8"
                )
            if not raw:
                break
            offset += len(raw)
            lines += raw.count(b"\n")
    return BadRecordError(path, None, "invalid UTF-8", category="invalid_utf8")


def load_json(path: PathLike) -> Any:
    """Parse a whole JSON document; a broken file raises BadRecordError (it cannot be skipped)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise _utf8_error(path) from e
    except json.JSONDecodeError as e:
        raise BadRecordError(
            path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})", category="invalid_json"
        ) from e


def iter_objects(
    path: PathLike, *, on_bad: OnBad = "raise", report: RecordReport | None = None
) -> Iterator[tuple[int, PositionKind, Any]]:
    """Yield ``(position, kind, value)`` from a JSONL file or a JSON array file.

    ``kind`` is ``"line"`` for JSONL (position = line number) and ``"record"`` for arrays
    (position = 1-based index). Lets loaders with custom logic reuse the error handling.
    """
    _check_on_bad(on_bad, report)
    fmt = detect_format(path)
    if fmt == "empty":
        return iter(())
    if fmt == "jsonl":
        return ((n, "line", obj) for n, obj in _iter_jsonl_objects(path, on_bad, report))
    return ((i, "record", obj) for i, obj in iter_array(path))


def iter_files(
    paths: Sequence[Path], on_bad: OnBad, report: RecordReport
) -> Iterator[tuple[Path, int, str, Any]]:
    """``(file, position, kind, record)`` of each record of several files, in turn."""
    for path in paths:
        for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
            yield path, pos, kind, obj


_ARRAY_CHUNK = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]")


def iter_array(path: PathLike, chunk_chars: int = _ARRAY_CHUNK) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, element)`` (1-based) of a file holding one JSON array, one element at a
    time: LLaVA-Med releases its figures and conversations as arrays of hundreds of MB, which
    ``json.load`` would hold whole. Each element is parsed by the standard decoder as the
    buffer holds it whole; an element is held only while it is parsed.

    A syntax error raises :class:`BadRecordError` with its line and column (a broken array
    cannot be resynchronised, so it cannot be skipped), after the elements before it.
    """
    import codecs

    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        lines_before = 0  # newlines in the text dropped from the buffer
        column_before = 0  # characters after the last of them: the buffer's start column

        def more() -> bool:
            nonlocal buf, pos, eof, lines_before, column_before
            if eof:
                return False
            raw = f.read(chunk_chars)
            try:
                text = utf8.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise _utf8_error(path) from e
            eof = not raw
            newlines = buf.count("\n", 0, pos)
            lines_before += newlines
            last = buf.rfind("\n", 0, pos)
            column_before = pos - last - 1 if newlines else column_before + pos
            buf = buf[pos:] + text
            pos = 0
            return True

        def fail(msg: str, at: int) -> BadRecordError:
            line = lines_before + buf.count("\n", 0, at) + 1
            last = buf.rfind("\n", 0, at)
            column = at - last if last >= 0 else column_before + at + 1
            return BadRecordError(
                path, line, f"invalid JSON ({msg} at column {column})", category="invalid_json"
            )

        def skip_space() -> str:
            """The next non-space character (``""`` at the end), reading as needed."""
            nonlocal pos
            while True:
                pos = _SPACE.match(buf, pos).end()
                if pos < len(buf) or not more():
                    return buf[pos : pos + 1]

        if skip_space() != "[":
            raise fail("expected a JSON array", pos)
        pos += 1
        index = 0
        if skip_space() == "]":
            pos += 1
        else:
            while True:
                if not skip_space():
                    raise fail("unexpected end of file in the array", pos)
                while True:  # parse one element: complete once a delimiter or EOF follows
                    try:  # (a number cut by the buffer, "3.5" read as "3", is not complete)
                        obj, end = decoder.raw_decode(buf, pos)
                        if eof or (end < len(buf) and buf[end] in _DELIMITERS):
                            break
                    except json.JSONDecodeError as e:
                        if eof:
                            raise fail(e.msg, e.pos) from None
                    more()  # incomplete so far: read on (at EOF the next try decides)
                index += 1
                pos = end
                yield index, obj
                sep = skip_space()
                if sep == ",":
                    pos += 1
                    if skip_space() == "]":
                        raise fail("trailing comma before ']'", pos)
                    continue
                if sep == "]":
                    pos += 1
                    break
                raise fail(
                    "expected ',' or ']' after an element" if sep else "unexpected end of file",
                    pos,
                )
        if skip_space():
            raise fail("extra data after the array", pos)


class LocatedRecords(list[Any]):
    """Records as a reader returned them, each remembering the file position it was read at.

    A check run after reading (:func:`check_unique`) can then name the file line or array
    element of a bad record: its index in the list is not that once blank, invalid or skipped
    lines came before it. Positions follow the record objects, not the list slots, so sorting
    keeps them right; a record added otherwise (or a plain list) has no position.
    """

    def __init__(self) -> None:
        super().__init__()
        self._where: dict[int, tuple[Any, int, PositionKind]] = {}

    def add(self, rec: Any, pos: int, kind: PositionKind) -> None:
        """Append ``rec``, read at ``pos`` (a line number, or an element index if ``kind`` is
        ``"record"``)."""
        self.append(rec)
        self._where[id(rec)] = (rec, pos, kind)

    def where(self, rec: Any) -> tuple[int, PositionKind] | None:
        """Where ``rec`` was read, or ``None`` if it was not added with a position."""
        got = self._where.get(id(rec))
        if got is None or got[0] is not rec:  # the record held keeps its id from being reused
            return None
        return got[1], got[2]


def read_records(
    path: PathLike,
    model: type[BaseModel] | None = None,
    *,
    on_bad: OnBad = "raise",
    report: RecordReport | None = None,
) -> LocatedRecords:
    """Read all records from JSONL or a JSON array file (as released by LLaVA-Med/BioMed-VITAL).

    In an array, positions in errors are the 1-based element index ("record 12"). The list
    remembers each record's position for later checks (:class:`LocatedRecords`).
    """
    out = LocatedRecords()
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        try:
            rec = parse_record(obj, model, path, pos, kind)
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        if report is not None:
            report.kept()
        out.add(rec, pos, kind)
    return out


def _get_key(rec: Any, key: str) -> Any:
    if isinstance(rec, dict):
        return rec.get(key)
    return getattr(rec, key, None)


def check_unique(
    records: Iterable[Any],
    key: str,
    path: PathLike,
    *,
    on_bad: OnBad = "raise",
    report: RecordReport | None = None,
    where: Sequence[tuple[int, PositionKind]] | None = None,
    counted: bool = True,
) -> list[Any]:
    """Refuse repeated ids (which would silently double-count or overwrite records downstream).

    Errors name the file line (or array element) each record was read at: ``where`` gives the
    positions, one per record, else a :class:`LocatedRecords` from a reader knows them; without
    either, positions are 1-based indices in ``records`` ("record N").

    Returns the records, minus later duplicates when ``on_bad="skip"`` (each counted in
    ``report`` as ``duplicate:<key>``). With ``counted`` (the readers count what they return as
    kept in the same report), a file record all of whose records are dropped is also taken out
    of the kept count, so no record is counted both kept and skipped. Records whose key is
    missing/None are not checked.
    """
    _check_on_bad(on_bad, report)
    recs = list(records)
    if where is not None:
        if len(where) != len(recs):
            raise ValueError(f"check_unique: {len(where)} positions for {len(recs)} records")
        located: list[tuple[int, PositionKind] | None] = list(where)
    elif isinstance(records, LocatedRecords):
        located = [records.where(rec) for rec in recs]
    else:
        located = [None] * len(recs)
    # One file record may give several records (answer marks give one pair per contrast); it
    # stops being kept only when all of them are dropped.
    left: dict[tuple[int, PositionKind], int] = {}
    for loc in located:
        if loc is not None:
            left[loc] = left.get(loc, 0) + 1
    seen: dict[Any, tuple[int, PositionKind]] = {}
    out: list[Any] = []
    for i, (rec, loc) in enumerate(zip(recs, located, strict=True), start=1):
        value = _get_key(rec, key)
        if value is None:
            out.append(rec)
            continue
        pos, kind = loc if loc is not None else (i, "record")
        if value not in seen:
            seen[value] = (pos, kind)
            out.append(rec)
            continue
        first_pos, first_kind = seen[value]
        err = BadRecordError(
            path,
            pos,
            f"duplicate {key} {value!r} ({kind} {pos} repeats {first_kind} {first_pos})",
            key,
            kind=kind,
            category=f"duplicate:{key}",
        )
        handle_bad(err, on_bad, report)  # raises unless skipping
        if counted and report is not None:
            if loc is None:
                report.unkeep()
            else:
                left[loc] -= 1
                if left[loc] == 0:
                    report.unkeep()
    return out


# ----------------------------------------------------------------------------- writing


def fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not possible on every platform, so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Write to a temp file in the same directory, then ``os.replace`` it onto ``path``.

    The output therefore appears complete or not at all; on an exception the temp file is removed
    and any previous file at ``path`` is left untouched. ``mode`` is ``"w"``/``"wt"`` or ``"wb"``.
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_write mode must be 'w', 'wt' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, like a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        f = os.fdopen(fd, mode, encoding=None if "b" in mode else encoding)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", by_alias=True)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def to_jsonable(record: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """A model as the JSON dict it is written as (aliases such as ``from`` used)."""
    if isinstance(record, BaseModel):
        return record.model_dump(mode="json", by_alias=True)
    return record


def write_jsonl(
    path: PathLike, records: Iterable[BaseModel | dict[str, Any]], *, allow_nan: bool = False
) -> int:
    """Atomically write records one per line, streaming from ``records``; returns the count.

    NaN/inf are refused by default because most JSON readers reject them.
    """
    n = 0
    with atomic_write(path, "w") as f:
        for rec in records:
            f.write(
                json.dumps(
                    to_jsonable(rec), ensure_ascii=False, allow_nan=allow_nan, default=_json_default
                )
            )
            f.write("\n")
            n += 1
    return n


def write_json(
    path: PathLike, obj: Any, *, indent: int | None = 2, allow_nan: bool = False
) -> None:
    """Atomically write one JSON document (models, paths, sets and numpy values are converted)."""
    with atomic_write(path, "w") as f:
        json.dump(
            obj, f, ensure_ascii=False, indent=indent, allow_nan=allow_nan, default=_json_default
        )
        f.write("\n")
