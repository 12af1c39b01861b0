"""The bundled model: present, small, self-describing, and as accurate as its model card says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from boneage.data import split_indices
from boneage.evaluation import evaluate
from boneage.inference import Predictor, bundled_model_path
from boneage.labels import read_labels

pytestmark = pytest.mark.integration


def test_bundled_model_is_shipped_small_and_fp16() -> None:
    path = bundled_model_path()
    assert path.is_file(), "the package must ship src/boneage/assets/model.safetensors"
    assert path.stat().st_size < 25 * 1024 * 1024
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["boneage"])
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys() if "weight" in k}
    assert dtypes == {"torch.float16"}
    for key in ("version", "backbone", "input_size", "val_mae_months", "trained_on", "config", "licence"):
        assert key in meta
    assert "non-commercial" in meta["licence"]


def test_bundled_model_reproduces_its_validation_mae(shared_sample, tmp_path) -> None:
    """Recompute the model card's held-out MAE on the same stratified split (no TTA, to keep it quick)."""
    predictor = Predictor.load(tta=False)
    meta = predictor.meta
    cfg = predictor.cfg
    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    _, val_idx = split_indices(labels, cfg.data.val_fraction, cfg.data.seed, cfg.data.folds, cfg.data.fold)
    val = labels.iloc[val_idx].reset_index(drop=True)
    report = evaluate(predictor, val, cache_dir=tmp_path, progress=False)
    assert report.metrics["n"] == meta["validation_images"]
    assert report.metrics["mae_months"] == pytest.approx(meta["val_mae_no_tta_months"], abs=0.3)
    # far better than predicting the mean age, which is what an untrained model would do
    assert report.metrics["mae_months"] < 0.5 * report.metrics["mae_baseline_mean_months"]


def test_bundled_model_predicts_a_real_radiograph(shared_sample) -> None:
    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    row = labels.iloc[0]
    pred = Predictor.load().predict(row["path"], "male" if row["male"] else "female")
    assert np.isfinite(pred.bone_age_months) and 0 < pred.bone_age_months < 260
    assert len(pred.views_months) == 6 and pred.uncertainty_months >= 0
