"""Item images as bytes a browser can show: JPEG/PNG/GIF/WebP as stored, everything else
(DICOM above all) decoded by the suite's loader — DICOM windowed as a viewer would, with the
file's window (else min–max) — and sent as PNG. CT slices can also be shown through the standard
presets (soft tissue, lung, bone, brain) that radiologists switch between. Paths go through :class:`~biomedvital.data.images.ImageRoot`, so a data file cannot make the
server read anything outside the configured image root.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from biomedvital.data.images import (
    ImageLoadError,
    ImageRoot,
    is_dicom,
    load_image,
    window_to_uint8,
)

_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
_CACHE_SIZE = 32

CT_WINDOWS: dict[str, tuple[str, float, float]] = {
    "soft": ("soft tissue", 40.0, 400.0),
    "lung": ("lung", -600.0, 1500.0),
    "bone": ("bone", 400.0, 1800.0),
    "brain": ("brain", 40.0, 80.0),
}
"""Standard CT window presets (Hounsfield units: name, centre, width) offered for CT images."""


@dataclass(frozen=True)
class BrowserImage:
    """Encoded image bytes, their MIME type and a short note shown under the image."""

    data: bytes
    content_type: str
    note: str
    windows: tuple[str, ...] = ()  # presets the page may ask for (CT only)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _dicom_header(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # the pixels decoded already; the header only adds a note
        return None


def _dicom_note(ds: Any) -> str:
    if ds is None:
        return "DICOM"
    c, w = _number(ds.get("WindowCenter")), _number(ds.get("WindowWidth"))
    head = f"DICOM {str(ds.get('Modality', '')).strip()}".strip()
    if c is not None and w is not None and w >= 1:
        return f"{head} · file window C {c:g} / W {w:g}"
    return f"{head} · min–max (no window in the file)"


def _dicom_preset(path: Path, ds: Any, preset: str) -> BrowserImage:
    """A single-frame grayscale CT slice through a standard window (Hounsfield units)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    name, center, width = CT_WINDOWS[preset]
    full = pydicom.dcmread(path, force=True)
    values = apply_modality_lut(full.pixel_array, full)
    out = window_to_uint8(values, center, width)
    if str(full.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    png = io.BytesIO()
    Image.fromarray(out, "L").save(png, "PNG")
    note = f"DICOM CT · {name} window C {center:g} / W {width:g}"
    return BrowserImage(png.getvalue(), "image/png", note, tuple(CT_WINDOWS))


def _is_plain_ct(ds: Any) -> bool:
    if ds is None or str(ds.get("Modality", "")).upper() != "CT":
        return False
    frames = _number(ds.get("NumberOfFrames")) or 1
    return int(_number(ds.get("SamplesPerPixel")) or 1) == 1 and frames == 1


def _encode(path: Path, window: str | None = None) -> BrowserImage:
    if is_dicom(path):
        ds = _dicom_header(path)
        presets = tuple(CT_WINDOWS) if _is_plain_ct(ds) else ()
        if window in CT_WINDOWS and presets:
            try:
                return _dicom_preset(path, ds, window)
            except Exception as exc:
                raise ImageLoadError(f"cannot window DICOM pixel data in {path}: {exc}") from exc
        png = io.BytesIO()
        load_image(path).save(png, "PNG")
        return BrowserImage(png.getvalue(), "image/png", _dicom_note(ds), presets)
    try:
        with Image.open(path) as im:
            fmt, size = im.format, im.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from exc
    if fmt in _AS_IS:
        return BrowserImage(path.read_bytes(), _AS_IS[fmt], f"{fmt} · {size[0]}×{size[1]}")
    png = io.BytesIO()
    load_image(path).save(png, "PNG")
    return BrowserImage(png.getvalue(), "image/png", f"{fmt} · {size[0]}×{size[1]}")


class ImageServer:
    """Confined, cached conversion of item images (cache keyed by path, size and mtime)."""

    def __init__(self, root: ImageRoot) -> None:
        self.root = root
        self._cache: OrderedDict[tuple[str, int, int, str], BrowserImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, rel: str, window: str | None = None) -> BrowserImage:
        """The browser image for a data-supplied path (``window``: a CT preset, else the file's).

        Raises UnsafePathError (escape, absolute path), FileNotFoundError or ImageLoadError.
        """
        path = self.root.resolve(rel)
        st = path.stat()
        window = window if window in CT_WINDOWS else None
        key = (str(path), st.st_size, st.st_mtime_ns, window or "")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        img = _encode(path, window)
        with self._lock:
            self._cache[key] = img
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return img
