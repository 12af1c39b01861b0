"""The test-time views and the heatmap's maths, defined once for both engines.

The views are applied in numpy (bilinear, zero padding, kornia's ``rotate``/``scale`` conventions, checked
against kornia in the tests), so the ONNX and the torch engine feed their networks the same pixels; the
heatmap's post-processing is pytorch-grad-cam's ``scale_cam_image`` in numpy.
"""

from __future__ import annotations

import math

import numpy as np

View = tuple[bool, float, float]

# (horizontal flip, rotation in degrees, zoom): small, label-preserving views whose spread is the uncertainty
TTA_VIEWS: list[View] = [
    (False, 0.0, 1.0),
    (True, 0.0, 1.0),
    (False, 8.0, 1.0),
    (False, -8.0, 1.0),
    (False, 0.0, 0.92),
    (True, 0.0, 1.08),
]


def _affine(angle: float, zoom: float, size: int) -> np.ndarray:
    """kornia's ``get_rotation_matrix2d`` about the centre ((S-1)/2): a forward 2x3 pixel-space map."""
    c = (size - 1) / 2.0
    a = math.cos(math.radians(angle)) * zoom
    b = math.sin(math.radians(angle)) * zoom
    return np.array([[a, b, (1 - a) * c - b * c], [-b, a, b * c + (1 - a) * c]], dtype=np.float64)


def _warp(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """dst(x, y) = src(M⁻¹(x, y)) with bilinear sampling; corners outside the image contribute zero."""
    n, h, w = images.shape
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    wx, wy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    out = np.zeros((n, h, w), dtype=np.float32)
    for dy, dx, weight in (
        (0, 0, (1 - wx) * (1 - wy)),
        (0, 1, wx * (1 - wy)),
        (1, 0, (1 - wx) * wy),
        (1, 1, wx * wy),
    ):
        xi, yi = x0 + dx, y0 + dy
        valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = images[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += np.where(valid, weight, 0.0).astype(np.float32) * vals
    return out


def tta_views(images: np.ndarray, views: list[View]) -> np.ndarray:
    """(B, 1, S, S) float → (V·B, 1, S, S), view-major."""
    x = np.asarray(images, dtype=np.float32)
    out = []
    for flip, angle, zoom in views:
        v = x[..., ::-1] if flip else x
        if angle or zoom != 1.0:
            b, c, h, w = v.shape
            flat = np.ascontiguousarray(v).reshape(b * c, h, w)
            if angle:
                flat = _warp(flat, _affine(angle, 1.0, w))
            if zoom != 1.0:
                flat = _warp(flat, _affine(0.0, zoom, w))
            v = flat.reshape(b, c, h, w)
        out.append(np.ascontiguousarray(v))
    return np.concatenate(out, 0)


def _resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR (half-pixel centres, edges replicated) for a small map → (size, size)."""
    h, w = img.shape

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        lo = np.floor(pos).astype(np.int64)
        frac = (pos - lo).astype(np.float32)
        return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), frac

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def cam_to_heatmap(cam: np.ndarray, size: int) -> np.ndarray:
    """Low-resolution weighted activations → the Grad-CAM map (float (S, S) in [0, 1]) as pytorch-grad-cam
    draws it: ReLU, min-max scaling, bilinear resize, and scaling again."""
    img = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    img = img - img.min()
    img = img / (1e-7 + img.max())
    img = np.maximum(_resize_bilinear(img, size), 0)
    img = img - img.min()
    return (img / (1e-7 + img.max())).astype(np.float32)
