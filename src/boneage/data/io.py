"""Read a hand radiograph from any file a clinic or a browser upload may hand us.

Everything downstream (preprocessing, the model, the report) wants one thing: a float32 greyscale
array in [0, 1] where bone is bright.  Files arrive as 8/16-bit PNG, JPEG photographs of a film, TIFF,
BMP or DICOM (MONOCHROME1 or 2, rescaled, windowed, multi-frame, sometimes without the preamble), so
this module sniffs the real format from the content and turns every failure into a one-line
:class:`~boneage.errors.BoneAgeInputError` instead of a library traceback.
"""

from __future__ import annotations

import datetime as _dt
import io as _io
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from boneage.errors import BoneAgeInputError

__all__ = ["Radiograph", "read_radiograph", "sniff_format", "MIN_SIDE", "WORKING_SIDE"]

#: Smallest accepted side in pixels: anything smaller cannot show the carpal bones.
MIN_SIDE = 32

#: Largest accepted image, checked against the size the file declares before anything is decoded. Hand
#: radiographs are far smaller: the RSNA sample is 470-1285 x 540-1485 px (< 2 Mpx), full-resolution
#: CR/DR films and clinic exports reach about 3000 x 3500 (~10 Mpx), a 24 Mpx phone photo of a film is
#: 6000 x 4000. 40 Mpx leaves room above all of them while bounding one decode to about 160 MB of float32
#: (an 8-bit RGB frame is 120 MB before conversion); anything larger is a mistake or a decompression bomb.
MAX_PIXELS = 40_000_000

#: Working size (issue #43 item 7): an image whose long side is at least twice this is shrunk by a whole
#: factor k = long side // WORKING_SIDE as it is decoded, so its long side stays >= WORKING_SIDE: JPEGs in
#: the decoder itself (``Image.draft``: 1/2, 1/4 or 1/8 scale), every other format by averaging k x k blocks
#: of the stored values right after decoding, before any float copy. 2048 px is 6.8x the bundled model's
#: 299 px squash and 4x the largest input any recipe uses (512 px), so what the model sees is unchanged in
#: practice; hand radiographs (RSNA sample <= 1485 px, CR/DR films ~3000 x 3500) are never shrunk at all.
#: A 40 Mpx PNG costs one 8/16-bit decode instead of several full-size float32 copies.
WORKING_SIDE = 2048
JPEG_DRAFT_SIDE = WORKING_SIDE  # the name before the working size covered every format

_DAYS_PER_MONTH = 30.4375  # 365.25 / 12

# Formats we decode with Pillow, keyed by sniff_format() name -> Pillow format id.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP"}

_NOT_AN_IMAGE = "not an image file (PNG, JPEG or DICOM expected)"

# Image formats we recognise but do not read: named in the message instead of "not an image file".
_UNSUPPORTED = (
    ("GIF", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("WebP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("JPEG 2000", lambda h: h.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"))),
    ("HEIC/HEIF", lambda h: h[4:8] == b"ftyp" and h[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heif")),
)

_OPEN_LOCK = threading.Lock()

# Pillow puts repr()s such as "<_io.BytesIO object at 0x7f...>" into its messages; users never see them.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


@dataclass
class Radiograph:
    """A decoded radiograph plus the DICOM header facts the report needs.

    ``pixels`` is float32, HxW, in [0, 1] with 0 = black (air) and 1 = white (bone), i.e. the
    MONOCHROME2 sense, whatever the file stored.
    """

    pixels: np.ndarray
    source: str
    format: str
    sex: str | None = None
    birth_date: _dt.date | None = None
    study_date: _dt.date | None = None
    laterality: str | None = None
    bits: int = 8
    #: PatientSex as the file states it when it is neither F nor M (e.g. "O"), so a message can say so
    sex_stated: str | None = None
    #: Header facts that were present but unusable (e.g. an invalid StudyDate), for the user to see.
    header_warnings: list[str] = field(default_factory=list)

    @property
    def chronological_age_months(self) -> float | None:
        """Age at the study in months (days / 30.4375), so the report can compare it to bone age."""
        if self.birth_date is None or self.study_date is None:
            return None
        return (self.study_date - self.birth_date).days / _DAYS_PER_MONTH


def sniff_format(head: bytes) -> str | None:
    """Name the file format from its first bytes (>= 132 for DICOM), because suffixes lie.

    Returns ``"png"``, ``"jpeg"``, ``"dicom"``, ``"tiff"``, ``"bmp"`` or ``None`` when unknown.
    DICOM without the 128-byte preamble is not recognised here (see :func:`read_radiograph`).
    """
    head = bytes(head[:132])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    return None


#: suffixes of files that are never radiographs: a folder walk does not even open them
NOT_IMAGES = {
    ".html",
    ".htm",
    ".csv",
    ".json",
    ".txt",
    ".md",
    ".xml",
    ".pdf",
    ".log",
    ".yaml",
    ".yml",
    ".zip",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
DICOMDIR_UID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def _dicom_by_content(path: Path) -> bool:
    """A DICOM file whatever its name: the ``DICM`` marker after the preamble, or (PACS exports without a
    preamble) a data set that parses and names its SOP class."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if sniff_format(head) == "dicom":
        return True
    if sniff_format(head) is not None or len(head) < 8:
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not a DICOM data set: pydicom raises many types for arbitrary bytes
        return False
    return "SOPClassUID" in ds


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    if not _dicom_by_content(path):
        return False
    import pydicom

    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    except Exception:
        return False
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_UID


def dicomdir_files(path: Path) -> list[Path]:
    """The image files a DICOMDIR lists (read, not treated as an image)."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(pydicom.dcmread(path))
    except Exception as exc:
        raise BoneAgeInputError(f"not a readable DICOMDIR ({type(exc).__name__})", path) from None
    return [Path(instance.path) for instance in fileset if instance.path and Path(instance.path).is_file()]


def find_radiographs(inputs: list[Path], *, recursive: bool = True) -> list[Path]:
    """The radiographs among files and folders as a user names them: folders walked (sub-folders too unless
    ``recursive`` is off; hidden files skipped), PNG/JPEG/TIFF/BMP by suffix, DICOM by content whatever its
    name (``IM0001``, ``1.2.840....``), a DICOMDIR read for the files it lists. A file named explicitly is
    always kept (a bad one gets its own one-line error later). Each file once, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            walk = sorted(item.rglob("*")) if recursive else sorted(item.iterdir())
            for path in walk:
                rel = path.relative_to(item).parts
                if not path.is_file() or any(part.startswith(".") for part in rel):
                    continue
                suffix = path.suffix.lower()
                if suffix in NOT_IMAGES:
                    continue
                if path.name.upper() == "DICOMDIR":
                    continue  # its files are in the walk already
                pictures = IMAGE_SUFFIXES - {".dcm", ".dicom"}
                if suffix in pictures or (
                    (suffix in IMAGE_SUFFIXES or _dicom_by_content(path)) and not _is_dicomdir(path)
                ):
                    found.append(path)
        elif item.is_file() and _is_dicomdir(item):
            found += dicomdir_files(item)
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def read_radiograph(
    source: str | Path | bytes,
    name: str | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> Radiograph:
    """Decode a radiograph from a path or raw upload bytes into a :class:`Radiograph`.

    ``name`` labels messages for bytes input (the upload's file name). ``max_pixels`` bounds the size
    the file declares, checked before decoding, so a tiny compressed file cannot exhaust memory
    (decompression bomb). Raises :class:`BoneAgeInputError` for every kind of bad input.
    """
    data, label = _load_bytes(source, name)
    if not data:
        raise BoneAgeInputError("empty file", label)

    fmt = sniff_format(data[:132])
    if fmt == "dicom":
        return _read_dicom(data, label, max_pixels=max_pixels, force=False)
    if fmt in _PIL_FORMATS:
        return _read_pillow(data, label, fmt, max_pixels=max_pixels)

    # Last resort: a DICOM data set written without the preamble and "DICM" marker.
    rad = _try_headerless_dicom(data, label, max_pixels=max_pixels)
    if rad is not None:
        return rad
    for fmt_name, matches in _UNSUPPORTED:
        if matches(data[:32]):
            raise BoneAgeInputError(
                f"unsupported image format ({fmt_name}): convert it to PNG, or send the original DICOM", label
            )
    raise BoneAgeInputError(_NOT_AN_IMAGE, label)


# ----------------------------------------------------------------------------------------------
# input


def _load_bytes(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    """Return the file content and the label to use in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<upload>"
    if not isinstance(source, (str, Path)):
        raise BoneAgeInputError(f"expected a path or bytes, got {type(source).__name__}", name)
    path = Path(source)
    label = name or str(source)
    if not path.exists():
        raise BoneAgeInputError("file not found", label)
    if path.is_dir():
        raise BoneAgeInputError("is a folder, not an image file", label)
    try:
        return path.read_bytes(), label
    except OSError as exc:
        raise BoneAgeInputError(f"cannot read file ({exc.strerror or exc})", label) from exc


def _short(exc: BaseException, limit: int = 160) -> str:
    """One-line, bounded description of a library exception for user messages (no object addresses)."""
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    """Reject images too small to show a hand or too big to decode safely."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BoneAgeInputError(f"image too small ({width}x{height})", label)
    if width * height > max_pixels:
        raise BoneAgeInputError(
            f"image too large ({width}x{height} = {width * height} pixels, limit {max_pixels})", label
        )


def _finish(arr: np.ndarray, label: str) -> np.ndarray:
    """Final contract checks shared by all readers: 2-D float32, finite, in [0, 1], not blank."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise BoneAgeInputError(f"unexpected image shape {arr.shape}", label)
    if not np.isfinite(arr).all():
        raise BoneAgeInputError("image contains non-finite pixel values", label)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise BoneAgeInputError("blank image (all pixels have the same value)", label)
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] using the full data range; a constant image is left for _finish to reject."""
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.any():
        return arr.astype(np.float32)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (..., 3) array, kept in float to avoid an extra 8-bit rounding."""
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# ----------------------------------------------------------------------------------------------
# Pillow formats


def _read_pillow(data: bytes, label: str, fmt: str, *, max_pixels: int) -> Radiograph:
    """PNG/JPEG/TIFF/BMP: any bit depth and colour mode to luminance in [0, 1].

    ``Image.open`` only parses the header, so the declared size is checked before any pixel is decoded.
    Pillow's own decompression-bomb warning (above ~89 Mpx) and error (above twice that) become the same
    one-line "image too large" instead of a warning on stderr or a library message.
    """
    # Pillow warns from Image.open, so only the header parse sits inside the filter. The warnings filter list
    # is process-wide: the lock keeps our own threads (the web app's workers) from undoing each other's
    # filter; a race with other code can at worst let Pillow print its warning, and _check_size still refuses.
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(_io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BoneAgeInputError(_too_large_message(exc, max_pixels), label) from exc
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            raise BoneAgeInputError(f"not a readable image ({_short(exc)})", label) from exc

    with im:
        width, height = im.size
        _check_size(width, height, label, max_pixels)
        try:
            if fmt == "jpeg" and max(width, height) >= 2 * WORKING_SIDE:
                scale = WORKING_SIDE / max(width, height)
                im.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
            im.load()
            # Phone photos of a film carry the rotation in EXIF only. Read after load (Pillow >= 11 turns a
            # TIFF itself while loading and drops the tag) and before the reduced copy, which has no EXIF.
            turn = _EXIF_TURNS.get(im.getexif().get(_ORIENTATION, 1)) if fmt in ("jpeg", "tiff") else None
            im = _reduce_pil(im, _working_factor(*im.size))
            if turn is not None:
                im = im.transpose(turn)
        except Image.DecompressionBombError as exc:
            raise BoneAgeInputError(_too_large_message(exc, max_pixels), label) from exc
        except Exception as exc:
            raise BoneAgeInputError(f"not a readable image ({_short(exc)})", label) from exc
        pixels, bits = _pil_to_float(im, label)
    return Radiograph(pixels=_finish(pixels, label), source=label, format=fmt, bits=bits)


_ORIENTATION = 0x0112  # the EXIF Orientation tag
#: EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose`` does).
_EXIF_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _working_factor(width: int, height: int) -> int:
    """The whole factor that brings the long side down towards ``WORKING_SIDE`` but never below it."""
    return max(1, max(width, height) // WORKING_SIDE)


def _reduce_pil(im: Image.Image, factor: int) -> Image.Image:
    """Average ``factor`` x ``factor`` blocks in the image's own mode (8/16/32-bit, grey or colour)."""
    if factor <= 1:
        return im
    if im.mode.startswith("I;16"):  # Pillow's reduce has no 16-bit modes
        return Image.fromarray(_box_reduce(np.asarray(im), factor))
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):  # palette indices must not be averaged: colours first, as _pil_to_float does
        im = im.convert("RGB")
    try:
        return im.reduce(factor)
    except ValueError:  # a mode Pillow cannot reduce: the colours _pil_to_float would take anyway
        return im.convert("RGB").reduce(factor)


def _box_reduce(arr: np.ndarray, factor: int, strip_rows: int = 64) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of an (H, W) or (H, W, C) array, in its own dtype (integers
    rounded), like ``Image.reduce``: edge blocks average the pixels they have. Computed a strip of
    ``strip_rows`` output rows at a time, so no full-size float copy is ever made."""
    h, w = arr.shape[:2]
    cols = np.arange(0, w, factor)
    col_n = np.diff(np.append(cols, w))
    parts = []
    for top in range(0, h, factor * strip_rows):
        strip = arr[top : top + factor * strip_rows]
        rows = np.arange(0, strip.shape[0], factor)
        row_n = np.diff(np.append(rows, strip.shape[0]))
        sums = np.add.reduceat(np.add.reduceat(strip, rows, axis=0, dtype=np.float64), cols, axis=1)
        counts = np.multiply.outer(row_n, col_n).reshape(len(rows), len(cols), *([1] * (arr.ndim - 2)))
        parts.append(sums / counts)
    out = np.concatenate(parts)
    if np.issubdtype(arr.dtype, np.integer):
        np.rint(out, out=out)
    return out.astype(arr.dtype)


def _too_large_message(exc: BaseException, max_pixels: int) -> str:
    """Pillow's decompression-bomb message in our words: the declared pixel count and our limit."""
    found = re.search(r"Image size \((\d+) pixels\)", str(exc))
    declared = f"{int(found.group(1))} pixels" if found else "declared size"
    return f"image too large ({declared}, limit {max_pixels})"


def _pil_to_float(im: Image.Image, label: str) -> tuple[np.ndarray, int]:
    """Convert any Pillow mode to a float luminance array in [0, 1] and report the stored bit depth.

    Alpha is ignored: radiographs carry no meaningful transparency, and compositing could blank
    an image whose exporter wrote a zero alpha channel.
    """
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32), 1
    # One float32 copy, scaled in place: the same float32 arithmetic as ``arr / 255.0``, half the memory.
    if mode in ("L", "LA", "La"):
        arr = np.asarray(im.getchannel(0) if mode != "L" else im)
        return _scaled(arr, 255.0), 8
    if mode.startswith("I;16"):
        arr = np.asarray(im)
        return _scaled(arr, float(np.iinfo(arr.dtype).max)), 16
    if mode == "I":
        arr = np.asarray(im)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 0xFFFF:  # 16-bit content promoted to int32 by Pillow
            return _scaled(arr, 65535.0), 16
        return _minmax(arr), 32
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return arr.copy(), 32
        return _minmax(arr), 32
    # Colour or palette: RGB, RGBA, RGBX, P, PA, CMYK, YCbCr, LAB, HSV, ...
    try:
        rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise BoneAgeInputError(f"unsupported image mode {mode!r} ({_short(exc)})", label) from exc
    grey = _luminance(rgb)
    grey /= 255.0
    return grey, 8


def _scaled(arr: np.ndarray, full: float) -> np.ndarray:
    """``arr / full`` as float32 in one copy."""
    out = arr.astype(np.float32)
    out /= full
    return out


# ----------------------------------------------------------------------------------------------
# DICOM


def _try_headerless_dicom(data: bytes, label: str, *, max_pixels: int) -> Radiograph | None:
    """Accept content without the DICM marker only if pydicom finds pixel data in it."""
    # Such files start with a group 0x0002 (meta) or 0x0008 (identification) tag; checking that first
    # keeps arbitrary binaries away from a forced parse.
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(_io.BytesIO(data), force=True)
        if not _has_pixels(ds):
            return None
    except Exception:
        return None
    return _dicom_to_radiograph(ds, label, max_pixels=max_pixels)


def _read_dicom(data: bytes, label: str, *, max_pixels: int, force: bool) -> Radiograph:
    """Parse a DICOM Part 10 file and decode its first frame."""
    import pydicom

    try:
        ds = pydicom.dcmread(_io.BytesIO(data), force=force)
    except Exception as exc:
        raise BoneAgeInputError(f"not a readable DICOM file ({_short(exc)})", label) from exc
    return _dicom_to_radiograph(ds, label, max_pixels=max_pixels)


def _has_pixels(ds: Any) -> bool:
    return any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _get(ds: Any, keyword: str) -> Any:
    """Header value or None; a malformed element must not stop us reading the image."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    return value


def _int_tag(ds: Any, keyword: str) -> int | None:
    value = _get(ds, keyword)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _dicom_to_radiograph(ds: Any, label: str, *, max_pixels: int) -> Radiograph:
    if not _has_pixels(ds):
        raise BoneAgeInputError("DICOM file has no image data", label)
    rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
    if rows is None or cols is None:
        raise BoneAgeInputError("DICOM file has no image size (Rows/Columns missing)", label)
    _check_size(cols, rows, label, max_pixels)

    _ensure_transfer_syntax(ds)
    arr = _decode_first_frame(ds, label)
    photometric = str(_get(ds, "PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = _int_tag(ds, "BitsStored") or _int_tag(ds, "BitsAllocated") or 8
    # Shrink a very large frame to the working size in its stored values, before the LUTs make float64
    # copies of it: averaging detector values is what binning on the detector would have recorded.
    factor = _working_factor(arr.shape[1], arr.shape[0]) if arr.ndim >= 2 else 1
    if factor > 1 and arr.ndim == 2 and photometric == "PALETTE COLOR":  # indices must not be averaged
        arr = _box_reduce(_apply_palette(arr, ds, label), factor)
        photometric = "RGB"
    elif factor > 1:
        arr = _box_reduce(arr, factor)

    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # Colour DICOM (RGB, YBR already converted to RGB by pydicom, or a palette applied below).
        pixels = _minmax(_luminance(arr[..., :3]))
    elif arr.ndim == 2 and photometric == "PALETTE COLOR":
        pixels = _minmax(_luminance(_apply_palette(arr, ds, label)))
    elif arr.ndim == 2:
        pixels = _minmax(_apply_grey_luts(arr, ds))
        if photometric == "MONOCHROME1":  # stored with 0 = white: flip to MONOCHROME2 sense
            pixels = 1.0 - pixels
    else:
        raise BoneAgeInputError(f"unexpected DICOM pixel array shape {arr.shape}", label)

    notes: list[str] = []
    return Radiograph(
        pixels=_finish(pixels, label),
        source=label,
        format="dicom",
        sex=_parse_sex(_get(ds, "PatientSex")),
        sex_stated=_unusable_sex(_get(ds, "PatientSex")),
        birth_date=_first_date(ds, ("PatientBirthDate",), notes),
        study_date=_first_date(ds, ("StudyDate", "AcquisitionDate", "SeriesDate", "ContentDate"), notes),
        laterality=_parse_laterality(_get(ds, "ImageLaterality") or _get(ds, "Laterality")),
        bits=bits,
        header_warnings=notes,
    )


def _ensure_transfer_syntax(ds: Any) -> None:
    """Give a preamble-less data set the transfer syntax it was actually read with.

    pydicom needs file_meta.TransferSyntaxUID to decode pixels; files without a meta header only
    carry the encoding pydicom guessed while parsing.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and _get(meta, "TransferSyntaxUID"):
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decode_first_frame(ds: Any, label: str) -> np.ndarray:
    """Decode only what we use: the first frame of a (possibly multi-frame) data set."""
    from pydicom.pixels import pixel_array

    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        frames = _int_tag(ds, "NumberOfFrames") or 1
        if frames > 1:
            arr = pixel_array(ds, index=0)
        else:
            arr = ds.pixel_array
    except Exception as exc:
        if getattr(tsyntax, "is_compressed", False):
            raise BoneAgeInputError(
                f"cannot decode compressed DICOM pixel data (transfer syntax {tsyntax.name}, {tsyntax}): "
                "install a decoder such as pylibjpeg or convert the file to uncompressed DICOM",
                label,
            ) from exc
        raise BoneAgeInputError(f"DICOM pixel data could not be decoded ({_short(exc)})", label) from exc
    arr = np.asarray(arr)
    frames = _int_tag(ds, "NumberOfFrames") or 1
    samples = _int_tag(ds, "SamplesPerPixel") or 1
    if frames > 1 and arr.ndim == (4 if samples > 1 else 3):  # decoder returned every frame
        arr = arr[0]
    return arr


def _apply_grey_luts(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT / rescale to physical values, then the VOI LUT or window the modality chose."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out: np.ndarray = arr
    try:
        out = apply_modality_lut(out, ds)
    except Exception:
        out = arr  # a broken modality LUT still leaves a usable raw image
    has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        try:
            windowed = np.asarray(apply_voi_lut(out, ds), dtype=np.float64)
            if "VOILUTSequence" not in ds and _rescale_slope(ds) < 0:
                # pydicom scales the window output by the (negative) slope, which flips it; we only
                # need the order of grey levels, so restore "below the window = darkest".
                windowed = -windowed
            if np.ptp(windowed) > 0:  # ignore a window that blanks the whole image
                out = windowed
        except Exception:
            pass  # malformed window values: fall back to the full range
    return np.asarray(out, dtype=np.float64)


def _rescale_slope(ds: Any) -> float:
    try:
        return float(ds.get("RescaleSlope", 1.0))
    except (TypeError, ValueError):
        return 1.0


def _apply_palette(arr: np.ndarray, ds: Any, label: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        return np.asarray(apply_color_lut(arr, ds))
    except Exception as exc:
        raise BoneAgeInputError(f"DICOM palette could not be applied ({_short(exc)})", label) from exc


# ----------------------------------------------------------------------------------------------
# DICOM header facts


_DATE_RE = re.compile(r"^\s*(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})")


def _parse_date(value: Any) -> _dt.date | None:
    """DICOM DA (YYYYMMDD, also the old YYYY.MM.DD); anything invalid becomes None."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return _dt.date(value.year, value.month, value.day)
    match = _DATE_RE.match(str(value))
    if not match:
        return None
    try:
        return _dt.date(*(int(g) for g in match.groups()))
    except ValueError:
        return None


def _first_date(ds: Any, keywords: tuple[str, ...], notes: list[str] | None = None) -> _dt.date | None:
    """The first valid date among ``keywords``; a date that is present but invalid is reported in ``notes``
    (so an age that cannot be computed, or comes from a fallback date, is never a silent surprise)."""
    for keyword in keywords:
        value = _get(ds, keyword)
        date = _parse_date(value)
        if date is not None:
            return date
        if value is not None and notes is not None:
            text = " ".join(str(value).split())[:40]
            notes.append(f"DICOM {keyword} {text!r} is not a valid date; ignored")
    return None


def _parse_sex(value: Any) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return {"M": "male", "F": "female"}.get(text)


def _unusable_sex(value: Any) -> str | None:
    """A PatientSex that is present but neither F nor M (DICOM allows O), for the error message."""
    text = str(value).strip() if value is not None else ""
    return text[:16] if text and _parse_sex(text) is None else None


def _parse_laterality(value: Any) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text if text in ("L", "R") else None
