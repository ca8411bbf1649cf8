"""What the ``answer`` tests share: the fake endpoint that echoes what it was sent, image
stand-ins for the benchmarks whose images are not shipped, and the verb run in-process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "generation"))

from fakeapi import KEY_ENV, FakeAPI  # noqa: E402

from biomedvital.cli import main  # noqa: E402

SHARED = Path(os.environ.get("BIOMEDVITAL_SHARED_DATA") or REPO.parent / "shared" / "data")
"""Real public data (``../shared/data``; the variable points elsewhere, e.g. from a worktree)."""
BENCHMARK_FILES = {
    "vqa_rad": SHARED / "vqa-rad" / "VQA_RAD Dataset Public.json",
    "slake": SHARED / "slake" / "test.json",
    "pathvqa": SHARED / "pathvqa" / "pvqa_test.json",
    "llava_med_bench": SHARED / "llava-med" / "llava_med_eval_qa50_qa.jsonl",
}
SHIPPED_IMAGES = SHARED / "vqa-rad" / "images"
CONF = REPO / "conf" / "eval"


def sent_parts(body: dict[str, Any]) -> tuple[str, str, str]:
    """(system prompt, SHA-256 of the image's bytes, question text) of a request body."""
    system, user = body["messages"][0], body["messages"][1]
    image = next(p for p in user["content"] if p["type"] == "image_url")["image_url"]["url"]
    text = next(p for p in user["content"] if p["type"] == "text")["text"]
    data = base64.b64decode(image.split(",", 1)[1])
    return system["content"], hashlib.sha256(data).hexdigest(), text


def echo(body: dict[str, Any]) -> str:
    """The fake model's answer: what it was sent (image hash and question), so a prediction
    shows the request its question went out as."""
    _, image, text = sent_parts(body)
    return f"{image[:16]} | {text}"


def echo_api(api: FakeAPI) -> FakeAPI:
    api.responder = echo
    return api


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_stand_ins(root: Path, names: set[str], shipped: Path | None = None) -> dict[str, Path]:
    """An image per name under ``root``: the shipped file where there is one, else a small
    stand-in whose bytes are its own (its name is in the file); returns name -> file."""
    from PIL import Image

    out = {}
    for name in sorted(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        real = shipped / name if shipped is not None else None
        if real is not None and real.is_file():
            path.write_bytes(real.read_bytes())
        else:
            seed = hashlib.sha256(name.encode()).digest()
            im = Image.new("RGB", (4, 4), tuple(seed[:3]))
            if path.suffix.lower() == ".png":
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                info.add_text("name", name)
                im.save(path, pnginfo=info)
            else:
                im.save(path, format="JPEG", comment=name.encode())
        out[name] = path
    return out


def run_answer(
    config: Path | str, api_url: str, out: Path, store: Path | str, *extra: str, model: str = "m"
) -> dict:
    """``python -m biomedvital answer`` in this process; the run record (``run.answer.json``)."""
    main(
        [
            "answer",
            "--config",
            str(config),
            "--client.base_url",
            api_url,
            "--client.model",
            model,
            "--client.api_key_env",
            KEY_ENV,
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.store",
            str(store),
            "--progress",
            "false",
            *extra,
        ]
    )
    return json.loads((out / "run.answer.json").read_text())


def predictions(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
