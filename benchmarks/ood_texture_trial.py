"""Would early-stage feature statistics catch what the pooled-feature density misses? A measured trial.

The bundled model's OOD density (``boneage.ood``) lets two synthetic chest-like drawings through: v0.3's
pooled features place them inside the real-hand cloud. The usual remedy is a density on earlier layers too
(Lee et al. 2018, "feature ensemble"). This script fits, for each early stage of the bundled network, a
PCA-Mahalanobis density (as ``FeatureDensity``) on the per-channel mean and standard deviation of that stage's
activations over training images (squashed 299 px copies, never the held-out ids), calibrates its threshold
the way bundling does (1.25 x the 99.5% quantile of other training images), and counts:

- the held-out hands it would refuse, as native PNGs (what a clinic sends) and as their 299 px copies;
- the synthetic battery of ``benchmarks/ood_battery.py`` it would refuse, and the chest-like drawings' scores.

No product code changes: the statistics come from forward hooks on the torch network. The result decides
whether such a density can ship (docs/results/ood/texture_trial.json; see benchmarks/RESULTS.md).

    python benchmarks/ood_texture_trial.py --out docs/results/ood
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SQUARE, SAMPLE = SHARED / "rsna-bone-age-299", SHARED / "rsna-bone-age-sample"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/ood"))
    ap.add_argument("--fit", type=int, default=800, help="training images the densities are fitted on")
    ap.add_argument("--calibrate", type=int, default=400, help="other training images for the threshold")
    ap.add_argument("--stages", default="1,2,3", help="stages (timm blocks) to try")
    ap.add_argument(
        "--jpeg",
        type=int,
        default=0,
        help="also score native PNGs and the battery after a squash-to-299 + JPEG round trip at this quality "
        "(the training copies are 299 px JPEG q60): does imitating their making close the native shift?",
    )
    args = ap.parse_args()

    import torch
    from ood_battery import synthetic_battery

    from boneage.ood import FeatureDensity
    from boneage.runtime import load_predictor

    started = time.perf_counter()
    predictor = load_predictor(engine="torch", tta=False, runtime="torch")  # the bundled model
    net = predictor.model.float().eval()
    stages = [int(s) for s in args.stages.split(",")]
    captured: dict[int, torch.Tensor] = {}
    for k in stages:
        net.backbone.blocks[k].register_forward_hook(
            lambda _m, _i, out, k=k: captured.__setitem__(
                k, torch.cat([out.mean((2, 3)), out.std((2, 3), correction=0)], 1)
            )
        )

    def stats(images: np.ndarray) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {k: [] for k in stages}
        with torch.inference_mode():
            for i in range(0, len(images), 32):
                net.features(torch.from_numpy(images[i : i + 32, None].astype(np.float32) / 255.0))
                for k in stages:
                    out[k].append(captured[k].numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def prepared(paths: list[Path]) -> np.ndarray:
        return np.stack([predictor.prepare(p)[1] for p in paths])

    def like_training_copy(pixels: np.ndarray) -> np.ndarray:
        """The frame made the way the training copies were: squashed to 299 px, then JPEG at ``--jpeg``."""
        from boneage.preprocess import training_copy

        return training_copy(pixels, 299, args.jpeg)

    def prepared_jpeg(paths: list[Path]) -> np.ndarray:
        from boneage.io import read_radiograph

        return np.stack([predictor.preprocess(like_training_copy(read_radiograph(p).pixels)) for p in paths])

    labels = pd.read_csv(SQUARE / "labels.csv", dtype={"id": str})
    held = pd.read_csv(SAMPLE / "labels.csv", dtype={"id": str})
    train_ids = labels.loc[~labels["id"].isin(set(held["id"])), "id"].sample(
        args.fit + args.calibrate, random_state=0
    )
    train = stats(prepared([SQUARE / "images" / f"{i}.jpg" for i in train_ids]))
    native = stats(prepared([SAMPLE / "images" / f"{i}.png" for i in held["id"]]))
    square = stats(prepared([SQUARE / "images" / f"{i}.jpg" for i in held["id"]]))
    battery = synthetic_battery(np.random.default_rng(0))
    synthetic = stats(np.stack([predictor.preprocess(v) for v in battery.values()]))
    if args.jpeg:
        native_j = stats(prepared_jpeg([SAMPLE / "images" / f"{i}.png" for i in held["id"]]))
        synthetic_j = stats(
            np.stack([predictor.preprocess(like_training_copy(v)) for v in battery.values()])
        )
    chest = [list(battery).index(n) for n in battery if n.startswith("chest-like")]
    rows = []
    for k in stages:
        for components in (8, 32):
            d = FeatureDensity.fit(train[k][: args.fit], components=components)
            threshold = d.calibrate(train[k][args.fit :])
            s_native, s_square, s_syn = d.score(native[k]), d.score(square[k]), d.score(synthetic[k])
            rows.append(
                {
                    "stage": k,
                    "statistics": train[k].shape[1],
                    "components": components,
                    "threshold": round(threshold, 2),
                    "held_out_native_refused": int((s_native > threshold).sum()),
                    "held_out_299_refused": int((s_square > threshold).sum()),
                    "held_out": len(held),
                    "battery_refused": int((s_syn > threshold).sum()),
                    "battery": len(battery),
                    "chest_like_scores": [round(float(s_syn[i]), 2) for i in chest],
                    "native_score_median": round(float(np.median(s_native)), 2),
                    "square_score_median": round(float(np.median(s_square)), 2),
                }
            )
            if args.jpeg:
                s_nj, s_sj = d.score(native_j[k]), d.score(synthetic_j[k])
                rows[-1].update(
                    {
                        "held_out_native_jpeg_refused": int((s_nj > threshold).sum()),
                        "battery_jpeg_refused": int((s_sj > threshold).sum()),
                        "chest_like_jpeg_scores": [round(float(s_sj[i]), 2) for i in chest],
                        "native_jpeg_score_median": round(float(np.median(s_nj)), 2),
                    }
                )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "fit_images": args.fit,
        "calibration_images": args.calibrate,
        "threshold_rule": "1.25 x the 99.5% quantile of the calibration images' scores",
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.jpeg:
        result["jpeg_quality"] = args.jpeg
    name = f"texture_trial_jpeg{args.jpeg}.json" if args.jpeg else "texture_trial.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
