"""Shared bits of the benchmarks: timing, a results folder, model-name arguments and a larger
synthetic pool."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from biomedvital.data.model_names import parse_model_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = time.perf_counter() - t0


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {**payload, "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(payload, indent=2))
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
