"""Splits (4:1 stratified, k-fold) and the preprocessed-image cache (reuse, incremental, self-repairing)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import boneage.data as data_mod
from boneage.data import BoneAgeDataset, ImageCache, split_indices, strata, to_float
from boneage.errors import BoneAgeInputError
from boneage.io import read_radiograph
from boneage.labels import read_labels
from boneage.preprocess import Preprocess


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
    """Counts the files the cache preprocesses (patched in place of ``boneage.data._preprocess_file``)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.original = data_mod._preprocess_file

    def __call__(self, job):
        self.paths.append(Path(job[0]).stem)
        return self.original(job)


def test_cache_second_load_reads_disk_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _write_images(tmp_path / "img", 4)
    prep = Preprocess(size=32)
    counter = _Counter()
    monkeypatch.setattr(data_mod, "_preprocess_file", counter)
    first = ImageCache(tmp_path / "cache", prep).load(labels, workers=1, progress=False)
    assert first.shape == (4, 32, 32) and first.dtype == np.uint8
    assert sorted(counter.paths) == ["0", "1", "2", "3"]
    cache = ImageCache(tmp_path / "cache", prep)
    assert cache.dir.name == f"32px-{prep.key()}"
    assert sorted(p.name for p in cache.dir.iterdir()) == ["0.npy", "1.npy", "2.npy", "3.npy"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.dir.iterdir()}

    counter.paths.clear()
    second = cache.load(labels, workers=1, progress=False)
    assert counter.paths == []  # nothing preprocessed again
    assert np.array_equal(first, second)
    assert {p.name: p.stat().st_mtime_ns for p in cache.dir.iterdir()} == mtimes  # nothing rewritten


def test_cache_is_incremental(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _write_images(tmp_path / "img", 3)
    prep = Preprocess(size=32)
    cache = ImageCache(tmp_path / "cache", prep)
    cache.load(labels, workers=1, progress=False)
    more = pd.concat([labels, _write_images(tmp_path / "img", 2, start=3)], ignore_index=True)
    counter = _Counter()
    monkeypatch.setattr(data_mod, "_preprocess_file", counter)
    out = cache.load(more, workers=1, progress=False)
    assert sorted(counter.paths) == ["3", "4"]  # only the new ids
    assert out.shape == (5, 32, 32)
    for i, path in enumerate(more["path"]):
        assert np.array_equal(out[i], prep(read_radiograph(path).pixels))


def test_other_settings_use_another_folder(tmp_path: Path) -> None:
    labels = _write_images(tmp_path / "img", 2)
    a = ImageCache(tmp_path / "cache", Preprocess(size=32))
    b = ImageCache(tmp_path / "cache", Preprocess(size=32, contrast="none"))
    assert a.dir != b.dir
    a.load(labels, workers=1, progress=False)
    out = b.load(labels, workers=1, progress=False)
    assert np.array_equal(
        out[0], Preprocess(size=32, contrast="none")(read_radiograph(labels["path"][0]).pixels)
    )


def test_corrupt_and_wrong_entries_are_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    labels = _write_images(tmp_path / "img", 3)
    prep = Preprocess(size=32)
    cache = ImageCache(tmp_path / "cache", prep)
    good = cache.load(labels, workers=1, progress=False)
    cache.path("1").write_bytes(b"\x93NUMPY garbage, a half-written file")
    np.save(cache.path("2"), np.zeros((16, 16), dtype=np.uint8))  # stale shape
    counter = _Counter()
    monkeypatch.setattr(data_mod, "_preprocess_file", counter)
    with caplog.at_level(logging.WARNING, logger="boneage.data"):
        out = cache.load(labels, workers=1, progress=False)
    assert sorted(counter.paths) == ["1", "2"]
    assert "corrupt" in caplog.text
    assert np.array_equal(out, good)
    assert np.array_equal(np.load(cache.path("1")), good[1])  # the entry on disk is repaired
    assert np.load(cache.path("2")).shape == (32, 32)
    assert not list(cache.dir.glob("*.tmp.npy"))


@pytest.mark.integration
def test_cached_equals_direct_preprocessing(
    shared_sample: Path, real_labels: pd.DataFrame, tmp_path: Path
) -> None:
    labels = real_labels.iloc[:4].reset_index(drop=True)
    prep = Preprocess(size=48)
    cached = ImageCache(tmp_path, prep).load(labels, workers=1, progress=False)
    reread = ImageCache(tmp_path, prep).load(labels, workers=1, progress=False)
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
    with caplog.at_level(logging.WARNING, logger="boneage.data"):
        assert dm.decode_mode("jpeg") == "device"
    lines = [r.getMessage() for r in caplog.records if r.name == "boneage.data"]
    assert len(lines) == 1 and "data.decode=device without a CUDA device" in lines[0]
    caplog.clear()
    auto = data_mod.BoneAgeDataModule(DataConfig(decode="auto"), PreprocessSpec(size=32), accelerator="auto")
    with caplog.at_level(logging.WARNING, logger="boneage.data"):
        assert auto.decode_mode("jpeg") == "worker"
    assert not [r for r in caplog.records if r.name == "boneage.data"]
