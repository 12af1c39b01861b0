"""Splits, datasets and the Lightning DataModule.

Radiographs are large PNGs; decoding and cropping them every epoch would dominate CPU training, so each is
preprocessed once into the shard cache of :mod:`boneage.data.shards` (raw uint8 shards under
``data.cache_dir``, in a folder named by the preprocess settings' hash, unless ``data.cache`` names one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
from torch.utils.data import DataLoader, Dataset, RandomSampler

from boneage.config import Config, DataConfig, TrainConfig, TrainerConfig
from boneage.data.preprocess import Preprocess
from boneage.data.shards import (
    MANIFEST,
    ShardCache,
    build_cache,
    cache_rows,
    raise_failures,
    shard_cache_path,
)
from boneage.data.sources import SOURCES, group_split, read_source
from boneage.errors import BoneAgeInputError
from boneage.progress import ProgressOption
from boneage.spec import PreprocessSpec

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
    idx = np.arange(len(labels))
    n_val = int(np.ceil(val_fraction * len(labels)))
    for bands in (5, 4, 3, 2, 1, 0):  # a small set (data.limit) gets coarser strata until each can be split
        y = strata(labels, bands) if bands else np.zeros(len(labels), dtype=int)
        counts = np.bincount(y)[np.bincount(y) > 0]
        if folds and folds > 1:
            if counts.min() >= folds:
                break
        elif counts.min() >= 2 and len(counts) <= min(n_val, len(labels) - n_val):
            break
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise BoneAgeInputError(f"fold {fold} is not in 0..{folds - 1}")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(splitter.split(idx, y))[fold]
    else:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(idx, y))
    return np.sort(train), np.sort(val)


def stratified_subset(labels: pd.DataFrame, idx: np.ndarray, n: int, seed: int = 42) -> np.ndarray:
    """``n`` of the rows ``idx`` (sorted), stratified by sex and age band and seeded; nested: with one seed,
    the subset for a smaller ``n`` lies inside the subset for a larger one (a learning curve adds images)."""
    idx = np.asarray(idx)
    if n <= 0 or n >= len(idx):
        return np.sort(idx)
    rng = np.random.default_rng(seed)
    y = strata(labels.iloc[idx], 5)
    # the k-th of a stratum's m shuffled members sits at (k + u) / m along [0, 1): the first n positions take
    # each stratum in proportion to its size, and the order is the same for every n
    position = np.empty(len(idx))
    for stratum in np.unique(y):
        members = np.flatnonzero(y == stratum)
        rng.shuffle(members)
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = np.lexsort((rng.random(len(idx)), position))
    return np.sort(idx[order[:n]])


def holdout_ids(csv: str | Path) -> set[str]:
    """The ids listed in ``csv`` (any RSNA layout; only its id column is read)."""
    p = Path(csv)
    if not p.is_file():
        raise BoneAgeInputError("holdout labels file not found", p)
    try:
        table = pd.read_csv(p, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise BoneAgeInputError(f"not a readable CSV ({type(exc).__name__})", p) from None
    column = next((c for c in table.columns if c.strip().lower() in {"id", "case id", "image id"}), None)
    if column is None:
        raise BoneAgeInputError("holdout labels have no id column", p)
    return set(table[column].astype(str).str.strip())


def holdout_mask(labels: pd.DataFrame, csv: str | Path) -> np.ndarray:
    """Rows of ``labels`` whose id is listed in ``csv`` (any RSNA layout; only its ids are read)."""
    return labels["id"].astype(str).isin(holdout_ids(csv)).to_numpy()


def split_rows(labels: pd.DataFrame, d: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows of ``labels``: stratified by sex and age band; by patient when the source
    knows patients (NIH, MURA), so follow-up films of a validation patient never appear in training."""
    if "patient" in labels:
        return group_split(labels["patient"], d.val_fraction, d.seed, d.folds, d.fold)
    return split_indices(labels, d.val_fraction, d.seed, d.folds, d.fold)


@dataclass(frozen=True)
class Selection:
    """Which rows of a label table train, validate and are scored as the holdout (see :func:`select_rows`)."""

    labels: pd.DataFrame  # rows in use: data.limit applied, holdout rows out (kept with val_from_holdout)
    train_idx: np.ndarray  # rows of `labels`
    val_idx: np.ndarray
    holdout: pd.DataFrame | None  # the data.holdout_labels rows (None without holdout_labels)
    monitor: bool  # `holdout` is scored each epoch as a second validation set (holdout_mae)


def select_rows(labels: pd.DataFrame, d: DataConfig) -> Selection:
    """The one id selection of every image cache: ``data.limit`` → holdout (``data.holdout_labels`` never
    trains; with ``val_from_holdout`` it is the validation set) → train/validation split → ``train_limit``."""
    if d.limit:
        labels = labels.iloc[: d.limit]
    labels = labels.reset_index(drop=True)
    holdout, validation = None, None
    if d.holdout_labels:
        held = holdout_mask(labels, d.holdout_labels)
        holdout = labels[held].reset_index(drop=True)
        if d.val_from_holdout:
            if not held.any():
                raise BoneAgeInputError("none of the holdout ids is in data.labels", d.holdout_labels)
            validation = held
            log.info("validating on the %d images listed in %s", int(held.sum()), d.holdout_labels)
        else:
            labels = labels[~held].reset_index(drop=True)
            log.info("held out %d images listed in %s", len(holdout), d.holdout_labels)
    if validation is not None:
        train_idx, val_idx = np.flatnonzero(~validation), np.flatnonzero(validation)
    else:
        train_idx, val_idx = split_rows(labels, d)
    if d.train_limit:
        train_idx = stratified_subset(labels, train_idx, d.train_limit, d.seed)
    monitor = bool(d.holdout_monitor and holdout is not None and len(holdout) and validation is None)
    return Selection(labels, train_idx, val_idx, holdout, monitor)


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
    """Labels (RSNA, or NIH/MURA through ``boneage.sources``) → split → cached preprocessed images → loaders.

    It gets only what it uses: the ``data`` section, the preprocessing spec, the batch size and whether
    training runs on CUDA (where shard JPEGs can be decoded on the device).
    """

    def __init__(
        self,
        data: DataConfig,
        preprocess: PreprocessSpec,
        *,
        batch_size: int = 16,
        accelerator: str = "auto",
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.data = data
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.accelerator = accelerator
        self.progress = progress
        self.labels: pd.DataFrame | None = None
        self.holdout_labels: pd.DataFrame | None = None  # data.holdout_labels rows: never trained on
        self.holdout_set: Dataset | None = None  # scored each epoch when data.holdout_monitor
        self.train_idx = self.val_idx = np.array([], dtype=int)

    def setup(self, stage: str | None = None) -> None:
        """Labels → :func:`select_rows` → datasets over the shard cache (``data.cache``, or the automatic one
        under ``data.cache_dir``), built or updated first when needed (see ``training_cache``).
        """
        if self.labels is not None:
            return
        d = self.data
        table = None if d.cache else self.read_table()
        cache, rows = training_cache(d, self.preprocess, progress=self.progress, table=table)
        sel = self._select(rows)
        decode = self.decode_mode(cache.format)
        if sel.monitor:
            self.holdout_set = cache.dataset(sel.holdout, decode)
        self.train_set = cache.dataset(sel.labels.iloc[self.train_idx], decode)
        self.val_set = cache.dataset(sel.labels.iloc[self.val_idx], decode)
        self.labels = sel.labels

    def _select(self, table: pd.DataFrame) -> Selection:
        """The shared id selection; ``labels`` is set once the datasets exist (setup then counts as done)."""
        sel = select_rows(table, self.data)
        self.train_idx, self.val_idx = sel.train_idx, sel.val_idx
        self.holdout_labels = sel.holdout
        return sel

    def read_table(self) -> pd.DataFrame:
        """The tidy ``id, boneage, male, path`` table of ``data.source`` (RSNA, NIH or MURA)."""
        return read_source(self.data)

    def decode_mode(self, fmt: str) -> str:
        """Where shard images are decoded: ``device`` (the batch, after the transfer: nvJPEG on a GPU) or
        ``worker`` (each image on the CPU in the loader). ``auto``: device for JPEG when training on CUDA."""
        mode = self.data.decode
        accelerator = str(self.accelerator).lower()
        on_cuda = torch.cuda.is_available() and accelerator in {"auto", "gpu", "cuda"}
        if mode == "auto":
            return "device" if fmt == "jpeg" and on_cuda else "worker"
        if mode not in {"device", "worker"}:
            raise BoneAgeInputError(f"unknown data.decode {mode!r} (auto, device or worker)")
        if mode == "device" and not on_cuda:  # works (EncodedImages.decode falls back to PIL), but slowly
            log.warning(
                "data.decode=device without a CUDA device: each batch is decoded on the CPU in the training "
                "process; data.decode=worker (or auto) spreads that over the loader workers"
            )
        return mode

    def _loader_options(self, dataset: Dataset) -> dict:
        """Encoded shard batches keep their own collate; JPEG/PNG shard datasets use loader workers (all of
        them to decode on the CPU, up to 2 to gather bytes ahead of the GPU); raw shards decoded here need
        none; host memory is pinned for asynchronous copies when there is a GPU."""
        collate = getattr(dataset, "collate", None)
        decode = getattr(dataset, "decode", "")
        # raw shards need no decoding: a batch is a few copies out of the memory map, ~14k images/s (256 px)
        # in this process, no slower than 2 workers and ≫ ~33 images/s of CPU training; no workers also
        # keeps the loader's RNG use that of a plain in-memory set (a resumed run repeats a straight one)
        raw = getattr(dataset, "format", "") == "raw"
        workers = self.data.num_workers if decode == "worker" and not raw else 0
        if decode == "device":
            workers = min(2, self.data.num_workers)
        return {
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": collate() if callable(collate) else None,
            "num_workers": workers,
            "persistent_workers": workers > 0,
        }

    def _val_sampler(self, dataset: Dataset | None = None) -> object | None:
        """Under DDP each rank validates a disjoint share of the set, without the padding (repeated images)
        Lightning's default DistributedSampler adds, so the summed errors give the exact validation MAE."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(
            dataset if dataset is not None else self.val_set,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=False,
        )

    @property
    def target_stats(self) -> tuple[float, float]:
        ages = self.train_set.boneage
        return float(ages.mean()), float(ages.std())

    def train_dataloader(self) -> DataLoader:
        batch = self.batch_size
        if self.data.epoch_images:  # a fixed epoch length: the set repeated (reshuffled each pass) or cut
            return DataLoader(
                self.train_set,
                batch_size=batch,
                sampler=RandomSampler(self.train_set, num_samples=self.data.epoch_images),
                drop_last=self.data.epoch_images > batch,
                **self._loader_options(self.train_set),
            )
        return DataLoader(
            self.train_set,
            batch_size=batch,
            shuffle=True,
            drop_last=len(self.train_set) > batch,
            **self._loader_options(self.train_set),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split (which picks best.ckpt), then the holdout set when one is monitored."""
        loaders = [
            DataLoader(
                ds,
                batch_size=self.batch_size * 2,
                shuffle=False,
                sampler=self._val_sampler(ds),
                **self._loader_options(ds),
            )
            for ds in (self.val_set, self.holdout_set)
            if ds is not None
        ]
        return loaders[0] if len(loaders) == 1 else loaders


def make_datamodule(
    data: DataConfig,
    preprocess: PreprocessSpec,
    train: TrainConfig | None = None,
    trainer: TrainerConfig | None = None,
    *,
    progress: bool = True,
) -> BoneAgeDataModule:
    """The data module for ``data.source``, checked before any image is read."""
    if data.source not in SOURCES:
        raise BoneAgeInputError(f"unknown data.source {data.source!r} ({', '.join(SOURCES)})")
    if data.val_from_holdout and not data.holdout_labels:
        raise BoneAgeInputError("data.val_from_holdout needs data.holdout_labels (the validation ids)")
    if data.source != "rsna" and data.cache:
        raise BoneAgeInputError(
            f"data.cache holds RSNA labels only; data.source={data.source} trains from its own table with "
            "the automatic cache under data.cache_dir (leave data.cache empty)"
        )
    return BoneAgeDataModule(
        data,
        preprocess,
        batch_size=(train or TrainConfig()).batch_size,
        accelerator=(trainer or TrainerConfig()).accelerator,
        progress=progress,
    )


def datamodule_from_config(cfg: Config, progress: bool = True) -> BoneAgeDataModule:
    """Convenience for notebooks and tests: the data module of a whole run config."""
    return make_datamodule(cfg.data, cfg.preprocess, cfg.train, cfg.trainer, progress=progress)


# ------------------------------------------------------------------------- what to cache, and from where
def auto_cache_path(d: DataConfig, p: PreprocessSpec) -> Path:
    """Where training keeps its cache without ``data.cache``: keyed by preprocess settings and format."""
    return shard_cache_path(d.cache_dir, Preprocess.from_config(p), d.shard_format, d.shard_quality)


def training_cache(
    d: DataConfig, p: PreprocessSpec, progress: ProgressOption = True, table: pd.DataFrame | None = None
) -> tuple[ShardCache, pd.DataFrame]:
    """The shard cache a ``data`` section names, built or updated first when needed, and the rows to use.

    ``data.cache: PATH``: the cache *is* the dataset (labels included); data.images/data.labels are read
    only to build it when PATH holds no cache yet. Without ``data.cache``: a cache under ``data.cache_dir``
    (:func:`auto_cache_path`) kept in step with the source table (``table``, or ``read_source(d)``: RSNA,
    NIH or MURA), whose rows, order and columns (labels, ``patient``...) are returned with where each image
    is; only the images come from the cache.
    The rows are then chosen by ``boneage.data.select_rows``. When the holdout is scored
    (``data.holdout_monitor`` or ``data.val_from_holdout``) its images come from the cache too: building a
    ``data.cache`` adds them (even beyond ``data.limit``), and a ``data.cache`` that lacks some is an error;
    the automatic cache gets them from the source table like every other row.
    """
    prep = Preprocess.from_config(p)
    build = {
        "fmt": d.shard_format,
        "quality": d.shard_quality,
        "workers": max(1, d.num_workers),
        "progress": progress,
    }
    source: pd.DataFrame | None = None
    scored: set[str] = set()  # holdout ids read from the cache (a second validation set, or the first)
    if d.holdout_labels and (d.holdout_monitor or d.val_from_holdout):
        scored = holdout_ids(d.holdout_labels)
    if d.cache:
        root = Path(d.cache)
        if not (root / MANIFEST).is_file():
            if not (Path(d.labels).is_file() and Path(d.images).is_dir()):
                raise BoneAgeInputError(
                    f"no shard cache here, and data.images ({d.images}) / data.labels ({d.labels}) are "
                    "not available to build one",
                    root,
                )
            report = build_cache(root, prep, d.labels, d.images, limit=d.limit, include=scored, **build)
            raise_failures(report)
    else:
        root = auto_cache_path(d, p)
        source = read_source(d) if table is None else table
        if d.limit:
            source = source.iloc[: d.limit]
        source = source.reset_index(drop=True)
        raise_failures(build_cache(root, prep, source, d.images, **build))
    cache = ShardCache(root)
    cache.check_settings(prep)
    if d.cache_verify:
        cache.check()
    if source is not None:  # the source table decides which images, in which order, with which labels
        return cache, cache_rows(cache, source)
    rows = cache.labels()
    if scored:
        missing = scored - set(rows["id"].astype(str))
        if missing:
            raise BoneAgeInputError(
                f"{len(missing)} of the {len(scored)} holdout ids in {d.holdout_labels} are not in this "
                "shard cache (data.holdout_monitor / data.val_from_holdout read them from it); add them with "
                "`boneage cache build` or set data.holdout_monitor=false",
                root,
            )
    if d.limit:
        rows = rows.iloc[: d.limit].reset_index(drop=True)
    return cache, rows
