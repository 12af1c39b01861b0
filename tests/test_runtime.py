"""The torch-free engine (``boneage.runtime``): parity with the torch engine on real radiographs (bone age,
preprocessing, Grad-CAM), numpy TTA against kornia's, stale-graph handling, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from boneage.errors import BoneAgeInputError
from boneage.runtime import (
    TTA_VIEWS,
    OnnxPredictor,
    bundled_model_path,
    cam_to_heatmap,
    load_predictor,
    onnx_metadata,
    onnx_path_for,
    onnx_session,
    tta_views,
)

TRAINING_MODULES = ("torch", "timm", "kornia", "lightning", "pytorch_lightning", "torchvision")


def _real_images(sample: Path, n: int = 3) -> list[Path]:
    return sorted((sample / "images").glob("*.png"))[:n]


@pytest.fixture(scope="module")
def engines() -> tuple[OnnxPredictor, object]:
    """The bundled model on both engines (the torch one with its network in torch)."""
    from boneage.inference import Predictor

    return OnnxPredictor.load(threads=1), Predictor.load(runtime="torch")


@pytest.mark.integration
def test_bundled_model_parity_on_real_radiographs(shared_sample: Path, engines) -> None:
    """Same preprocessing output, same bone age (≤ 0.05 months), same Grad-CAM (correlation ≥ 0.99)."""
    onnx, torch_engine = engines
    for path, sex in zip(_real_images(shared_sample), ("male", "female", "male"), strict=True):
        a, b = onnx.predict(path, sex), torch_engine.predict(path, sex)
        assert np.array_equal(a.image, b.image)
        assert abs(a.bone_age_months - b.bone_age_months) <= 0.05
        assert np.abs(np.subtract(a.views_months, b.views_months)).max() <= 0.05
        assert abs(a.uncertainty_months - b.uncertainty_months) <= 0.05
        cam_a, cam_b = onnx.heatmap(a), torch_engine.heatmap(b)
        assert cam_a.shape == cam_b.shape == a.image.shape
        assert float(np.corrcoef(cam_a.ravel(), cam_b.ravel())[0, 1]) >= 0.99
        assert 0.0 <= cam_a.min() and cam_a.max() <= 1.0


@pytest.mark.integration
def test_tiny_bundle_parity_and_heatmap(shared_sample: Path, tiny_bundle: Path) -> None:
    """A bundle written by save_bundle ships its .onnx; a SiLU backbone's in-graph Grad-CAM matches too."""
    from boneage.inference import Predictor

    assert onnx_path_for(tiny_bundle).is_file()
    onnx, torch_engine = OnnxPredictor.load(tiny_bundle), Predictor.load(tiny_bundle, runtime="torch")
    for path in _real_images(shared_sample, 2):
        a, b = onnx.predict(path, "female"), torch_engine.predict(path, "female")
        assert abs(a.bone_age_months - b.bone_age_months) <= 0.05
        assert float(np.corrcoef(onnx.heatmap(a).ravel(), torch_engine.heatmap(b).ravel())[0, 1]) >= 0.99


def test_numpy_tta_matches_kornia() -> None:
    import torch

    from boneage.inference import tta_batch

    x = np.random.default_rng(0).random((2, 1, 64, 64)).astype(np.float32)
    ours = tta_views(x, TTA_VIEWS)
    theirs = tta_batch(torch.from_numpy(x), TTA_VIEWS).numpy()
    assert ours.shape == theirs.shape == (12, 1, 64, 64)
    assert np.abs(ours - theirs).max() < 1e-4


def test_cam_to_heatmap_matches_grad_cam_scaling() -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image

    cam = np.random.default_rng(1).normal(size=(7, 7)).astype(np.float32)
    expected = scale_cam_image(scale_cam_image(np.maximum(cam, 0)[None], (224, 224)))[0]
    assert np.abs(cam_to_heatmap(cam, 224) - expected).max() < 1e-5


def test_bundled_onnx_is_current_and_small() -> None:
    weights = bundled_model_path()
    graph = onnx_path_for(weights)
    meta = onnx_metadata(onnx_session(graph))
    from boneage.runtime import ONNX_EXPORT_VERSION, file_digest

    assert meta["boneage_weights_sha256"] == file_digest(weights)
    assert meta["boneage_export_version"] == ONNX_EXPORT_VERSION
    assert weights.stat().st_size + graph.stat().st_size <= 25 * 1024 * 1024


def test_stale_onnx_is_reexported_with_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    """A bundle whose .onnx belongs to other weights gets a fresh export (torch installed here)."""
    import shutil

    copy = tmp_path / "m.safetensors"
    shutil.copy(tiny_bundle, copy)
    onnx_path_for(copy).write_bytes(b"not a graph")
    predictor = OnnxPredictor.load(copy)
    assert predictor.has_cam


def test_missing_onnx_without_torch_is_one_line(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    copy = tmp_path / "m.safetensors"
    shutil.copy(tiny_bundle, copy)
    monkeypatch.setitem(sys.modules, "boneage.inference", None)  # import fails as without torch
    with pytest.raises(BoneAgeInputError, match=r"boneage\[train\]") as info:
        OnnxPredictor.load(copy)
    assert "\n" not in str(info.value) and "boneage export" in str(info.value)


def test_unknown_engine_is_a_user_error() -> None:
    with pytest.raises(BoneAgeInputError, match="engine"):
        load_predictor(engine="tensorrt")


def test_ood_scores_do_not_touch_shared_state(tiny_bundle: Path) -> None:
    """ood_scores must not swap the views a concurrent predict is reading."""
    predictor = OnnxPredictor.load(tiny_bundle)
    before = predictor.views
    predictor.ood_scores(np.zeros((1, 64, 64), np.uint8), np.array([True]))
    assert predictor.views is before


_NO_TORCH_SCRIPT = """
import json, sys
from boneage.cli import app
try:
    app({args!r})
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": sorted(m for m in {mods!r} if m in sys.modules)}}))
"""


def _run_cli(args: list[str]) -> dict:
    script = _NO_TORCH_SCRIPT.format(args=args, mods=TRAINING_MODULES)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_predict_never_imports_the_training_stack(shared_sample: Path) -> None:
    image = str(_real_images(shared_sample, 1)[0])
    out = _run_cli(["predict", image, "--sex", "male", "--age", "10y", "--json"])
    assert out == {"code": 0, "loaded": []}


def test_help_and_argument_errors_load_nothing() -> None:
    assert _run_cli(["predict", "--help"]) == {"code": 0, "loaded": []}
    bad = _run_cli(["predict", "missing.png", "--sex", "alien"])
    assert bad == {"code": 2, "loaded": []}
