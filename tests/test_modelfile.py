"""``boneage.modelfile``: the one reader and writer of model files. A model file carries its spec and typed
facts and nothing about training; files of the v0.1 and v0.12.0 layouts still load; facts are validated
when read; the model has its own version, apart from the package's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_predictor
from safetensors import safe_open

import boneage
from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFacts, ModelFile, bundled_model_path, write_model_file
from boneage.ood import TEXTURE_STAGE
from boneage.predict import load_predictor
from boneage.release.bundle import convert_bundle, save_model_file


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["boneage"])


def test_a_model_file_carries_the_spec_and_typed_facts_and_nothing_about_training(tiny_bundle: Path) -> None:
    meta = _meta(tiny_bundle)
    assert set(meta) == {"spec", "facts"}
    assert set(meta["spec"]) >= {"preprocess", "backbone", "head", "target_mean", "target_std", "task"}
    assert meta["facts"]["facts_version"] == 2 and meta["facts"]["model_version"] == "test"
    read = ModelFile.read(tiny_bundle)
    assert read.kind == "bundle" and read.facts.heldout_native.mae_months == 99.0


def test_written_weights_are_fp16_and_small(tmp_path: Path) -> None:
    predictor = make_tiny_predictor()
    model = predictor.engine.model
    path = write_model_file(tmp_path / "m.safetensors", predictor.spec, predictor.facts, model.state_dict())
    n_floats = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    assert 2 * n_floats <= path.stat().st_size < 2 * n_floats + 64_000  # two bytes a value plus the header
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(tensors) == set(model.state_dict())
    # weights in fp16; the four scalar normalisation buffers stay fp32 (127.6 must not become 127.625)
    floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point()}
    assert {d for k, d in floats.items() if not k.startswith(("age_", "pixel_"))} == {torch.float16}
    assert {d for k, d in floats.items() if k.startswith(("age_", "pixel_"))} == {torch.float32}
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed


def test_v0_12_0_flat_facts_are_read_into_the_typed_record() -> None:
    """v0.12.0 was first written with flat, untyped facts (its metadata is kept in tests/data, the spec left
    out): they are read into the typed record, every figure kept, and its model version is its own."""
    meta = json.loads((Path(__file__).parent / "data" / "v0_12_0_flat_facts.json").read_text())
    facts = ModelFacts.from_record(meta)
    assert facts.model_version == "0.12.0" != boneage.__version__
    assert facts.heldout_native.images == 1001 and facts.heldout_native.mae_months == 6.88
    assert (
        facts.heldout_native.mae_no_tta_months == 7.049 and facts.heldout_native.mae_by_sex["male"] == 6.656
    )
    assert facts.heldout_training_geometry.mae_months == 7.145 and facts.validation_split.mae_months == 6.825
    assert facts.ood.flagged["heldout_native"] == (9, 1001) and facts.ood.texture_copy_recipe == (299, 60)
    assert facts.ood.texture_stage == 2
    assert facts.legacy == {}  # every key of the old layout found its typed place
    assert facts.headline() == {
        "mae_months": 6.88,
        "images": 1001,
        "on": "held-out radiographs in their own aspect ratio",
    }


def test_the_shipped_file_states_its_model_version_and_texture_stage() -> None:
    """The shipped file (v0.12.0's weights, re-bundled on 2026-12-07 with the texture density on blocks[1])
    has typed facts, its own model version, and says which stage its texture density taps."""
    facts = ModelFile.read(bundled_model_path()).facts
    assert facts.model_version == "0.12.0" != boneage.__version__
    assert facts.ood.texture_stage == TEXTURE_STAGE == 1 and facts.ood.texture_copy_recipe == (299, 60)
    assert facts.legacy == {} and facts.heldout_native.images == 1001
    assert facts.headline() == {
        "mae_months": 6.879,
        "images": 1001,
        "on": "held-out radiographs in their own aspect ratio",
    }


def test_facts_are_validated_when_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {"w": torch.zeros(2)}
    spec = make_tiny_predictor().spec.model_dump(mode="json")
    for bad, problem in (
        (
            {"model_version": "1", "heldout_native": {"images": "many", "mae_months": 5}},
            "heldout_native.images",
        ),
        ({"model_version": "1", "tta_spred": 3}, "unknown key 'tta_spred'"),
    ):
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path), metadata={"boneage": json.dumps({"spec": spec, "facts": bad})})
        with pytest.raises(BoneAgeInputError, match="invalid model facts") as info:
            ModelFile.read(path)
        assert problem in str(info.value) and str(path) in str(info.value)


def test_loading_a_model_file_never_reads_the_run_config(tiny_bundle: Path) -> None:
    """Renaming or removing any training option cannot break loading a model: the loader does not even
    import the run-config module (checked in a fresh interpreter where importing it fails)."""
    code = (
        "import sys; sys.modules['boneage.config'] = None\n"
        "from boneage.predict import load_predictor\n"
        f"p = load_predictor({str(tiny_bundle)!r}, engine='onnx')\n"
        "import numpy as np\n"
        "x = p.predict_arrays(np.zeros((1, 64, 64), np.uint8), np.array([True]))[0]\n"
        "print(p.spec.backbone, float(x[0]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("test_efficientnet ")


def test_a_renamed_training_field_does_not_break_a_model_file(tiny_bundle: Path, monkeypatch) -> None:
    from pydantic import create_model

    import boneage.config as config

    renamed = create_model("TrainConfig", __base__=config.Section, learning_rate=(float, 1e-3))
    monkeypatch.setattr(config, "TrainConfig", renamed)
    assert load_predictor(tiny_bundle).spec.backbone == "test_efficientnet"


def test_v01_file_loads_and_converts(tmp_path: Path) -> None:
    """A v0.1 file (whole training config in its metadata, head layers named by index, flat facts) predicts
    the same as its converted file, which carries a spec and typed facts instead."""
    from safetensors.torch import save_file

    predictor = make_tiny_predictor(size=64, seed=3)
    state = {}
    for key, value in predictor.engine.model.state_dict().items():
        key = key.replace("head.hidden.0.", "head.0.").replace("head.out.", "head.2.")
        state[key] = (value.half() if value.is_floating_point() else value).contiguous()
    old_config = {  # the v0.1 layout: every section, data paths included
        "data": {"images": "/somewhere/images", "labels": "/somewhere/labels.csv", "val_fraction": 0.2},
        "preprocess": {"size": 64, "crop": True, "contrast": "percentile"},
        "model": {"backbone": "test_efficientnet", "pretrained": "none", "sex_units": 8, "head": [16]},
        "train": {"epochs": 30, "optimizer": "adam", "an_option_since_renamed": 1},
    }
    old = tmp_path / "v01.safetensors"
    flat = {"version": "0.1.0", "val_mae_months": 8.52, "validation_images": 201, "a_note": "x"}
    save_file(state, str(old), metadata={"boneage": json.dumps({**flat, "config": old_config})})
    legacy = load_predictor(old, engine="torch", tta=False)
    assert legacy.spec.preprocess.geometry == "letterbox" and legacy.spec.head == [16]
    assert legacy.facts.model_version == "0.1.0" and legacy.facts.heldout_training_geometry.mae_months == 8.52
    assert legacy.facts.legacy == {"a_note": "x"}  # kept, shown nowhere
    new = convert_bundle(old, tmp_path / "v02.safetensors")
    meta = _meta(new)
    assert set(meta) == {"spec", "facts"} and meta["spec"]["backbone"] == "test_efficientnet"
    assert meta["facts"]["converted_from"].startswith("v01.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    male = np.array([True, False, True, False])
    a = legacy.predict_arrays(images, male)[0]
    b = load_predictor(new, engine="torch", tta=False).predict_arrays(images, male)[0]
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_a_facts_record_round_trips(tmp_path: Path) -> None:
    predictor = make_tiny_predictor()
    facts = ModelFacts.parse(
        {
            "model_version": "1.2.3",
            "training_range_months": [12, 228],
            "heldout_native": {"images": 3, "mae_months": 6.5, "mae_by_age_band": {"0-2y": [1, 2.0]}},
            "ood": {"threshold": 4.6, "flagged": {"heldout_native": [1, 3]}},
        }
    )
    path = save_model_file(predictor, tmp_path / "m.safetensors", facts)
    assert ModelFile.read(path).facts == facts
    assert load_predictor(path).info["headline"]["mae_months"] == 6.5
