"""Shard-cache image formats side by side (raw, JPEG, PNG).

Why: the project had two preprocessed-image caches, a per-image ``.npy`` cache loaded into one uint8 array
and ``boneage.cache`` (a few checksummed shard files plus a manifest that carries the labels, memory-mapped,
decoded per image in loader workers or on the GPU with nvJPEG). A design issue asked for one image cache
instead of two if the measurements showed one serves both; benchmarks/results/cache_formats.jsonl holds
that comparison (raw shards: the same bytes as the .npy cache, loader far faster than training), so the
.npy cache was removed and raw shards are the default. This script still measures, for the
same N radiographs and the bundled model's preprocessing (squash 299 px frame → hand crop → percentile
contrast → 256 px letterbox, as in configs/bundled-v0.2.yaml), per format:

- build: wall time of a fresh build with 2 worker processes (sources read once beforehand, so every format
  starts from the same warm source files), and bytes on disk (every file of the cache folder);
- setup: ``BoneAgeDataModule.setup()`` as ``boneage train`` runs it for that format, i.e. the whole set
  loaded into what training consumes (manifest, full sha256 check (``data.cache_verify``), memory maps),
  cold (the cache's files evicted from
  the page cache with posix_fadvise(DONTNEED) after an fsync, nothing else on the machine is touched; on a
  VM the host may still cache the disk, so cold means not in this machine's page cache) and
  warm (right after); both include reading and checking the whole label CSV (``labels_s``, the same for
  every format);
- decode_all: every image read and decoded once in this process, the cost a first epoch pays lazily;
- loader: images/s of ``dm.train_dataloader()`` (batch 32, the loader workers
  ``BoneAgeDataModule`` picks for the format), iterating batches and converting them
  to float, without the network; --passes timed passes after --warmup untimed ones (worker start-up,
  torch's first conversions);
- for lossy formats the abs pixel error (max, mean, p99, grey levels 0-255) against the lossless images
  (the first of raw/png measured); the other lossless format is checked to be identical to them.

One JSON line per format goes to stdout (and is appended to --out), then a plain table.

    .venv/bin/python benchmarks/cache_formats.py --images 2000 --out benchmarks/results/cache_formats.jsonl

Smoke test: ``.venv/bin/python benchmarks/cache_formats.py --images 24``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.cache import ShardCache, auto_cache_path, build_cache, decode_batch
from boneage.config import load_config
from boneage.data import make_datamodule, to_float
from boneage.labels import read_labels
from boneage.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "rsna-bone-age-299"
CONFIG = REPO / "configs" / "bundled-v0.2.yaml"
FORMATS = ("raw", "jpeg", "png")


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, files) of every regular file under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def evict(folder: Path) -> None:
    """Drop this folder's files from the page cache (written back first); other files stay cached."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm_sources(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def cache_folder(data_cfg: Any, pre_spec: Any) -> Path:
    return auto_cache_path(data_cfg, pre_spec)


def timed_setup(cfg: Any, data_cfg: Any) -> tuple[float, Any]:
    dm = make_datamodule(data_cfg, cfg.preprocess, cfg.train, cfg.trainer, progress=False)
    start = time.perf_counter()
    dm.setup("fit")
    return time.perf_counter() - start, dm


def loader_speed(dm: Any, passes: int, warmup: int) -> tuple[float, int, int]:
    """images/s over ``passes`` timed passes of the training loader, after ``warmup`` untimed passes."""
    loader = dm.train_dataloader()

    def one_pass() -> int:
        n = 0
        for images, _male, _age in loader:
            x = to_float(decode_batch(images, "cpu"))
            n += x.shape[0]
        return n

    for _ in range(warmup):  # starts the (persistent) workers; torch's first conversions are slow too
        one_pass()
    start = time.perf_counter()
    n = sum(one_pass() for _ in range(passes))
    return n / (time.perf_counter() - start), n, int(loader.num_workers)


def decode_all(folder: Path) -> tuple[float, np.ndarray]:
    cache = ShardCache(folder)
    table = cache.labels()
    ds = cache.dataset(table, "worker")
    start = time.perf_counter()
    images = np.stack([ds[i][0][0].numpy() for i in range(len(ds))])
    seconds = time.perf_counter() - start
    order = np.argsort(table["id"].astype(str).to_numpy(), kind="stable")
    return seconds, images[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="the first N rows of labels.csv")
    ap.add_argument("--data", type=Path, default=DATA, help="folder with labels.csv and images/")
    ap.add_argument("--config", type=Path, default=CONFIG, help="preprocess, batch and num_workers from here")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=["raw", "jpeg"])
    ap.add_argument("--quality", type=int, default=0, help="JPEG quality (default: data.shard_quality)")
    ap.add_argument("--build-workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2, help="timed passes of the training loader")
    ap.add_argument("--warmup", type=int, default=2, help="untimed loader passes before those")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--root", type=Path, default=None, help="folder for the caches (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the caches afterwards")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per format here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    prep = Preprocess.from_config(cfg.preprocess)
    quality = args.quality or cfg.data.shard_quality
    labels_csv, images_dir = args.data / "labels.csv", args.data / "images"
    table = read_labels(labels_csv, images_dir).iloc[: args.images].reset_index(drop=True)
    start = time.perf_counter()
    read_labels(labels_csv, images_dir)
    labels_s = time.perf_counter() - start  # part of every setup time: the whole CSV is read, then cut
    made_root = args.root is None
    root = Path(tempfile.mkdtemp(prefix="cache-formats-")) if made_root else args.root
    root.mkdir(parents=True, exist_ok=True)
    common = {
        "images": str(images_dir),
        "labels": str(labels_csv),
        "limit": args.images,
        "cache_dir": str(root),
        "cache": "",
        "holdout_labels": "",  # the shard path ignores it; the same images for every format
        "holdout_monitor": False,
        "decode": "worker" if not torch.cuda.is_available() else "auto",
    }
    print(
        f"# {len(table)} images of {args.data}, preprocess {prep.to_dict()}, key {prep.key()}, "
        f"batch {cfg.train.batch_size}, data.num_workers {cfg.data.num_workers}, root {root}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None  # lossless images in id order
    try:
        for fmt in args.formats:
            update = dict(common, cache_format="shards", shard_format=fmt, shard_quality=quality)
            data_cfg = cfg.data.model_copy(update=update)
            folder = cache_folder(data_cfg, cfg.preprocess)
            warm_sources(table["path"].astype(str).tolist())
            start = time.perf_counter()
            report = build_cache(
                folder,
                prep,
                table,
                images_dir,
                fmt=fmt,
                quality=quality,
                workers=args.build_workers,
                progress=False,
            )
            if report.failed:
                raise SystemExit(f"{fmt}: {len(report.failed)} images failed, first {report.failed[0]}")
            build_s = time.perf_counter() - start
            disk, files = folder_bytes(folder)
            evict(folder)
            cold_s, _ = timed_setup(cfg, data_cfg)
            warm_s, dm = timed_setup(cfg, data_cfg)
            speed, seen, workers = loader_speed(dm, args.passes, args.warmup)
            row: dict[str, Any] = {
                "format": fmt,
                "quality": quality if fmt == "jpeg" else None,
                "images": len(table),
                "size": prep.size,
                "preprocess_key": prep.key(),
                "build_s": round(build_s, 2),
                "build_workers": args.build_workers,
                "disk_bytes": disk,
                "disk_mib": round(disk / 2**20, 2),
                "bytes_per_image": round(disk / len(table)),
                "files": files,
                "labels_s": round(labels_s, 3),
                "setup_cold_s": round(cold_s, 3),
                "setup_warm_s": round(warm_s, 3),
                "decode_all_s": None,
                "train_images": len(dm.train_set),
                "loader_images_s": round(speed, 1),
                "loader_images": seen,
                "loader_workers": workers,
                "batch": cfg.train.batch_size,
            }
            row["decode_all_s"], images = decode_all(folder)
            row["decode_all_s"] = round(row["decode_all_s"], 3)
            if fmt in {"raw", "png"}:
                if reference is None:
                    reference = images
                else:
                    row["identical_to_lossless"] = bool(np.array_equal(reference, images))
            elif reference is not None:
                err = np.abs(images.astype(np.int16) - reference.astype(np.int16))
                row.update(
                    max_abs_error=int(err.max()),
                    mean_abs_error=round(float(err.mean()), 3),
                    p99_abs_error=float(np.percentile(err, 99)),
                )
            row.update(
                threads=torch.get_num_threads(),
                torch=torch.__version__,
                machine=platform.machine(),
                date=time.strftime("%Y-%m-%d"),
            )
            del dm
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        if made_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.keep:
            for fmt in args.formats:
                data_cfg = cfg.data.model_copy(update=dict(common, shard_format=fmt, shard_quality=quality))
                folder = cache_folder(data_cfg, cfg.preprocess)
                shutil.rmtree(folder, ignore_errors=True)
                Path(str(folder) + ".lock").unlink(missing_ok=True)

    head = (
        f"{'format':<8}{'MiB':>9}{'B/img':>8}{'files':>7}{'build s':>9}{'setup cold':>12}{'setup warm':>12}"
        f"{'decode all':>12}{'loader img/s':>14}{'workers':>9}{'max err':>9}"
    )
    print("\n" + head)
    for r in rows:
        name = r["format"] + (str(r["quality"]) if r["quality"] else "")
        decode = "-" if r["decode_all_s"] is None else f"{r['decode_all_s']:.2f}"
        err = r.get("max_abs_error", 0 if r.get("identical_to_lossless", True) else "diff")
        print(
            f"{name:<8}{r['disk_mib']:>9.2f}{r['bytes_per_image']:>8}{r['files']:>7}{r['build_s']:>9.2f}"
            f"{r['setup_cold_s']:>12.3f}{r['setup_warm_s']:>12.3f}{decode:>12}{r['loader_images_s']:>14.1f}"
            f"{r['loader_workers']:>9}{err!s:>9}"
        )


if __name__ == "__main__":
    main()
