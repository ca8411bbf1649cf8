"""Image loading: DICOM display mapping, Pillow formats, corrupt files and path confinement."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from biomedvital.data.images import (
    ImageLoadError,
    ImageRoot,
    UnsafePathError,
    image_digest,
    is_dicom,
    load_image,
    window_to_uint8,
)

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


def _gray(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    a = np.asarray(im)
    assert a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- DICOM


def test_ct_without_window_uses_min_max_of_hounsfield_units() -> None:
    ds = pydicom.dcmread(CT)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    g = _gray(load_image(CT))
    assert g.shape == ds.pixel_array.shape
    assert g.min() == 0 and g.max() == 255
    assert np.unique(g).size > 100
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert np.abs(g.astype(int) - expected).max() <= 1


def test_mr_window_from_dataset_is_respected() -> None:
    ds = pydicom.dcmread(MR)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    g = _gray(load_image(MR))
    px = ds.pixel_array.astype(float)
    # Pixels above the window's top (c - 0.5 + (w - 1) / 2 = 1399) saturate to white.
    assert (px > 1400).any()
    assert (g[px > 1400] == 255).all()
    expected = np.clip(np.rint(((px - 599.5) / 1599 + 0.5) * 255), 0, 255)
    assert np.array_equal(g, expected.astype(np.uint8))
    assert g.max() - g.min() > 180  # uses most of the 8-bit range


def test_multivalued_and_changed_window(tmp_path: Path) -> None:
    ds = pydicom.dcmread(MR)
    ds.WindowCenter = [1000, 40]
    ds.WindowWidth = [400, 80]
    g = _gray(load_image(_save(ds, tmp_path / "w.dcm")))
    px = ds.pixel_array.astype(float)
    assert (g[px <= 800] == 0).all() and (g[px >= 1200] == 255).all()


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = _gray(load_image(_save(ds, tmp_path / "m1.dcm")))
    assert np.array_equal(inverted, 255 - _gray(load_image(CT)))


def test_multiframe_uses_middle_frame(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    base = ds.pixel_array
    frames = np.stack([np.zeros_like(base), base, np.full_like(base, 500)])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    g = _gray(load_image(_save(ds, tmp_path / "mf.dcm")))
    assert np.array_equal(g, _gray(load_image(CT)))


def test_dicom_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    plain = tmp_path / "scan_0001"
    shutil.copy(CT, plain)
    assert is_dicom(plain)
    assert np.array_equal(np.asarray(load_image(plain)), np.asarray(load_image(CT)))


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    path = _save(ds, tmp_path / "nopix.dcm")
    with pytest.raises(ImageLoadError, match="has no pixel data") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_garbage_with_dicom_suffix(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(ImageLoadError, match="junk.dcm"):
        load_image(path)


def test_window_to_uint8_fallbacks() -> None:
    arr = np.array([[0.0, 25.0], [100.0, np.nan]])
    assert window_to_uint8(arr).tolist() == [[0, 64], [255, 0]]
    assert window_to_uint8(arr, 50, 0).tolist() == window_to_uint8(arr).tolist()  # bad width
    assert window_to_uint8(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]


# ----------------------------------------------------------------------------- Pillow


@pytest.fixture(scope="module")
def retina_jpg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("img") / "retina.jpg"
    Image.fromarray(skdata.retina()).save(path, quality=90)
    return path


def test_jpeg_loads_as_rgb(retina_jpg: Path) -> None:
    im = load_image(retina_jpg)
    assert im.mode == "RGB" and im.size == (1411, 1411)
    assert np.asarray(im).mean() > 10


def test_truncated_jpeg_raises_image_load_error(retina_jpg: Path, tmp_path: Path) -> None:
    data = retina_jpg.read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageLoadError, match="junk.png"):
        load_image(junk)


def test_grayscale_and_16bit_png(tmp_path: Path) -> None:
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"
    wide = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    g = _gray(load_image(tmp_path / "g16.png"))
    assert g.min() == 0 and g.max() == 255 and np.unique(g).size > 200  # not clipped to 255


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image("/nonexistent/dir/nope.png")


def test_image_digest_tracks_content(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    shutil.copy(CT, path)
    assert image_digest(path) == hashlib.sha256(CT.read_bytes()).hexdigest()
    with path.open("ab") as f:
        f.write(b"\0")
    assert image_digest(path) != hashlib.sha256(CT.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- ImageRoot


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    shutil.copy(CT, r / "sub" / "ct.dcm")
    (tmp_path / "secret.png").write_bytes(b"outside")
    return r


def test_image_root_resolves_and_loads(root: Path) -> None:
    ir = ImageRoot(root)
    assert ir.resolve("sub/ct.dcm") == (root / "sub" / "ct.dcm").resolve()
    assert ir.resolve("sub/../sub/ct.dcm") == (root / "sub" / "ct.dcm").resolve()
    assert ir.load("sub/ct.dcm").mode == "RGB"


def test_image_root_refuses_dotdot_escape(root: Path) -> None:
    with pytest.raises(UnsafePathError) as info:
        ImageRoot(root).resolve("sub/../../secret.png")
    assert "sub/../../secret.png" in str(info.value) and str(root.resolve()) in str(info.value)


def test_image_root_refuses_absolute_paths(root: Path) -> None:
    outside = str(root.parent / "secret.png")
    with pytest.raises(UnsafePathError, match="absolute"):
        ImageRoot(root).resolve(outside)
    inside = str(root / "sub" / "ct.dcm")
    with pytest.raises(UnsafePathError):
        ImageRoot(root).resolve(inside)  # even inside the root: data must be relative


def test_image_root_refuses_symlink_escape(root: Path) -> None:
    os.symlink(root.parent / "secret.png", root / "link.png")
    os.symlink(root.parent, root / "up")
    ir = ImageRoot(root)
    with pytest.raises(UnsafePathError, match="escapes"):
        ir.resolve("link.png")
    with pytest.raises(UnsafePathError, match="escapes"):
        ir.load("up/secret.png")
    os.symlink(root / "sub" / "ct.dcm", root / "inside.dcm")
    assert ir.resolve("inside.dcm") == (root / "sub" / "ct.dcm").resolve()


def test_image_root_missing_file_names_path(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sub/missing.jpg"):
        ImageRoot(root).resolve("sub/missing.jpg")
    with pytest.raises(UnsafePathError):
        ImageRoot(root).resolve("../missing.jpg")  # escape reported before existence
    with pytest.raises(FileNotFoundError):
        ImageRoot(root / "nope")
