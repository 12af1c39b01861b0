"""Radiographs and labels in, training batches out: reading files (``io``), label tables (``labels``,
``sources``), the deterministic preprocessing shared with inference (``preprocess``), augmentation
(``augment``), the shard storage format (``shards``) and splits and loaders (``datamodule``).

Importing the package loads nothing heavy (the CLI starts fast); the names below load their module when
first used."""

import importlib
from typing import Any

_WHERE = {
    "Radiograph": "io",
    "read_radiograph": "io",
    "Sex": "labels",
    "parse_sex": "labels",
    "read_labels": "labels",
    "Preprocess": "preprocess",
    # 0.12's ``boneage.data`` names (the training stack)
    "BoneAgeDataModule": "datamodule",
    "make_datamodule": "datamodule",
    "datamodule_from_config": "datamodule",
    "holdout_ids": "datamodule",
    "holdout_mask": "datamodule",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"boneage.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'boneage.data' has no attribute {name!r}")
