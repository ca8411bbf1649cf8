"""``fetch-figures``: the PMC figures of LLaVA-Med's URL lists, one image out of each tarball.

LLaVA-Med releases its figures as lines of ``pmc_tar_url`` (a PMC open-access package),
``image_file_path`` (the figure inside it) and ``pair_id``: ``llava_med_image_urls.jsonl`` for
the instruction data (the figures the generation stage starts from) and
``llava_med_image_urls_eval.jsonl`` for LLaVA-Med-Bench's 50 figures (``conf/eval/
llava_med_bench.yaml``'s ``image_root``). Each image is written as ``<pair_id><suffix>`` (the
name the question and figure files use, e.g. ``18063892_F3.jpg``).

The package is read as a stream and the download stops at the wanted member, so the rest of a
large package is not fetched. Writes are atomic; an image already in the folder is not fetched
again, so a killed or partly failed run is resumed by rerunning it. A failure (HTTP error after
the retries, a URL that cannot be requested, a member missing from the package, a member that
is not an image) is recorded with its reason in ``fetch.failed.jsonl``, never dropped;
``fetch.manifest.json`` holds the counts and every image's SHA-256.
"""

from __future__ import annotations

import io
import random
import re
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from http.client import HTTPException, InvalidURL
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image
from tqdm import tqdm

from biomedvital.data.hashing import sha256_file
from biomedvital.data.jsonio import (
    atomic_write,
    handle_bad,
    iter_objects,
    load_json,
    write_json,
    write_jsonl,
)
from biomedvital.data.outputs import locks_output
from biomedvital.data.report import BadRecordError, RecordReport
from biomedvital.tracking.mlflow import DEFAULT_STORE, PipelineRun
from biomedvital.tracking.provenance import git_state

MANIFEST = "fetch.manifest.json"
FAILED = "fetch.failed.jsonl"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEMES = ("https://", "http://", "ftp://", "file://")
MAX_IMAGE_BYTES = 64 << 20  # a PMC figure is well under this; a larger member is refused


class FetchError(Exception):
    """A figure that cannot be had from its package (``category`` says why)."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


@dataclass(frozen=True)
class FigureSource:
    """One line of a LLaVA-Med URL list."""

    pair_id: str
    url: str
    member: str

    @property
    def file_name(self) -> str:
        return self.pair_id + PurePosixPath(self.member).suffix.lower()


def read_sources(
    path: Path, on_bad: Literal["raise", "skip"], report: RecordReport
) -> list[FigureSource]:
    """The URL list's records, checked: a string URL of a known scheme, a member path, and a
    ``pair_id`` that is a plain file name (it names the written file) and is not repeated."""
    sources: list[FigureSource] = []
    seen: set[str] = set()
    for pos, kind, obj in iter_objects(path, on_bad=on_bad, report=report):
        try:
            if not isinstance(obj, dict):
                raise BadRecordError(path, pos, "expected a JSON object", kind=kind)
            fields = {}
            for key in ("pmc_tar_url", "image_file_path", "pair_id"):
                value = obj.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise BadRecordError(
                        path, pos, "missing or not a string", key, kind=kind,
                        category=f"missing:{key}",
                    )  # fmt: skip
                fields[key] = value.strip()
            if not fields["pmc_tar_url"].startswith(_SCHEMES):
                raise BadRecordError(
                    path, pos, f"URL scheme not one of {_SCHEMES}", "pmc_tar_url", kind=kind
                )
            if not _SAFE_NAME.fullmatch(fields["pair_id"]):
                raise BadRecordError(
                    path, pos, f"pair_id {fields['pair_id']!r} is not a plain file name",
                    "pair_id", kind=kind, category="unsafe:pair_id",
                )  # fmt: skip
            if fields["pair_id"] in seen:
                raise BadRecordError(
                    path, pos, f"duplicate pair_id {fields['pair_id']!r}", "pair_id", kind=kind,
                    category="duplicate:pair_id",
                )  # fmt: skip
        except BadRecordError as err:
            handle_bad(err, on_bad, report)
            continue
        seen.add(fields["pair_id"])
        report.kept()
        sources.append(
            FigureSource(fields["pair_id"], fields["pmc_tar_url"], fields["image_file_path"])
        )
    return sources


def _member_bytes(stream: Any, member: str) -> bytes:
    """The bytes of ``member`` from a tar stream, read no further than that member."""
    wanted = member.removeprefix("./")
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.name.removeprefix("./") != wanted:
                continue
            if not info.isfile():
                raise FetchError(f"{member} is not a regular file in the package", "not_a_file")
            if info.size > MAX_IMAGE_BYTES:
                raise FetchError(
                    f"{member} is {info.size} bytes (more than {MAX_IMAGE_BYTES})", "too_large"
                )
            handle = tar.extractfile(info)
            assert handle is not None
            return handle.read()
    raise FetchError(f"{member} is not in the package", "missing_member")


def _check_image(data: bytes, member: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for bad bytes
        raise FetchError(
            f"{member} is not a readable image ({type(err).__name__})", "not_an_image"
        ) from err


def _open(url: str, timeout_s: float) -> Any:
    """Send the request for ``url``; the response (an HTTP response, or a file-like object for
    ``file://`` and ``ftp://``). A URL that cannot be sent at all (a non-ASCII character,
    a space, a bad port or host: ``ValueError``/``UnicodeError``/``InvalidURL`` while urllib and
    http.client build the request) raises :class:`FetchError` ``bad_url``: retrying cannot help,
    and it must be recorded as one failure, not abort the run."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "biomedvital"})
        return urllib.request.urlopen(request, timeout=timeout_s)
    except (InvalidURL, ValueError) as err:  # UnicodeError is a ValueError
        raise FetchError(f"bad URL {url!r} ({type(err).__name__}: {err})", "bad_url") from err


def fetch_one(
    source: FigureSource, out: Path, timeout_s: float, max_attempts: int, backoff_s: float
) -> str:
    """Download ``source``'s package up to its member and write the image atomically; returns
    its SHA-256. Network errors and 5xx/429 answers are retried with jittered backoff; a 4xx,
    a URL that cannot be requested, a missing member or bad image bytes raise
    :class:`FetchError` at once."""
    for attempt in range(1, max_attempts + 1):
        try:
            with _open(source.url, timeout_s) as response:
                data = _member_bytes(response, source.member)
            break
        except urllib.error.HTTPError as err:
            if err.code != 429 and err.code < 500:
                raise FetchError(f"HTTP {err.code} for {source.url}", f"http_{err.code}") from err
            reason, category = f"HTTP {err.code}", f"http_{err.code}"
        except (OSError, HTTPException, tarfile.TarError, zlib.error, EOFError) as err:
            # URLError and timeouts are OSErrors; a cut stream: IncompleteRead, a tar/gzip error
            reason, category = f"{type(err).__name__}: {err}", "network"
        if attempt == max_attempts:
            raise FetchError(f"{reason} after {max_attempts} attempts: {source.url}", category)
        time.sleep(backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
    _check_image(data, source.member)
    target = out / source.file_name
    with atomic_write(target, "wb") as f:
        f.write(data)
    return sha256_file(target)


@locks_output("out")
def fetch_figures(
    urls: Path,
    out: Path,
    workers: int = 8,
    max_attempts: int = 4,
    timeout_s: float = 120.0,
    backoff_s: float = 1.0,
    limit: int | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    store: str = DEFAULT_STORE,
    tags: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Fetch the figures a LLaVA-Med URL list names into ``out`` (see the module docstring).

    Args:
        urls: ``llava_med_image_urls_eval.jsonl`` or ``llava_med_image_urls.jsonl`` (JSONL or a
            JSON array of ``pmc_tar_url``, ``image_file_path``, ``pair_id``).
        out: the image folder (an ``image_root``); the manifest and failures go beside the images.
        workers: downloads at a time.
        max_attempts / timeout_s / backoff_s: per package: tries for network errors and
            5xx/429 answers, seconds a read may stall, base of the jittered exponential backoff.
        limit: fetch only the first ``limit`` figures (trial runs; recorded).
        on_bad_record: ``raise`` on a bad line of the list (naming it) or ``skip`` (counted).
        store: MLflow store folder (experiment ``data``, run ``fetch_figures``: counts, manifest).
        tags: extra MLflow run tags.
        progress: show a progress bar.
    """
    urls, out = Path(urls), Path(out)
    if workers < 1 or max_attempts < 1:
        raise ValueError("workers and max_attempts must be >= 1")
    report = RecordReport()
    sources = read_sources(urls, on_bad_record, report)[:limit]
    out.mkdir(parents=True, exist_ok=True)
    previous = load_json(out / MANIFEST).get("images", {}) if (out / MANIFEST).is_file() else {}
    images: dict[str, str] = {}
    todo = []
    for src in sources:
        if (out / src.file_name).is_file():  # fetched by an earlier run
            images[src.file_name] = previous.get(src.file_name) or sha256_file(out / src.file_name)
        else:
            todo.append(src)
    existing = len(images)
    failed: list[dict[str, str]] = []
    bar = tqdm(total=len(todo), desc="fetch", unit="fig", disable=not progress, mininterval=0.5)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {
            pool.submit(fetch_one, s, out, timeout_s, max_attempts, backoff_s): s for s in todo
        }
        for future in as_completed(futures):
            src = futures[future]
            try:
                images[src.file_name] = future.result()
            except FetchError as err:
                failed.append(
                    {"pair_id": src.pair_id, "url": src.url, "category": err.category,
                     "reason": str(err)}
                )  # fmt: skip
            bar.update()
    except BaseException:  # Ctrl-C: the queued downloads are dropped; written images stay
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    bar.close()
    failed.sort(key=lambda r: r["pair_id"])
    write_jsonl(out / FAILED, failed)
    counts = {
        "figures": len(sources),
        "fetched": len(images) - existing,
        "already_there": existing,
        "failed": len(failed),
        "failed_by_reason": dict(sorted(Counter(r["category"] for r in failed).items())),
    }
    with PipelineRun("data", "fetch_figures", store, tags) as run:
        manifest = {
            "urls": {"path": str(urls), "sha256": sha256_file(urls)},
            "out": str(out),
            "limit": limit,
            "records": report.as_dict(),
            "counts": counts,
            "images": dict(sorted(images.items())),
            "mlflow_run_id": run.run_id,
            "git": git_state(),
        }
        write_json(out / MANIFEST, manifest)
        run.log_params({"urls": str(urls), "out": str(out), "limit": limit})
        run.log_metrics({f"fetch/{k}": counts[k] for k in ("fetched", "already_there", "failed")})
        run.log_dict(manifest, MANIFEST)
    return {k: v for k, v in manifest.items() if k != "images"}
