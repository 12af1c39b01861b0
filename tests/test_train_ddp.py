"""Two-process DDP on the CPU (gloo) reproduces a one-process run: same weights, same validation MAE.

What is comparable, and why the setup looks the way it does:

* DDP averages the ranks' gradients. With 2 ranks x batch 4 each rank's loss is the mean over its 4 images,
  and the average of the two gradients is the gradient of the mean over all 8: the same step as one process
  with batch 8, *if* no layer couples the images of a batch. BatchNorm does (its statistics would come from
  4 images per rank instead of 8), so the backbone is timm's ``test_efficientnet_gn``, the test EfficientNet
  with GroupNorm, which normalises each image on its own. Dropout and augmentation are off: they draw
  random numbers, and ranks draw their own (``BoneAgeModule.on_fit_start``).
* Which images form a step must match too. Lightning gives each rank a DistributedSampler with its own
  shuffle, so the training set is exactly one global batch (8 images): every epoch is one step over the
  same 8 images in both runs, whatever the order. Two epochs make two SGD steps (momentum included).
* SGD, not Adam: Adam's first steps are about lr x sign(gradient), so float rounding in the gloo
  all-reduce could flip a near-zero component; SGD keeps differences at the size of the rounding.
* The validation set has 9 images, an odd number: Lightning's default DistributedSampler would pad it to
  10 by repeating an image on one rank; the DataModule's unrepeated sampler plus Lightning's batch-size
  weighted ``sync_dist`` give the exact MAE over the 9 images, equal to the one-process value.

The DDP run is ``torchrun --standalone --nproc-per-node 2 -m boneage train CONFIG`` in a subprocess: the
launch docs/training-at-scale.md describes, with both ranks starting (and importing) in parallel; Lightning
finds the ranks in torchrun's environment and does not launch processes of its own.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from boneage.config import load_config


def _write_dataset(root: Path, n: int = 17) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(3)
    for i in range(n):
        yy, xx = np.mgrid[0:64, 0:48]
        blob = np.exp(-(((yy - 32 - i % 5) / 16) ** 2 + ((xx - 24) / 10) ** 2))
        img = np.clip(20 + 200 * blob + rng.normal(0, 6, blob.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(images / f"{100 + i}.png")
        rows.append((str(100 + i), float(24 + 11 * i), bool(i % 2)))
    labels = root / "labels.csv"
    pd.DataFrame(rows, columns=["id", "boneage", "male"]).to_csv(labels, index=False)
    return images, labels


def _config(root: Path, images: Path, labels: Path, devices: int, batch: int) -> Path:
    data = {
        "name": f"ddp{devices}",
        "data": {
            "images": str(images),
            "labels": str(labels),
            "cache_dir": str(root / "cache"),
            "val_fraction": 0.5,  # 17 images: 8 train (one global batch), 9 validation (odd)
            "num_workers": 0,
            "seed": 1,
        },
        "preprocess": {"size": 32},
        "augment": {"enabled": False},
        "model": {
            "backbone": "test_efficientnet_gn",
            "pretrained": "none",
            "head": [8],
            "sex_units": 4,
            "dropout": 0.0,
        },
        "train": {
            "epochs": 2,
            "batch_size": batch,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "schedule": "constant",
            "seed": 7,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "precision": "32-true",
            "progress_bar": False,
            "log_every_n_steps": 1,
        },
    }
    path = root / f"ddp{devices}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _val_maes(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(row["val_mae"]) for row in csv.DictReader(f)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    from boneage.train.loop import train

    images, labels = _write_dataset(tmp_path)
    single = tmp_path / "single"
    summary = train(load_config(_config(tmp_path, images, labels, 1, 8)), single, progress=False)
    assert (summary["train_images"], summary["val_images"]) == (8, 9)

    ddp = tmp_path / "ddp"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "boneage", "train", str(_config(tmp_path, images, labels, 2, 4))]
    cmd += ["--run-dir", str(ddp), "--no-progress"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - a hung process group
        pytest.fail(f"DDP run timed out: {exc.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]

    # rank 0 alone writes the per-epoch rows: two epochs, two rows (not four)
    single_mae, ddp_mae = _val_maes(single), _val_maes(ddp)
    assert len(single_mae) == len(ddp_mae) == 2
    np.testing.assert_allclose(ddp_mae, single_mae, rtol=1e-4, atol=1e-3)
    a, b = _weights(single), _weights(ddp)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"weights differ by up to {worst}"
    # and the steps changed the model (the MAE moved between epochs): not two untouched initialisations
    assert abs(single_mae[1] - single_mae[0]) > 1e-3
