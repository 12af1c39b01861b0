"""Augment: batched training augmentations keep shape and range, draw parameters per sample, and vanish at
zero strength or when disabled."""

from __future__ import annotations

import pytest
import torch

from boneage.config import AugmentConfig
from boneage.data.augment import Augment

ZERO = {
    "flip": 0.0,
    "shift": 0.0,
    "rotate": 0.0,
    "zoom": 0.0,
    "gamma": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
}


def _batch(n: int = 4, size: int = 32) -> torch.Tensor:
    """An asymmetric picture (a bright block in the upper left, a dim bar below) so flips and turns show."""
    base = torch.zeros(size, size)
    base[2:12, 3:10] = 1.0
    base[size - 8 : size - 4, 2 : size // 2] = 0.4
    return base.expand(n, 1, size, size).clone()


def test_default_keeps_shape_dtype_and_range() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 1, 32, 32)
    out = Augment(AugmentConfig())(images)
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


def test_strong_settings_stay_in_range() -> None:
    torch.manual_seed(1)
    aug = Augment(AugmentConfig(), gamma=0.9, brightness=0.9, contrast=0.9, zoom=0.5, rotate=45, shift=0.3)
    out = aug(torch.rand(8, 1, 48, 48))
    assert out.shape == (8, 1, 48, 48)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_zero_strength_is_identity() -> None:
    images = _batch()
    aug = Augment(AugmentConfig(enabled=True, **ZERO))
    assert len(aug.ops) == 0
    assert torch.equal(aug(images), images)


def test_disabled_is_identity_even_with_strength() -> None:
    images = _batch()
    cfg = AugmentConfig(enabled=False, flip=1.0, rotate=30.0, gamma=0.5)
    out = Augment(cfg)(images)
    assert torch.equal(out, images)
    assert torch.equal(Augment(AugmentConfig(), enabled=False)(images), images)


def test_certain_flip_mirrors_exactly() -> None:
    images = _batch()
    out = Augment(AugmentConfig(**{**ZERO, "flip": 1.0}))(images)
    assert torch.allclose(out, images.flip(-1))


def test_parameters_are_drawn_per_sample() -> None:
    torch.manual_seed(0)
    images = _batch(n=4)  # four copies of the same picture
    out = Augment(AugmentConfig(**{**ZERO, "flip": 1.0, "rotate": 20.0}))(images)
    for i in range(4):
        assert not torch.allclose(out[i], images[i], atol=1e-3)  # every sample is changed
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 0.05, (i, j)  # ... and differently
    # the flip happened: the bright block moved from the left to the right half
    assert out[:, :, :, 16:].mean() > out[:, :, :, :16].mean()


def test_photometric_changes_per_sample() -> None:
    torch.manual_seed(0)
    images = _batch(n=3)
    out = Augment(AugmentConfig(**{**ZERO, "gamma": 0.5, "brightness": 0.3}))(images)
    means = [float(out[i].mean()) for i in range(3)]
    assert len({round(m, 4) for m in means}) == 3


@pytest.mark.parametrize("key", ["flip", "rotate", "shift", "zoom", "gamma", "brightness", "contrast"])
def test_each_setting_adds_its_op(key: str) -> None:
    value = 0.5 if key != "rotate" else 10.0
    assert len(Augment(AugmentConfig(**{**ZERO, key: value})).ops) == 1
