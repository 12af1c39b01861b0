"""How much of the held-out error every model here shares: many per-image prediction CSVs of the same ids,
each model's MAE, the MAE of their mean and median, and each image's spread across models.

    python benchmarks/shared_error.py --out docs/results/shared_error.json \
        docs/results/bundled-v0.4/preds_native.csv docs/results/bundled-v0.12/preds_native.csv ...

Why: every EfficientNet-Lite2 model since v0.5 lands 6.84-7.06 months on the held-out native PNGs. If the
models' errors were mostly their own, averaging them would fall well below the best one; if the mean of all
of them lands where the best one does, the remaining error is shared by every recipe measured here (label
noise, or what none of them can see in these inputs), and more cycles or members cannot reach the <= 6.0
target. It only records, on ids no model was picked on; nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from boneage.errors import BoneAgeInputError
from boneage.evaluation import align_predictions, read_predictions


def shared_error(files: list[Path]) -> dict:
    """Per-model MAE, the mean's and the median's, the per-image spread (SD across models) and the error
    correlation's range, over the ids every file answered with the same reference age."""
    try:
        ref, preds = align_predictions([(str(f), read_predictions(f)) for f in files])
    except BoneAgeInputError as exc:
        raise SystemExit(f"error: {exc}") from None
    preds = preds.dropna()
    err = preds.sub(ref.reindex(preds.index), axis=0)
    corr = err.corr().to_numpy()
    off = corr[~np.eye(len(files), dtype=bool)]
    return {
        "n_images": len(preds),
        "mae": {str(files[i]): round(float(e.abs().mean()), 3) for i, e in err.items()},
        "mae_of_mean": round(float(err.mean(axis=1).abs().mean()), 3),
        "mae_of_median": round(float(err.median(axis=1).abs().mean()), 3),
        "mean_spread_across_models_sd": round(float(err.std(axis=1, ddof=1).mean()), 3),
        "error_correlation_min_max": [round(float(off.min()), 3), round(float(off.max()), 3)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", type=Path, nargs="+", help="per-image prediction CSVs of the same ids")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(args.files) < 2:
        raise SystemExit("error: give at least two prediction files")
    result = shared_error(args.files)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
