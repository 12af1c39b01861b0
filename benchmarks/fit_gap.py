"""How well the bundled model fits the images it trained on, against the images it never saw.

    python benchmarks/fit_gap.py --config configs/bundled-v0.6.yaml --train-sample 2000 \
        --out benchmarks/results/fit_gap.json

Why: issue #10's target (6.0 months on the held-out ids) is 1 month below the bundled model. Whether more
CPU time could close that depends on which side limits it. A model that fits its training images far
better than unseen ones is limited by data and regularisation; one that cannot fit its own training images
much better than unseen ones is limited by what it can learn from these inputs (their detail, the labels'
noise) or by its training. Every set is scored the same way: the 299 px copies through the model's own
preprocessing, single view (as the training logs score), so only the images differ. The held-out ids are
reported for the record and choose nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

BANDS = [(0, 60), (60, 120), (120, 168), (168, 204), (204, 300)]  # months: the clinical age bands of interest


def summary(preds: pd.DataFrame) -> dict:
    """MAE, median, bias, the share of all error carried by the worst 5%, and MAE by age band."""
    from boneage.evaluation import metrics

    age = preds["boneage"].to_numpy(float)
    err = preds["predicted"].to_numpy(float) - age
    a = np.abs(err)
    worst = np.sort(a)[::-1][: max(1, round(0.05 * len(a)))]
    m = metrics(preds["predicted"].to_numpy(float), age)
    return {
        "n": m["n"],
        "mae": round(m["mae_months"], 3),
        "mae_se": round(float(a.std(ddof=1) / np.sqrt(len(a))), 3),
        "median_ae": round(m["median_ae_months"], 3),
        "bias": round(m["bias_months"], 3),
        "share_of_error_in_worst_5pct": round(float(worst.sum() / a.sum()), 3),
        "mae_by_age_band": {
            f"{lo}-{hi}m": {
                "n": int(m.sum()), "mae": round(float(a[m].mean()), 2), "bias": round(float(err[m].mean()), 2)
            }
            for lo, hi in BANDS
            if (m := (age >= lo) & (age < hi)).any()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True, help="the bundled model's run config (its split)")
    ap.add_argument("--model", type=Path, default=None, help="model file or checkpoint (default: the bundle)")
    ap.add_argument("--train-sample", type=int, default=2000, help="training ids scored (random, seed 0)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from boneage.config import load_config
    from boneage.data import read_source, select_rows
    from boneage.evaluation import evaluate
    from boneage.inference import Predictor

    cfg = load_config(args.config)
    # the run's id selection only: no image cache is built or opened (every set is read from its files)
    sel = select_rows(read_source(cfg.data), cfg.data)
    val = sel.labels.iloc[sel.val_idx].reset_index(drop=True)
    train = sel.labels.iloc[sel.train_idx].reset_index(drop=True)
    train = train.sample(n=min(args.train_sample, len(train)), random_state=0).reset_index(drop=True)
    held = sel.holdout
    assert held is not None, "the config names no data.holdout_labels"
    predictor = Predictor.load(args.model, tta=False)

    result: dict = {"config": str(args.config), "model": str(args.model or "bundled"), "view": "single"}
    for name, table in (("training ids (sample)", train), ("validation split", val),
                        ("held-out ids, 299 px copies (recorded, chooses nothing)", held)):
        result[name] = summary(evaluate(predictor, table, progress=False).predictions)
    gap = result["validation split"]["mae"] - result["training ids (sample)"]["mae"]
    result["validation_minus_training_mae"] = round(gap, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
