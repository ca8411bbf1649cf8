"""Images in chat messages: a small reference until the moment of sending.

A request's image travels as ``biomedvital-image:<path>#sha256=<hash>`` (:func:`image_ref`), so
100,000 queued requests never hold 100,000 base64 images in memory. The cache key sees the hash
alone (:func:`key_messages`): moving or copying the image folder changes no key. The client
inlines the bytes as a data URL when it sends (:func:`inline_images`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from biomedvital.data.hashing import sha256_file
from biomedvital.data.images import load_image

IMAGE_REF = "biomedvital-image:"
HASH_SEP = "#sha256="
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
"""Image files sent as stored; any other format (DICOM…) is converted to PNG when sent."""
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes of more than 8 bits a channel (sent converted, see :func:`sent_as_stored`)."""
EXIF_ORIENTATION = 0x0112


def image_ref(path: Path) -> str:
    """A stand-in for the image's data URL: its path and content hash.

    Messages carry this reference until the moment of sending. The path is only where to read
    the bytes from: cache keys see the hash alone (:func:`key_messages`), so moving or copying
    the image folder does not change a key (a rerun would pay for every request again).
    """
    if MIME.get(path.suffix.lower()) is None:
        load_image(path)  # converted at send time (DICOM…): fail now, naming the file, not then
    return f"{IMAGE_REF}{path}{HASH_SEP}{sha256_file(path)}"


def _map_image_refs(
    messages: list[dict[str, Any]], url_of: Callable[[str], str]
) -> list[dict[str, Any]]:
    """``messages`` with every image reference's URL replaced by ``url_of(ref)``; messages
    without one are shared, not copied."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict)
            and p.get("type") == "image_url"
            and str(p.get("image_url", {}).get("url", "")).startswith(IMAGE_REF)
            for p in content
        ):
            parts = []
            for p in content:
                url = p.get("image_url", {}).get("url", "") if p.get("type") == "image_url" else ""
                if isinstance(url, str) and url.startswith(IMAGE_REF):
                    p = {**p, "image_url": {**p["image_url"], "url": url_of(url)}}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _ref_path(ref: str) -> Path:
    return Path(ref.removeprefix(IMAGE_REF).rsplit(HASH_SEP, 1)[0])


def _ref_hash_only(ref: str) -> str:
    return f"{IMAGE_REF}sha256={ref.rsplit(HASH_SEP, 1)[-1]}"


def key_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the cache key sees them: image references reduced to their content hash
    (the same bytes under another folder are the same request)."""
    return _map_image_refs(messages, _ref_hash_only)


def inline_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every image reference replaced by the image's data URL (for sending)."""
    return _map_image_refs(messages, lambda ref: image_data_url(_ref_path(ref)))


def sent_as_stored(path: Path) -> bool:
    """Whether a JPEG/PNG file decodes on a server as :func:`load_image` decodes it, so its bytes
    can be sent as stored: 8-bit pixels and no EXIF rotation. A 16-bit or float image would be
    clipped by a server's ``convert("RGB")`` (``load_image`` rescales it) and a rotation tag is
    not applied by every server (``load_image`` applies it); those are sent as converted PNG."""
    if MIME.get(path.suffix.lower()) is None:
        return False
    try:
        with Image.open(path) as im:
            rotated = im.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1)
            return im.mode not in WIDE_MODES and not rotated
    except (OSError, ValueError):
        return True  # sent as it is; the server reports what it cannot read


def image_data_url(path: Path) -> str:
    """The image as a base64 data URL: JPEG/PNG bytes as stored when they decode alike everywhere
    (:func:`sent_as_stored`), anything else (DICOM, 16-bit PNG, EXIF-rotated JPEG) as the PNG of
    what :func:`load_image` decodes, the pixels every local evaluation sees."""
    mime = MIME.get(path.suffix.lower())
    if mime is not None and sent_as_stored(path):
        data = path.read_bytes()
    else:
        buf = io.BytesIO()
        load_image(path).save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
