"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-bone-age-sample"


@pytest.fixture(scope="session")
def shared_sample() -> Path:
    """The real RSNA sample next to the repo; missing data fails in CI (a silent skip hides a broken
    checkout) and skips on a developer machine without it."""
    if not (SHARED_SAMPLE / "labels.csv").is_file() or not (SHARED_SAMPLE / "images").is_dir():
        message = f"shared RSNA sample not found at {SHARED_SAMPLE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_SAMPLE


def make_tiny_predictor(size: int = 64, seed: int = 0):
    """A randomly initialised tiny network with the real Predictor around it: fast, offline, deterministic."""
    import torch

    from boneage.config import Config
    from boneage.inference import Predictor
    from boneage.models import BoneAgeNet

    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.backbone = "test_efficientnet"
    cfg.model.pretrained = "none"
    cfg.model.head = [16]
    cfg.model.dropout = 0.0
    cfg.preprocess.size = size
    model = BoneAgeNet("test_efficientnet", [16], sex_units=8, dropout=0.0, in_chans=1)
    cfg.model.sex_units = 8
    return Predictor(model, cfg, {"val_mae_months": 99.0, "version": "test"})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved in the bundled-model format (fp16 safetensors + JSON metadata)."""
    from boneage.inference import save_bundle

    path = tmp_path_factory.mktemp("bundle") / "tiny.safetensors"
    return save_bundle(make_tiny_predictor(), path)
