"""Shard caches: build, incremental add, corruption detection, equality with the uncached path, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import boneage.data.shards as cache_mod
from boneage.config import Config
from boneage.data.datamodule import datamodule_from_config
from boneage.data.io import read_radiograph
from boneage.data.preprocess import Preprocess
from boneage.data.shards import (
    EncodedCollate,
    EncodedImages,
    ShardCache,
    build_cache,
    decode_image,
    encode_image,
)
from boneage.errors import BoneAgeInputError

SIZE = 32
PREP = Preprocess(size=SIZE)


def _radiograph(rng: np.random.Generator, h: int = 72, w: int = 56) -> np.ndarray:
    """A dark film with a bright off-centre 'hand' blob and noise, so crop and contrast have work to do."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    blob = np.exp(-(((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.2 * w)) ** 2))
    img = 20 + 200 * blob + rng.normal(0, 8, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _dataset(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic radiographs ``<root>/images/<id>.png`` and ``<root>/labels-<n>.csv`` listing them."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image_id = str(5000 + i)
        path = images / f"{image_id}.png"
        if not path.exists():
            Image.fromarray(_radiograph(np.random.default_rng(1000 + i))).save(path)
        rows.append((image_id, float(rng.integers(12, 216)), bool(i % 2)))
    labels = root / f"labels-{n}.csv"
    pd.DataFrame(rows, columns=["id", "boneage", "male"]).to_csv(labels, index=False)
    return images, labels


def _flip_bytes(path: Path, at: int, count: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        chunk = f.read(count)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in chunk))


# ---- codecs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_lossless_formats_round_trip_exactly(fmt: str) -> None:
    img = _radiograph(np.random.default_rng(0), 40, 40)
    assert np.array_equal(decode_image(encode_image(img, fmt), fmt, 40), img)


def test_jpeg_round_trip_is_close_and_small() -> None:
    img = PREP(_radiograph(np.random.default_rng(0)).astype(np.float32) / 255)
    data = encode_image(img, "jpeg", quality=95)
    assert data[:3] == b"\xff\xd8\xff"
    assert b"\xff\xc2" not in data  # baseline, not progressive: what nvJPEG's hardware decoder takes
    back = decode_image(data, "jpeg", SIZE)
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 2.0


# ---- build, incremental, verify ----------------------------------------------------------------------


def test_build_writes_manifest_shards_and_labels(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 10)
    out = tmp_path / "cache"
    report = build_cache(out, PREP, labels, images, fmt="jpeg", quality=90, workers=2, progress=False)
    assert (report.added, report.already, report.failed) == (10, 0, [])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "boneage-shard-cache" and manifest["count"] == 10
    assert manifest["preprocess"] == PREP.to_dict() and manifest["preprocess_key"] == PREP.key()
    assert manifest["format"] == "jpeg" and manifest["quality"] == 90
    shard = manifest["shards"][0]
    assert shard["file"] == "shard-00000.bin" and (out / shard["file"]).stat().st_size == shard["bytes"]
    assert {"id", "boneage", "male", "offset", "length", "crc32"} <= set(shard["records"][0])
    cache = ShardCache(out)
    assert cache.verify() == []
    table = cache.labels()
    csv = pd.read_csv(labels, dtype={"id": str})
    assert table["id"].tolist() == csv["id"].tolist()  # build order = CSV order
    assert np.allclose(table["boneage"], csv["boneage"]) and (table["male"] == csv["male"]).all()
    assert not list(out.glob("*.partial"))


def test_rebuild_adds_only_new_ids_as_new_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, first = _dataset(tmp_path, 6)
    out = tmp_path / "cache"
    build_cache(out, PREP, first, images, fmt="png", workers=1, progress=False)
    sha_before = ShardCache(out).manifest["shards"][0]["sha256"]
    seen: list[str] = []
    real = cache_mod._encode_job

    def spy(job):  # type: ignore[no-untyped-def]
        seen.append(Path(job[1]).stem)
        return real(job)

    monkeypatch.setattr(cache_mod, "_encode_job", spy)
    _, second = _dataset(tmp_path, 9)
    report = build_cache(out, PREP, second, images, fmt="png", workers=1, progress=False)
    assert sorted(seen) == ["5006", "5007", "5008"]
    assert (report.added, report.already, report.shards_added) == (3, 6, ["shard-00001.bin"])
    cache = ShardCache(out)
    assert [s["file"] for s in cache.manifest["shards"]] == ["shard-00000.bin", "shard-00001.bin"]
    assert cache.manifest["shards"][0]["sha256"] == sha_before and cache.count == 9
    seen.clear()
    again = build_cache(out, PREP, second, images, fmt="png", workers=1, progress=False)
    assert seen == [] and again.added == 0 and again.already == 9


def test_build_reports_progress_through_a_callback(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 3)
    out = tmp_path / "cache"
    calls: list[tuple[int, int]] = []
    build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=lambda *a: calls.append(a))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    calls.clear()
    build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=lambda *a: calls.append(a))
    assert calls == []  # nothing to encode, nothing to report


def test_changed_label_updates_manifest_without_reencoding(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 4)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=False)
    table = pd.read_csv(labels, dtype={"id": str})
    table.loc[1, "boneage"] = 99.0
    table.to_csv(labels, index=False)
    report = build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=False)
    assert (report.added, report.relabelled) == (0, 1)
    assert ShardCache(out).labels()["boneage"].iloc[1] == 99.0


def test_small_shard_limit_splits_into_several_shards(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 5)
    out = tmp_path / "cache"
    report = build_cache(out, PREP, labels, images, fmt="raw", workers=1, shard_mb=2.5 * SIZE * SIZE / 2**20)
    assert len(report.shards_added) == 2  # 3 raw images fill the first shard, 2 go to the next
    assert ShardCache(out).verify() == [] and ShardCache(out).count == 5


def test_other_settings_in_the_same_folder_are_refused(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 3)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="jpeg", quality=95, workers=1, progress=False)
    with pytest.raises(BoneAgeInputError, match="other settings"):
        build_cache(out, PREP, labels, images, fmt="jpeg", quality=80, workers=1, progress=False)
    with pytest.raises(BoneAgeInputError, match="other settings"):
        build_cache(out, Preprocess(size=48), labels, images, fmt="jpeg", workers=1, progress=False)
    with pytest.raises(BoneAgeInputError, match="contrast"):
        ShardCache(out).check_settings(Preprocess(size=SIZE, contrast="none"))


def test_unreadable_image_is_reported_and_skipped(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 4)
    (images / "5002.png").write_bytes(b"not a png at all")
    report = build_cache(tmp_path / "c", PREP, labels, images, fmt="raw", workers=1, progress=False)
    assert report.added == 3 and [i for i, _ in report.failed] == ["5002"]


def test_flipped_bytes_are_detected_and_named(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 6)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="png", workers=1, progress=False)
    cache = ShardCache(out)
    victim = cache.manifest["shards"][0]["records"][2]
    _flip_bytes(out / "shard-00000.bin", victim["offset"] + victim["length"] // 2)
    problems = ShardCache(out).verify()
    assert len(problems) == 1 and "shard-00000.bin" in problems[0] and victim["id"] in problems[0]
    with pytest.raises(BoneAgeInputError, match=r"shard-00000\.bin.*checksum mismatch"):
        ShardCache(out).check()
    # the training side sees the same error, before any image is decoded
    cfg = _cache_config(out, tmp_path)
    with pytest.raises(BoneAgeInputError, match=r"shard-00000\.bin"):
        datamodule_from_config(cfg, progress=False).setup("fit")


def test_truncated_shard_is_detected_and_repair_rebuilds_it(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 4)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=False)
    shard = out / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(BoneAgeInputError, match=r"shard-00000\.bin: truncated"):
        ShardCache(out).check()
    with pytest.raises(BoneAgeInputError, match="damaged cache"):  # no silent add on top of it
        build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=False)
    runner = CliRunner()
    from boneage.cli import app

    result = runner.invoke(app, ["cache", "verify", str(out)])
    assert result.exit_code == 2 and "shard-00000.bin" in result.output
    result = runner.invoke(app, ["cache", "verify", str(out), "--drop-corrupt", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["dropped"] == 1
    report = build_cache(out, PREP, labels, images, fmt="raw", workers=1, progress=False)
    assert report.added == 4 and ShardCache(out).verify() == []


def test_cli_build_reads_preprocess_from_config_and_options(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 3)
    config = tmp_path / "c.yaml"
    config.write_text("preprocess:\n  size: 40\n  contrast: none\n")
    from boneage.cli import app

    out = tmp_path / "cache"
    args = ["cache", "build", "--images", str(images), "--labels", str(labels), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--config", str(config), "--no-crop", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 added" in result.output
    assert ShardCache(out).preprocess == Preprocess(size=40, crop=False, contrast="none")
    result = CliRunner().invoke(app, ["cache", "verify", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"] is True


# ---- reading: equality with the uncached path, device decode, training ------------------------------


def _cache_config(cache: Path | None, tmp_path: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.images, cfg.data.labels = str(tmp_path / "images"), str(tmp_path / "labels-12.csv")
    cfg.data.cache_dir = str(tmp_path / "auto")
    cfg.data.cache = str(cache) if cache else ""
    cfg.data.num_workers = 0
    cfg.data.val_fraction = 0.25
    cfg.preprocess.size = SIZE
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _items(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    images, male, age = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).numpy(), torch.stack(male).numpy(), torch.stack(age).numpy()


def _uncached(cfg: Config, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the datasets should yield for ``rows``, read and preprocessed directly from the files."""
    prep = Preprocess.from_config(cfg.preprocess)
    images = np.stack([prep(read_radiograph(path).pixels) for path in rows["path"]])[:, None]
    return images, rows["male"].to_numpy(np.float32), rows["boneage"].to_numpy(np.float32)


@pytest.mark.parametrize("fmt", ["png", "raw", "jpeg"])
def test_samples_equal_the_uncached_path(tmp_path: Path, fmt: str) -> None:
    """Lossless shards give exactly the preprocessed files, the split of select_rows and the CSV's labels;
    JPEG is within q95's error."""
    from boneage.data.datamodule import select_rows
    from boneage.data.labels import read_labels

    _dataset(tmp_path, 12)
    cfg = _cache_config(None, tmp_path, cache_format="shards", shard_format=fmt, decode="worker")
    sel = select_rows(read_labels(cfg.data.labels, cfg.data.images), cfg.data)
    shards = datamodule_from_config(cfg, progress=False)
    shards.setup("fit")
    assert np.array_equal(sel.train_idx, shards.train_idx) and np.array_equal(sel.val_idx, shards.val_idx)
    for idx, b_set in ((sel.train_idx, shards.train_set), (sel.val_idx, shards.val_set)):
        a, b = _uncached(cfg, sel.labels.iloc[idx]), _items(b_set)
        assert a[0].shape == b[0].shape and b[0].dtype == np.uint8
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_array_equal(b_set.array(), b[0][:, 0])
        if fmt == "jpeg":
            diff = np.abs(a[0].astype(int) - b[0].astype(int))
            assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12
        else:
            np.testing.assert_array_equal(a[0], b[0])


def test_device_decode_batches_encoded_bytes(tmp_path: Path) -> None:
    images, labels = _dataset(tmp_path, 6)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="jpeg", workers=1, progress=False)
    cache = ShardCache(out)
    table = cache.labels()
    by_worker = cache.dataset(table, "worker")
    by_device = cache.dataset(table, "device")
    item = by_device[0][0]
    assert item.dtype == torch.uint8 and item.ndim == 1 and bytes(item[:3].tolist()) == b"\xff\xd8\xff"
    collate = by_device.collate()
    assert isinstance(collate, EncodedCollate) and by_worker.collate() is None
    batch, male, age = collate([by_device[i] for i in range(len(by_device))])
    assert isinstance(batch, EncodedImages) and len(batch) == 6 and male.shape == age.shape == (6,)
    decoded = batch.decode("cpu")
    assert decoded.shape == (6, 1, SIZE, SIZE) and decoded.dtype == torch.uint8
    expected = torch.stack([by_worker[i][0] for i in range(6)])
    assert torch.equal(decoded, expected)  # the same decoder on the CPU: identical pixels


def test_encoded_batch_stays_on_host_and_pins_as_one_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's transfer moves sex and age but must leave the JPEG bytes on the host (nvJPEG reads them
    there); the DataLoader's pinning makes one buffer whose views are the images."""
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data._utils.pin_memory import pin_memory

    images, labels = _dataset(tmp_path, 3)
    build_cache(tmp_path / "c", PREP, labels, images, fmt="jpeg", workers=1, progress=False)
    data = ShardCache(tmp_path / "c").dataset(ShardCache(tmp_path / "c").labels(), "device")
    batch = data.collate()([data[i] for i in range(3)])
    moved = move_data_to_device(batch, torch.device("meta"))
    assert moved[0] is batch[0] and moved[1].device.type == "meta" and moved[2].device.type == "meta"
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())  # no CUDA here
    pinned = pin_memory(batch)[0]
    assert isinstance(pinned, EncodedImages) and len(pinned) == 3
    assert pinned.data[0].untyped_storage().data_ptr() == pinned.data[2].untyped_storage().data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(pinned.data, batch[0].data, strict=True))
    assert torch.equal(pinned.decode("cpu"), batch[0].decode("cpu"))


def _tiny_training(cfg) -> None:
    """A 1-epoch CPU run of the tiny test network: enough to exercise the cache → training path."""
    cfg.model.backbone, cfg.model.pretrained, cfg.model.head = "test_efficientnet", "none", [8]
    cfg.model.sex_units, cfg.model.preset = 4, ""
    cfg.train.epochs, cfg.train.batch_size = 1, 4
    cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 1
    cfg.trainer.progress_bar = False


def test_training_runs_from_the_cache_alone(tmp_path: Path) -> None:
    """data.cache holds images and labels: train with no images folder or CSV, the batches decoded after
    the transfer (on the CPU here; the same code hands JPEGs to nvJPEG on a GPU)."""
    from boneage.train.loop import train

    images, labels = _dataset(tmp_path, 12)
    out = tmp_path / "cache"
    build_cache(out, PREP, labels, images, fmt="jpeg", workers=1, progress=False)
    cfg = _cache_config(out, tmp_path, decode="device")
    cfg.data.images, cfg.data.labels = str(tmp_path / "gone"), str(tmp_path / "gone.csv")
    _tiny_training(cfg)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["train_images"] == 9 and summary["val_images"] == 3
    assert summary["best_val_mae"] is not None and np.isfinite(summary["best_val_mae"])


def test_missing_cache_without_sources_is_a_user_error(tmp_path: Path) -> None:
    cfg = _cache_config(tmp_path / "nowhere", tmp_path)
    with pytest.raises(BoneAgeInputError, match="no shard cache"):
        datamodule_from_config(cfg, progress=False).setup("fit")


def test_named_cache_is_built_when_missing_and_respects_preprocess(tmp_path: Path) -> None:
    _dataset(tmp_path, 12)
    out = tmp_path / "built-by-training"
    dm = datamodule_from_config(_cache_config(out, tmp_path, shard_format="raw"), progress=False)
    dm.setup("fit")
    assert ShardCache(out).count == 12 and len(dm.train_set) + len(dm.val_set) == 12
    other = _cache_config(out, tmp_path)
    other.preprocess.size = 48
    with pytest.raises(BoneAgeInputError, match="preprocess settings"):
        datamodule_from_config(other, progress=False).setup("fit")


def test_training_from_shards_scores_the_holdout_it_never_trains_on(tmp_path: Path) -> None:
    """data.holdout_labels with a shard cache: the held-out ids are left out of training and validation and
    scored each epoch from the cache as holdout_mae (the second validation loader)."""
    from boneage.train.loop import train

    _dataset(tmp_path, 12)
    pd.read_csv(tmp_path / "labels-12.csv").iloc[::4].to_csv(tmp_path / "holdout.csv", index=False)  # 3 ids
    cfg = _cache_config(tmp_path / "cache", tmp_path, decode="worker", shard_format="raw")
    cfg.data.holdout_labels = str(tmp_path / "holdout.csv")
    _tiny_training(cfg)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert (summary["train_images"], summary["val_images"], summary["holdout_images"]) == (6, 3, 3)
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["holdout_mae"].notna().any()


_AFTER_TORCH = """
import sys
from pathlib import Path
import torch
from boneage.data.shards import build_cache
from boneage.data.preprocess import Preprocess

torch.set_num_threads(2)
x = torch.randn(256, 256)
for _ in range(20):  # the parent's intra-op thread pool is started, as after a training run
    x = torch.tanh(x @ x)
report = build_cache(
    Path(sys.argv[1]), Preprocess(size=32, contrast="clahe"), Path(sys.argv[2]), Path(sys.argv[3]),
    fmt="raw", workers=2, progress=False,
)
print("cached", report)
"""


def test_clahe_cache_builds_with_workers_after_torch_ran(tmp_path: Path) -> None:
    # a grid's second variant builds its cache in the process that trained the first one; CLAHE runs torch
    # (kornia) in the cache workers, and forked workers of a process whose torch threads had started hung
    # for good (seen in grid 7). The workers now run torch on one thread, so this finishes in seconds.
    import subprocess
    import sys

    images, labels = _dataset(tmp_path, 6)
    script = tmp_path / "after_torch.py"
    script.write_text(_AFTER_TORCH)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c"), str(labels), str(images)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "added=6" in done.stdout and "failed=[]" in done.stdout
