"""``boneage.predict``: one policy, two engines. Parity of the ONNX and torch engines on real radiographs
(bone age, preprocessing, Grad-CAM), the one TTA view list against kornia, the one heatmap formula against
pytorch-grad-cam's hooks, stale-graph handling, the engine flag, and no torch on the clinical path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_predictor

from boneage.errors import BoneAgeInputError
from boneage.modelfile import bundled_model_path, file_digest, onnx_path_for
from boneage.modelfile.format import ONNX_EXPORT_VERSION
from boneage.predict import TTA_VIEWS, load_predictor
from boneage.predict.onnx_engine import onnx_session
from boneage.predict.views import cam_to_heatmap, tta_views

TRAINING_MODULES = ("torch", "timm", "kornia", "lightning", "pytorch_lightning", "torchvision")


def _real_images(sample: Path, n: int = 3) -> list[Path]:
    return sorted((sample / "images").glob("*.png"))[:n]


@pytest.fixture(scope="module")
def engines():
    """The bundled model on both engines."""
    return load_predictor(engine="onnx", threads=1), load_predictor(engine="torch", device="cpu")


@pytest.mark.integration
def test_bundled_model_parity_on_real_radiographs(shared_sample: Path, engines) -> None:
    """Same preprocessing output, same bone age (≤ 0.05 months), same Grad-CAM (correlation ≥ 0.99)."""
    onnx, torch_engine = engines
    assert (onnx.engine.name, torch_engine.engine.name) == ("onnx", "torch")
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
def test_in_graph_heatmap_equals_hook_based_grad_cam(shared_sample: Path, engines) -> None:
    """The one heatmap formula (``ExportGraph``'s closed form, run by both engines) against pytorch-grad-cam's
    hooks and a real backward pass, on real radiographs through the bundled network."""
    import torch
    from pytorch_grad_cam import GradCAM

    _, torch_side = engines
    model = torch_side.engine.model
    female = torch.tensor([0.0])

    class _Bound(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x, female.expand(x.shape[0])).unsqueeze(1)

    for path in _real_images(shared_sample, 2):
        pred = torch_side.predict(path, "female")
        target = model.backbone.get_submodule(model.backbone.feature_info[-1]["module"])
        x = torch.from_numpy(pred.image).float().div(255)[None, None]
        with GradCAM(model=_Bound(), target_layers=[target]) as cam:
            hooked = cam(input_tensor=x, targets=[lambda out: out.sum()])[0]
        ours = torch_side.heatmap(pred)
        assert float(np.corrcoef(ours.ravel(), hooked.ravel())[0, 1]) >= 0.99
        assert np.abs(ours - hooked).max() < 0.05


@pytest.mark.integration
def test_tiny_model_file_parity_and_heatmap(shared_sample: Path, tiny_bundle: Path) -> None:
    """A model file ships its .onnx; a SiLU backbone's in-graph Grad-CAM agrees across engines too."""
    assert onnx_path_for(tiny_bundle).is_file()
    onnx, torch_side = load_predictor(tiny_bundle, engine="onnx"), load_predictor(tiny_bundle, engine="torch")
    for path in _real_images(shared_sample, 2):
        a, b = onnx.predict(path, "female"), torch_side.predict(path, "female")
        assert abs(a.bone_age_months - b.bone_age_months) <= 0.05
        assert float(np.corrcoef(onnx.heatmap(a).ravel(), torch_side.heatmap(b).ravel())[0, 1]) >= 0.99


@pytest.mark.parametrize("age_bins", [0, 20])
def test_engines_agree_on_arrays(age_bins: int, tmp_path: Path) -> None:
    """A model file written from the torch engine, read back on ONNX Runtime: the same months per view."""
    from boneage.release.bundle import save_model_file

    predictor = make_tiny_predictor(size=64, seed=3, age_bins=age_bins)
    path = save_model_file(predictor, tmp_path / "m.safetensors", predictor.facts)
    on_onnx, on_torch = load_predictor(path, engine="onnx"), load_predictor(path, engine="torch")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    images[:, 16:48, 20:44] = 230  # some structure, not only noise
    male = np.array([True, False, True, False, True])
    a, b = on_onnx.predict_arrays(images, male), on_torch.predict_arrays(images, male)
    for x, y in zip(a, b, strict=True):
        assert np.abs(x - y).max() < 0.05


def test_the_one_view_list_matches_kornia() -> None:
    """The TTA views are applied in numpy for both engines; they are kornia's rotate/scale, to 1e-4."""
    import kornia.geometry.transform as KT
    import torch

    x = np.random.default_rng(0).random((2, 1, 64, 64)).astype(np.float32)
    ours = tta_views(x, TTA_VIEWS)
    t = torch.from_numpy(x)
    theirs = []
    for flip, angle, zoom in TTA_VIEWS:
        v = t.flip(-1) if flip else t
        if angle:
            v = KT.rotate(v, torch.full((2,), float(angle)))
        if zoom != 1.0:
            v = KT.scale(v, torch.full((2, 2), float(zoom)))
        theirs.append(v)
    expected = torch.cat(theirs).numpy()
    assert ours.shape == expected.shape == (12, 1, 64, 64)
    assert np.abs(ours - expected).max() < 1e-4
    assert np.array_equal(ours[:2], x) and np.array_equal(ours[2:4], x[..., ::-1])


def test_cam_to_heatmap_matches_grad_cam_scaling() -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image

    cam = np.random.default_rng(1).normal(size=(7, 7)).astype(np.float32)
    expected = scale_cam_image(scale_cam_image(np.maximum(cam, 0)[None], (224, 224)))[0]
    assert np.abs(cam_to_heatmap(cam, 224) - expected).max() < 1e-5


def test_bundled_onnx_is_current_and_small() -> None:
    weights = bundled_model_path()
    graph = onnx_path_for(weights)
    meta = dict(onnx_session(graph).get_modelmeta().custom_metadata_map)
    assert meta["boneage_weights_sha256"] == file_digest(weights)
    assert meta["boneage_export_version"] == ONNX_EXPORT_VERSION
    assert weights.stat().st_size + graph.stat().st_size <= 25 * 1024 * 1024


def test_stale_onnx_is_reexported_with_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    """A model file whose .onnx belongs to other weights gets a fresh export (torch installed here)."""
    copy = tmp_path / "m.safetensors"
    shutil.copy(tiny_bundle, copy)
    onnx_path_for(copy).write_bytes(b"not a graph")
    predictor = load_predictor(copy, engine="onnx")
    assert predictor.has_heatmap


def test_missing_onnx_without_torch_is_one_line(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "m.safetensors"
    shutil.copy(tiny_bundle, copy)
    monkeypatch.setitem(sys.modules, "boneage.models.export", None)  # import fails as without torch
    with pytest.raises(BoneAgeInputError, match=r"boneage\[train\]") as info:
        load_predictor(copy, engine="onnx")
    assert "\n" not in str(info.value) and "boneage export" in str(info.value)


def test_a_checkpoint_on_the_onnx_engine_uses_a_cached_export(
    trained_run: tuple[Path, dict], tmp_path: Path, monkeypatch
) -> None:
    import boneage.models.export as export

    monkeypatch.setenv("BONEAGE_CACHE", str(tmp_path))
    ckpt = trained_run[0] / "best.ckpt"
    first = load_predictor(ckpt, engine="onnx")
    exported = list((tmp_path / "onnx").iterdir())
    assert len(exported) == 1 and exported[0].suffix == ".onnx"  # no temporary left over
    calls: list[object] = []
    monkeypatch.setattr(export, "export_onnx", lambda *args, **kwargs: calls.append(args))
    second = load_predictor(ckpt, engine="onnx")
    assert calls == [] and second.engine.name == first.engine.name == "onnx"  # the graph is reused
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    male = np.array([True, False, True])
    on_torch = load_predictor(ckpt, engine="torch").predict_arrays(images, male)[0]
    assert np.abs(second.predict_arrays(images, male)[0] - on_torch).max() < 0.05


@pytest.mark.parametrize("engine", ["tensorrt", "auto-ish"])
def test_unknown_engine_is_a_user_error(engine: str) -> None:
    with pytest.raises(BoneAgeInputError, match="unknown engine"):
        load_predictor(engine=engine)


def test_default_engine_is_onnx_when_installed() -> None:
    assert load_predictor(tta=False).engine.name == "onnx"


def test_ood_scores_do_not_touch_shared_state(tiny_bundle: Path) -> None:
    """ood_scores must not swap the views a concurrent predict is reading."""
    predictor = load_predictor(tiny_bundle)
    before = predictor.views
    predictor.ood_scores(np.zeros((1, 64, 64), np.uint8))
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
