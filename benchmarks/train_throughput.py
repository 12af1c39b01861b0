"""Training throughput in images/s for one backbone, resolution and batch, through three input paths:

(a) synthetic: a uint8 batch already on the device → float → forward, backward, optimiser step (the ceiling)
(b) pipeline:  the project's path: shard cache → DataLoader (encoded bytes, pinned) → decode on the device
               (nvJPEG on CUDA; the CPU decodes in loader workers) → kornia augmentation → the same step
(c) plain:     PNG files → PIL decode + resize + torchvision CPU augmentation in DataLoader workers → step

It prints b/a and c/a (the share of the ceiling each input path keeps) and one JSON object on stdout.
The step is the training step of ``BoneAgeModule`` (L1 loss, Adam) without Lightning: channels_last, bf16
autocast on CUDA, optionally ``torch.compile`` (--compile).

Usage (GPU target: b/a >= 0.90 for tf_efficientnet_lite0 and inception_v3 at 512 px):
    boneage cache build --images DIR --labels CSV --size 512 --out .cache/shards-512-q95
    python benchmarks/train_throughput.py --cache .cache/shards-512-q95 --backbone tf_efficientnet_lite0 \\
        --size 512 --batch 64 --steps 50 --device cuda
Small CPU check:
    python benchmarks/train_throughput.py --cache .cache/shards-128-q95 --size 128 --batch 16 --steps 5 \\
        --warmup 2 --workers 1 --device cpu
Prints one JSON line (machine, settings, images/s per input path).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from boneage.config import AugmentConfig
from boneage.data.augment import Augment
from boneage.data.datamodule import to_float
from boneage.data.labels import read_labels
from boneage.data.shards import ShardCache, decode_batch
from boneage.models.net import BoneAgeNet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-bone-age-sample"


class PlainPNG(Dataset):
    """The straightforward loader: open the PNG, greyscale, resize, augment on the CPU with torchvision."""

    def __init__(self, paths: list[str], male: np.ndarray, age: np.ndarray, size: int) -> None:
        from torchvision import transforms

        self.paths, self.size = paths, size
        self.male = torch.as_tensor(male, dtype=torch.float32)
        self.age = torch.as_tensor(age, dtype=torch.float32)
        self.tf = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(),
                transforms.RandomAffine(degrees=20, translate=(0.2, 0.2), scale=(0.8, 1.2)),
                transforms.PILToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            grey = img.convert("L").resize((self.size, self.size), Image.BILINEAR)
        return self.tf(grey), self.male[i], self.age[i]


def make_step(
    backbone: str, device: torch.device, compile_model: bool, augment: bool
) -> Callable[[Any, torch.Tensor, torch.Tensor], float]:
    torch.manual_seed(0)
    model = BoneAgeNet(backbone, [512], sex_units=32, dropout=0.2, in_chans=1).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    if compile_model:
        model.compile()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    aug = Augment(AugmentConfig()).to(device) if augment else None
    bf16 = device.type == "cuda"

    def step(images: Any, male: torch.Tensor, age: torch.Tensor) -> float:
        x = to_float(decode_batch(images, device))
        if aug is not None:
            x = aug(x)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x, male)
        loss = torch.nn.functional.l1_loss(pred.float(), age) / 41.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(age)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    batches: Iterator[tuple[Any, torch.Tensor, torch.Tensor]],
    step: Callable[[Any, torch.Tensor, torch.Tensor], float],
    device: torch.device,
    warmup: int,
    steps: int,
) -> float:
    """images/s over ``steps`` steps after ``warmup`` (which also fills loader queues and compiles)."""

    def run(n: int) -> int:
        done = 0
        for _ in range(n):
            images, male, age = next(batches)
            male = male.to(device, non_blocking=True)
            age = age.to(device, non_blocking=True)
            done += step(images, male, age)
        return done

    run(warmup)
    _sync(device)
    start = time.perf_counter()
    images = run(steps)
    _sync(device)
    return images / (time.perf_counter() - start)


def forever(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def loader(
    dataset: Dataset, batch: int, workers: int, device: torch.device, collate: Any = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=collate,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0", help="e.g. inception_v3")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per path")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", type=Path, default=None, help="shard cache at --size (for path b)")
    ap.add_argument("--images", type=Path, default=SHARED / "images", help="PNG folder (for path c)")
    ap.add_argument("--labels", type=Path, default=SHARED / "labels.csv")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    ap.add_argument("--decode", default="auto", help="path b: auto (JPEG on CUDA: device) | device | worker")
    ap.add_argument("--paths", default="abc", help="which paths to run, e.g. ab")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    result: dict[str, Any] = {
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "compile": args.compile,
        "images_per_s": {},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    ips: dict[str, float] = result["images_per_s"]

    if "a" in args.paths:
        step = make_step(args.backbone, device, args.compile, augment=False)
        shape = (args.batch, 1, args.size, args.size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        male = torch.randint(0, 2, (args.batch,)).float()
        age = torch.rand(args.batch) * 200
        batches = itertools.repeat((images, male, age))
        ips["a_synthetic"] = measure(batches, step, device, args.warmup, args.steps)
        say(f"(a) synthetic on {device}: {ips['a_synthetic']:.1f} images/s")

    if "b" in args.paths:
        if args.cache is None:
            say("(b) skipped: no --cache")
        else:
            cache = ShardCache(args.cache)
            if cache.size != args.size:
                raise SystemExit(f"{args.cache} holds {cache.size} px images, not --size {args.size}")
            decode = args.decode
            if decode == "auto":
                decode = "device" if cache.format == "jpeg" and device.type == "cuda" else "worker"
            data = cache.dataset(cache.labels(), decode)
            # encoded bytes need no decoding workers: one collates and pins while the GPU decodes and trains
            workers = min(args.workers, 2) if decode == "device" else args.workers
            batches = forever(loader(data, args.batch, workers, device, data.collate()))
            step = make_step(args.backbone, device, args.compile, augment=True)
            ips["b_pipeline"] = measure(batches, step, device, args.warmup, args.steps)
            result.update(cache=str(args.cache), cache_format=cache.format, decode=decode)
            say(f"(b) shard cache, decode={decode}, augment on {device}: {ips['b_pipeline']:.1f} images/s")

    if "c" in args.paths:
        if not args.labels.is_file() or not args.images.is_dir():
            say(f"(c) skipped: no PNGs at {args.images}")
        else:
            table = read_labels(args.labels, args.images)
            data = PlainPNG(
                table["path"].astype(str).tolist(),
                table["male"].to_numpy(dtype=np.float32),
                table["boneage"].to_numpy(dtype=np.float32),
                args.size,
            )
            batches = forever(loader(data, args.batch, args.workers, device))
            step = make_step(args.backbone, device, args.compile, augment=False)
            ips["c_plain_pil"] = measure(batches, step, device, args.warmup, args.steps)
            say(f"(c) plain PIL + DataLoader from PNGs: {ips['c_plain_pil']:.1f} images/s")

    if "a_synthetic" in ips:
        for key, name in (("b_pipeline", "b/a"), ("c_plain_pil", "c/a")):
            if key in ips:
                result[name] = round(ips[key] / ips["a_synthetic"], 3)
                say(f"{name} = {result[name]:.3f}")
    result["images_per_s"] = {k: round(v, 2) for k, v in ips.items()}
    if args.out is not None:
        from boneage.files import atomic_write

        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
