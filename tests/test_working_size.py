"""Issue #43 item 7: very large radiographs are shrunk to the working size while they are decoded, so a
40 Mpx file never exists as full-size float copies, and the model sees the same picture."""

from __future__ import annotations

import csv
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dicom
from PIL import Image

import boneage.data.io as bio
from boneage.data.io import WORKING_SIDE, read_radiograph


def _encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _pattern(height: int, width: int, full: int = 255, dtype: type = np.uint8) -> np.ndarray:
    """Smooth structure with detail at every scale, so a wrong block average shows."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    return ((np.sin(x * 40) * np.cos(y * 30) * 0.4 + 0.5) * full).astype(dtype)


def test_box_reduce_is_pillows_reduce() -> None:
    """The numpy reduce (16-bit images, DICOM) averages exactly as ``Image.reduce``, edge blocks included."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (101, 67), dtype=np.uint8)
    rgb = rng.integers(0, 256, (50, 31, 3), dtype=np.uint8)
    for arr, mode in ((grey, "L"), (rgb, "RGB")):
        ours = bio._box_reduce(arr, 3, strip_rows=4)  # several strips and a partial last one
        assert ours.dtype == np.uint8 and ours.shape[:2] == (-(-arr.shape[0] // 3), -(-arr.shape[1] // 3))
        expected = np.asarray(Image.fromarray(arr, mode).reduce(3))
        assert np.abs(ours.astype(int) - expected).max() <= 1  # rounding of exact halves may differ
    wide = rng.integers(0, 4096, (20, 20), dtype=np.uint16)
    np.testing.assert_array_equal(bio._box_reduce(wide, 4), np.rint(wide.reshape(5, 4, 5, 4).mean((1, 3))))


def test_40_megapixel_png_is_decoded_to_the_working_size() -> None:
    """A just-under-40 Mpx PNG comes out at a whole fraction of its size, never below WORKING_SIDE, without a
    full-size float copy (those were 160 MB each: the issue's 998 MB peak)."""
    height, width = 6940, 5748  # 39.9 Mpx, 4.7x the largest sample radiograph
    source = _pattern(height, width)
    data = _encode(Image.fromarray(source), "PNG", compress_level=1)
    tracemalloc.start()
    try:
        rad = read_radiograph(data, name="big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    factor = height // WORKING_SIDE
    assert factor == 3
    assert rad.pixels.shape == (-(-height // 3), -(-width // 3)) and max(rad.pixels.shape) >= WORKING_SIDE
    assert peak < 64e6, f"{peak / 1e6:.0f} MB of numpy/Python memory to decode"
    expected = np.asarray(Image.fromarray(source).reduce(3), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(rad.pixels, expected)


@pytest.mark.parametrize("kind", ["png16", "jpeg-rotated", "tiff-rotated", "palette", "dicom", "dicom-mono1"])
def test_every_format_is_shrunk_the_same_way(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a small working size, each format comes out as the block average of its full decode, the way
    the full-size read would have shown it (orientation, MONOCHROME1, 16-bit range all kept)."""
    monkeypatch.setattr(bio, "WORKING_SIDE", 64)
    height, width = 300, 200  # factor 300 // 64 = 4
    if kind == "png16":
        data = _encode(Image.fromarray(_pattern(height, width, 65535, np.uint16)), "PNG")
    elif kind in ("jpeg-rotated", "tiff-rotated"):
        im = Image.fromarray(_pattern(height, width))
        exif = im.getexif()
        exif[0x0112] = 6  # shown turned by 90 degrees
        data = _encode(im, kind[:4].upper(), exif=exif, **({"quality": 95} if kind[0] == "j" else {}))
    elif kind == "palette":
        data = _encode(
            Image.fromarray(_pattern(height, width)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"
        )
    else:
        photometric = "MONOCHROME1" if kind == "dicom-mono1" else "MONOCHROME2"
        write_dicom(tmp_path / "x.dcm", _pattern(height, width, 4095, np.uint16), photometric=photometric)
        data = (tmp_path / "x.dcm").read_bytes()
    small = read_radiograph(data, name=kind).pixels
    monkeypatch.setattr(bio, "WORKING_SIDE", 100_000)  # the same file read at full size, as before
    big = read_radiograph(data, name=kind).pixels
    turned = kind.endswith("rotated")
    assert big.shape == ((width, height) if turned else (height, width))  # upright, as before
    expected = bio._box_reduce(big, 4)
    assert small.shape == expected.shape == ((50, 75) if turned else (75, 50))
    if kind == "jpeg-rotated":  # decoded at 1/4 scale by the JPEG decoder itself (Image.draft): close
        assert np.abs(small - expected).mean() < 0.01
        return
    if kind.startswith("dicom"):  # rescaled to [0, 1] by its own range, which averaging narrows slightly
        expected = (expected - expected.min()) / np.ptp(expected)  # also for MONOCHROME1 (flip, rescale)
    tolerance = 1 / 4095 if kind.startswith(("png16", "dicom")) else 1 / 255  # one stored level
    assert np.abs(small - expected).max() <= tolerance + 1e-6


def test_sample_radiographs_are_decoded_exactly_as_before(shared_sample: Path) -> None:
    """Every real radiograph is smaller than the working size: its pixels are bit for bit what the reader
    gave before, so its bone age cannot change."""
    with open(shared_sample / "labels.csv", newline="") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)][:40]
    for image_id in ids:
        path = shared_sample / "images" / f"{image_id}.png"
        with Image.open(path) as im:
            assert max(im.size) < 2 * WORKING_SIDE and im.mode == "L"
            before = np.asarray(im).astype(np.float32) / 255.0
        np.testing.assert_array_equal(read_radiograph(path).pixels, before)


def test_upscaled_radiograph_keeps_its_bone_age(shared_sample: Path) -> None:
    """A real radiograph upscaled 4x (29 Mpx) is the same picture: shrunk while decoding, PNG or JPEG, its
    bone age stays within 1 month of the original's. (Not closer: any resampling can move the hand crop by a
    pixel, which moves this model by ~0.5 month; bicubic upscaling alone moves another sample radiograph by
    2.3 months. benchmarks/memory.py measures the shrink against a full-size decode.)"""
    from boneage.predict import load_predictor

    predictor = load_predictor(tta=False)
    path = shared_sample / "images" / "9224.png"  # one of the largest sample radiographs, 1230 x 1485
    with Image.open(path) as im:
        big = im.resize((im.width * 4, im.height * 4), Image.Resampling.BICUBIC)
    original = predictor.predict(path, "male").bone_age_months
    for fmt in ("PNG", "JPEG"):
        data = _encode(big, fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 90}))
        upscaled = predictor.predict(data, "male", name=f"big.{fmt.lower()}")
        assert max(upscaled.radiograph.pixels.shape) < 2 * WORKING_SIDE
        assert abs(upscaled.bone_age_months - original) < 1.0, (fmt, upscaled.bone_age_months, original)
