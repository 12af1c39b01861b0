"""Weight averages ("model soups"): checkpoints or bundles fine-tuned from one start → one checkpoint that
scores, bundles and meets a ship rule like a trained run; optionally with its BatchNorm statistics
re-estimated on training images."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.config import RunConfig, load_config
from boneage.data.augment import Augment
from boneage.data.datamodule import to_float
from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFile, file_digest
from boneage.models.net import BoneAgeNet
from boneage.models.surgery import average_state_dicts, mixing_shares, reestimate_batchnorm
from boneage.release.runs import run_config_for, run_split
from boneage.spec import ModelSpec
from boneage.train.experiments import config_differences
from boneage.train.runs import git_commit

log = logging.getLogger(__name__)


def average_checkpoints(
    sources: list[str | Path],
    out_path: str | Path,
    *,
    weights: list[float] | None = None,
    config: str | Path | None = None,
    bn_images: int = 0,
    bn_seed: int = 0,
) -> Path:
    """Checkpoints or bundles of one architecture → one checkpoint holding their weighted mean (a model
    soup; ``boneage.models.average_state_dicts``), with ``config.yaml`` beside it so it bundles and
    scores like a trained run. The config gives the data split that judges it: ``config``, or else the
    run config of the first ``.ckpt`` source. With ``bn_images`` the BatchNorm statistics are then
    re-estimated on that many training-split images (``batchnorm_from_training_images``) instead of
    averaged. Bundles' OOD densities are not averaged: a soup's features differ, so ``make_bundle`` fits
    its own."""
    paths = [Path(s).expanduser() for s in sources]
    if len(paths) < 2:
        raise BoneAgeInputError("averaging needs at least two models")
    shares = mixing_shares(len(paths), weights)  # bad weights or no split fail before any model is read
    if bn_images < 0:
        raise BoneAgeInputError(f"bn_images must be 0 (average the statistics) or more, got {bn_images}")
    if config is not None:
        cfg = load_config(config)
    else:
        ckpts = [p for p in paths if p.suffix == ".ckpt"]
        if not ckpts:
            raise BoneAgeInputError("no .ckpt among the models: pass the run config that gives the split")
        cfg = run_config_for(ckpts[0])
    specs, states = [], []
    for p in paths:
        model_file = ModelFile.read(p)
        specs.append(model_file.spec)
        states.append(model_file.network_state())
    first = specs[0].model_dump()
    for p, spec in zip(paths[1:], specs[1:], strict=True):
        other = spec.model_dump()
        # "versions" records the software that wrote each file, not what the weights mean
        differ = sorted(
            k for k in first.keys() | other.keys() if k != "versions" and first.get(k) != other.get(k)
        )
        if differ:
            raise BoneAgeInputError(
                f"its model spec differs from {paths[0].name}'s in {', '.join(differ)}", p
            )
    mean = average_state_dicts(states, shares)
    batchnorm = None
    if bn_images:
        mean, batchnorm = batchnorm_from_training_images(mean, specs[0], cfg, bn_images, bn_seed)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    differ = config_differences(out.parent, cfg)
    if differ:
        raise BoneAgeInputError(
            f"a different config.yaml is already there ({'; '.join(differ[:3])}): write the average "
            "elsewhere",
            out.parent / "config.yaml",
        )
    cfg.save(out.parent / "config.yaml")
    blob = {
        "state_dict": {f"model.{k}": v for k, v in mean.items()},
        "boneage_spec": first,
        "averaged_from": [
            # the name and digest, not the path: a bundle made from this must not carry a local folder
            {"file": p.name, "sha256": file_digest(p), "weight": round(w, 6)}
            for p, w in zip(paths, shares, strict=True)
        ],
        **({"batchnorm": batchnorm} if batchnorm else {}),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(blob, tmp)
    tmp.replace(out)
    return out


def batchnorm_from_training_images(
    state: dict[str, Any], spec: ModelSpec, cfg: RunConfig, n: int, seed: int = 0, batch_size: int = 32
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state with re-estimated BatchNorm statistics, a record of how): ``n`` images drawn (``seed``) from
    the run's training split, preprocessed as the model's spec says, under the run's augmentation, because
    that is how the ingredients' own statistics were gathered during training."""
    if cfg.preprocess != spec.preprocess:  # the split's cached images must be what the models see
        raise BoneAgeInputError(f"the run config {cfg.name!r} preprocesses otherwise than the models' spec")
    dm, _ = run_split(cfg)
    train = dm.train_set  # the run's cached training images, as fit_ood reads them
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False))
    images, male = torch.from_numpy(train.array(rows)), train.male[rows]
    model = BoneAgeNet.from_spec(spec)
    model.load_state_dict(state)
    augment = Augment(cfg.augment)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(images), batch_size):
            x = to_float(images[start : start + batch_size, None])
            yield augment(x), male[start : start + batch_size]

    with torch.random.fork_rng():  # the augmentation draws from its own seeded stream
        torch.manual_seed(seed)
        seen = reestimate_batchnorm(model, batches())
    record = {"images": seen, "seed": seed, "split": "training", "augmented": augment.enabled}
    log.info("re-estimated BatchNorm statistics on %d training images", seen)
    return dict(model.state_dict()), record
