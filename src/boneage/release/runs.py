"""A training run's own records, as release tooling reads them: the config it trained with, the split it
validated on, and the held-out ids in both geometries."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from boneage.config import RunConfig, config_from_dict
from boneage.data.datamodule import BoneAgeDataModule, holdout_mask
from boneage.data.labels import read_labels
from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFile


def run_config_for(checkpoint: str | Path) -> RunConfig:
    """The run config a checkpoint was trained with: the run folder's config.yaml (v0.1 checkpoints also
    carried it inside)."""
    ckpt = Path(checkpoint)
    saved = ckpt.parent / "config.yaml"
    if saved.is_file():
        return config_from_dict(yaml.safe_load(saved.read_text()) or {}, source=saved)
    legacy = ModelFile.read(ckpt).training_config if ckpt.suffix == ".ckpt" else None
    if legacy is not None:
        return config_from_dict(legacy, source=ckpt)
    raise BoneAgeInputError(
        "no config.yaml beside the checkpoint: cannot tell which images it trained on", ckpt
    )


def run_split(cfg: RunConfig) -> tuple[BoneAgeDataModule, pd.DataFrame]:
    """The run's data module, set up with the split it trained on, and its validation table: the images
    that choose (checkpoints, ship rules) and calibrate, so every report on a candidate scores the same
    ids."""
    dm = BoneAgeDataModule(
        cfg.data.model_copy(update={"holdout_monitor": False}), cfg.preprocess, progress=False
    )
    dm.setup("fit")
    assert dm.labels is not None
    return dm, dm.labels.iloc[dm.val_idx].reset_index(drop=True)


def holdout_tables(cfg: RunConfig, native_images: Path | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The held-out ids in the training geometry (from data.images) and, when their own files exist, in
    the clinic's geometry (the holdout CSV's folder, or ``native_images``). Public because every report on
    a candidate model must score the same two tables."""
    d = cfg.data
    labels = read_labels(d.labels, d.images)
    train_geometry = labels[holdout_mask(labels, d.holdout_labels)].reset_index(drop=True)
    folder = native_images or Path(d.holdout_labels).parent / "images"
    native = read_labels(d.holdout_labels, folder) if folder.is_dir() else None
    return train_geometry, native
