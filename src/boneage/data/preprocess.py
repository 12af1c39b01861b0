"""Deterministic preprocessing shared by training and inference: geometry, hand crop, contrast, letterbox.

``geometry`` says how a radiograph's frame is shaped before anything else: ``letterbox`` keeps the hand's
proportions; ``squash`` first resizes the whole frame to a square, as the 299 px RSNA training copies were
made, so a clinic's file in its own aspect ratio reaches the model in the geometry that model was trained on.

The same object runs on a training image, a cached image and a clinician's upload, so the model always
sees the input it was trained on. Its settings travel inside every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

_WORK_SIZE = 256  # the hand is located on a copy this large: fast and robust to noise
# Bump when the preprocessing code (hand_box, squash, letterbox, contrast) changes what it outputs for the
# same settings: cache keys change with it, so no cache of the old pixels is reused. Version 1 adds nothing
# to the key, which keeps the names of the caches made before the version existed.
PREPROCESS_VERSION = 1


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(img.resize((max(1, width), max(1, height)), Image.BILINEAR), dtype=np.float32)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def _work_copy(pixels: np.ndarray) -> tuple[np.ndarray | None, float]:
    """A smoothed copy at most ``_WORK_SIZE`` px, stretched to [0, 1] by its 1st-99th percentiles (None for
    a flat image), and its scale: the hand is located on this, fast and robust to noise."""
    h, w = pixels.shape
    scale = _WORK_SIZE / max(h, w)
    small = _resize(pixels, round(w * scale), round(h * scale)) if scale < 1 else pixels.astype(np.float32)
    small = ndimage.uniform_filter(small, size=3)
    lo, hi = np.percentile(small, [1, 99])
    if hi - lo < 1e-3:
        return None, scale
    return np.clip((small - lo) / (hi - lo), 0, 1), scale


def _largest_object(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected object of a mask (None if it is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == int(np.argmax(sizes)) + 1


def bright_objects(pixels: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The bright objects of the work copy (above Otsu's threshold, thin bridges opened; None for a flat
    image) and that copy's scale: the hand, markers, labels, collimator bands. ``_hand_mask`` keeps the
    largest; the OOD check's ``boneage.ood.frame`` asks whether the hand is whole and in one piece."""
    norm, scale = _work_copy(pixels)
    if norm is None:
        return None, scale
    return ndimage.binary_opening(norm > _otsu(norm), iterations=2), scale


def _hand_mask(pixels: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The largest bright object on the work copy (None if there is none), and that copy's scale: on a hand
    film the largest object is the hand. Collimator bands, lead markers and labels are separate, smaller
    objects once thin bridges are opened."""
    objects, scale = bright_objects(pixels)
    if objects is None:
        return None, scale
    return _largest_object(objects), scale


def hand_box(pixels: np.ndarray, margin: float = 0.04, min_area: float = 0.15) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the largest bright object, which on a hand film is the hand;
    markers and collimator bands fall outside it. When nothing plausible is found the whole image is kept."""
    h, w = pixels.shape
    hand, scale = _hand_mask(pixels)
    if hand is None:
        return 0, h, 0, w
    sh, sw = hand.shape
    rows, cols = np.nonzero(hand)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    if (bottom - top) * (right - left) < min_area * sh * sw:
        return 0, h, 0, w
    pad_r, pad_c = round(margin * sh), round(margin * sw)
    top, bottom = max(0, top - pad_r), min(sh, bottom + pad_r)
    left, right = max(0, left - pad_c), min(sw, right + pad_c)
    inv = 1 / scale if scale < 1 else 1.0
    return (
        int(top * inv),
        min(h, int(np.ceil(bottom * inv))),
        int(left * inv),
        min(w, int(np.ceil(right * inv))),
    )


def hand_tilt(pixels: np.ndarray, max_tilt: float = 45.0, min_elongation: float = 1.3) -> float:
    """Degrees (counter-clockwise) that turn the hand's long axis upright: the principal axis of the hand
    mask's second moments, a label-free stand-in for the keypoint registration of Iglovikov et al. 0 when
    the mask is missing, round (no clear axis), or tilted more than ``max_tilt``: a hand turned by 90° or
    more stays as it is, for the orientation check to see."""
    hand, _ = _hand_mask(pixels)
    if hand is None or hand.sum() < 16:
        return 0.0
    rows, cols = np.nonzero(hand)
    cov = np.cov(np.stack([cols - cols.mean(), rows.mean() - rows]))  # x right, y up
    evals, evecs = np.linalg.eigh(cov)
    if evals[0] <= 0 or evals[1] / evals[0] < min_elongation**2:
        return 0.0
    x, y = evecs[:, 1]  # the long axis
    tilt = float(np.degrees(np.arctan2(x, y)))  # its angle from vertical, clockwise positive
    tilt = (tilt + 90.0) % 180.0 - 90.0  # an axis has no direction: fold into [-90, 90)
    return tilt if abs(tilt) <= max_tilt else 0.0


def align_hand(pixels: np.ndarray) -> np.ndarray:
    """The frame rotated so the hand's long axis is vertical (see ``hand_tilt``); corners filled with the
    background's level, so the hand crop that follows is not misled by them."""
    tilt = hand_tilt(pixels)
    if abs(tilt) < 0.5:
        return pixels
    fill = float(np.percentile(pixels, 5))
    # ndimage.rotate turns counter-clockwise as displayed for a positive angle: it undoes a clockwise tilt
    return ndimage.rotate(pixels, tilt, reshape=True, order=1, mode="constant", cval=fill)


def hand_silhouette(pixels: np.ndarray, min_area: float = 0.15) -> np.ndarray | None:
    """The whole hand, soft tissue included, as a mask of ``pixels``' shape; None when no plausible one is
    found (the caller then keeps every pixel). ``_hand_mask`` thresholds between the two brightest classes
    and its opening cuts thin fingertips off, which is fine for a box but not for a mask that blanks what lies
    outside it; this one thresholds between the background and soft tissue (Otsu's threshold within the
    darker Otsu class), keeps the largest object, fills it and grows it by 2 working pixels. A label-free
    stand-in for the segmentation network Iglovikov et al. used to remove the background: markers, labels
    and collimator light are separate objects and fall outside it."""
    norm, scale = _work_copy(pixels)
    if norm is None:
        return None
    upper = _otsu(norm)
    darker = norm[norm <= upper]
    if upper <= 0 or darker.size == 0:
        return None
    hand = _largest_object(ndimage.binary_opening(norm > _otsu(darker / upper) * upper, iterations=1))
    if hand is None:
        return None
    mask = ndimage.binary_fill_holes(hand)
    if mask.mean() < min_area:
        return None
    mask = ndimage.binary_dilation(mask, iterations=2)
    if scale < 1:
        h, w = pixels.shape
        mask = _resize(mask.astype(np.float32), w, h) > 0.5
    return mask


def letterbox(pixels: np.ndarray, size: int) -> np.ndarray:
    """Fit the long side to ``size`` and pad the short side with black, keeping the hand's proportions."""
    h, w = pixels.shape
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    resample = Image.BILINEAR if scale >= 1 else Image.BOX
    resized = np.asarray(img.resize((nw, nh), resample), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """The whole frame resized to ``size`` x ``size`` without keeping the aspect ratio (antialiased when
    shrinking), the way the squashed training copies were made; a frame already that size is left alone."""
    h, w = pixels.shape
    if (h, w) == (size, size):
        return pixels.astype(np.float32, copy=False)
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    resample = Image.BILINEAR if size >= max(h, w) else Image.BOX
    return np.asarray(img.resize((size, size), resample), dtype=np.float32)


GEOMETRIES = ("letterbox", "squash")
ALIGNMENTS = ("none", "axis")
FITS = ("pad", "stretch")
BACKGROUNDS = ("keep", "remove")


def training_copy(pixels: np.ndarray, size: int = 299, quality: int = 60) -> np.ndarray:
    """The frame as the shared 299 px training copies were made: squashed to ``size``², 8-bit, JPEG at
    ``quality`` (../shared/data/rsna-bone-age-299/README.md). Not a model input: the fine texture of a
    clinic's PNG differs from that of the JPEG copies every training image comes from, so statistics of
    that texture (the OOD check's ``texture`` density) are only comparable on an image made the same way.
    ``pixels`` in [0, 1] (a ``Radiograph``) or 0-255."""
    import io

    grey = np.asarray(pixels, dtype=np.float32)
    if grey.size and float(grey.max()) <= 1.0:
        grey = grey * 255.0
    small = np.clip(np.rint(squash(grey, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def percentile_stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Contrast from the ``low``-``high`` percentiles of ``pixels`` to [0, 1], clipped: robust to a few
    saturated or empty pixels (the ``percentile`` contrast of ``Preprocess``)."""
    lo, hi = np.percentile(pixels, [low, high])
    return np.clip((pixels - lo) / max(float(hi - lo), 1e-6), 0, 1)


def _clahe(pixels: np.ndarray) -> np.ndarray:
    try:
        import kornia
        import torch
    except ImportError:  # a light install: the CLAHE models need the training stack
        from boneage.errors import BoneAgeInputError

        raise BoneAgeInputError(
            "this model's contrast=clahe preprocessing needs kornia: pip install 'boneage[train]'"
        ) from None

    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    out = kornia.enhance.equalize_clahe(t, clip_limit=2.0, grid_size=(8, 8))
    return out[0, 0].numpy()


@dataclass(frozen=True)
class Preprocess:
    """Radiograph (float greyscale in [0, 1]) → square uint8 image of ``size`` pixels."""

    size: int = 512
    crop: bool = True
    contrast: str = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    geometry: str = "letterbox"  # letterbox | squash (whole frame to squash_size² first)
    squash_size: int = 299  # the side of the square frame when geometry is squash
    align: str = "none"  # none | axis (turn the hand's long axis upright before the crop)
    fit: str = "pad"  # pad | stretch (how the crop box becomes the square: black bars, or resized to fill it)
    background: str = "keep"  # keep | remove (black outside the hand's silhouette: markers, labels, light)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r} (letterbox or squash)")
        if self.geometry == "squash" and self.squash_size < 32:
            raise ValueError("preprocess squash_size must be at least 32 pixels")
        if self.contrast not in {"percentile", "clahe", "none"}:
            raise ValueError(f"unknown contrast method {self.contrast!r} (percentile, clahe or none)")
        if self.size < 32:
            raise ValueError("preprocess size must be at least 32 pixels")
        if self.align not in ALIGNMENTS:
            raise ValueError(f"unknown align {self.align!r} (none or axis)")
        if self.fit not in FITS:
            raise ValueError(f"unknown fit {self.fit!r} (pad or stretch)")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r} (keep or remove)")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, dtype=np.float32)
        if self.geometry == "squash":
            pixels = squash(pixels, self.squash_size)
        if self.align == "axis":
            pixels = align_hand(pixels)
        if self.crop:
            top, bottom, left, right = hand_box(pixels)
            pixels = pixels[top:bottom, left:right]
        silhouette = hand_silhouette(pixels) if self.background == "remove" else None
        if self.contrast == "percentile":
            pixels = percentile_stretch(pixels, self.low_percentile, self.high_percentile)
        elif self.contrast == "clahe":
            pixels = _clahe(pixels)
        if silhouette is not None:  # after the contrast stretch, so the blanked background is black
            pixels = np.where(silhouette, pixels, 0.0).astype(np.float32)
        out = squash(pixels, self.size) if self.fit == "stretch" else letterbox(pixels, self.size)
        return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)

    @classmethod
    def from_config(cls, section: Any) -> Preprocess:
        """From a ``PreprocessSpec`` (the config's ``preprocess`` section, same field names) or a dict."""
        if hasattr(section, "model_dump"):
            return cls(**section.model_dump())
        return cls(**(section if isinstance(section, dict) else asdict(section)))

    from_spec = from_config

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """A short hash of the settings: a cache built with other settings is never reused by mistake.
        Letterbox settings hash without the squash fields, so caches made before they existed stay valid."""
        d: dict[str, Any] = self.to_dict()
        if self.geometry == "letterbox":
            d.pop("geometry")
            d.pop("squash_size")
        if self.align == "none":  # as before the option existed
            d.pop("align")
        if self.fit == "pad":  # likewise
            d.pop("fit")
        if self.background == "keep":  # likewise
            d.pop("background")
        if PREPROCESS_VERSION > 1:
            d["code_version"] = PREPROCESS_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
