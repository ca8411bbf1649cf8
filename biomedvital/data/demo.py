"""Embedded demo pool over real medical images that ship inside pip packages.

The pool needs no download: the images are files bundled with pydicom (two small DICOM studies and
an annotated abdominal MRI) and scikit-image (immunohistochemistry, a fundus photograph, a
quantitative phase image of a cell and a retinal microaneurysm crop). They are copied byte for byte;
DICOM files are left as DICOM because the image loader windows them itself.

The text (figure captions and mentions, eight candidate conversations of deliberately varied
quality per image with a 0-10 rating each, and clinician preference pairs) is hand-written package
data in ``demo_content.json``. :func:`materialize_demo` lays it out in the same file layouts the
real pipeline reads (LLaVA-Med figures, LLaVA conversations, judge ratings, preference pairs).

Writing is atomic at the directory level: everything is written to a temporary sibling directory
which is then renamed onto ``out_dir``. A reader therefore sees either no directory or a complete
one, a crash leaves nothing half-written behind, and a second call that finds an up-to-date
directory (same content hash, every file intact) does nothing.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import fsync_dir

__all__ = [
    "ANNOTATOR",
    "CANDIDATES_PER_IMAGE",
    "DEMO_CONTENT",
    "DOMAIN_KEYS",
    "FORMAT_VERSION",
    "GENERATOR_MODEL",
    "JUDGE",
    "MANIFEST_KIND",
    "QUALITIES",
    "DemoFiles",
    "demo",
    "load_demo_content",
    "materialize_demo",
    "source_path",
]

FORMAT_VERSION = 1
"""Layout version of both ``demo_content.json`` and the materialised directory."""

CONTENT_RESOURCE = "demo_content.json"
MANIFEST_KIND = "biomedvital-demo"
GENERATOR_MODEL = "demo-handwritten"
JUDGE = "demo-handwritten"
ANNOTATOR = "demo-clinician"

DOMAIN_KEYS = ("chest_xray", "mri", "ct_scan", "histology", "gross")
"""The LLaVA-Med figure domain flags."""

QUALITIES = ("excellent", "good", "mediocre", "poor")
CANDIDATES_PER_IMAGE = 8
MIN_PREFERENCES_PER_IMAGE = 4

# Packages the images are taken from: content name -> distribution name (for the version).
SOURCE_PACKAGES = {"pydicom": "pydicom", "skimage": "scikit-image"}

FIGURES_FILE = "figures.jsonl"
CANDIDATES_FILE = "candidates.jsonl"
RATINGS_FILE = "ratings.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
# inputs of `generate` on the demo: the figures with their image file (LLaVA-Med's layout names
# images <pair_id>.jpg, the demo's are the bundled files), and demonstrations in BioMed-VITAL's
# layout (the best-rated hand-written conversation of each figure)
GENERATION_FIGURES_FILE = "generation/figures.jsonl"
DEMONSTRATIONS_FILE = "generation/demonstrations.jsonl"
MANIFEST_FILE = "manifest.json"
IMAGES_DIR = "images"

# Temporary siblings of out_dir older than this are leftovers of killed runs and are removed.
_STALE_TMP_SECONDS = 3600.0

_KEY_RE = re.compile(r"^[a-z0-9_]+$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DemoFiles:
    """Paths of a materialised demo pool (``images`` is the directory candidate paths are under)."""

    root: Path
    images: Path
    figures: Path
    candidates: Path
    ratings: Path
    preferences: Path
    manifest: Path
    generation_figures: Path
    demonstrations: Path

    @classmethod
    def at(cls, root: str | Path) -> DemoFiles:
        """The layout under ``root`` (nothing is checked or written)."""
        r = Path(root)
        return cls(
            root=r,
            images=r / IMAGES_DIR,
            figures=r / FIGURES_FILE,
            candidates=r / CANDIDATES_FILE,
            ratings=r / RATINGS_FILE,
            preferences=r / PREFERENCES_FILE,
            manifest=r / MANIFEST_FILE,
            generation_figures=r / GENERATION_FIGURES_FILE,
            demonstrations=r / DEMONSTRATIONS_FILE,
        )


# ----------------------------------------------------------------------------- content


def _content_bytes() -> bytes:
    return resources.files(__package__).joinpath(CONTENT_RESOURCE).read_bytes()


def load_demo_content() -> dict[str, Any]:
    """Parse and check the packaged ``demo_content.json`` (a fresh copy on every call).

    Raises ValueError naming the offending image/candidate when the hand-written file is malformed.
    """
    content = json.loads(_content_bytes().decode("utf-8"))
    _validate_content(content)
    return content


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{CONTENT_RESOURCE}: {where}: {msg}")


def _check_text(value: Any, where: str, *, single_line: bool = False) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(where, "must be a non-empty string")
    if single_line and "\n" in value:
        _fail(where, "must be a single line")


def _validate_content(content: Any) -> None:
    if not isinstance(content, dict):
        _fail("top level", "must be a JSON object")
    if content.get("format_version") != FORMAT_VERSION:
        _fail("format_version", f"expected {FORMAT_VERSION}, got {content.get('format_version')!r}")
    images = content.get("images")
    if not isinstance(images, list) or not images:
        _fail("images", "must be a non-empty list")
    seen: dict[str, set[str]] = {"key": set(), "pair_id": set(), "file": set()}
    for n, img in enumerate(images):
        where = f"images[{n}]"
        if not isinstance(img, dict):
            _fail(where, "must be an object")
        key = img.get("key")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            _fail(where, f"key {key!r} must match {_KEY_RE.pattern}")
        where = f"image {key!r}"
        for field in ("key", "pair_id", "file"):
            value = img.get(field)
            _check_text(value, f"{where}.{field}", single_line=True)
            if value in seen[field]:
                _fail(where, f"duplicate {field} {value!r}")
            seen[field].add(value)
        if not _FILE_RE.match(img["file"]):
            _fail(where, f"file {img['file']!r} must be a plain file name")
        source = img.get("source")
        if not isinstance(source, dict) or source.get("package") not in SOURCE_PACKAGES:
            _fail(where, f"source.package must be one of {sorted(SOURCE_PACKAGES)}")
        if not isinstance(source.get("file"), str) or not _FILE_RE.match(source["file"]):
            _fail(where, "source.file must be a plain file name")
        for field in ("fig_caption", "fig_label", "modality"):
            _check_text(img.get(field), f"{where}.{field}")
        if img.get("pmid") is not None:
            _fail(where, "pmid must be null (demo figures have no PubMed record)")
        domain = img.get("domain")
        if (
            not isinstance(domain, dict)
            or set(domain) != set(DOMAIN_KEYS)
            or not all(isinstance(v, bool) for v in domain.values())
        ):
            _fail(where, f"domain must map exactly {list(DOMAIN_KEYS)} to booleans")
        mentions = img.get("in_text_mention")
        if not isinstance(mentions, list) or not mentions:
            _fail(where, "in_text_mention must be a non-empty list")
        for m, mention in enumerate(mentions):
            if not isinstance(mention, dict) or not isinstance(mention.get("entities"), list):
                _fail(f"{where}.in_text_mention[{m}]", "must be {tokens: str, entities: list}")
            _check_text(mention.get("tokens"), f"{where}.in_text_mention[{m}].tokens")
        _validate_candidates(img.get("candidates"), where)
        _validate_preferences(img.get("preferences"), where)


def _validate_candidates(candidates: Any, where: str) -> None:
    if not isinstance(candidates, list) or len(candidates) != CANDIDATES_PER_IMAGE:
        _fail(where, f"needs exactly {CANDIDATES_PER_IMAGE} candidates")
    for c, cand in enumerate(candidates, start=1):
        cw = f"{where} candidate {c}"
        if not isinstance(cand, dict):
            _fail(cw, "must be an object")
        if cand.get("quality") not in QUALITIES:
            _fail(cw, f"quality must be one of {QUALITIES}")
        rating = cand.get("rating")
        if not isinstance(rating, int) or isinstance(rating, bool) or not 0 <= rating <= 10:
            _fail(cw, f"rating must be an integer 0-10, got {rating!r}")
        _check_text(cand.get("rating_reason"), f"{cw}.rating_reason", single_line=True)
        turns = cand.get("conversations")
        if not isinstance(turns, list) or not turns or len(turns) % 2:
            _fail(cw, "conversations must be a non-empty list of question/answer turn pairs")
        for t, turn in enumerate(turns):
            expected = "human" if t % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != expected:
                _fail(cw, f"turn {t + 1} must be from {expected!r}")
            _check_text(turn.get("value"), f"{cw} turn {t + 1}")
            has_token = "<image>" in turn["value"]
            if has_token != (t == 0):
                _fail(cw, "exactly the first (human) turn must contain <image>")


def _validate_preferences(preferences: Any, where: str) -> None:
    if not isinstance(preferences, list) or len(preferences) < MIN_PREFERENCES_PER_IMAGE:
        _fail(where, f"needs at least {MIN_PREFERENCES_PER_IMAGE} preference pairs")
    for p, item in enumerate(preferences, start=1):
        pw = f"{where} preference {p}"
        if not isinstance(item, dict):
            _fail(pw, "must be an object")
        for field in ("question", "preferred", "rejected"):
            _check_text(item.get(field), f"{pw}.{field}")
        if item["preferred"].strip() == item["rejected"].strip():
            _fail(pw, "preferred and rejected are identical")


DEMO_CONTENT: dict[str, Any] = load_demo_content()
"""The packaged demo content, parsed once at import (use :func:`load_demo_content` for a copy)."""


# ----------------------------------------------------------------------------- sources


def source_path(package: str, file: str) -> Path:
    """Location of a bundled image file inside an installed package (never downloads)."""
    if package == "pydicom":
        from pydicom.data import get_testdata_file

        found = get_testdata_file(file, download=False)
        if not found:
            raise FileNotFoundError(
                errno.ENOENT, f"pydicom does not bundle test file {file!r}", file
            )
        path = Path(str(found))
    elif package == "skimage":
        import skimage.data

        path = Path(skimage.data.__file__).parent / file
    else:
        raise ValueError(
            f"unknown source package {package!r} (expected one of {sorted(SOURCE_PACKAGES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"bundled image missing from {package}", str(path))
    return path


def _package_version(package: str) -> str | None:
    try:
        return metadata.version(SOURCE_PACKAGES[package])
    except metadata.PackageNotFoundError:  # pragma: no cover - imported above, so installed
        return None


# ----------------------------------------------------------------------------- rendering


def _jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records]
    return "".join(lines).encode("utf-8")


def _render(content: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """All output files (relative path -> bytes) except the manifest, plus manifest metadata."""
    figures: list[dict[str, Any]] = []
    candidates: list[dict[str, Any]] = []
    ratings: list[dict[str, Any]] = []
    preferences: list[dict[str, Any]] = []
    files: dict[str, bytes] = {}
    image_meta: list[dict[str, Any]] = []
    for img in content["images"]:
        key, rel_image = img["key"], img["file"]
        package, source_file = img["source"]["package"], img["source"]["file"]
        files[f"{IMAGES_DIR}/{rel_image}"] = source_path(package, source_file).read_bytes()
        image_meta.append(
            {
                "key": key,
                "image": rel_image,
                "pair_id": img["pair_id"],
                "modality": img["modality"],
                "source": {
                    "package": package,
                    "file": source_file,
                    "version": _package_version(package),
                },
            }
        )
        figures.append(
            {
                "pair_id": img["pair_id"],
                "fig_caption": img["fig_caption"],
                "fig_label": img["fig_label"],
                "in_text_mention": img["in_text_mention"],
                "domain": img["domain"],
                "pmid": img["pmid"],
            }
        )
        for c, cand in enumerate(img["candidates"], start=1):
            cid = f"{key}-c{c}"
            candidates.append(
                {
                    "id": cid,
                    "image": rel_image,
                    "conversations": cand["conversations"],
                    "pair_id": img["pair_id"],
                    "generator": {"model": GENERATOR_MODEL, "quality": cand["quality"]},
                }
            )
            ratings.append(
                {
                    "candidate_id": cid,
                    "score": cand["rating"],
                    "judge": JUDGE,
                    "raw": f"{cand['rating']}\n{cand['rating_reason']}",
                }
            )
        for p, item in enumerate(img["preferences"], start=1):
            preferences.append(
                {
                    "id": f"{key}-p{p}",
                    "image": rel_image,
                    "question": item["question"],
                    "preferred": item["preferred"],
                    "rejected": item["rejected"],
                    "fig_caption": img["fig_caption"],
                    "in_text_mention": img["in_text_mention"],
                    "pair_id": img["pair_id"],
                    "annotator": ANNOTATOR,
                }
            )
    files[FIGURES_FILE] = _jsonl(figures)
    files[CANDIDATES_FILE] = _jsonl(candidates)
    files[RATINGS_FILE] = _jsonl(ratings)
    files[PREFERENCES_FILE] = _jsonl(preferences)
    files[GENERATION_FIGURES_FILE] = _jsonl(
        {**fig, "image": img["file"]} for fig, img in zip(figures, content["images"], strict=True)
    )
    files[DEMONSTRATIONS_FILE] = _jsonl(_demonstrations(content, figures))
    meta = {
        "counts": {
            "images": len(image_meta),
            "figures": len(figures),
            "candidates": len(candidates),
            "ratings": len(ratings),
            "preferences": len(preferences),
        },
        "images": image_meta,
        "sources": {
            SOURCE_PACKAGES[p]: _package_version(p)
            for p in sorted({m["source"]["package"] for m in image_meta})
        },
    }
    return files, meta


def _demonstrations(
    content: Mapping[str, Any], figures: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The best-rated candidate of each figure as a demonstration (first of equal ratings)."""
    out = []
    for img, fig in zip(content["images"], figures, strict=True):
        best = max(img["candidates"], key=lambda c: c["rating"])
        out.append(
            {
                "id": f"{img['key']}-demo",
                "imgs": img["file"],
                "conversations": best["conversations"],
                **{k: fig[k] for k in ("fig_caption", "fig_label", "in_text_mention", "domain")},
                "pair_id": fig["pair_id"],
            }
        )
    return out


def _build_manifest(files: Mapping[str, bytes], meta: Mapping[str, Any]) -> dict[str, Any]:
    listing = {
        rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for rel, data in sorted(files.items())
    }
    # The hash covers every written byte plus the recorded metadata, so any change to the content,
    # the bundled images, the rendering code or the package versions yields a new hash.
    hashed = {"format_version": FORMAT_VERSION, "files": listing, **meta}
    content_hash = hashlib.sha256(
        json.dumps(hashed, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    return {
        "kind": MANIFEST_KIND,
        "format_version": FORMAT_VERSION,
        "content_hash": content_hash,
        "written_by": __name__,
        **meta,
        "files": listing,
    }


# ----------------------------------------------------------------------------- install


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        return None
    return manifest


def _is_current(root: Path, content_hash: str) -> bool:
    """True when ``root`` holds a complete demo with this hash and every listed file intact."""
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("content_hash") != content_hash:
        return False
    listing = manifest.get("files")
    if not isinstance(listing, dict) or not listing:
        return False
    try:
        for rel, entry in listing.items():
            path = root / rel
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return False
            if sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def _check_replaceable(root: Path) -> None:
    """Refuse to replace anything that is not an (outdated) demo directory or an empty one."""
    if not root.exists() and not root.is_symlink():
        return
    if not root.is_dir():
        raise FileExistsError(
            errno.EEXIST, "demo output path exists and is not a directory", str(root)
        )
    if _read_manifest(root) is not None or not any(root.iterdir()):
        return
    raise FileExistsError(
        errno.EEXIST,
        f"{root} exists and is not a demo directory (no {MANIFEST_FILE} of kind {MANIFEST_KIND!r}); "
        "refusing to replace it",
        str(root),
    )


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sibling(root: Path, tag: str) -> Path:
    return root.with_name(f".{root.name}.{tag}-{secrets.token_hex(6)}")


def _remove_leftovers(root: Path) -> None:
    """Delete temp/old siblings left by killed runs (temp dirs only once they are clearly stale)."""
    now = time.time()
    for tag in ("tmp", "old"):
        for path in root.parent.glob(f".{glob.escape(root.name)}.{tag}-*"):
            try:
                if tag == "tmp" and now - path.stat().st_mtime < _STALE_TMP_SECONDS:
                    continue  # possibly a concurrent writer's work in progress
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)


def _install(tmp: Path, root: Path, content_hash: str, *, force: bool) -> None:
    """Rename the finished ``tmp`` onto ``root``; an existing outdated demo is moved aside first."""
    for _ in range(10):
        try:
            os.replace(tmp, root)  # succeeds if root is absent (or an empty directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            fsync_dir(root.parent)
            return
        # root is a non-empty directory: a concurrent run may just have installed the same demo.
        if not force and _is_current(root, content_hash):
            return
        _check_replaceable(root)
        old = _sibling(root, "old")
        try:
            os.replace(root, old)
        except FileNotFoundError:
            continue  # another run moved it away; try again
        try:
            os.replace(tmp, root)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another run installed in between; loop re-checks it
        else:
            fsync_dir(root.parent)
            return
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise RuntimeError(
        f"could not install the demo at {root}: it keeps being replaced concurrently"
    )


def materialize_demo(out_dir: str | Path, *, force: bool = False) -> DemoFiles:
    """Write the demo pool under ``out_dir`` and return its paths.

    Layout: ``images/<file>`` (bundled originals, byte for byte), ``figures.jsonl`` (LLaVA-Med
    figure records), ``candidates.jsonl`` (LLaVA conversations), ``ratings.jsonl`` (0-10 judge
    scores), ``preferences.jsonl`` (clinician pairs) and ``manifest.json`` (counts, per-file
    SHA-256, source package versions and a content hash).

    Idempotent: if ``out_dir`` already holds this exact demo (hash matches, files intact) nothing
    is touched. Otherwise the pool is written to a temporary sibling directory and renamed into
    place, so an interrupted run never leaves a partial ``out_dir``. An outdated demo directory is
    replaced; any other non-empty directory raises FileExistsError. ``force`` rewrites even an
    up-to-date demo.
    """
    root = Path(out_dir).absolute()
    files, meta = _render(load_demo_content())
    manifest = _build_manifest(files, meta)
    content_hash = manifest["content_hash"]
    if not force and _is_current(root, content_hash):
        return DemoFiles.at(root)
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    tmp = _sibling(root, "tmp")
    os.mkdir(tmp)  # not mkdtemp: its 0o700 mode would end up on out_dir; let the umask decide
    try:
        for rel, data in files.items():
            _write_file(tmp / rel, data)
        # The manifest goes last: a directory with a manifest is complete.
        manifest_bytes = (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        _write_file(tmp / MANIFEST_FILE, manifest_bytes)
        fsync_dir(tmp / IMAGES_DIR)
        fsync_dir(tmp / Path(DEMONSTRATIONS_FILE).parent)
        fsync_dir(tmp)
        _install(tmp, root, content_hash, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoFiles.at(root)


def demo(out_dir: str = "data/demo", force: bool = False) -> dict[str, Any]:
    """Write the embedded demo pool (real images bundled with pydicom and scikit-image).

    Args:
        out_dir: folder to write; left untouched when it already holds this exact demo.
        force: rewrite the folder even when it is up to date.

    Returns:
        The written paths, record counts and content hash.
    """
    files = materialize_demo(out_dir, force=force)
    manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    return {
        "root": str(files.root),
        "images": str(files.images),
        "figures": str(files.figures),
        "candidates": str(files.candidates),
        "ratings": str(files.ratings),
        "preferences": str(files.preferences),
        "generation_figures": str(files.generation_figures),
        "demonstrations": str(files.demonstrations),
        "manifest": str(files.manifest),
        "counts": manifest["counts"],
        "content_hash": manifest["content_hash"],
    }
