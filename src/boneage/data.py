"""Splits, a preprocessed-image cache, datasets and the Lightning DataModule.

Radiographs are large PNGs; decoding and cropping them every epoch would dominate CPU training, so each is
preprocessed once into a uint8 array kept under a folder named by the preprocess settings' hash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from torch.utils.data import DataLoader, Dataset

from boneage.config import Config
from boneage.errors import BoneAgeInputError
from boneage.io import read_radiograph
from boneage.labels import read_labels
from boneage.preprocess import Preprocess

log = logging.getLogger(__name__)


def strata(labels: pd.DataFrame, bands: int = 5) -> np.ndarray:
    """Sex × age-quantile band: each stratum is large enough to split, even for a few hundred images."""
    ages = labels["boneage"].to_numpy(dtype=float)
    edges = np.quantile(ages, np.linspace(0, 1, bands + 1)[1:-1])
    band = np.searchsorted(edges, ages, side="right")
    return labels["male"].to_numpy(dtype=int) * bands + band


def split_indices(
    labels: pd.DataFrame, val_fraction: float = 0.2, seed: int = 42, folds: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices, stratified by sex and age band; k-fold when ``folds`` > 1."""
    y = strata(labels)
    idx = np.arange(len(labels))
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise BoneAgeInputError(f"fold {fold} is not in 0..{folds - 1}")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(splitter.split(idx, y))[fold]
    else:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(idx, y))
    return np.sort(train), np.sort(val)


def _preprocess_file(args: tuple[str, Preprocess]) -> np.ndarray:
    path, prep = args
    return prep(read_radiograph(path).pixels)


class ImageCache:
    """Preprocessed radiographs as ``<root>/<size>px-<hash>/<id>.npy``; a rebuild adds only what is new."""

    def __init__(self, root: str | Path, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self.dir = Path(root) / f"{preprocess.size}px-{preprocess.key()}"

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npy"

    def _load(self, image_id: str) -> np.ndarray | None:
        p = self.path(image_id)
        if not p.is_file():
            return None
        try:
            arr = np.load(p)
        except (ValueError, OSError, EOFError):
            log.warning("cache entry %s is corrupt; rebuilding it", p)
            return None
        size = self.preprocess.size
        return arr if arr.shape == (size, size) and arr.dtype == np.uint8 else None

    def load(self, labels: pd.DataFrame, workers: int = 2, progress: bool = True) -> np.ndarray:
        """All images of ``labels`` (which needs ``id`` and ``path``) as one (N, S, S) uint8 array."""
        self.dir.mkdir(parents=True, exist_ok=True)
        size = self.preprocess.size
        out = np.empty((len(labels), size, size), dtype=np.uint8)
        todo: list[int] = []
        for i, image_id in enumerate(labels["id"]):
            arr = self._load(str(image_id))
            if arr is None:
                todo.append(i)
            else:
                out[i] = arr
        if todo:
            jobs = [(str(labels["path"].iloc[i]), self.preprocess) for i in todo]
            results = self._run(jobs, workers, progress)
            for i, arr in zip(todo, results, strict=True):
                out[i] = arr
                tmp = self.path(str(labels["id"].iloc[i])).with_suffix(".tmp.npy")
                np.save(tmp, arr)
                tmp.replace(self.path(str(labels["id"].iloc[i])))
        return out

    @staticmethod
    def _run(jobs: list[tuple[str, Preprocess]], workers: int, progress: bool) -> list[np.ndarray]:
        from rich.progress import Progress

        results: list[np.ndarray] = []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"preprocessing {len(jobs)} radiographs", total=len(jobs))
            if workers > 1 and len(jobs) > 8:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for arr in pool.map(_preprocess_file, jobs, chunksize=8):
                        results.append(arr)
                        bar.advance(task)
            else:
                for job in jobs:
                    results.append(_preprocess_file(job))
                    bar.advance(task)
        return results


class BoneAgeDataset(Dataset):
    """Preprocessed uint8 images with sex and bone age; yields float tensors the model takes as they are."""

    def __init__(self, images: np.ndarray, male: Sequence[bool], boneage: Sequence[float]) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.male = torch.as_tensor(np.asarray(male, dtype=np.float32))
        self.boneage = torch.as_tensor(np.asarray(boneage, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0), self.male[i], self.boneage[i]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch → float in [0, 1]; done on the device so only bytes cross the bus."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


class BoneAgeDataModule(L.LightningDataModule):
    """Labels → stratified split → cached preprocessed images → loaders."""

    def __init__(self, cfg: Config, progress: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.progress = progress
        self.labels: pd.DataFrame | None = None
        self.train_idx = self.val_idx = np.array([], dtype=int)

    def setup(self, stage: str | None = None) -> None:
        if self.labels is not None:
            return
        d = self.cfg.data
        labels = read_labels(d.labels, d.images)
        if d.limit:
            labels = labels.iloc[: d.limit].reset_index(drop=True)
        self.train_idx, self.val_idx = split_indices(labels, d.val_fraction, d.seed, d.folds, d.fold)
        p = self.cfg.preprocess
        prep = Preprocess(p.size, p.crop, p.contrast, p.low_percentile, p.high_percentile)
        images = ImageCache(d.cache_dir, prep).load(
            labels, workers=max(1, d.num_workers), progress=self.progress
        )
        self.labels = labels
        self.train_set = BoneAgeDataset(
            images[self.train_idx],
            labels["male"].iloc[self.train_idx],
            labels["boneage"].iloc[self.train_idx],
        )
        self.val_set = BoneAgeDataset(
            images[self.val_idx], labels["male"].iloc[self.val_idx], labels["boneage"].iloc[self.val_idx]
        )

    @property
    def target_stats(self) -> tuple[float, float]:
        ages = self.train_set.boneage
        return float(ages.mean()), float(ages.std())

    def train_dataloader(self) -> DataLoader:
        batch = self.cfg.train.batch_size
        return DataLoader(
            self.train_set,
            batch_size=batch,
            shuffle=True,
            drop_last=len(self.train_set) > batch,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.cfg.train.batch_size * 2,
            shuffle=False,
            pin_memory=torch.cuda.is_available(),
        )
