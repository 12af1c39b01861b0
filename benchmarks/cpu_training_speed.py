"""Training images/s on this machine's CPU cores for candidate backbones and input sizes, two ways:

(a) ceiling:  float batches already in memory → forward, L1 loss, backward, Adam step
(b) pipeline: what ``boneage train`` does: the preprocessed uint8 image cache (each radiograph decoded and
              preprocessed once) → DataLoader → float → progressive-resize downsizing when the input is
              smaller than the cache → the talk's kornia augmentations → the same step

b/a is the share of the network's speed the data path keeps (target ≥ 0.9). Real radiographs from the
squashed 299 px RSNA set go through the squash-geometry preprocessing first (cached under .cache/).

    python benchmarks/cpu_training_speed.py --models tf_efficientnet_lite0 mobilenetv2_100 \
        --sizes 160 224 --batch 32 --steps 6 --precision fp32 bf16

``--graph eager compile`` also measures the network under ``torch.compile`` (``trainer.compile: true``); its
one-off compilation happens in the warm-up steps, whose time is reported as ``warmup_s``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from boneage.augment import Augment
from boneage.cache import cached_images
from boneage.config import AugmentConfig
from boneage.data import BoneAgeDataset, to_float
from boneage.labels import read_labels
from boneage.models import BoneAgeNet
from boneage.preprocess import Preprocess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-bone-age-299"


def step_fn(model: BoneAgeNet, precision: str = "fp32"):
    """One training step as Lightning runs it: ``bf16`` is ``trainer.precision: bf16-mixed`` (autocast on the
    CPU; weights and optimizer state stay fp32)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor, male: torch.Tensor, age: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x.contiguous(memory_format=torch.channels_last), male)
        loss = torch.nn.functional.l1_loss(out.float(), age)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(batches, step, warmup: int, steps: int, batch: int) -> tuple[float, float]:
    """(images/s over ``steps`` steps, seconds of the ``warmup`` steps before them)."""
    it = iter(batches)
    start = time.perf_counter()
    for _ in range(warmup):
        step(*next(it))
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    return steps * batch / (time.perf_counter() - start), warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224])
    ap.add_argument("--cache-size", type=int, default=0, help="preprocess size (default: the largest size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    ap.add_argument("--graph", nargs="+", choices=["eager", "compile"], default=["eager"])
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_size = args.cache_size or max(args.sizes)
    labels = read_labels(DATA / "labels.csv", DATA / "images").iloc[: args.images].reset_index(drop=True)
    prep = Preprocess(size=cache_size, geometry="squash", squash_size=299)
    t0 = time.perf_counter()
    images = cached_images(".cache/boneage", prep, labels, workers=2, progress=False)
    print(f"# image cache {images.shape} ready in {time.perf_counter() - t0:.1f} s")
    ds = BoneAgeDataset(images, labels["male"].astype(float), labels["boneage"])
    augment = Augment(AugmentConfig())
    n_batches = args.warmup + args.steps
    for name in args.models:
        runs = [(s, p, g) for s in args.sizes for p in args.precision for g in args.graph]
        for size, precision, graph in runs:
            torch.manual_seed(0)
            model = BoneAgeNet(name, [512], 32, 0.2, 1).to(memory_format=torch.channels_last).train()
            if graph == "compile":
                model.compile()
            step = step_fn(model, precision)
            mem = [
                (
                    torch.rand(args.batch, 1, size, size),
                    torch.randint(0, 2, (args.batch,)).float(),
                    torch.rand(args.batch) * 200,
                )
                for _ in range(n_batches)
            ]
            ceiling, warm = timed(mem, step, args.warmup, args.steps, args.batch)
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)

            def pipeline(loader=loader, size=size):
                while True:
                    for x, male, age in loader:
                        x = to_float(x)
                        if size != x.shape[-1]:
                            x = torch.nn.functional.interpolate(
                                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                            )
                        yield augment(x), male, age

            piped, _ = timed(pipeline(), step, args.warmup, args.steps, args.batch)
            row = {
                "model": name,
                "size": size,
                "cache_size": cache_size,
                "batch": args.batch,
                "precision": precision,
                "graph": graph,
                "warmup_s": round(warm, 1),
                "ceiling_images_s": round(ceiling, 2),
                "pipeline_images_s": round(piped, 2),
                "share": round(piped / ceiling, 3),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.machine(),
            }
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
