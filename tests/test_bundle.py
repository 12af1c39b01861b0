"""Bundling: a checkpoint becomes one small file carrying only the model spec and measured facts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_train_config
from safetensors import safe_open

from boneage.bundle import convert_bundle, make_bundle, save_bundle
from boneage.inference import Predictor


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["boneage"])


def test_bundle_carries_the_spec_and_nothing_about_training(tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle)
    assert set(meta["spec"]) >= {"preprocess", "backbone", "head", "target_mean", "target_std", "task"}
    assert not {"config", "data", "train", "trainer", "augment"} & set(meta)


def test_loading_a_bundle_never_reads_the_run_config(tiny_bundle: Path) -> None:
    """Renaming or removing any training option cannot break loading a model: the loader does not even
    import the run-config module (checked in a fresh interpreter where importing it fails)."""
    code = (
        "import sys; sys.modules['boneage.config'] = None\n"
        "from boneage.inference import Predictor\n"
        f"p = Predictor.load({str(tiny_bundle)!r}, runtime='torch')\n"
        "import numpy as np\n"
        "x = p.predict_arrays(np.zeros((1, 64, 64), np.uint8), np.array([True]))[0]\n"
        "print(p.spec.backbone, float(x[0]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("test_efficientnet ")


def test_a_renamed_training_field_does_not_break_a_bundle(tiny_bundle: Path, monkeypatch) -> None:
    """Rename a field of the training section in the running process: the bundle still loads."""
    from pydantic import create_model

    import boneage.config as config

    renamed = create_model("TrainConfig", __base__=config.Section, learning_rate=(float, 1e-3))
    monkeypatch.setattr(config, "TrainConfig", renamed)
    assert Predictor.load(tiny_bundle).spec.backbone == "test_efficientnet"


def test_v01_bundle_loads_and_converts(tmp_path: Path) -> None:
    """A v0.1 bundle (whole training config in its metadata, head layers named by index) predicts the same
    as its converted v0.2 file, which no longer carries the training config."""
    from conftest import make_tiny_predictor
    from safetensors.torch import save_file

    predictor = make_tiny_predictor(size=64, seed=3)
    state = {}
    for key, value in predictor.model.state_dict().items():
        key = key.replace("head.hidden.0.", "head.0.").replace("head.out.", "head.2.")
        state[key] = (value.half() if value.is_floating_point() else value).contiguous()
    old_config = {  # the v0.1 layout: every section, data paths included
        "data": {"images": "/somewhere/images", "labels": "/somewhere/labels.csv", "val_fraction": 0.2},
        "preprocess": {
            "size": 64,
            "crop": True,
            "contrast": "percentile",
            "low_percentile": 0.5,
            "high_percentile": 99.5,
        },
        "model": {
            "preset": "",
            "task": "regression",
            "backbone": "test_efficientnet",
            "pretrained": "none",
            "sex_units": 8,
            "head": [16],
            "dropout": 0.0,
            "in_chans": 1,
        },
        "train": {"epochs": 30, "optimizer": "adam", "an_option_since_renamed": 1},
    }
    old = tmp_path / "v01.safetensors"
    save_file(state, str(old), metadata={"boneage": json.dumps({"version": "0.1.0", "config": old_config})})
    legacy = Predictor.load(old, tta=False)
    assert legacy.spec.preprocess.geometry == "letterbox" and legacy.spec.head == [16]
    new = convert_bundle(old, tmp_path / "v02.safetensors")
    meta = _meta(new)
    assert "config" not in meta and meta["spec"]["backbone"] == "test_efficientnet"
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    male = np.array([True, False, True, False])
    a = legacy.predict_arrays(images, male)[0]
    b = Predictor.load(new, tta=False).predict_arrays(images, male)[0]
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_convert_cli(tmp_path: Path, tiny_bundle: Path) -> None:
    from typer.testing import CliRunner

    from boneage.cli import app

    result = CliRunner().invoke(
        app, ["bundle", "--convert", str(tiny_bundle), "--out", str(tmp_path / "c.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "spec" in _meta(tmp_path / "c.safetensors")
    result = CliRunner().invoke(app, ["bundle", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "--checkpoint" in result.output


@pytest.mark.integration
def test_make_bundle_measures_the_holdout_in_both_geometries(
    shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    """With data.holdout_labels the held-out ids never train, are scored each epoch, and the bundle states
    their MAE in the training geometry and through the predict path on their own files."""
    from boneage.training import train

    labels = pd.read_csv(shared_sample / "labels.csv", dtype={"id": str})
    held = labels.iloc[:8]
    holdout_csv = tmp_path / "holdout.csv"
    held.to_csv(holdout_csv, index=False)
    cfg = make_tiny_train_config(
        shared_sample, tiny_cache_dir, data={"limit": 48, "holdout_labels": str(holdout_csv)}
    )
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    assert summary["holdout_images"] == 8 and summary["train_images"] + summary["val_images"] == 40
    rows = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(rows["holdout_mae"]).all()  # scored every epoch, a record only
    path, facts = make_bundle(
        run / "best.ckpt", tmp_path / "m.safetensors", native_images=shared_sample / "images"
    )
    preds = facts.pop("_predictions")
    meta = _meta(path)
    assert meta["validation_images"] == 8 and meta["native_images"] == 8
    assert set(preds["native"]["id"]) == set(held["id"])
    for key in (
        "val_mae_months",
        "native_mae_months",
        "geometry_mean_abs_difference_months",
        "tta_spread_p99_months",
        "training_range_months",
        "native_mae_by_sex",
        "ood_calibration_images",
        "orientation_val_turned_detected_at_least",
        "ood_texture_threshold",
        "ood_flagged_native_texture",
    ):
        assert key in meta, key
    loaded = Predictor.load(path).ood
    assert loaded.orientation is not None  # the orientation probe ships in the bundle
    assert loaded.texture is not None  # and the texture density; letterbox: no remaking of the input
    assert loaded.copy_recipe == (0, 0)
    assert meta["ood_flagged_native"][0] >= meta["ood_flagged_native_texture"][0]
    lo, hi = meta["training_range_months"]
    assert 0 < lo < hi <= 240
    predictor = Predictor.load(path)
    assert predictor.training_range == (lo, hi)
    assert predictor.meta["tta_spread_p99_months"] == meta["tta_spread_p99_months"]
    # the same images, the same model: the letterbox geometry reads native files the way training did
    assert meta["geometry_mean_abs_difference_months"] < 0.5


def test_save_bundle_is_atomic(tmp_path: Path, tiny_bundle: Path) -> None:
    predictor = Predictor.load(tiny_bundle)
    out = save_bundle(predictor, tmp_path / "a" / "m.safetensors", {"note": "x"})
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    assert _meta(out)["note"] == "x"
