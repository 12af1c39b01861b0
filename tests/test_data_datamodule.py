"""Splits (4:1 stratified, k-fold) and the preprocessed-image cache (reuse, incremental, self-repairing)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import boneage.data.datamodule as data_mod
import boneage.data.shards as cache_mod
from boneage.data.datamodule import BoneAgeDataset, split_indices, strata, to_float
from boneage.data.io import read_radiograph
from boneage.data.labels import read_labels
from boneage.data.preprocess import Preprocess
from boneage.data.shards import ShardCache, ShardDataset, cached_images, shard_cache_path
from boneage.errors import BoneAgeInputError


@pytest.fixture(scope="module")
def real_labels(shared_sample: Path) -> pd.DataFrame:
    return read_labels(shared_sample / "labels.csv", shared_sample / "images")


def _synthetic_labels(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": [str(1000 + i) for i in range(n)],
            "boneage": rng.uniform(6, 228, n).round(),
            "male": rng.random(n) < 0.55,
        }
    )


# ---- splits ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_split_is_4_to_1_disjoint_complete_and_stratified(real_labels: pd.DataFrame) -> None:
    n = len(real_labels)
    assert n == 1001
    train, val = split_indices(real_labels, 0.2, seed=42)
    assert abs(len(val) - n / 5) <= 1 and abs(len(train) - 4 * n / 5) <= 1
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    male = real_labels["male"].to_numpy(dtype=bool)
    assert abs(male[val].mean() - male.mean()) <= 0.05
    assert abs(male[train].mean() - male.mean()) <= 0.05
    # the age distribution is stratified too
    ages = real_labels["boneage"].to_numpy(dtype=float)
    assert abs(np.median(ages[val]) - np.median(ages)) <= 12


@pytest.mark.integration
def test_split_is_deterministic_for_a_seed(real_labels: pd.DataFrame) -> None:
    a = split_indices(real_labels, 0.2, seed=42)
    b = split_indices(real_labels, 0.2, seed=42)
    c = split_indices(real_labels, 0.2, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.integration
def test_kfold_folds_are_disjoint_and_cover_everything(real_labels: pd.DataFrame) -> None:
    n = len(real_labels)
    vals = []
    for fold in range(5):
        train, val = split_indices(real_labels, seed=42, folds=5, fold=fold)
        assert len(np.intersect1d(train, val)) == 0
        assert len(train) + len(val) == n
        assert abs(len(val) - n / 5) <= 1
        vals.append(val)
    everything = np.concatenate(vals)
    assert len(everything) == n  # no image validates twice
    assert np.array_equal(np.sort(everything), np.arange(n))  # every image validates once
    again = split_indices(real_labels, seed=42, folds=5, fold=3)[1]
    assert np.array_equal(again, vals[3])


def test_bad_fold_is_a_user_error() -> None:
    with pytest.raises(BoneAgeInputError, match="fold 5 is not in 0..4"):
        split_indices(_synthetic_labels(100), folds=5, fold=5)


@pytest.mark.parametrize("n", [10, 25, 40, 60])
def test_small_sets_still_split(n: int) -> None:
    """data.limit smoke runs: too few images per sex × age stratum must not crash the split."""
    labels = _synthetic_labels(n)
    train, val = split_indices(labels, 0.2, seed=42)
    assert len(val) == int(np.ceil(0.2 * n))
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    for fold in range(3):
        train, val = split_indices(labels, seed=1, folds=3, fold=fold)
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == n


def test_strata_combine_sex_and_age_band() -> None:
    labels = pd.DataFrame({"boneage": [10, 50, 100, 150, 200] * 2, "male": [False] * 5 + [True] * 5})
    y = strata(labels)
    assert len(set(y[:5])) == 5 and len(set(y[5:])) == 5
    assert set(y[:5]).isdisjoint(set(y[5:]))


# ---- cache ----------------------------------------------------------------------------------------


def _write_images(folder: Path, n: int, start: int = 0) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        img = (rng.random((90, 70)) * 60).astype(np.uint8)
        img[20:70, 15 + i % 5 : 55] = 200 + i  # a bright 'hand', different for every image
        path = folder / f"{i}.png"
        Image.fromarray(img).save(path)
        rows.append({"id": str(i), "boneage": 100.0 + i, "male": bool(i % 2), "path": str(path)})
    return pd.DataFrame(rows)


class _Counter:
    """Counts the files the cache preprocesses (patched in place of ``boneage.cache._encode_job``)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.original = cache_mod._encode_job

    def __call__(self, job):
        self.paths.append(Path(job[1]).stem)
        return self.original(job)


def test_cache_second_load_reads_disk_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _write_images(tmp_path / "img", 4)
    prep = Preprocess(size=32)
    counter = _Counter()
    monkeypatch.setattr(cache_mod, "_encode_job", counter)
    first = cached_images(tmp_path / "cache", prep, labels, workers=1)
    assert first.shape == (4, 32, 32) and first.dtype == np.uint8
    assert sorted(counter.paths) == ["0", "1", "2", "3"]
    folder = shard_cache_path(tmp_path / "cache", prep)
    assert folder.name == f"shards-32px-{prep.key()}-raw"
    cache = ShardCache(folder)
    assert cache.format == "raw" and sorted(cache.labels()["id"]) == ["0", "1", "2", "3"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    counter.paths.clear()
    second = cached_images(tmp_path / "cache", prep, labels.iloc[::-1], workers=1)
    assert counter.paths == []  # nothing preprocessed again
    assert np.array_equal(first[::-1], second)  # in the order of the table asked for
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # nothing rewritten


def test_cache_is_incremental(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _write_images(tmp_path / "img", 3)
    prep = Preprocess(size=32)
    cached_images(tmp_path / "cache", prep, labels, workers=1)
    more = pd.concat([labels, _write_images(tmp_path / "img", 2, start=3)], ignore_index=True)
    counter = _Counter()
    monkeypatch.setattr(cache_mod, "_encode_job", counter)
    out = cached_images(tmp_path / "cache", prep, more, workers=1)
    assert sorted(counter.paths) == ["3", "4"]  # only the new ids
    assert out.shape == (5, 32, 32)
    for i, path in enumerate(more["path"]):
        assert np.array_equal(out[i], prep(read_radiograph(path).pixels))
    assert len(ShardCache(shard_cache_path(tmp_path / "cache", prep)).manifest["shards"]) == 2


def test_other_settings_use_another_folder(tmp_path: Path) -> None:
    labels = _write_images(tmp_path / "img", 2)
    a, b = Preprocess(size=32), Preprocess(size=32, contrast="none")
    assert shard_cache_path(tmp_path / "cache", a) != shard_cache_path(tmp_path / "cache", b)
    cached_images(tmp_path / "cache", a, labels, workers=1)
    out = cached_images(tmp_path / "cache", b, labels, workers=1)
    assert np.array_equal(out[0], b(read_radiograph(labels["path"][0]).pixels))


def test_cached_images_of_an_empty_or_unlabelled_table(tmp_path: Path) -> None:
    labels = _write_images(tmp_path / "img", 2)
    prep = Preprocess(size=32)
    assert cached_images(tmp_path / "cache", prep, labels.iloc[:0]).shape == (0, 32, 32)
    out = cached_images(tmp_path / "cache", prep, labels[["id", "path"]], workers=1)  # no boneage/male
    assert np.array_equal(out[1], prep(read_radiograph(labels["path"][1]).pixels))


def test_unlabelled_reads_keep_the_cached_labels(tmp_path: Path) -> None:
    """Evaluation and bundling read images by id alone: their placeholder labels (0 months, female) must not
    replace the real ones in the manifest, and an unknown (NaN) age must not rewrite it on every call."""
    labels = _write_images(tmp_path / "img", 3)
    prep = Preprocess(size=32)
    cached_images(tmp_path / "cache", prep, labels, workers=1)
    folder = shard_cache_path(tmp_path / "cache", prep)
    before = ShardCache(folder).labels().sort_values("id").reset_index(drop=True)
    cached_images(tmp_path / "cache", prep, labels[["id", "path"]], workers=1)
    after = ShardCache(folder).labels().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before[["id", "boneage", "male"]], after[["id", "boneage", "male"]])

    unknown = labels.assign(boneage=float("nan"))
    report = cache_mod.build_cache(folder, prep, unknown, fmt="raw", workers=1, progress=False)
    assert report.relabelled == 3
    mtime = (folder / cache_mod.MANIFEST).stat().st_mtime_ns
    report = cache_mod.build_cache(folder, prep, unknown, fmt="raw", workers=1, progress=False)
    assert report.relabelled == 0 and (folder / cache_mod.MANIFEST).stat().st_mtime_ns == mtime


def test_same_ids_from_other_files_are_refused(tmp_path: Path) -> None:
    """The native PNG of an id must never be answered with the cached squashed copy of that id."""
    squashed = _write_images(tmp_path / "square", 3)
    native = _write_images(tmp_path / "native", 3)
    prep = Preprocess(size=32)
    cached_images(tmp_path / "cache", prep, squashed, workers=1)
    with pytest.raises(BoneAgeInputError, match=r"image 0 is cached from .*square.*native"):
        cached_images(tmp_path / "cache", prep, native, workers=1)
    assert cached_images(tmp_path / "cache", prep, squashed.iloc[1:], workers=1).shape == (2, 32, 32)


def test_records_without_sources_are_checked_against_the_build_folder(tmp_path: Path) -> None:
    """Caches built before records named their files: the folder the cache was built from decides."""
    squashed = _write_images(tmp_path / "square", 2)
    nested = _write_images(tmp_path / "square" / "images_001", 1)  # NIH-style subfolders of the build folder
    native = _write_images(tmp_path / "native", 2)
    prep = Preprocess(size=32)
    root = tmp_path / "cache"
    cache_mod.build_cache(root, prep, squashed, tmp_path / "square", fmt="raw", workers=1, progress=False)
    manifest = cache_mod.read_manifest(root)
    for shard in manifest["shards"]:
        for rec in shard["records"]:
            rec.pop("source")
    cache_mod._write_manifest(root, manifest)
    cache_mod.build_cache(root, prep, nested, tmp_path / "square", fmt="raw", workers=1, progress=False)
    with pytest.raises(BoneAgeInputError, match="cached from the folder"):
        cache_mod.build_cache(root, prep, native, fmt="raw", workers=1, progress=False)


def test_a_flipped_bit_in_a_raw_shard_is_caught_when_read(tmp_path: Path) -> None:
    """Raw bytes decode whatever they hold; evaluation and bundling must not score a damaged image."""
    labels = _write_images(tmp_path / "img", 2)
    prep = Preprocess(size=32)
    cached_images(tmp_path / "cache", prep, labels, workers=1)
    shard = next(shard_cache_path(tmp_path / "cache", prep).glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first image; the file keeps its size
    shard.write_bytes(bytes(data))
    with pytest.raises(BoneAgeInputError, match="cached image 0 is damaged"):
        cached_images(tmp_path / "cache", prep, labels, workers=1)


def test_damaged_cache_is_a_one_line_error(tmp_path: Path) -> None:
    labels = _write_images(tmp_path / "img", 3)
    prep = Preprocess(size=32)
    cached_images(tmp_path / "cache", prep, labels, workers=1)
    shard = next(shard_cache_path(tmp_path / "cache", prep).glob("shard-*.bin"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(BoneAgeInputError, match="damaged cache") as err:
        cached_images(tmp_path / "cache", prep, labels, workers=1)
    assert "\n" not in str(err.value)


@pytest.mark.integration
def test_cached_equals_direct_preprocessing(
    shared_sample: Path, real_labels: pd.DataFrame, tmp_path: Path
) -> None:
    labels = real_labels.iloc[:4].reset_index(drop=True)
    prep = Preprocess(size=48)
    cached = cached_images(tmp_path, prep, labels, workers=1)
    reread = cached_images(tmp_path, prep, labels, workers=1)
    for i, path in enumerate(labels["path"]):
        direct = prep(read_radiograph(path).pixels)
        assert np.array_equal(cached[i], direct)
        assert np.array_equal(reread[i], direct)


# ---- dataset ----------------------------------------------------------------------------------------


def test_dataset_items_and_to_float() -> None:
    images = np.arange(2 * 32 * 32, dtype=np.int64).reshape(2, 32, 32).astype(np.uint8)
    ds = BoneAgeDataset(images, [True, False], [120.0, 36.0])
    assert len(ds) == 2
    image, male, age = ds[1]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert float(male) == 0.0 and float(age) == 36.0
    x = to_float(image[None])
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert torch.allclose(x[0, 0], torch.from_numpy(images[1]).float() / 255)
    already = torch.rand(1, 1, 4, 4)
    assert to_float(already) is already


# ---- decode=device without a GPU ---------------------------------------------------------------------


def test_device_decode_without_cuda_falls_back_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """data.decode=device on a CPU-only machine keeps working (EncodedImages.decode uses PIL on the CPU,
    see test_cache.py::test_training_runs_from_the_cache_alone) and says once why it is slow."""
    from boneage.config import DataConfig
    from boneage.spec import PreprocessSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dm = data_mod.BoneAgeDataModule(DataConfig(decode="device"), PreprocessSpec(size=32), accelerator="auto")
    with caplog.at_level(logging.WARNING, logger="boneage.data.datamodule"):
        assert dm.decode_mode("jpeg") == "device"
    lines = [r.getMessage() for r in caplog.records if r.name == "boneage.data.datamodule"]
    assert len(lines) == 1 and "data.decode=device without a CUDA device" in lines[0]
    caplog.clear()
    auto = data_mod.BoneAgeDataModule(DataConfig(decode="auto"), PreprocessSpec(size=32), accelerator="auto")
    with caplog.at_level(logging.WARNING, logger="boneage.data.datamodule"):
        assert auto.decode_mode("jpeg") == "worker"
    assert not [r for r in caplog.records if r.name == "boneage.data.datamodule"]


# ---- learning curves and holdout validation (the CPU grids of docs/experiments.md) -------------------


def test_stratified_subset_is_seeded_nested_and_stratified() -> None:
    labels = _synthetic_labels(2000, seed=3)
    idx = np.arange(0, 2000, 2)  # a training split: every other row
    small = data_mod.stratified_subset(labels, idx, 100, seed=7)
    large = data_mod.stratified_subset(labels, idx, 400, seed=7)
    assert len(small) == 100 and len(large) == 400 and len(np.unique(large)) == 400
    assert set(small) <= set(large) <= set(idx)  # nested, and only from the rows given
    assert np.array_equal(small, data_mod.stratified_subset(labels, idx, 100, seed=7))
    assert not np.array_equal(small, data_mod.stratified_subset(labels, idx, 100, seed=8))
    # each sex x age-band stratum keeps its share (within two images)
    full, part = np.bincount(strata(labels.iloc[idx])), np.bincount(strata(labels.iloc[small]), minlength=10)
    assert np.all(np.abs(part - full * 100 / len(idx)) < 2)
    assert np.array_equal(data_mod.stratified_subset(labels, idx, 0), idx)
    assert np.array_equal(data_mod.stratified_subset(labels, idx, 5000), idx)


def _datamodule(tmp_path: Path, **data: object) -> data_mod.BoneAgeDataModule:
    from boneage.config import DataConfig
    from boneage.spec import PreprocessSpec

    table = _write_images(tmp_path / "images", 50)
    table[["id", "boneage", "male"]].to_csv(tmp_path / "labels.csv", index=False)
    table.iloc[::5][["id", "boneage", "male"]].to_csv(tmp_path / "holdout.csv", index=False)  # 10 ids
    cfg = DataConfig(
        images=str(tmp_path / "images"),
        labels=str(tmp_path / "labels.csv"),
        holdout_labels=str(tmp_path / "holdout.csv"),
        cache_dir=str(tmp_path / "cache"),
        num_workers=1,
        **data,
    )
    return data_mod.make_datamodule(cfg, PreprocessSpec(size=32, crop=False), progress=False)


def test_val_from_holdout_validates_on_the_holdout_and_trains_on_all_others(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path, val_from_holdout=True, val_fraction=0.2)
    dm.setup("fit")
    held = set(pd.read_csv(tmp_path / "holdout.csv", dtype=str)["id"])
    val_ids = set(dm.labels.iloc[dm.val_idx]["id"])
    train_ids = set(dm.labels.iloc[dm.train_idx]["id"])
    assert val_ids == held and len(train_ids) == 40 and not train_ids & held  # val_fraction unused
    assert len(dm.val_set) == 10 and len(dm.train_set) == 40 and dm.holdout_set is None
    assert not isinstance(dm.val_dataloader(), list)  # one validation set: the holdout


def test_train_limit_and_epoch_images(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path, val_from_holdout=True, train_limit=20, epoch_images=64)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    assert set(dm.train_idx) <= set(np.flatnonzero(~dm.labels["id"].isin(dm.holdout_labels["id"])))
    loader = dm.train_dataloader()
    assert len(loader) == 4  # 64 images drawn per epoch at batch 16: the 20 repeated, not 1 pass
    seen = torch.cat([age for _, _, age in loader])
    assert len(seen) == 64 and set(seen.tolist()) == set(dm.train_set.boneage.tolist())


def test_val_from_holdout_needs_holdout_labels() -> None:
    from boneage.config import DataConfig
    from boneage.spec import PreprocessSpec

    with pytest.raises(BoneAgeInputError, match="val_from_holdout needs data.holdout_labels"):
        data_mod.make_datamodule(DataConfig(val_from_holdout=True), PreprocessSpec(size=32))


# ---- the shard caches select the ids of select_rows (holdout, val_from_holdout, limits) ---------------

SHARDS = {"decode": "worker"}


def _ids(dm: data_mod.BoneAgeDataModule) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, holdout) ids, in order."""
    ids = dm.labels["id"].astype(str)
    held = [] if dm.holdout_labels is None else dm.holdout_labels["id"].astype(str).tolist()
    return ids.iloc[dm.train_idx].tolist(), ids.iloc[dm.val_idx].tolist(), held


def _expected_ids(dm: data_mod.BoneAgeDataModule) -> tuple[list[str], list[str], list[str]]:
    """What :func:`select_rows` picks from the label CSV itself, without any cache."""
    sel = data_mod.select_rows(dm.read_table(), dm.data)
    ids = sel.labels["id"].astype(str)
    held = [] if sel.holdout is None else sel.holdout["id"].astype(str).tolist()
    return ids.iloc[sel.train_idx].tolist(), ids.iloc[sel.val_idx].tolist(), held


def _held(tmp_path: Path) -> set[str]:
    return set(pd.read_csv(tmp_path / "holdout.csv", dtype=str)["id"])


@pytest.mark.parametrize("named", [False, True], ids=["automatic", "data.cache=PATH"])
def test_shards_never_train_on_the_holdout_and_monitor_it(tmp_path: Path, named: bool) -> None:
    extra = {"cache": str(tmp_path / "named")} if named else {}
    dm = _datamodule(tmp_path, val_fraction=0.2, **SHARDS, **extra)
    dm.setup("fit")
    held = _held(tmp_path)
    train, val, holdout = _ids(dm)
    assert not (set(train) | set(val)) & held and len(train) + len(val) == 40
    assert set(holdout) == held
    # holdout_monitor: a second validation loader over exactly the holdout ids, read from the shard cache
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert isinstance(dm.holdout_set, ShardDataset) and sorted(dm.holdout_set.ids) == sorted(held)
    ages = torch.cat([age for _, _, age in loaders[1]]).tolist()
    assert sorted(ages) == sorted(100.0 + int(i) for i in held)  # _write_images: boneage = 100 + id


def test_default_config_trains_from_the_automatic_raw_cache(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path)
    dm.setup("fit")
    from boneage.data.datamodule import auto_cache_path

    cache = ShardCache(auto_cache_path(dm.data, dm.preprocess))
    assert cache.format == "raw" and cache.root.parent == tmp_path / "cache"
    assert sorted(cache.labels()["id"]) == sorted(dm.read_table()["id"].astype(str))  # holdout ids too
    assert isinstance(dm.train_set, ShardDataset) and dm.train_set.format == "raw"


def test_old_npy_configs_train_from_raw_shards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="boneage.config"):
        dm = _datamodule(tmp_path, cache_format="npy")
    assert dm.data.cache_format == "shards" and dm.data.shard_format == "raw"
    assert [r.getMessage() for r in caplog.records if "cache_format=npy" in r.getMessage()]
    dm.setup("fit")
    assert _ids(dm) == _expected_ids(dm)


def test_saved_npy_era_config_stays_lossless() -> None:
    """A run config saved by v0.2 states every field, including that era's shard_format: jpeg default;
    resuming or bundling it must read the same lossless images it was trained on."""
    from boneage.config import config_from_dict

    saved = {  # the data section of v0.2's saved run config, field for field
        "images": "../shared/data/rsna-bone-age-299/images",
        "labels": "../shared/data/rsna-bone-age-299/labels.csv",
        "val_fraction": 0.05,
        "holdout_labels": "../shared/data/rsna-bone-age-sample/labels.csv",
        "cache_dir": ".cache/boneage",
        "cache": "",
        "cache_format": "npy",
        "shard_format": "jpeg",
        "shard_quality": 95,
        "decode": "auto",
    }
    cfg = config_from_dict({"name": "bundled-v0.2", "data": saved})
    assert cfg.data.cache_format == "shards" and cfg.data.shard_format == "raw"


def test_val_from_holdout_on_shards(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path, val_from_holdout=True, train_limit=20, epoch_images=32, **SHARDS)
    dm.setup("fit")
    train, val, _ = _ids(dm)
    assert set(val) == _held(tmp_path) and len(train) == 20 and not set(train) & set(val)
    assert dm.holdout_set is None and not isinstance(dm.val_dataloader(), list)
    assert len(dm.train_dataloader()) == 2  # epoch_images=32 at batch 16


@pytest.mark.parametrize(
    "data",
    [
        {"val_fraction": 0.2},
        {"val_fraction": 0.25, "seed": 3, "train_limit": 15, "holdout_monitor": False},
        {"val_from_holdout": True, "train_limit": 25},
        {"folds": 4, "fold": 2, "limit": 30},
    ],
    ids=["holdout", "train_limit", "val_from_holdout", "kfold+limit"],
)
@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_shard_caches_select_the_ids_of_select_rows(tmp_path: Path, data: dict, fmt: str) -> None:
    stats = set()
    for extra in ({}, {"cache": str(tmp_path / "named")}):
        dm = _datamodule(tmp_path, **data, **SHARDS, shard_format=fmt, **extra)
        dm.setup("fit")
        expected = _expected_ids(dm)
        assert expected[0] and expected[1] and expected[2]
        assert _ids(dm) == expected, extra
        assert (dm.holdout_set is None) == (not dm.data.holdout_monitor or dm.data.val_from_holdout)
        stats.add(dm.target_stats)
    assert len(stats) == 1  # the same labels from the CSV and from a named cache's manifest


def test_named_cache_built_with_limit_holds_the_holdout(tmp_path: Path) -> None:
    """data.limit=20 builds the first 20 images plus the 6 holdout ids beyond them, so the monitor can read
    them later; the rows used are still those of the automatic cache."""
    auto = _datamodule(tmp_path, limit=20)
    auto.setup("fit")
    dm = _datamodule(tmp_path, limit=20, cache=str(tmp_path / "named"), **SHARDS)
    dm.setup("fit")
    assert ShardCache(tmp_path / "named").count == 26
    assert _ids(dm) == _ids(auto) == _expected_ids(auto) and len(_ids(dm)[2]) == 4


def test_named_cache_without_the_holdout_ids_is_a_one_line_error(tmp_path: Path) -> None:
    from boneage.data.shards import build_cache

    _datamodule(tmp_path)  # writes the images and CSVs
    table = read_labels(tmp_path / "labels.csv", tmp_path / "images")
    keep = table[~table["id"].isin(["0", "5", "10"])]  # 3 of the 10 holdout ids left out
    build_cache(tmp_path / "named", Preprocess(size=32, crop=False), keep, workers=1, progress=False)
    dm = _datamodule(tmp_path, cache=str(tmp_path / "named"), **SHARDS)
    with pytest.raises(BoneAgeInputError, match="3 of the 10 holdout ids") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)
    # held out but not scored: nothing needs to be read from the cache, so the missing ids do not matter
    quiet = _datamodule(tmp_path, cache=str(tmp_path / "named"), holdout_monitor=False, **SHARDS)
    quiet.setup("fit")
    assert not set(_ids(quiet)[0] + _ids(quiet)[1]) & _held(tmp_path)
