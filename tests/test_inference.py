"""Predictor: load a bundle or a checkpoint, predict with TTA, DICOM sex and laterality, heatmap, ONNX."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_predictor, write_dicom

from boneage.bundle import save_bundle
from boneage.errors import BoneAgeInputError
from boneage.inference import TTA_VIEWS, Predictor, normalize_sex, tta_batch
from boneage.io import read_radiograph


def _hand_like(h: int = 160, w: int = 120) -> np.ndarray:
    """uint8 picture of a bright blob with a 'thumb' on one side: mirroring it changes the picture."""
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 20, dtype=np.uint8)
    img[((yy - 95) / 50) ** 2 + ((xx - 55) / 35) ** 2 <= 1] = 180
    img[30:80, 15:28] = 220  # thumb on the left
    img[20:70, 60:70] = 200
    return img


@pytest.fixture(scope="module")
def bundle_predictor(tiny_bundle: Path) -> Predictor:
    return Predictor.load(tiny_bundle)


@pytest.fixture(scope="module")
def real_image(shared_sample: Path) -> Path:
    return shared_sample / "images" / "1377.png"


def test_load_bundle_matches_the_saved_model(bundle_predictor: Predictor) -> None:
    p = bundle_predictor
    assert p.spec.backbone == "test_efficientnet"
    assert p.preprocess.size == 64
    assert len(p.views) == 6
    assert p.info["backbone"] == "test_efficientnet" and p.info["input_size"] == 64
    assert "config" not in p.info and "spec" not in p.info
    original = make_tiny_predictor()  # the same seed as the bundle: the fp16 copy must agree closely
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    male = np.array([True, False, True])
    a = p.predict_arrays(images, male)[0]
    b = original.predict_arrays(images, male)[0]
    np.testing.assert_allclose(a, b, atol=0.5)


@pytest.mark.integration
def test_predict_real_radiograph(bundle_predictor: Predictor, real_image: Path) -> None:
    pred = bundle_predictor.predict(real_image, "female")
    assert pred.sex == "female"
    assert math.isfinite(pred.bone_age_months)
    assert pred.uncertainty_months >= 0
    assert len(pred.views_months) == 6 == len(TTA_VIEWS)
    assert pred.bone_age_months == pytest.approx(np.mean(pred.views_months), abs=1e-3)
    assert pred.uncertainty_months == pytest.approx(np.std(pred.views_months), abs=1e-3)
    assert pred.image is not None and pred.image.shape == (64, 64) and pred.image.dtype == np.uint8
    assert np.array_equal(pred.image, bundle_predictor.preprocess(read_radiograph(real_image).pixels))
    data = pred.to_dict()
    assert data["bone_age_years"] == pytest.approx(data["bone_age_months"] / 12, abs=0.01)
    json.dumps(data)
    male = bundle_predictor.predict(real_image, "m")
    assert male.sex == "male" and male.bone_age_months != pred.bone_age_months


@pytest.mark.integration
def test_without_tta_one_view(tiny_bundle: Path, real_image: Path) -> None:
    pred = Predictor.load(tiny_bundle, tta=False).predict(real_image, "male")
    assert len(pred.views_months) == 1 and pred.uncertainty_months == 0


@pytest.mark.integration
def test_sex_is_required(bundle_predictor: Predictor, real_image: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="sex is required") as info:
        bundle_predictor.predict(real_image)
    assert str(real_image) in str(info.value)
    with pytest.raises(BoneAgeInputError, match="sex must be female or male"):
        bundle_predictor.predict(real_image, "unknown")


def test_normalize_sex() -> None:
    assert normalize_sex("F") == "female" and normalize_sex("Male") == "male"
    assert normalize_sex(True) == "male" and normalize_sex(False) == "female"
    assert normalize_sex(None) is None and normalize_sex("") is None
    # typed by a person, 1/0/true mean nothing obvious: only the documented spellings are accepted
    for typed in ("1", "0", "true", "yes"):
        with pytest.raises(BoneAgeInputError, match="sex must be female or male"):
            normalize_sex(typed)
    assert normalize_sex("true", flags=True) == "male"  # a label file's `male` column


def test_dicom_sex_from_header(tmp_path: Path, bundle_predictor: Predictor) -> None:
    path = write_dicom(tmp_path / "hand.dcm", _hand_like(), PatientSex="M")
    pred = bundle_predictor.predict(path)
    assert pred.sex == "male"
    assert math.isfinite(pred.bone_age_months)
    # a given sex wins over the header, with a warning
    given = bundle_predictor.predict(path, "female")
    assert given.sex == "female"
    assert any("DICOM header says male" in w for w in given.warnings)


def test_right_hand_is_mirrored(tmp_path: Path, bundle_predictor: Predictor) -> None:
    pixels = _hand_like()
    left = write_dicom(tmp_path / "left.dcm", pixels, PatientSex="F", ImageLaterality="L")
    right = write_dicom(tmp_path / "right.dcm", pixels, PatientSex="F", ImageLaterality="R")
    p_left, p_right = bundle_predictor.predict(left), bundle_predictor.predict(right)
    assert not any("mirrored" in w for w in p_left.warnings)
    assert any("mirrored" in w for w in p_right.warnings)
    assert np.array_equal(p_right.image, bundle_predictor.preprocess(read_radiograph(left).pixels[:, ::-1]))
    assert not np.array_equal(p_right.image, p_left.image)


def test_heatmap_shape_and_range(tmp_path: Path, bundle_predictor: Predictor) -> None:
    pred = bundle_predictor.predict(write_dicom(tmp_path / "h.dcm", _hand_like(), PatientSex="F"))
    cam = bundle_predictor.heatmap(pred)
    assert cam.shape == (64, 64) == pred.image.shape
    assert cam.dtype == np.float32
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert np.isfinite(cam).all()


def test_tta_batch_views() -> None:
    x = torch.rand(2, 1, 32, 32)
    out = tta_batch(x, TTA_VIEWS)
    assert out.shape == (12, 1, 32, 32)
    assert torch.equal(out[:2], x)  # view 0 is the image itself
    assert torch.equal(out[2:4], x.flip(-1))  # view 1 its mirror image


@pytest.mark.parametrize("age_bins", [0, 20])
def test_onnx_matches_torch(age_bins: int) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("onnxruntime is not installed")
    predictor = make_tiny_predictor(size=64, seed=3, age_bins=age_bins)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    images[:, 16:48, 20:44] = 230  # some structure, not only noise
    male = np.array([True, False, True, False, True])
    torch_mean, torch_spread, torch_views = predictor.predict_arrays(images, male)
    assert predictor.use_onnx() is True
    assert predictor.onnx_session is not None
    onnx_mean, onnx_spread, onnx_views = predictor.predict_arrays(images, male)
    assert np.abs(onnx_views - torch_views).max() < 0.05
    assert np.abs(onnx_mean - torch_mean).max() < 0.05
    assert np.abs(onnx_spread - torch_spread).max() < 0.05


def test_save_bundle_is_small_fp16_with_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    predictor = make_tiny_predictor()
    path = save_bundle(predictor, tmp_path / "m.safetensors", {"val_mae_months": 12.5})
    n_floats = sum(v.numel() for v in predictor.model.state_dict().values() if v.is_floating_point())
    size = path.stat().st_size
    assert size < 25_000_000
    assert 2 * n_floats <= size < 2 * n_floats + 64_000  # two bytes per value plus the header
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["boneage"])
    assert set(tensors) == set(predictor.model.state_dict())
    # weights in fp16; the four scalar normalisation buffers stay fp32 (127.6 must not become 127.625)
    floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point()}
    assert {d for k, d in floats.items() if not k.startswith(("age_", "pixel_"))} == {torch.float16}
    assert {d for k, d in floats.items() if k.startswith(("age_", "pixel_"))} == {torch.float32}
    assert {t.dtype for t in tensors.values() if not t.is_floating_point()} <= {torch.int64}  # BN counters
    assert meta["val_mae_months"] == 12.5
    assert meta["spec"]["backbone"] == "test_efficientnet"
    assert "config" not in meta  # nothing about how it was trained travels with the weights
    again = Predictor.load(path)
    assert again.meta["val_mae_months"] == 12.5


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="checkpoint not found"):
        Predictor.load(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(BoneAgeInputError, match="not a readable checkpoint") as info:
        Predictor.load(junk)
    assert str(junk) in str(info.value)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(BoneAgeInputError, match="no boneage model spec"):
        Predictor.load(plain)


@pytest.mark.integration
def test_training_checkpoint_loads(trained_run: tuple[Path, dict], real_image: Path) -> None:
    run_dir, _ = trained_run
    for name in ("best.ckpt", "last.ckpt"):
        predictor = Predictor.load(run_dir / name)
        assert predictor.spec.backbone == "test_efficientnet"
        assert predictor.preprocess.size == 32
        pred = predictor.predict(real_image, "male")
        assert math.isfinite(pred.bone_age_months) and pred.uncertainty_months >= 0
        assert pred.image.shape == (32, 32)
    # the checkpoint's weights, not a fresh network: its target statistics came from the training images
    ckpt = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=False)
    assert float(predictor.model.age_mean) == pytest.approx(float(ckpt["state_dict"]["model.age_mean"]))
    for key, tensor in ckpt["state_dict"].items():
        if key.startswith("model."):
            assert torch.equal(predictor.model.state_dict()[key[len("model.") :]], tensor), key


def test_auto_runtime_uses_a_cached_onnx_export(tiny_bundle, tmp_path, monkeypatch) -> None:
    import boneage.inference as inference

    monkeypatch.setenv("BONEAGE_CACHE", str(tmp_path))
    first = Predictor.load(tiny_bundle, runtime="auto")
    assert first.onnx_session is not None
    exported = list((tmp_path / "onnx").glob("*.onnx"))
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [exported[0].name]  # no temporary left over

    calls: list[object] = []
    monkeypatch.setattr(inference, "export_onnx", lambda *args, **kwargs: calls.append(args))
    second = Predictor.load(tiny_bundle, runtime="auto")
    assert calls == [] and second.onnx_session is not None  # the second load reuses the graph

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    male = np.array([True, False, True])
    torch_mean = Predictor.load(tiny_bundle, runtime="torch").predict_arrays(images, male)[0]
    assert np.abs(second.predict_arrays(images, male)[0] - torch_mean).max() < 0.05


def test_unknown_runtime_is_a_user_error(tiny_bundle) -> None:
    with pytest.raises(BoneAgeInputError, match="runtime"):
        Predictor.load(tiny_bundle, runtime="tensorrt")


def test_with_preprocess_reads_the_same_network_with_another_input(real_image: Path) -> None:
    """The benchmarks that score a model under another geometry (fit_readout, native_geometry) rely on this:
    the copy shares the weights, prepares the radiograph its own way, and leaves the original untouched."""
    base = make_tiny_predictor(size=64)
    stretched = base.with_preprocess(fit="stretch")
    assert stretched.model is base.model
    assert (base.spec.preprocess.fit, stretched.spec.preprocess.fit) == ("pad", "stretch")
    assert stretched.spec.backbone == base.spec.backbone and stretched.meta == base.meta
    a, b = base.prepare(real_image)[1], stretched.prepare(real_image)[1]
    assert a.shape == b.shape == (64, 64) and not np.array_equal(a, b)
    # the same answer as a predictor built by hand around that spec (what the benchmarks used to do)
    by_hand = Predictor(base.model, stretched.spec, base.meta)
    assert stretched.predict(real_image, "M").bone_age_months == pytest.approx(
        by_hand.predict(real_image, "M").bone_age_months, abs=1e-6
    )
    assert base.with_preprocess(size=48).prepare(real_image)[1].shape == (48, 48)
    one_view = Predictor(base.model, base.spec, tta=False).with_preprocess(fit="stretch")
    assert len(one_view.views) == 1 and len(stretched.views) == len(TTA_VIEWS)


@pytest.mark.parametrize(("changes", "field"), [({"fitt": "stretch"}, "fitt"), ({"size": 8}, "size")])
def test_with_preprocess_rejects_a_bad_field(changes: dict, field: str) -> None:
    with pytest.raises(BoneAgeInputError, match=rf"preprocess\.{field}"):
        make_tiny_predictor(size=64).with_preprocess(**changes)
