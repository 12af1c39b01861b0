"""read_radiograph: every format decodes to float32 [0, 1], bone bright; bad input is one clear error."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from boneage.data.io import Radiograph, read_radiograph, sniff_format
from boneage.errors import BoneAgeInputError

H, W = 48, 64


def _gradient_u8() -> np.ndarray:
    """Left-to-right ramp 0..255 so orientation and range are both checkable."""
    ramp = np.linspace(0, 255, W).round().astype(np.uint8)
    return np.tile(ramp, (H, 1))


def _png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _dicom(tmp_path: Path, pixels: np.ndarray, *, name: str = "x.dcm", **kwargs: object) -> Path:
    return write_dicom(tmp_path / name, pixels, **kwargs)


def _ramp_u16(max_value: int = 4095) -> np.ndarray:
    ramp = np.linspace(0, max_value, W).round().astype(np.uint16)
    return np.tile(ramp, (H, 1))


def _assert_contract(rad: Radiograph, shape: tuple[int, int] = (H, W)) -> None:
    assert rad.pixels.dtype == np.float32
    assert rad.pixels.shape == shape
    assert np.isfinite(rad.pixels).all()
    assert rad.pixels.min() >= 0.0 and rad.pixels.max() <= 1.0


# ----------------------------------------------------------------------------------------------
# real data


@pytest.mark.integration
def test_real_shared_png(shared_sample: Path) -> None:
    path = shared_sample / "images" / "1377.png"
    with Image.open(path) as im:
        width, height = im.size
    rad = read_radiograph(path)
    _assert_contract(rad, (height, width))
    assert rad.format == "png" and rad.bits == 8
    assert rad.source == str(path)
    assert rad.pixels.max() > 0.5 > rad.pixels.min()  # real contrast, not a blank or saturated read
    assert rad.sex is None and rad.chronological_age_months is None


# ----------------------------------------------------------------------------------------------
# Pillow formats


def test_sniff_format() -> None:
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\0" * 10) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"\0" * 10) == "jpeg"
    assert sniff_format(b"\0" * 128 + b"DICM" + b"\0" * 4) == "dicom"
    assert sniff_format(b"II*\x00" + b"\0" * 10) == "tiff"
    assert sniff_format(b"MM\x00*" + b"\0" * 10) == "tiff"
    assert sniff_format(b"BM" + b"\0" * 20) == "bmp"
    assert sniff_format(b"hello world") is None
    assert sniff_format(b"") is None


def test_grey_png_8bit(tmp_path: Path) -> None:
    arr = _gradient_u8()
    path = tmp_path / "grey.png"
    Image.fromarray(arr, mode="L").save(path)
    rad = read_radiograph(path)
    _assert_contract(rad)
    assert rad.format == "png" and rad.bits == 8
    np.testing.assert_allclose(rad.pixels, arr / 255.0, atol=1e-6)
    assert rad.pixels[0, 0] == 0.0 and rad.pixels[0, -1] == 1.0


def test_png_16bit_keeps_precision(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 1024).round().astype(np.uint16)
    arr = np.tile(ramp, (40, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)  # Pillow stores uint16 as a 16-bit greyscale PNG
    rad = read_radiograph(path)
    _assert_contract(rad, arr.shape)
    assert rad.bits == 16
    assert len(np.unique(rad.pixels)) > 256
    np.testing.assert_allclose(rad.pixels, arr / 65535.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_pillow_16bit_modes_divide_by_65535(mode: str) -> None:
    arr = _ramp_u16(max_value=40000)
    im = Image.fromarray(arr.astype(np.int32)).convert("I") if mode == "I" else Image.fromarray(arr)
    if mode == "I;16B":
        im = Image.frombytes("I;16B", (W, H), arr.astype(">u2").tobytes())
    assert im.mode == mode
    rad = read_radiograph(_png_bytes(im, "TIFF"), name="deep.tif")
    assert rad.format == "tiff" and rad.bits == 16
    np.testing.assert_allclose(rad.pixels, arr / 65535.0, atol=1e-6)


def test_rgb_png_to_luminance(tmp_path: Path) -> None:
    grey = _gradient_u8()
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[0, 0] = (255, 0, 0)  # pure red has BT.601 luma 0.299
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb, mode="RGB").save(path)
    rad = read_radiograph(path)
    _assert_contract(rad)
    assert rad.pixels[0, 0] == pytest.approx(0.299, abs=1e-3)
    np.testing.assert_allclose(rad.pixels[1:], grey[1:] / 255.0, atol=1e-5)


def test_rgba_and_grey_alpha_ignore_alpha(tmp_path: Path) -> None:
    grey = _gradient_u8()
    alpha = np.zeros_like(grey)  # fully transparent: a careless exporter must not blank the image
    Image.fromarray(np.dstack([grey, grey, grey, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        rad = read_radiograph(tmp_path / name)
        _assert_contract(rad)
        np.testing.assert_allclose(rad.pixels, grey / 255.0, atol=1e-5)


def test_palette_png(tmp_path: Path) -> None:
    grey = _gradient_u8()
    Image.fromarray(grey, mode="L").convert("P").save(tmp_path / "p.png")
    rad = read_radiograph(tmp_path / "p.png")
    _assert_contract(rad)
    assert rad.pixels[0, 0] < 0.05 and rad.pixels[0, -1] > 0.95


def test_jpeg_and_suffix_is_ignored(tmp_path: Path) -> None:
    grey = _gradient_u8()
    path = tmp_path / "really_a_jpeg.png"  # wrong suffix: content decides
    Image.fromarray(grey, mode="L").save(path, format="JPEG", quality=95)
    rad = read_radiograph(path)
    _assert_contract(rad)
    assert rad.format == "jpeg"
    assert np.abs(rad.pixels - grey / 255.0).mean() < 0.02


def test_bytes_input_uses_name_in_source_and_errors() -> None:
    data = _png_bytes(Image.fromarray(_gradient_u8(), mode="L"))
    rad = read_radiograph(data, name="upload.png")
    _assert_contract(rad)
    assert rad.source == "upload.png" and rad.format == "png"
    with pytest.raises(BoneAgeInputError, match=r"^scan\.png: "):
        read_radiograph(b"not an image at all", name="scan.png")


# ----------------------------------------------------------------------------------------------
# bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="file not found"):
        read_radiograph(tmp_path / "nope.png")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient id,age\n1,12\n" * 20)
    with pytest.raises(BoneAgeInputError) as info:
        read_radiograph(path)
    assert str(info.value) == f"{path}: not an image file (PNG, JPEG or DICOM expected)"


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _png_bytes(Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8), mode="L"))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BoneAgeInputError, match=r"not a readable image \(") as info:
        read_radiograph(path)
    assert "\n" not in str(info.value)


def test_corrupt_header_png() -> None:
    with pytest.raises(BoneAgeInputError, match="not a readable image"):
        read_radiograph(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, name="bad.png")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BoneAgeInputError, match="empty file"):
        read_radiograph(path)
    with pytest.raises(BoneAgeInputError, match="^up.png: empty file$"):
        read_radiograph(b"", name="up.png")


def test_tiny_image(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 40), np.uint8) + np.arange(40, dtype=np.uint8), mode="L").save(
        tmp_path / "tiny.png"
    )
    with pytest.raises(BoneAgeInputError, match=r"image too small \(40x20\)"):
        read_radiograph(tmp_path / "tiny.png")


def test_too_many_pixels(tmp_path: Path) -> None:
    Image.fromarray(_gradient_u8(), mode="L").save(tmp_path / "big.png")
    with pytest.raises(BoneAgeInputError, match="image too large"):
        read_radiograph(tmp_path / "big.png", max_pixels=1000)
    assert read_radiograph(tmp_path / "big.png", max_pixels=H * W).pixels.shape == (H, W)


def test_blank_image(tmp_path: Path) -> None:
    Image.fromarray(np.full((H, W), 128, np.uint8), mode="L").save(tmp_path / "blank.png")
    with pytest.raises(BoneAgeInputError, match="blank image"):
        read_radiograph(tmp_path / "blank.png")


# ----------------------------------------------------------------------------------------------
# DICOM


def test_dicom_monochrome2_rescale(tmp_path: Path) -> None:
    raw = _ramp_u16()
    path = _dicom(tmp_path, raw, RescaleSlope="2", RescaleIntercept="-1024")
    rad = read_radiograph(path)
    _assert_contract(rad)
    assert rad.format == "dicom" and rad.bits == 12
    # A linear rescale followed by min-max keeps the ramp: raw 0 -> 0, raw max -> 1.
    np.testing.assert_allclose(rad.pixels, raw / raw.max(), atol=1e-6)
    assert len(np.unique(rad.pixels)) == len(np.unique(raw))


def test_dicom_negative_slope_flips(tmp_path: Path) -> None:
    raw = _ramp_u16()
    rad = read_radiograph(_dicom(tmp_path, raw, RescaleSlope="-1", RescaleIntercept="0"))
    np.testing.assert_allclose(rad.pixels, 1.0 - raw / raw.max(), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = _ramp_u16()
    rad = read_radiograph(_dicom(tmp_path, raw, photometric="MONOCHROME1"))
    _assert_contract(rad)
    assert rad.pixels[0, -1] == 0.0  # MONOCHROME1 shows its largest value as black
    assert rad.pixels[0, 0] == 1.0
    np.testing.assert_allclose(rad.pixels, 1.0 - raw / raw.max(), atol=1e-6)


def test_dicom_window_is_applied(tmp_path: Path) -> None:
    raw = _ramp_u16()
    path = _dicom(tmp_path, raw, WindowCenter="2000", WindowWidth="1000")
    rad = read_radiograph(path)
    _assert_contract(rad)
    px = rad.pixels[0]
    assert (px[raw[0] <= 1400] == 0.0).all()  # below the window: black
    assert (px[raw[0] >= 2600] == 1.0).all()  # above the window: white
    inside = (raw[0] > 1600) & (raw[0] < 2400)
    assert inside.any() and ((px[inside] > 0.0) & (px[inside] < 1.0)).all()
    assert (np.diff(px) >= 0).all()


def test_dicom_window_with_monochrome1_and_negative_slope(tmp_path: Path) -> None:
    raw = _ramp_u16()
    inside = (raw[0] > 1600) & (raw[0] < 2400)
    mono1 = read_radiograph(
        _dicom(tmp_path, raw, photometric="MONOCHROME1", WindowCenter="2000", WindowWidth="1000")
    )
    px = mono1.pixels[0]
    assert (px[raw[0] <= 1400] == 1.0).all() and (px[raw[0] >= 2600] == 0.0).all()
    assert (np.diff(px) <= 0).all() and ((px[inside] > 0) & (px[inside] < 1)).all()
    # Modality values -raw: the window [-2500, -1500] holds raw 1500..2500; higher raw is darker.
    path = _dicom(
        tmp_path,
        raw,
        name="neg.dcm",
        RescaleSlope="-1",
        RescaleIntercept="0",
        WindowCenter="-2000",
        WindowWidth="1000",
    )
    px = read_radiograph(path).pixels[0]
    assert (px[raw[0] <= 1400] == 1.0).all() and (px[raw[0] >= 2600] == 0.0).all()
    assert (np.diff(px) <= 0).all() and ((px[inside] > 0) & (px[inside] < 1)).all()


def test_dicom_header_facts(tmp_path: Path) -> None:
    path = _dicom(
        tmp_path,
        _ramp_u16(),
        PatientSex="F",
        PatientBirthDate="20100115",
        StudyDate="20200115",
        ImageLaterality="L",
    )
    rad = read_radiograph(path)
    assert rad.sex == "female"
    assert rad.birth_date == dt.date(2010, 1, 15)
    assert rad.study_date == dt.date(2020, 1, 15)
    assert rad.laterality == "L"
    assert rad.chronological_age_months == pytest.approx(3652 / 30.4375)
    assert rad.chronological_age_months == pytest.approx(120.0, abs=0.1)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_dicom_header_fallbacks_and_lenient_dates(tmp_path: Path) -> None:
    path = _dicom(
        tmp_path,
        _ramp_u16(),
        PatientSex="O",
        PatientBirthDate="20101345",  # month 13: invalid -> None, not an error
        AcquisitionDate="20200301",
        Laterality="R",
    )
    rad = read_radiograph(path)
    assert rad.sex is None
    assert rad.birth_date is None
    assert rad.study_date == dt.date(2020, 3, 1)
    assert rad.laterality == "R"
    assert rad.chronological_age_months is None
    male = read_radiograph(_dicom(tmp_path, _ramp_u16(), name="m.dcm", PatientSex="M", SeriesDate="20190101"))
    assert male.sex == "male" and male.study_date == dt.date(2019, 1, 1)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = _dicom(tmp_path, None, PatientSex="M")
    with pytest.raises(BoneAgeInputError, match="DICOM file has no image data"):
        read_radiograph(path)


def test_dicom_without_preamble(tmp_path: Path) -> None:
    raw = _ramp_u16()
    path = _dicom(tmp_path, raw, preamble=False, PatientSex="M")
    assert path.read_bytes()[128:132] != b"DICM"
    rad = read_radiograph(path)
    assert rad.format == "dicom" and rad.sex == "male"
    np.testing.assert_allclose(rad.pixels, raw / raw.max(), atol=1e-6)


def test_dicom_multiframe_takes_first_frame(tmp_path: Path) -> None:
    first = _ramp_u16()
    frames = np.stack([first, first[:, ::-1]])
    rad = read_radiograph(_dicom(tmp_path, frames))
    np.testing.assert_allclose(rad.pixels, first / first.max(), atol=1e-6)


def test_dicom_rgb_to_luminance(tmp_path: Path) -> None:
    grey = _gradient_u8()
    rgb = np.ascontiguousarray(np.dstack([grey, grey, grey]))
    rad = read_radiograph(_dicom(tmp_path, rgb, photometric="RGB"))
    _assert_contract(rad)
    np.testing.assert_allclose(rad.pixels, grey / 255.0, atol=1e-5)


def test_dicom_compressed_without_decoder(tmp_path: Path) -> None:
    path = _dicom(tmp_path, _ramp_u16())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    # Encapsulated junk: there is no JPEG 2000 decoder installed, and the data would not decode anyway.
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(BoneAgeInputError, match="JPEG 2000") as info:
        read_radiograph(path)
    assert "\n" not in str(info.value) and "1.2.840.10008.1.2.4.90" in str(info.value)


def test_dicom_tiny(tmp_path: Path) -> None:
    path = _dicom(tmp_path, np.arange(16 * 16, dtype=np.uint16).reshape(16, 16))
    with pytest.raises(BoneAgeInputError, match=r"image too small \(16x16\)"):
        read_radiograph(path)


def test_dicom_too_many_pixels(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="image too large"):
        read_radiograph(_dicom(tmp_path, _ramp_u16()), max_pixels=100)


# ----------------------------------------------------------------------------------------------
# hardening: size limits before decoding, clean messages, unsupported formats, header warnings


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` with almost no pixel data: what a bomb's header looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_default_pixel_limit_fits_radiographs_and_is_checked_before_decoding() -> None:
    from boneage.data.io import MAX_PIXELS

    assert 3000 * 3500 < 6000 * 4000 < MAX_PIXELS <= 50_000_000  # full-resolution films, phone photos
    with pytest.raises(BoneAgeInputError, match=r"^big\.png: image too large \(8000x6000 = 48000000 pixels"):
        read_radiograph(_png_header_only(8000, 6000), name="big.png")  # refused from the header alone


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pillow-warning", "pillow-error"])
def test_pillow_decompression_bomb_is_one_line_and_no_warning(side: int) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BoneAgeInputError, match=r"^bomb\.png: image too large \(") as info:
            read_radiograph(_png_header_only(side, side), name="bomb.png")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DOS attack" not in str(info.value)


def test_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    from boneage.data.io import JPEG_DRAFT_SIDE

    ramp = np.tile(np.linspace(0, 255, 5000).astype(np.uint8), (600, 1))
    rad = read_radiograph(_png_bytes(Image.fromarray(ramp, mode="L"), "JPEG"), name="photo.jpg")
    assert rad.pixels.shape == (300, 2500)  # 1/2 scale in the decoder: long side still >= JPEG_DRAFT_SIDE
    assert max(rad.pixels.shape) >= JPEG_DRAFT_SIDE
    assert np.abs(rad.pixels[150, ::500] - np.linspace(0, 1, 5000)[::1000]).max() < 0.03
    small = read_radiograph(_png_bytes(Image.fromarray(ramp[:, :3000], mode="L"), "JPEG"), name="film.jpg")
    assert small.pixels.shape == (600, 3000)  # below twice the draft side: decoded exactly as before


@pytest.mark.parametrize("cut", [12, 20, 30])
def test_png_cut_in_its_header_names_no_object_address(cut: int) -> None:
    data = _png_bytes(Image.fromarray(_gradient_u8(), mode="L"))
    with pytest.raises(BoneAgeInputError, match=r"^cut\.png: not a readable image") as info:
        read_radiograph(data[:cut], name="cut.png")
    message = str(info.value)
    assert "0x" not in message and " at " not in message and "<" not in message, message


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("WEBP", "WebP")], ids=["gif", "webp"])
def test_gif_and_webp_are_named_unsupported(fmt: str, name: str) -> None:
    data = _png_bytes(Image.fromarray(_gradient_u8(), mode="L").convert("RGB"), fmt)
    with pytest.raises(BoneAgeInputError) as info:
        read_radiograph(data, name=f"hand.{fmt.lower()}")
    assert str(info.value).startswith(f"hand.{fmt.lower()}: unsupported image format ({name})")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_invalid_dicom_dates_are_reported(tmp_path: Path) -> None:
    from boneage.assessment import resolve_age

    path = _dicom(tmp_path, _ramp_u16(), PatientSex="F", PatientBirthDate="20100115", StudyDate="20231345")
    rad = read_radiograph(path)
    assert rad.study_date is None and rad.chronological_age_months is None
    assert rad.header_warnings == ["DICOM StudyDate '20231345' is not a valid date; ignored"]
    months, notes = resolve_age(None, rad)
    assert months is None and notes == rad.header_warnings  # reaches the result's warnings
    fallback = _dicom(
        tmp_path,
        _ramp_u16(),
        name="f.dcm",
        PatientBirthDate="2010-02-30",
        StudyDate="20231345",
        AcquisitionDate="20200301",
    )
    rad = read_radiograph(fallback)
    assert rad.birth_date is None and rad.study_date == dt.date(2020, 3, 1)
    assert len(rad.header_warnings) == 2 and "PatientBirthDate '2010-02-30'" in rad.header_warnings[0]
    valid = read_radiograph(_dicom(tmp_path, _ramp_u16(), name="v.dcm", StudyDate="20200101"))
    assert valid.header_warnings == []
