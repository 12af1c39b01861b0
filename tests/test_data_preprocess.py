"""Preprocess: hand crop, contrast, letterbox → a deterministic square uint8 image, keyed by its settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boneage.data.io import read_radiograph
from boneage.data.preprocess import Preprocess, align_hand, hand_box, hand_tilt, letterbox


def synthetic_film(
    h: int = 600, w: int = 500, seed: int = 0, borders: bool = True
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A dark noisy film with a bright elliptical 'hand', a collimator band along two edges and a small lead
    marker (``borders``); returns the image and the hand's (top, bottom, left, right)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.05, 0.01, (h, w)).clip(0, 1).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = 330, 270, 200, 120
    hand = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img[hand] = 0.6 + 0.1 * rng.random(int(hand.sum()))
    if not borders:
        return img, (cy - ry, cy + ry, cx - rx, cx + rx)
    img[:, :10] = 0.95  # collimator edge: a thin bright band along the left ...
    img[-8:, :] = 0.95  # ... and the bottom of the film
    img[30:50, 420:440] = 1.0  # lead marker
    return img, (cy - ry, cy + ry, cx - rx, cx + rx)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (64, 64), (1000, 37)])
@pytest.mark.parametrize("size", [32, 64])
def test_output_is_square_uint8(shape: tuple[int, int], size: int) -> None:
    rng = np.random.default_rng(1)
    out = Preprocess(size=size)(rng.random(shape, dtype=np.float32))
    assert out.shape == (size, size)
    assert out.dtype == np.uint8


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    tall = np.ones((200, 100), dtype=np.float32)
    out = letterbox(tall, 64)
    assert out.shape == (64, 64)
    bright_cols = np.nonzero(out.max(axis=0) > 0.5)[0]
    assert len(bright_cols) == 32  # 100/200 of 64
    assert bright_cols[0] == 16 and bright_cols[-1] == 47  # centred
    assert np.all(out[:, :16] == 0) and np.all(out[:, 48:] == 0)  # padding columns are zero
    assert np.all(out[:, 16:48] > 0.99)  # every row of the image is used: the long side fills the square
    wide = letterbox(np.ones((50, 200), dtype=np.float32), 64)
    assert np.all(wide[:24] == 0) and np.all(wide[40:] == 0) and np.all(wide[24:40] > 0.99)


def test_tall_bright_rectangle_on_black_keeps_its_proportions() -> None:
    canvas = np.zeros((400, 400), dtype=np.float32)
    canvas[50:350, 150:250] = 1.0  # 300 tall, 100 wide
    out = Preprocess(size=64, crop=True, contrast="none")(canvas)
    rows = np.nonzero(out.max(axis=1) > 127)[0]
    cols = np.nonzero(out.max(axis=0) > 127)[0]
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert height / width == pytest.approx(3.0, rel=0.15)
    assert height >= 50  # the crop removed most of the black: the rectangle nearly fills the long side
    assert np.all(out[:, : cols[0]] == 0) and np.all(out[:, cols[-1] + 1 :] == 0)  # black padding columns
    assert cols[0] > 10 and 64 - cols[-1] > 10


def test_hand_box_finds_the_hand_and_drops_borders() -> None:
    img, (h_top, h_bottom, h_left, h_right) = synthetic_film()
    top, bottom, left, right = hand_box(img)
    h, w = img.shape
    assert top <= h_top and bottom >= h_bottom and left <= h_left and right >= h_right  # the hand is inside
    assert left > 10 and bottom < h - 8  # the collimator band is outside
    assert top > 50 or right < 420  # the lead marker is outside
    assert (bottom - top) * (right - left) < 0.5 * h * w  # most empty film is gone
    # tight: the margin around the hand is a few percent, not a third of the image
    assert (bottom - top) < 1.2 * (h_bottom - h_top) and (right - left) < 1.3 * (h_right - h_left)


def test_hand_box_keeps_a_flat_image_whole() -> None:
    flat = np.full((120, 90), 0.3, dtype=np.float32)
    assert hand_box(flat) == (0, 120, 0, 90)


def test_crop_makes_borders_and_markers_irrelevant() -> None:
    film, _ = synthetic_film()
    clean, _ = synthetic_film(borders=False)  # the same film without collimator band and marker
    assert hand_box(film) == hand_box(clean)
    assert np.array_equal(Preprocess(size=64)(film), Preprocess(size=64)(clean))
    # without the crop the band and the marker change the picture a lot
    diff = np.abs(
        Preprocess(size=64, crop=False)(film).astype(int) - Preprocess(size=64, crop=False)(clean).astype(int)
    )
    assert diff.max() > 200


def test_deterministic_and_input_untouched() -> None:
    img, _ = synthetic_film(seed=3)
    before = img.copy()
    prep = Preprocess(size=64)
    a, b = prep(img), prep(img.copy())
    assert np.array_equal(a, b)
    assert np.array_equal(img, before)
    assert np.array_equal(Preprocess(size=64)(img), a)  # a new object with the same settings agrees


def test_contrast_modes() -> None:
    dim = np.tile(np.linspace(0.2, 0.5, 80, dtype=np.float32), (80, 1))  # a square ramp over [0.2, 0.5]
    dim[:40] = dim[:40, ::-1]  # and reversed in the top half, so the image has structure both ways
    pct = Preprocess(size=32, crop=False, contrast="percentile")(dim)
    none = Preprocess(size=32, crop=False, contrast="none")(dim)
    clahe = Preprocess(size=32, crop=False, contrast="clahe")(dim)
    for out in (pct, none, clahe):
        assert out.shape == (32, 32) and out.dtype == np.uint8
    # percentile stretches [0.2, 0.5] to the full range; none keeps the values (×255)
    assert pct.max() >= 250 and pct.min() <= 5
    assert 0.2 * 255 - 2 <= none.min() and none.max() <= 0.5 * 255 + 2
    assert not np.array_equal(clahe, pct) and not np.array_equal(clahe, none)
    assert clahe.std() > 10


def test_percentile_clips_outliers() -> None:
    img = np.full((100, 100), 0.4, dtype=np.float32)
    img[:, :50] = 0.6
    img[0, 0] = 1.0  # a single hot pixel must not decide the white point
    out = Preprocess(size=32, crop=False, contrast="percentile", low_percentile=1, high_percentile=99)(img)
    assert out[:, :14].min() == 255  # the 0.6 half is white, not grey
    assert out[:, -14:].max() == 0


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="contrast"):
        Preprocess(contrast="histeq")
    with pytest.raises(ValueError, match="at least 32"):
        Preprocess(size=16)
    with pytest.raises(ValueError, match="align"):
        Preprocess(align="axes")
    with pytest.raises(ValueError, match="fit"):
        Preprocess(fit="fill")


def test_key_changes_with_every_setting() -> None:
    base = Preprocess()
    assert base.key() == Preprocess().key()
    assert len(base.key()) == 12
    variants = [
        Preprocess(size=256),
        Preprocess(geometry="squash"),
        Preprocess(geometry="squash", squash_size=256),
        Preprocess(crop=False),
        Preprocess(contrast="clahe"),
        Preprocess(low_percentile=1.0),
        Preprocess(high_percentile=99.0),
        Preprocess(align="axis"),
        Preprocess(fit="stretch"),
        Preprocess(background="remove"),
    ]
    keys = {v.key() for v in variants}
    assert base.key() not in keys
    assert len(keys) == len(variants)
    assert base.to_dict() == {
        "size": 512,
        "crop": True,
        "contrast": "percentile",
        "low_percentile": 0.5,
        "high_percentile": 99.5,
        "geometry": "letterbox",
        "squash_size": 299,
        "align": "none",
        "fit": "pad",
        "background": "keep",
    }
    # caches built before the geometry and align fields existed keep their key (letterbox was the only one)
    assert base.key() == "fc3441471458"


@pytest.mark.integration
def test_real_radiographs(shared_sample: Path) -> None:
    paths = sorted((shared_sample / "images").glob("*.png"))[:3]
    assert len(paths) == 3
    prep = Preprocess(size=64)
    for path in paths:
        pixels = read_radiograph(path).pixels
        top, bottom, left, right = hand_box(pixels)
        h, w = pixels.shape
        assert 0 <= top < bottom <= h and 0 <= left < right <= w
        assert (bottom - top) * (right - left) >= 0.2 * h * w, path.name  # the crop keeps the hand
        out = prep(pixels)
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert out.std() > 20, path.name  # not blank
        assert 10 < out.mean() < 245, path.name
        assert np.array_equal(out, prep(pixels))


def test_squash_resizes_the_whole_frame_first() -> None:
    """geometry=squash: a tall frame becomes a square before cropping, as the 299 px training copies were
    made; a frame already that size is untouched."""
    from boneage.data.preprocess import squash

    tall = np.zeros((600, 300), dtype=np.float32)
    tall[100:500, 50:250] = 1.0  # a bright block, 2:1 tall
    sq = squash(tall, 299)
    assert sq.shape == (299, 299)
    rows, cols = np.nonzero(sq > 0.5)
    # the block now spans two thirds of the width and of the height: its 2:1 aspect became 1:1
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 3
    already = np.random.default_rng(0).random((299, 299)).astype(np.float32)
    assert np.array_equal(squash(already, 299), already)
    out = Preprocess(size=64, geometry="squash", crop=False)(tall)
    assert out.shape == (64, 64)
    # the block is 2/3 of the square's width when squashed, 1/3 when letterboxed (proportions kept)
    boxed = Preprocess(size=64, geometry="letterbox", crop=False)(tall)
    assert abs(int((out[32] > 127).sum()) - 43) <= 2
    assert abs(int((boxed[32] > 127).sum()) - 21) <= 2


@pytest.mark.integration
def test_squash_geometry_matches_the_299_training_copies(shared_sample: Path, shared_299: Path) -> None:
    """A clinic's native-aspect PNG squashed to 299 px matches the squashed training copy of the same id,
    and the whole preprocessing of both gives nearly the same model input."""
    from boneage.data.io import read_radiograph
    from boneage.data.preprocess import squash

    prep = Preprocess(size=224, geometry="squash", squash_size=299)
    ids = sorted(p.stem for p in (shared_sample / "images").glob("*.png"))[:12]
    correlations, diffs = [], []
    for image_id in ids:
        native = read_radiograph(shared_sample / "images" / f"{image_id}.png").pixels
        copy = read_radiograph(shared_299 / "images" / f"{image_id}.jpg").pixels
        assert native.shape != (299, 299) and copy.shape == (299, 299)
        correlations.append(np.corrcoef(squash(native, 299).ravel(), copy.ravel())[0, 1])
        a, b = prep(native).astype(float), prep(copy).astype(float)
        diffs.append(np.mean(np.abs(a - b)))
    assert min(correlations) > 0.98, correlations
    assert np.mean(diffs) < 6.0, diffs  # grey levels out of 255, after crop and contrast


def test_cache_key_follows_the_preprocessing_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A behaviour change in the preprocessing code must not reuse caches of the old pixels; version 1 keeps
    the keys of caches made before the version existed."""
    import boneage.data.preprocess as pre

    prep = pre.Preprocess(size=64)
    before = prep.key()
    assert pre.PREPROCESS_VERSION == 1 and before == pre.Preprocess(size=64).key()
    monkeypatch.setattr(pre, "PREPROCESS_VERSION", 2)
    assert prep.key() != before


@pytest.mark.integration
def test_training_copy_remakes_a_native_file_like_its_299_jpeg(shared_sample: Path, shared_299: Path) -> None:
    """The OOD texture check remakes an input the way the training copies were made: squashed to 299 px
    and JPEG-compressed. From a clinic's PNG that lands within a few grey levels of the shared copy of the
    same id."""
    from boneage.data.io import read_radiograph
    from boneage.data.preprocess import squash, training_copy

    ids = sorted(p.stem for p in (shared_sample / "images").glob("*.png"))[:6]
    for image_id in ids:
        native = read_radiograph(shared_sample / "images" / f"{image_id}.png").pixels
        copy = np.asarray(read_radiograph(shared_299 / "images" / f"{image_id}.jpg").pixels) * 255
        remade = training_copy(native)
        assert remade.shape == (299, 299) and remade.dtype == np.uint8
        assert np.mean(np.abs(remade - copy)) < 3.0  # grey levels; the copies were made from other PNGs
        # 0-255 input gives the same copy as [0, 1] input
        assert np.array_equal(training_copy(native * 255), remade)
        # it is the squash, compressed: close to it, but not it
        plain = squash(np.asarray(native, np.float32) * 255, 299)
        assert 0.0 < np.mean(np.abs(remade - plain)) < 3.0


def _bar(angle: float) -> np.ndarray:
    """A bright upright bar (a stand-in for a hand's long axis) turned counter-clockwise by ``angle``."""
    from scipy import ndimage

    img = np.zeros((200, 200), dtype=np.float32)
    img[40:160, 88:112] = 1.0
    return ndimage.rotate(img, angle, reshape=False, order=1)


@pytest.mark.parametrize("angle", [-40.0, -25.0, -8.0, 12.0, 30.0, 44.0])
def test_align_turns_a_tilted_hand_upright(angle: float) -> None:
    """Tilts up to 45 degrees either way are measured (clockwise positive) and undone."""
    assert hand_tilt(_bar(angle)) == pytest.approx(-angle, abs=1.5)
    assert abs(hand_tilt(align_hand(_bar(angle)), max_tilt=90)) < 1.5


@pytest.mark.parametrize("angle", [60.0, 90.0, 180.0])
def test_align_leaves_a_turned_hand_for_the_orientation_check(angle: float) -> None:
    """A hand turned by more than 45 degrees is not "corrected": the OOD orientation check must still see it,
    and an upside-down hand (180) has an upright axis."""
    assert hand_tilt(_bar(angle)) == 0.0
    np.testing.assert_array_equal(align_hand(_bar(angle)), _bar(angle))


def test_align_is_a_no_op_without_a_clear_axis() -> None:
    disc = np.zeros((100, 100), dtype=np.float32)
    yy, xx = np.mgrid[:100, :100]
    disc[(yy - 50) ** 2 + (xx - 50) ** 2 < 30**2] = 1.0
    assert hand_tilt(disc) == 0.0
    assert hand_tilt(np.zeros((64, 64), dtype=np.float32)) == 0.0


@pytest.mark.integration
def test_align_makes_real_hands_upright(shared_sample: Path) -> None:
    """On clinic radiographs (squashed as the model sees them) the aligned image's hand axis is upright,
    and the pipeline with ``align: axis`` still gives a square uint8 image."""
    from boneage.data.preprocess import squash

    paths = sorted((shared_sample / "images").glob("*.png"))[:8]
    tilts = []
    for path in paths:
        frame = squash(read_radiograph(path).pixels, 299)
        tilts.append(hand_tilt(frame))
        assert abs(hand_tilt(align_hand(frame), max_tilt=90)) < 3.0
        out = Preprocess(size=96, geometry="squash", align="axis")(read_radiograph(path).pixels)
        assert out.shape == (96, 96) and out.dtype == np.uint8
    assert max(abs(t) for t in tilts) > 3.0  # the sample has tilted hands, so this checked something


def test_stretch_fills_the_square_with_the_hand_region() -> None:
    # a tall bright "hand" on a dark frame: pad keeps its proportions (black bars left and right), stretch
    # resizes the crop box to the whole square, so only the crop's own margin is background
    img = np.full((200, 200), 0.05, dtype=np.float32)
    img[20:180, 70:130] = 0.9
    img[40:160, 90:110] = 0.6  # some structure inside, so the contrast stretch has two levels
    pad = Preprocess(size=64, fit="pad")(img)
    stretch = Preprocess(size=64, fit="stretch")(img)
    assert pad.shape == stretch.shape == (64, 64)
    assert pad[:, :8].max() == 0 and pad[:, -8:].max() == 0
    hand_cols = lambda out: int((out.max(axis=0) > 0).sum())  # noqa: E731
    assert hand_cols(pad) < 32 and hand_cols(stretch) > 48  # 60/76 of the box's width is hand
    # the same settings give the same pixels in training and inference; pad stays the default
    np.testing.assert_array_equal(stretch, Preprocess(size=64, fit="stretch")(img))
    assert Preprocess().fit == "pad"


def _gloved_hand() -> np.ndarray:
    """A palm of soft tissue with five thin fingers (bones brighter inside them), a wrist to the bottom edge,
    and a bright lead marker apart from it: the case where a mask between soft tissue and bone would cut the
    fingertips off."""
    rng = np.random.default_rng(3)
    img = rng.normal(0.05, 0.01, (300, 260)).clip(0, 1).astype(np.float32)
    img[150:300, 70:190] = 0.35  # palm and wrist: soft tissue
    for left in (72, 96, 120, 144, 168):
        img[40:150, left : left + 14] = 0.35  # a finger of soft tissue ...
        img[50:260, left + 5 : left + 9] = 0.8  # ... with its bone
    img[20:45, 215:245] = 1.0  # lead marker
    return img


def test_background_removal_blanks_markers_and_keeps_the_fingertips() -> None:
    from boneage.data.preprocess import hand_silhouette

    img = _gloved_hand()
    mask = hand_silhouette(img)
    assert mask is not None and mask.shape == img.shape
    assert mask[45:150, 72:182].any(axis=0)[[2, 26, 50, 74, 98]].all()  # every finger's middle
    assert mask[42, 78] and mask[42, 174]  # the fingertips' soft tissue, above the bones' ends
    assert not mask[20:45, 215:245].any()  # the marker is another object
    assert not mask[5:30, 5:60].any()  # nor the empty film
    keep = Preprocess(size=64, crop=False)(img)
    remove = Preprocess(size=64, crop=False, background="remove")(img)
    marker = (slice(5, 9), slice(51, 55))  # where the marker lands on the letterboxed 64 px square
    assert keep[marker].min() > 200 and remove[marker].max() == 0
    hand = (slice(40, 60), slice(20, 44))
    np.testing.assert_array_equal(keep[hand], remove[hand])  # inside the silhouette nothing changes
    assert Preprocess().background == "keep"


def test_background_removal_keeps_every_pixel_when_no_hand_is_found() -> None:
    from boneage.data.preprocess import hand_silhouette

    flat = np.full((120, 100), 0.4, dtype=np.float32)
    assert hand_silhouette(flat) is None
    np.testing.assert_array_equal(Preprocess(size=48, background="remove")(flat), Preprocess(size=48)(flat))
    with pytest.raises(ValueError, match="background"):
        Preprocess(background="erase")


@pytest.mark.integration
def test_background_removal_on_real_radiographs(shared_299: Path) -> None:
    """On the 299 px training copies the silhouette is most of the crop (soft tissue kept) yet not all of
    it, the blanked pixels are dark or marker-bright (not hand), and the hand's bright centre survives."""
    from boneage.data.preprocess import hand_box, hand_silhouette

    paths = sorted((shared_299 / "images").glob("*.jpg"))[:12]
    shares, blanked_any = [], 0
    for path in paths:
        frame = read_radiograph(path).pixels
        top, bottom, left, right = hand_box(frame)
        crop = np.asarray(frame[top:bottom, left:right], dtype=np.float32)
        mask = hand_silhouette(crop)
        assert mask is not None, path.name
        shares.append(float(mask.mean()))
        h, w = crop.shape
        assert mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean() > 0.7, path.name  # the hand's middle
        outside = crop[~mask]
        if outside.size:
            blanked_any += 1
            assert np.median(outside) < np.median(crop[mask]), path.name  # background is darker than hand
        out = Preprocess(size=128, geometry="squash", background="remove")(frame)
        assert out.shape == (128, 128) and out.dtype == np.uint8
    assert 0.35 < float(np.median(shares)) < 0.95
    assert blanked_any >= 10
