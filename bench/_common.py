"""Shared bits of the benchmarks: timing, a results folder (and its published copy), model-name
arguments and a larger synthetic pool."""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from biomedvital.data.model_names import parse_model_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PUBLISHED = RESULTS / "published"  # committed: the copies docs/performance.md cites
# what a result depends on (results themselves left out): a published one is made by committed
# code
_CODE = (
    "biomedvital", "bench", "conf", "pyproject.toml", "requirements.lock",
    ":(exclude)bench/results",
)  # fmt: skip
_LOAD_AT_START = os.getloadavg()  # the benches import this module first


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _uncommitted() -> str:
    return _git("status", "--porcelain", "--untracked-files=all", "--", *_CODE)


# the code as the bench starts (what ran, whatever is committed while it runs)
_COMMIT_AT_START = _git("rev-parse", "HEAD")
_DIRTY_AT_START = bool(_uncommitted())


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = time.perf_counter() - t0


def spread(values: Sequence[float], digits: int = 3) -> dict:
    """Repeat-by-repeat values with their least, greatest, mean and standard deviation: the
    uncertainty a quoted figure is stated with."""
    return {
        "values": [round(v, digits) for v in values],
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "mean": round(statistics.fmean(values), digits),
        "sd": round(statistics.stdev(values), digits) if len(values) > 1 else None,
    }


def publish_flag(text: str) -> bool:
    """An argparse ``type`` for ``--publish true|false``: true is refused while the code a
    result depends on has uncommitted changes (the commit recorded would not be what ran)."""
    value = text.lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if value == "true" and (dirty := _uncommitted()):
        raise argparse.ArgumentTypeError(
            "a published result is made by committed code; uncommitted changes:\n" + dirty
        )
    return value == "true"


def add_publish(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--publish",
        type=publish_flag,
        default=False,
        help="write bench/results/published/NAME.json (committed, cited by the docs) instead of "
        "bench/results/NAME.json; refused while biomedvital/, bench/ or conf/ have uncommitted "
        "changes",
    )


def _relative(path: str) -> str:
    p = Path(path).resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else path


def conditions() -> dict:
    """What a timing depends on besides the code: the machine's load around the run (1, 5 and
    15 minute averages when the bench started and when it saved), the bench's niceness, the
    commit it started from (and whether the code had uncommitted changes) and the command."""
    return {
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": {
            "start": [round(x, 2) for x in _LOAD_AT_START],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "nice": os.nice(0),
        "git_commit": _COMMIT_AT_START,
        "git_dirty": _DIRTY_AT_START,
        "command": " ".join(["python", _relative(sys.argv[0]), *sys.argv[1:]]),
    }


def save(name: str, payload: dict, publish: bool = False) -> Path:
    """``payload`` and its :func:`conditions` as ``bench/results/NAME.json``, or the published
    copy under ``bench/results/published/``."""
    folder = PUBLISHED if publish else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {**payload, **conditions()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def model_name(accepted: Sequence[str], what: str = "model") -> Callable[[str], str]:
    """An argparse ``type`` for a model name (``open_clip:ViT-B-16``, ``tiny:tiny-llava``...):
    the package's parser, with ``accepted`` the prefixes of the registry the bench builds from,
    so that a typo stops the bench before anything is built, in the parser's words."""

    def parse(text: str) -> str:
        try:
            return str(parse_model_name(text, accepted, what=what))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (DataLoader
    workers, once joined): the work a run did, which other jobs on a shared machine move far
    less than its wall time."""
    gc.collect()  # a finished loader's workers are joined, and counted, when it is collected
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def replicate_pool(src: Path, dst: Path, copies: int) -> Path:
    """The demo pool ``copies`` times over, each copy with its own image bytes (a distinct
    crop), so that nothing is shared across copies and caches have real work to do."""
    from PIL import Image

    from biomedvital.data.images import load_image

    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images").mkdir(parents=True)
    out = {
        n: (dst / f"{n}.jsonl").open("w")
        for n in ("figures", "candidates", "ratings", "preferences")
    }
    rows = {
        n: [json.loads(x) for x in (src / f"{n}.jsonl").read_text().splitlines() if x.strip()]
        for n in out
    }
    for c in range(copies):
        renamed: dict[str, str] = {}
        for img in sorted((src / "images").iterdir()):
            im = load_image(img)
            w, h = im.size
            crop = im.crop((c % 7, c % 5, w - (c % 3), h - (c % 4)))
            name = f"{img.stem}-{c}.png"
            crop.save(dst / "images" / name)
            renamed[img.name] = name
        for f in rows["figures"]:
            out["figures"].write(json.dumps({**f, "pair_id": f"{f['pair_id']}-{c}"}) + "\n")
        for r in rows["candidates"]:
            out["candidates"].write(
                json.dumps(
                    {
                        **r,
                        "id": f"{r['id']}-{c}",
                        "image": renamed[r["image"]],
                        "pair_id": f"{r['pair_id']}-{c}",
                    }
                )
                + "\n"
            )
        for r in rows["ratings"]:
            out["ratings"].write(
                json.dumps({**r, "candidate_id": f"{r['candidate_id']}-{c}"}) + "\n"
            )
        for r in rows["preferences"]:
            out["preferences"].write(
                json.dumps(
                    {
                        **r,
                        "id": f"{r['id']}-{c}",
                        "image": renamed[r["image"]],
                        "pair_id": f"{r['pair_id']}-{c}",
                    }
                )
                + "\n"
            )
    for fh in out.values():
        fh.close()
    _ = Image
    return dst
