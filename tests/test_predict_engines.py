"""The policy on a model file or a checkpoint: TTA, DICOM sex and laterality, the heatmap, load errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_predictor, write_dicom

from boneage.data.io import read_radiograph
from boneage.data.labels import parse_sex as normalize_sex
from boneage.errors import BoneAgeInputError
from boneage.predict import TTA_VIEWS, Predictor, load_predictor


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
    return load_predictor(tiny_bundle)


@pytest.fixture(scope="module")
def real_image(shared_sample: Path) -> Path:
    return shared_sample / "images" / "1377.png"


def test_load_bundle_matches_the_saved_model(bundle_predictor: Predictor) -> None:
    p = bundle_predictor
    assert p.spec.backbone == "test_efficientnet"
    assert p.preprocess.size == 64
    assert len(p.views) == 6
    assert p.info["backbone"] == "test_efficientnet" and p.info["input_size"] == 64
    assert p.info["model_version"] == "test" and p.info["headline"]["mae_months"] == 99.0
    assert "config" not in p.info and "spec" not in p.info and "legacy" not in p.info
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
    pred = load_predictor(tiny_bundle, tta=False).predict(real_image, "male")
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


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="model file not found"):
        load_predictor(tmp_path / "missing.ckpt")
    with pytest.raises(BoneAgeInputError, match="is a folder, not a model file"):
        load_predictor(tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(BoneAgeInputError, match="not a readable checkpoint") as info:
        load_predictor(junk)
    assert str(junk) in str(info.value)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(BoneAgeInputError, match="no boneage model spec"):
        load_predictor(plain)
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"x")
    with pytest.raises(BoneAgeInputError, match="pass the .safetensors beside it"):
        load_predictor(graph)


@pytest.mark.integration
def test_training_checkpoint_loads(trained_run: tuple[Path, dict], real_image: Path) -> None:
    run_dir, _ = trained_run
    for name in ("best.ckpt", "last.ckpt"):
        predictor = load_predictor(run_dir / name, engine="torch")
        assert predictor.spec.backbone == "test_efficientnet"
        assert predictor.preprocess.size == 32
        pred = predictor.predict(real_image, "male")
        assert math.isfinite(pred.bone_age_months) and pred.uncertainty_months >= 0
        assert pred.image.shape == (32, 32)
    # the checkpoint's weights, not a fresh network: its target statistics came from the training images
    ckpt = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=False)
    model = predictor.engine.model
    assert float(model.age_mean) == pytest.approx(float(ckpt["state_dict"]["model.age_mean"]))
    for key, tensor in ckpt["state_dict"].items():
        if key.startswith("model."):
            assert torch.equal(model.state_dict()[key[len("model.") :]], tensor), key
