"""Fitting the OOD densities and the orientation probe from a model's features, with what they were
measured to do on images they were not fitted on.

The features come from a callable (the predictor's plain pass), so this module needs numpy (and sklearn for
the probe) but no network. Three disjoint sets of training ids, never the held-out ones: ``fit`` images
fit the densities; their thresholds are the ``OOD_QUANTILE`` of the scores of ``calibration`` images plus the
validation split, times ``OOD_MARGIN`` (v0.2 calibrated on the 569 validation images alone, whose 99.5%
quantile is about their third-largest score: too noisy for a 1% false-refusal target). The probe learns
from the first ``ORIENTATION_IMAGES`` of the fit set shown in all five orientations; the validation split,
upright and turned, measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from boneage.ood.density import (
    TEXTURE_COMPONENTS,
    TEXTURE_STAGE,
    FeatureDensity,
    OrientationProbe,
    rotation_ratios,
    turned,
)

OOD_QUANTILE = 0.995
OOD_MARGIN = 1.25
ORIENTATION_IMAGES = 1000

Features = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (uint8 images (N, S, S), male (N,)) → (N, D)
Texture = Callable[[np.ndarray], "np.ndarray | None"]  # uint8 images → (N, T) early-stage statistics


def fit_densities(
    features: Features,
    texture: Texture,
    fit: tuple[np.ndarray, np.ndarray],
    calibration: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    copy_recipe: tuple[int, int] = (0, 0),
    texture_stage: int = TEXTURE_STAGE,
) -> tuple[FeatureDensity, dict[str, Any]]:
    """(density with its orientation probe and texture density, what each was measured to do).
    Each set is (preprocessed uint8 images, male). ``copy_recipe``: (size, JPEG quality) the training
    images were made with, which the texture check remakes an input with first ((0, 0): none).
    ``texture_stage``: the stage ``texture`` taps, recorded so that a loaded file taps the same one."""
    fit_images, fit_male = fit
    cal_images, cal_male = calibration
    val_images, val_male = validation
    feats = features(fit_images, fit_male)
    density = FeatureDensity.fit(feats)
    val_feats = features(val_images, val_male)
    cal_feats = features(cal_images, cal_male) if len(cal_images) else val_feats[:0]
    density.calibrate(np.concatenate([cal_feats, val_feats]), OOD_QUANTILE, OOD_MARGIN)
    n_orient = min(ORIENTATION_IMAGES, len(fit_images))
    orient_feats = features(turned(fit_images[:n_orient]), np.tile(fit_male[:n_orient], 4))
    density.orientation = OrientationProbe.fit(feats[:n_orient], orient_feats)
    turned_feats = features(turned(val_images), np.tile(val_male, 4))
    val_scores, cal_scores = density.score(val_feats), density.score(cal_feats)
    ratios = rotation_ratios(val_scores, density.score(turned_feats))
    density.rotation_ratio = float(np.quantile(ratios, OOD_QUANTILE) * OOD_MARGIN)  # for older runtimes
    probe = density.orientation
    # a turned image's other orientations include the upright one, so score(turned) / score(upright) is a
    # lower bound of its ratio: above the confirm ratio, the warning is certain to be confirmed
    turned_floor = density.score(turned_feats) / np.maximum(np.tile(val_scores, 4), 1e-9)
    report: dict[str, Any] = {
        "threshold": round(density.threshold, 3),
        "rotation_ratio": round(density.rotation_ratio, 3),
        "train_images": len(fit_images),
        "calibration_images": len(cal_images) + len(val_images),
        "calibration": f"{OOD_MARGIN} x the {OOD_QUANTILE:.1%} quantile of the scores of {len(cal_images)} "
        f"training images outside the fit and the {len(val_images)}-image validation split",
        "orientation_train_images": n_orient,
        "flagged": {
            "val_split": [int(density.refuses(val_scores).sum()), len(val_scores)],
            "calibration_train": [int(density.refuses(cal_scores).sum()), len(cal_scores)],
            "orientation_val_upright": [int(density.looks_turned(val_feats, ratios).sum()), len(val_feats)],
            "orientation_val_upright_probe_alone": [
                int((probe.upright_probability(val_feats) < probe.limit).sum()),
                len(val_feats),
            ],
            "orientation_val_turned_detected_at_least": [
                int(density.looks_turned(turned_feats, turned_floor).sum()),
                len(turned_feats),
            ],
        },
    }
    _fit_texture(density, texture, fit_images, cal_images, val_images, copy_recipe, texture_stage, report)
    return density, report


def _fit_texture(
    density: FeatureDensity,
    texture: Texture,
    fit_images: np.ndarray,
    cal_images: np.ndarray,
    val_images: np.ndarray,
    copy_recipe: tuple[int, int],
    texture_stage: int,
    report: dict[str, Any],
) -> None:
    """The texture density: early-stage statistics of the same images, calibrated like the pooled one."""
    fit_stats = texture(fit_images)
    if fit_stats is None or not fit_stats.size:
        report["texture_note"] = "not fitted: this backbone has no EfficientNet-layout stage to tap"
        return
    density.texture = tex = FeatureDensity.fit(fit_stats, components=TEXTURE_COMPONENTS)
    cal_stats = texture(cal_images) if len(cal_images) else fit_stats[:0]
    val_stats = texture(val_images)
    assert cal_stats is not None and val_stats is not None
    tex.calibrate(np.concatenate([cal_stats, val_stats]), OOD_QUANTILE, OOD_MARGIN)
    density.copy_recipe = copy_recipe
    report.update(
        texture_stage=texture_stage,
        texture_components=int(len(tex.variances)),
        texture_threshold=round(tex.threshold, 3),
        texture_copy_recipe=list(copy_recipe),
    )
    report["flagged"]["texture_val_split"] = [int(tex.refuses(tex.score(val_stats)).sum()), len(val_stats)]
    report["flagged"]["texture_calibration_train"] = [
        int(tex.refuses(tex.score(cal_stats)).sum()),
        len(cal_stats),
    ]
