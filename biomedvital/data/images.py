"""Safe, uniform image loading: PNG/JPEG via Pillow and DICOM via pydicom, always RGB.

Image paths come from data files, so they are resolved inside a fixed root and refused if they
escape it. DICOM pixels are mapped to display values (rescale, window, MONOCHROME1 inversion) the
way a viewer would show them, because vision encoders were trained on displayed images.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .hashing import sha256_file
from .jsonio import PathLike

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})


class UnsafePathError(ValueError):
    """A data-supplied image path that is absolute or escapes the image root."""


class ImageLoadError(ValueError):
    """An image file that exists but cannot be decoded (corrupt, truncated, no pixel data)."""


class ImageRoot:
    """A directory that relative image paths from data files are confined to."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(
                errno.ENOENT, f"image root is not a directory: {self.root}", str(self.root)
            )

    def resolve(self, rel: str) -> Path:
        """Absolute path of ``rel`` under the root, after resolving symlinks and ``..``.

        Raises UnsafePathError for absolute paths and escapes, FileNotFoundError if missing.
        """
        rel_str = os.fspath(rel)
        if not rel_str or "\x00" in rel_str:
            raise UnsafePathError(f"invalid image path {rel_str!r} (root {self.root})")
        if PurePath(rel_str).is_absolute() or rel_str.startswith(("/", "\\")):
            raise UnsafePathError(f"absolute image path {rel_str!r} refused (root {self.root})")
        candidate = (self.root / rel_str).resolve()
        if not candidate.is_relative_to(self.root):
            raise UnsafePathError(
                f"image path {rel_str!r} escapes the image root {self.root} (-> {candidate})"
            )
        if not candidate.is_file():
            raise FileNotFoundError(
                errno.ENOENT, f"image not found: {rel_str!r} under {self.root}", str(candidate)
            )
        return candidate

    def load(self, rel: str) -> Image.Image:
        """Load ``rel`` (confined to the root) as an RGB image."""
        return load_image(self.resolve(rel))

    def __repr__(self) -> str:
        return f"ImageRoot({str(self.root)!r})"


def is_dicom(path: PathLike) -> bool:
    """DICOM by suffix, or by the ``DICM`` magic at byte 128 (many exports have no suffix)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(p, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def load_image(path: PathLike) -> Image.Image:
    """Decode any supported image file to an RGB PIL image, raising ImageLoadError if unusable."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, f"image not found: {p}", str(p))
    if is_dicom(p):
        return _load_dicom(p)
    return _load_pillow(p)


def image_digest(path: PathLike) -> str:
    """SHA-256 of the file bytes, for cache keys that change whenever the image does."""
    return sha256_file(path)


# ----------------------------------------------------------------------------- Pillow


def _load_pillow(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try, so truncated files fail here
            im = ImageOps.exif_transpose(im) or im
            return _pil_to_rgb(im)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {e}") from e


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit/float grayscale: Pillow's convert() clips to 255, so rescale instead.
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(_minmax_uint8(arr), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- DICOM


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM element, as float."""
    if value is None:
        return None
    try:
        if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
            value = value[0]  # MultiValue, list or tuple
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _minmax_uint8(arr: np.ndarray) -> np.ndarray:
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def window_to_uint8(
    arr: np.ndarray, center: float | None = None, width: float | None = None
) -> np.ndarray:
    """Map values to uint8 with the DICOM linear VOI window, or min-max when no valid window."""
    arr = np.asarray(arr, dtype=np.float64)
    if center is None or width is None or not np.isfinite([center, width]).all() or width < 1:
        return _minmax_uint8(arr)
    # DICOM PS3.3 C.11.2.1.2.1 (linear): centre at c - 0.5, span of width - 1.
    scaled = ((arr - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5) * 255.0
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # .dcm files without the 128-byte preamble
    except Exception as e:
        raise ImageLoadError(f"cannot read DICOM file {path}: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(f"DICOM file {path} has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoders, inconsistent sizes, ...
        raise ImageLoadError(f"cannot decode DICOM pixel data in {path}: {e}") from e

    n_frames = int(_first(ds.get("NumberOfFrames")) or 1)
    if n_frames > 1 and arr.ndim >= 3:
        arr = arr[n_frames // 2]  # the middle slice is the most representative one
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(_first(ds.get("SamplesPerPixel")) or 1)

    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            return Image.fromarray(_minmax_uint8(rgb) if rgb.dtype != np.uint8 else rgb, "RGB")
        if samples == 3 and arr.ndim == 3:
            # pydicom returns colour pixels as RGB already (YBR is converted by default).
            rgb = arr if arr.dtype == np.uint8 else _minmax_uint8(arr)
            return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        if arr.ndim != 2:
            raise ImageLoadError(f"DICOM file {path}: unexpected pixel array shape {arr.shape}")
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        out = window_to_uint8(values, _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))
    except ImageLoadError:
        raise
    except Exception as e:
        raise ImageLoadError(f"cannot convert DICOM pixel data in {path}: {e}") from e
    if photometric == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are white
    return Image.fromarray(out, "L").convert("RGB")
