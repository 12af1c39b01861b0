"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_SAMPLE = SHARED_DATA / "rsna-bone-age-sample"
SHARED_299 = SHARED_DATA / "rsna-bone-age-299"


def _shared(folder: Path) -> Path:
    """A real data set next to the repo; missing data fails in CI (a silent skip hides a broken checkout)
    and skips on a developer machine without it."""
    if not (folder / "labels.csv").is_file() or not (folder / "images").is_dir():
        message = f"shared RSNA data not found at {folder}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def shared_sample() -> Path:
    """The 1,001 real radiographs in their own aspect ratio (what a clinic sends)."""
    return _shared(SHARED_SAMPLE)


@pytest.fixture(scope="session")
def shared_299() -> Path:
    """The 12,375 real radiographs squashed to 299 x 299 (the training data of the bundled model)."""
    return _shared(SHARED_299)


TINY_FACTS = {"model_version": "test", "heldout_native": {"images": 10, "mae_months": 99.0}}


def make_tiny_predictor(
    size: int = 64, seed: int = 0, *, tta: bool = True, preprocess: dict | None = None, **spec_fields
):
    """A randomly initialised tiny network on the torch engine with the real policy around it: fast, offline,
    deterministic. ``spec_fields`` set other ModelSpec fields (e.g. ``age_bins``)."""
    import torch

    from boneage.modelfile import ModelFacts
    from boneage.models.net import BoneAgeNet
    from boneage.predict import Predictor
    from boneage.predict.torch_engine import TorchEngine
    from boneage.spec import ModelSpec, PreprocessSpec

    torch.manual_seed(seed)
    spec = ModelSpec(
        preprocess=PreprocessSpec(size=size, **(preprocess or {})),
        backbone="test_efficientnet",
        head=[16],
        sex_units=8,
        dropout=0.0,
        **spec_fields,
    )
    model = BoneAgeNet.from_spec(spec)
    return Predictor(TorchEngine(model, "cpu"), spec, ModelFacts.parse(TINY_FACTS), tta=tta)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved as a model file (fp16 safetensors + facts) with its ONNX graph beside it."""
    from boneage.release.bundle import save_model_file

    predictor = make_tiny_predictor()
    path = tmp_path_factory.mktemp("bundle") / "tiny.safetensors"
    return save_model_file(predictor, path, predictor.facts)


def make_tiny_train_config(shared_sample: Path, cache_dir: Path, **sections: dict):
    """A training config small enough for CI: 40 real radiographs at 32 px, a tiny timm network, 1 epoch
    on the CPU. ``sections`` update fields, e.g. ``train={"epochs": 2}``; built (and validated) the way a
    YAML file is."""
    from boneage.config import build_config, deep_merge

    data = {
        "name": "tiny",
        "data": {
            "images": str(shared_sample / "images"),
            "labels": str(shared_sample / "labels.csv"),
            "limit": 40,
            "cache_dir": str(cache_dir),
            "num_workers": 1,
        },
        "preprocess": {"size": 32},
        "model": {
            "backbone": "test_efficientnet",
            "pretrained": "none",
            "head": [16],
            "sex_units": 8,
            "dropout": 0.0,
        },
        "train": {"epochs": 1, "batch_size": 16},
        "trainer": {"accelerator": "cpu", "devices": 1, "progress_bar": False, "log_every_n_steps": 1},
    }
    return build_config(deep_merge(data, sections))


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessed-image cache for every tiny training run of the session (same settings, same key)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(shared_sample: Path, tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(run_dir, summary) of a 1-epoch tiny training run on 40 real radiographs at 32 px."""
    from boneage.train.loop import train

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    summary = train(make_tiny_train_config(shared_sample, tiny_cache_dir), run_dir, progress=False)
    return run_dir, summary


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """Exported ONNX graphs go to a per-session folder, not the user's ~/.cache."""
    previous = os.environ.get("BONEAGE_CACHE")
    os.environ["BONEAGE_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if previous is None:
        os.environ.pop("BONEAGE_CACHE", None)
    else:
        os.environ["BONEAGE_CACHE"] = previous


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
    sop_class: str | None = None,
    **header: object,
) -> Path:
    """Write a DICOM file with pydicom's own writer, as a modality would (8/16-bit, RGB, multi-frame,
    with or without the preamble); ``header`` sets any DICOM keyword, e.g. ``PatientSex="F"``.
    Shared by the tests and ``benchmarks/ood_battery.py`` so that both send the reader the same files."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "TEST"
    for key, value in header.items():
        setattr(ds, key, value)
    if pixels is not None:
        # pydicom fills Rows, Columns, frames, samples and bit depths from the array; 16-bit grey is
        # stored as 12 bits, as most CR detectors do (so a value above 4095 is refused here, not written)
        bits = 8 if pixels.dtype.itemsize == 1 else 12
        ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits, generate_instance_uid=False)
    if preamble:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        # Bare data set, no preamble, no "DICM", no file meta: what some old PACS exports look like.
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


# ---- issue #45: the site calibration is fitted on real radiographs once per session ----------------------
CALIBRATION_PER_SEX = 55  # the calibration needs at least 50 per sex


@pytest.fixture(scope="session")
def native_plain_report(shared_sample: Path):
    """``evaluate`` of the bundled model (single view) on all 1,001 native files of the real sample: the
    held-out reproduction and the calibration tests read the same pass (about 35 s, once per session)."""
    from boneage.data.labels import read_labels
    from boneage.evaluation import evaluate
    from boneage.predict import load_predictor

    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    return evaluate(load_predictor(tta=False), labels, progress=False)  # reads and preprocesses every file


@pytest.fixture(scope="session")
def sample_predictions(shared_sample: Path, native_plain_report):
    """The bundled model's bone age (no TTA) for the first 55 girls and 55 boys of the real sample, with
    their readings: a DataFrame id, boneage, male, path, predicted (what ``growth.predict_labelled`` gives:
    the same plain pass as ``evaluate``)."""
    import pandas as pd

    from boneage.data.labels import read_labels

    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    picked = pd.concat(
        [labels[~labels["male"]].head(CALIBRATION_PER_SEX), labels[labels["male"]].head(CALIBRATION_PER_SEX)]
    ).reset_index(drop=True)
    predicted = native_plain_report.predictions.set_index("id")["predicted"]
    picked["predicted"] = predicted.loc[picked["id"].astype(str)].to_numpy(float)
    return picked


def shifted_readings(table) -> np.ndarray:
    """A site whose readers differ from RSNA's by a known per-sex line: girls read 1.08 x + 4 months, boys
    0.93 x - 5 months (the kind of per-population offset Deeplasia corrected on a new site)."""
    ref = table["boneage"].to_numpy(float)
    male = table["male"].to_numpy(bool)
    return np.where(male, 0.93 * ref - 5.0, 1.08 * ref + 4.0)


@pytest.fixture(scope="session")
def site_calibration(sample_predictions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibration of the bundled model to the shifted readings, saved as site.json."""
    from boneage.growth import fit_calibration
    from boneage.predict import load_predictor

    calibration = fit_calibration(
        sample_predictions["predicted"],
        shifted_readings(sample_predictions),
        sample_predictions["male"],
        model=load_predictor(tta=False).info,
        tta=False,
        labels="site-labels.csv",
    )
    assert calibration.helps
    return calibration.save(tmp_path_factory.mktemp("calibration") / "site.json")
