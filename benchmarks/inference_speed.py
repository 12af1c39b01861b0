"""CPU inference speed of the bundled model: ONNX Runtime vs PyTorch eager, and one `boneage predict` call.

Usage: python benchmarks/inference_speed.py [--checkpoint CKPT] [--images N] [--threads 2]
Prints one JSON object; results go into benchmarks/RESULTS.md by hand with the date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from boneage.inference import Predictor
from boneage.labels import read_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-bone-age-sample"


def images_per_second(predictor: Predictor, images: np.ndarray, male: np.ndarray, repeats: int) -> float:
    predictor.predict_arrays(images[:2], male[:2])  # warm-up: allocations, ORT graph optimisation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_arrays(images, male, batch_size=8)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    labels = read_labels(SHARED / "labels.csv", SHARED / "images").iloc[: args.images]
    base = Predictor.load(args.checkpoint, tta=False)
    prepared = np.stack([base.prepare(p)[1] for p in labels["path"]])
    male = labels["male"].to_numpy(bool)

    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "backbone": base.cfg.model.backbone,
        "input_size": base.cfg.preprocess.size,
        "images": len(prepared),
    }
    for tta in (False, True):
        torch_pred = Predictor.load(args.checkpoint, tta=tta)
        onnx_pred = Predictor.load(args.checkpoint, tta=tta, runtime="onnx")
        t = images_per_second(torch_pred, prepared, male, args.repeats)
        o = images_per_second(onnx_pred, prepared, male, args.repeats)
        diff = np.abs(torch_pred.predict_arrays(prepared, male)[0] - onnx_pred.predict_arrays(prepared, male)[0])
        key = "tta6" if tta else "single_view"
        results[key] = {
            "torch_eager_images_per_s": round(t, 2),
            "onnxruntime_images_per_s": round(o, 2),
            "onnx_over_torch": round(o / t, 2),
            "max_abs_diff_months": round(float(diff.max()), 4),
        }

    image = str(labels["path"].iloc[0])
    cmd = [sys.executable, "-m", "boneage", "predict", image, "--sex", "female", "--age", "10y", "--json"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    results["boneage_predict_wall_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
