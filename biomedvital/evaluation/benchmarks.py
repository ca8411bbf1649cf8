"""Loaders for the medical VQA benchmarks (VQA-RAD, SLAKE, PathVQA) into one record type.

Every loader reads the files as they are published and returns :class:`VQAItem` records with a
string question id, so predictions can be joined by id (never by position) whatever the source.
Ground truth is never skipped: a bad record raises :class:`BadRecordError` naming the file, the
record and the field, because dropping a question would silently change every score's denominator.

Published layouts handled:

* VQA-RAD ``VQA_RAD Dataset Public.json`` (OSF release): ``qid`` (int, but ``"0"`` for the first
  record), ``phrase_type`` (``test_freeform``/``test_para`` = test, ``freeform``/``para`` = train),
  ``answer`` (a few ints), ``answer_type`` (``"CLOSED "`` with a trailing space twice).
* SLAKE 1.0 ``train.json``/``validate.json``/``test.json``: English and Chinese mixed (``q_lang``),
  ``qid`` ints, two key orders (irrelevant for dicts, but tested).
* PathVQA grouped ``pvqa_<split>.json`` (the official baseline's format): one element per image,
  ``labelf.pvqa`` a list of one-key dicts ``{answer: 1}`` aligned by index with the questions in
  ``sentf.pvqa``; images without questions have empty lists. Question id = ``"<img_id>_<k>"``;
  closed = the answer is yes/no.
* LLaVA-Med's converted ``test.json`` (any benchmark): ``id``, ``image``, ``answer_type``
  (``OPEN``/``CLOSED``), ``conversations`` (or the typo ``conversatons``) whose first turn is the
  question (``<image>`` tokens removed) and second the answer. Assumed from LLaVA-Med's evaluation
  script and the community conversion scripts (the converted files themselves were not released);
  the ids must be unique, which rules out conversions that reuse the PathVQA image id per question.
* PathVQA on Hugging Face (``flaviagiammarino/path-vqa``): parquet files ``<split>-NNNNN-of-NNNNN
  .parquet`` with columns ``image`` (a struct of ``bytes`` and ``path``), ``question``, ``answer``.
  Question id = ``"<file stem>_<row>"`` (row 0-based within the file, e.g.
  ``"test-00000-of-00003_17"``); images are written once under an image cache folder, named by
  the SHA-256 of their bytes (see :func:`load_pathvqa_parquet`); closed = the answer is yes/no.
* LLaVA-Med-Bench ``llava_med_eval_qa50_qa.jsonl`` (open-ended chat, one split): ``question_id``,
  ``image``, ``text`` (the question, ``<image>`` removed), ``gpt4_answer`` (the reference the
  judge compares with), ``type``. Its items are ``answer_type="chat"``: answered and written,
  never scored by the VQA metrics (``judge`` scores them).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from biomedvital.data.jsonio import iter_objects
from biomedvital.data.report import BadRecordError, PositionKind

VQABenchmark = Literal["vqa_rad", "slake", "pathvqa"]  # scored by LLaVA-Med's VQA metrics
Benchmark = VQABenchmark | Literal["llava_med_bench"]
AnswerType = Literal["open", "closed", "chat"]
PathLike = str | os.PathLike[str]

BENCHMARKS: tuple[str, ...] = ("vqa_rad", "slake", "pathvqa", "llava_med_bench")
VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
LLAVA_MED_BENCH_FILE = "llava_med_eval_qa50_qa.jsonl"
_VQA_RAD_SPLITS = {
    "test_freeform": "test",
    "test_para": "test",
    "freeform": "train",
    "para": "train",
}
_SLAKE_SPLITS = ("train", "validate", "test")
_PATHVQA_SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"val": "validate", "validation": "validate", "valid": "validate"}
_KNOWN_SPLIT_STEMS = {"train", "val", "validate", "validation", "valid", "test"}


@dataclass(frozen=True, slots=True)
class VQAItem:
    """One benchmark question with its ground truth; ``question_id`` is what predictions cite."""

    question_id: str
    image: str
    question: str
    answer: str
    answer_type: AnswerType
    split: str


# ----------------------------------------------------------------------------- field helpers


class _Where:
    """Location of one record, so every error names file, record and field the same way."""

    __slots__ = ("kind", "path", "pos")

    def __init__(self, path: PathLike, pos: int, kind: PositionKind) -> None:
        self.path, self.pos, self.kind = path, pos, kind

    def error(
        self, reason: str, field: str | None = None, category: str | None = None
    ) -> BadRecordError:
        return BadRecordError(self.path, self.pos, reason, field, kind=self.kind, category=category)


def _get(obj: dict[str, Any], key: str, where: _Where, prefix: str = "") -> Any:
    if key not in obj:
        raise where.error("missing", prefix + key, f"missing:{prefix + key}")
    return obj[key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _qid(value: Any, where: _Where, field: str) -> str:
    """Ids are compared as strings: ``0``, ``"0"`` and a prediction's ``0`` are the same id."""
    if _is_int(value):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise where.error(f"expected an integer or non-empty string id (got {value!r})", field)


def _text(value: Any, where: _Where, field: str) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string (got {value!r})", field)
    return value


def _answer(value: Any, where: _Where, field: str) -> str:
    """Answers are strings; VQA-RAD stores a few counts as ints (``4``, ``12``)."""
    if _is_int(value):
        return str(value)
    if isinstance(value, str):
        return value
    raise where.error(f"expected a string or integer answer (got {value!r})", field)


def _answer_type(value: Any, where: _Where, field: str = "answer_type") -> AnswerType:
    """``OPEN``/``CLOSED`` in any case, surrounding spaces ignored (VQA-RAD has ``"CLOSED "``)."""
    if isinstance(value, str):
        norm = value.strip().upper()
        if norm == "OPEN":
            return "open"
        if norm == "CLOSED":
            return "closed"
    raise where.error(f"expected 'OPEN' or 'CLOSED' (got {value!r})", field)


def _records(path: Path) -> list[tuple[_Where, dict[str, Any]]]:
    out = []
    for pos, kind, obj in iter_objects(path):
        where = _Where(path, pos, kind)
        if not isinstance(obj, dict):
            raise where.error(
                f"expected a JSON object, got {type(obj).__name__}", category="not_an_object"
            )
        out.append((where, obj))
    return out


def _check_unique(items: list[VQAItem], wheres: list[_Where]) -> list[VQAItem]:
    seen: dict[str, _Where] = {}
    for item, where in zip(items, wheres, strict=True):
        first = seen.setdefault(item.question_id, where)
        if first is not where:
            raise where.error(
                f"duplicate question id {item.question_id!r} (first at {first.kind} {first.pos}); "
                "predictions are joined by id, so ids must be unique",
                category="duplicate:question_id",
            )
    return items


def _is_llava_layout(records: list[tuple[_Where, dict[str, Any]]]) -> bool:
    return bool(records) and any(k in records[0][1] for k in ("conversations", "conversatons"))


def _check_split_name(path: Path, split: str, stem: str) -> None:
    """Refuse e.g. ``validate.json`` loaded as ``split="test"`` (scores on the wrong split)."""
    stem_split = _SPLIT_ALIASES.get(stem, stem)
    if stem in _KNOWN_SPLIT_STEMS and stem_split != _SPLIT_ALIASES.get(split, split):
        raise ValueError(f"{path}: file name says split {stem!r} but split={split!r} was asked")


# ----------------------------------------------------------------------------- loaders


def _official_item(obj: dict[str, Any], where: _Where, image_key: str, split: str) -> VQAItem:
    """One record of VQA-RAD's or SLAKE's official JSON (they differ in the image's key)."""
    return VQAItem(
        question_id=_qid(_get(obj, "qid", where), where, "qid"),
        image=_text(_get(obj, image_key, where), where, image_key),
        question=_text(_get(obj, "question", where), where, "question"),
        answer=_answer(_get(obj, "answer", where), where, "answer"),
        answer_type=_answer_type(_get(obj, "answer_type", where), where),
        split=split,
    )


def load_vqa_rad(path: PathLike, split: str = "test") -> list[VQAItem]:
    """VQA-RAD from the official JSON (or the folder holding it); ``split``: test, train or all.

    The test split is ``phrase_type`` in {test_freeform, test_para}: 451 QA on 203 images.
    """
    if split not in ("test", "train", "all"):
        raise ValueError(f"VQA-RAD split must be 'test', 'train' or 'all', got {split!r}")
    path = _resolve(Path(path), _file_names("vqa_rad", split))
    records = _records(path)
    if _is_llava_layout(records):
        # a converted file holds one split, named only by its file name (the official file
        # holds both and is filtered by phrase_type below)
        _check_split_name(path, split, path.stem)
        return _llava_items(records, split)
    items, wheres = [], []
    for where, obj in records:
        phrase = _get(obj, "phrase_type", where)
        rec_split = _VQA_RAD_SPLITS.get(phrase) if isinstance(phrase, str) else None
        if rec_split is None:
            raise where.error(
                f"unknown phrase_type {phrase!r} (expected one of {sorted(_VQA_RAD_SPLITS)})",
                "phrase_type",
            )
        if split != "all" and rec_split != split:
            continue
        items.append(_official_item(obj, where, "image_name", rec_split))
        wheres.append(where)
    return _check_unique(items, wheres)


def load_slake(path: PathLike, split: str = "test", lang: str | None = "en") -> list[VQAItem]:
    """SLAKE 1.0 from ``<split>.json`` (a file, or the folder holding it); English by default.

    ``lang=None`` keeps every language. The English test split is 1,061 QA on 96 images.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _SLAKE_SPLITS:
        raise ValueError(f"SLAKE split must be one of {_SLAKE_SPLITS}, got {split!r}")
    path = _resolve(Path(path), _file_names("slake", split))
    _check_split_name(path, split, path.stem)
    records = _records(path)
    if _is_llava_layout(records):
        return _llava_items(records, split)
    items, wheres = [], []
    for where, obj in records:
        if lang is not None:
            q_lang = _get(obj, "q_lang", where)
            if q_lang != lang:
                continue
        items.append(_official_item(obj, where, "img_name", split))
        wheres.append(where)
    return _check_unique(items, wheres)


def load_pathvqa(
    path: PathLike,
    split: str = "test",
    image_cache: PathLike | None = None,
    write_images: bool = True,
) -> list[VQAItem]:
    """PathVQA from the grouped ``pvqa_<split>.json``, LLaVA-Med's converted layout, or parquet.

    Question ``k`` of image ``img_id`` gets id ``"<img_id>_<k>"`` and image ``"<split>/<img_id>.jpg"``
    (PathVQA's folder layout); a question is closed when its answer is yes or no. The test split is
    6,761 QA on 858 images (133 of the 991 test images carry no question).

    A ``.parquet`` file, or a folder (or its ``data/`` subfolder) holding ``<split>-*.parquet``
    and no JSON file of the split, is read by :func:`load_pathvqa_parquet`, which writes the
    images under ``image_cache`` unless ``write_images`` is off (scoring needs no image; both
    are ignored for the JSON layouts).
    """
    if split not in _PATHVQA_SPLITS:
        raise ValueError(f"PathVQA split must be one of {_PATHVQA_SPLITS}, got {split!r}")
    parquet = _pathvqa_parquet_files(Path(path), split)
    if parquet is not None:
        return load_pathvqa_parquet(parquet, split, image_cache, write_images)
    path = _resolve(Path(path), _file_names("pathvqa", split))
    stem = path.stem.removeprefix("pvqa_")
    _check_split_name(path, split, stem)
    records = _records(path)
    if _is_llava_layout(records):
        return _llava_items(records, split)
    items, wheres = [], []
    for where, obj in records:
        img_id = _text(_get(obj, "img_id", where), where, "img_id")
        labels = _group_list(obj, "labelf", where)
        questions = _group_list(obj, "sentf", where)
        if len(labels) != len(questions):
            raise where.error(
                f"{len(labels)} answers for {len(questions)} questions (they align by index)",
                "labelf.pvqa",
            )
        for k, (label, question) in enumerate(zip(labels, questions, strict=True)):
            if not isinstance(label, dict) or len(label) != 1:
                raise where.error(
                    f"expected a one-key object {{answer: score}} (got {label!r})",
                    f"labelf.pvqa.{k}",
                )
            answer = _answer(next(iter(label)), where, f"labelf.pvqa.{k}")
            closed = answer.strip().lower() in ("yes", "no")
            items.append(
                VQAItem(
                    question_id=f"{img_id}_{k}",
                    image=f"{split}/{img_id}.jpg",
                    question=_text(question, where, f"sentf.pvqa.{k}"),
                    answer=answer,
                    answer_type="closed" if closed else "open",
                    split=split,
                )
            )
            wheres.append(where)
    return _check_unique(items, wheres)


_PARQUET_SPLIT_NAMES = {"val": ("val", "validation", "validate", "valid")}


def _pathvqa_parquet_files(path: Path, split: str) -> list[Path] | None:
    """The parquet files to read for ``split``, or ``None`` when ``path`` is a JSON layout."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else None
    if not path.is_dir() or any(
        (path / n).is_file() for n in (f"pvqa_{split}.json", f"{split}.json")
    ):
        return None
    for folder in (path, path / "data"):
        files = sorted(
            f
            for name in _PARQUET_SPLIT_NAMES.get(split, (split,))
            for f in folder.glob(f"{name}-*.parquet")
        )
        if files:
            return files
    return None


def _image_name(data: bytes, hint: Any) -> str:
    """``<sha256 of the bytes>.<ext>``: the extension from the stored path, else the magic bytes."""
    ext = Path(hint).suffix.lower() if isinstance(hint, str) else ""
    if ext not in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"):
        if data.startswith(b"\x89PNG"):
            ext = ".png"
        elif data.startswith(b"\xff\xd8"):
            ext = ".jpg"
        else:
            ext = ".img"
    return hashlib.sha256(data).hexdigest() + ext


def _write_once(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` unless it is there already (atomic: temp file + rename)."""
    if target.is_file():
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def load_pathvqa_parquet(
    files: PathLike | Iterable[PathLike],
    split: str = "test",
    image_cache: PathLike | None = None,
    write_images: bool = True,
) -> list[VQAItem]:
    """PathVQA from the Hugging Face parquet files (``image``/``question``/``answer`` columns).

    Args:
        files: one ``.parquet`` file or several (read in the order given).
        split: labels the items; a file named ``<other split>-*.parquet`` is refused.
        image_cache: folder the images are written to, once each, as ``<sha256>.<ext>`` (the same
            image shared by several questions, or already written by an earlier load, is not
            written again). Point the evaluator's image root at it. Default: ``images`` next to
            the first parquet file.
        write_images: off, nothing is written (``score-vqa`` needs the names, not the images,
            and the data may sit on a read-only mount).

    Question ids are ``"<file stem>_<row>"`` with ``row`` the 0-based row in that file, so they
    stay the same across loads. A bad row raises :class:`BadRecordError` naming the file and the
    1-based record (``row + 1``) and the column.
    """
    import pyarrow.parquet as pq

    paths = [Path(files)] if isinstance(files, str | os.PathLike) else [Path(f) for f in files]
    if not paths:
        raise FileNotFoundError("no parquet files given")
    cache = Path(image_cache) if image_cache is not None else paths[0].parent / "images"
    if write_images:
        cache.mkdir(parents=True, exist_ok=True)
    items, wheres = [], []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
        _check_split_name(path, split, path.stem.split("-", 1)[0])
        table = pq.read_table(path)
        for col in ("image", "question", "answer"):
            if col not in table.column_names:
                raise BadRecordError(
                    path,
                    None,
                    f"missing column (has {table.column_names})",
                    col,
                    category=f"missing:{col}",
                )
        images, questions, answers = (
            table.column(c).to_pylist() for c in ("image", "question", "answer")
        )
        for row, (image, question, answer) in enumerate(
            zip(images, questions, answers, strict=True)
        ):
            where = _Where(path, row + 1, "record")
            data = image.get("bytes") if isinstance(image, dict) else None
            if not isinstance(data, bytes) or not data:
                raise where.error(
                    "expected a struct with non-empty 'bytes' (an encoded image)",
                    "image.bytes",
                    "missing:image.bytes",
                )
            answer = _answer(answer, where, "answer")
            question = _text(question, where, "question")
            name = _image_name(data, image.get("path"))
            if write_images:
                _write_once(cache / name, data)
            closed = answer.strip().lower() in ("yes", "no")
            items.append(
                VQAItem(
                    question_id=f"{path.stem}_{row}",
                    image=name,
                    question=question,
                    answer=answer,
                    answer_type="closed" if closed else "open",
                    split=split,
                )
            )
            wheres.append(where)
    return _check_unique(items, wheres)


def load_llava_vqa(path: PathLike, split: str = "test") -> list[VQAItem]:
    """LLaVA-Med's converted VQA file (``id``/``image``/``answer_type``/``conversations``).

    The split is not stored in these files, so ``split`` only labels the items.
    """
    path = Path(path)
    return _llava_items(_records(path), split)


def _llava_items(records: list[tuple[_Where, dict[str, Any]]], split: str) -> list[VQAItem]:
    items, wheres = [], []
    for where, obj in records:
        conv_key = "conversations" if "conversations" in obj else "conversatons"
        conv = _get(obj, conv_key, where)
        if not isinstance(conv, list) or len(conv) < 2:
            raise where.error("expected at least a question turn and an answer turn", conv_key)
        turns = []
        for t, turn in enumerate(conv[:2]):
            if not isinstance(turn, dict):
                raise where.error(f"expected an object (got {turn!r})", f"{conv_key}.{t}")
            turns.append(_get(turn, "value", where, f"{conv_key}.{t}."))
        question = _text(turns[0], where, f"{conv_key}.0.value")
        items.append(
            VQAItem(
                question_id=_qid(_get(obj, "id", where), where, "id"),
                image=_text(_get(obj, "image", where), where, "image"),
                question=question.replace("<image>", "").strip(),
                answer=_answer(turns[1], where, f"{conv_key}.1.value"),
                answer_type=_answer_type(_get(obj, "answer_type", where), where),
                split=split,
            )
        )
        wheres.append(where)
    return _check_unique(items, wheres)


def load_llava_med_bench(path: PathLike, split: str = "test") -> list[VQAItem]:
    """LLaVA-Med-Bench's questions (a file, or the folder holding ``llava_med_eval_qa50_qa.jsonl``):
    193 open-ended questions on 50 figures; the reference answer is ``gpt4_answer``.

    The benchmark has one split, ``test``; its items are ``answer_type="chat"``.
    """
    if split != "test":
        raise ValueError(f"LLaVA-Med-Bench has one split, 'test'; got {split!r}")
    path = _resolve(Path(path), _file_names("llava_med_bench", split))
    items, wheres = [], []
    for where, obj in _records(path):
        question = _text(_get(obj, "text", where), where, "text").replace("<image>", "").strip()
        if not question:
            raise where.error("empty question", "text", "empty:text")
        items.append(
            VQAItem(
                question_id=_qid(_get(obj, "question_id", where), where, "question_id"),
                image=_text(_get(obj, "image", where), where, "image"),
                question=question,
                answer=_text(_get(obj, "gpt4_answer", where), where, "gpt4_answer"),
                answer_type="chat",
                split=split,
            )
        )
        wheres.append(where)
    return _check_unique(items, wheres)


def _group_list(obj: dict[str, Any], key: str, where: _Where) -> list[Any]:
    group = _get(obj, key, where)
    if not isinstance(group, dict):
        raise where.error(f"expected an object with a 'pvqa' list (got {group!r})", key)
    values = _get(group, "pvqa", where, f"{key}.")
    if not isinstance(values, list):
        raise where.error(f"expected a list (got {values!r})", f"{key}.pvqa")
    return values


def _resolve(path: Path, names: Iterable[str]) -> Path:
    """A file is used as given; in a folder the first of ``names`` that exists."""
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(path)
        return path
    names = list(names)
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: none of {names} found")


def _file_names(benchmark: str, split: str) -> list[str]:
    """The file names a benchmark's loader looks for in a folder, first match wins."""
    if benchmark == "vqa_rad":
        return [VQA_RAD_FILE, f"{split}.json"]
    if benchmark == "slake":
        return [f"{_SPLIT_ALIASES.get(split, split)}.json"]
    if benchmark == "pathvqa":
        return [f"pvqa_{split}.json", f"{split}.json"]
    return [LLAVA_MED_BENCH_FILE]


def benchmark_files(benchmark: Benchmark, data: PathLike, split: str = "test") -> list[Path]:
    """The files :func:`load_benchmark` reads for ``split``: ``data`` itself when it is a file,
    else the file (or PathVQA's parquet shards) it picks in the folder. Provenance and the answer
    journal hash these, so a folder's changed file is seen."""
    path = Path(data)
    if benchmark == "pathvqa":
        parquet = _pathvqa_parquet_files(path, split)
        if parquet is not None:
            return parquet
    return [_resolve(path, _file_names(benchmark, split))]


_LOADERS: dict[str, Callable[..., list[VQAItem]]] = {
    "vqa_rad": load_vqa_rad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "llava_med_bench": load_llava_med_bench,
}


def load_benchmark(
    benchmark: Benchmark,
    data: PathLike,
    split: str = "test",
    image_cache: PathLike | None = None,
    write_images: bool = True,
) -> list[VQAItem]:
    """Load ``benchmark``'s ``split`` from a file or a folder of its published files.

    SLAKE is loaded in English (as LLaVA-Med evaluates it); use :func:`load_slake` for others.
    ``image_cache``, ``write_images``: where PathVQA's parquet images are written, and whether
    (see :func:`load_pathvqa_parquet`); ignored by every other layout.
    """
    if benchmark not in _LOADERS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if benchmark == "pathvqa":
        return load_pathvqa(data, split, image_cache, write_images)
    return _LOADERS[benchmark](data, split)


def split_stats(items: Iterable[VQAItem]) -> dict[str, int]:
    """Images / QA / open / closed counts, the figures papers publish for each split (and the
    open-ended chat questions, where there are any)."""
    items = list(items)
    types = Counter(it.answer_type for it in items)
    stats = {
        "images": len({it.image for it in items}),
        "qa": len(items),
        "open": types["open"],
        "closed": types["closed"],
    }
    if types["chat"]:
        stats["chat"] = types["chat"]
    return stats
