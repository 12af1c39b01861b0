"""Mean or median readout of a label-distribution head, paired per image (rule: docs/results/readout/RULE.md).

    python benchmarks/readout_check.py --out docs/results/readout

One torch pass per image set gives both readouts of the same logits: the expected age (today's) and the
median of each view's distribution (bins as 2-month cells, probability spread evenly inside a cell), each
averaged over the predictor's TTA views. The validation split decides; the held-out native PNGs are scored
afterwards for the record.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from boneage.evaluation import mean_and_se  # the same paired arithmetic as the ship rule


def median_months(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The median of each row's softmax over bins centred on ``centres`` (equal widths), interpolated
    inside the cell where the cumulative probability crosses 0.5: the estimate an absolute error rewards."""
    p = torch.softmax(logits.float(), dim=1)
    cdf = p.cumsum(1)
    n = p.shape[1]
    k = (cdf < 0.5).sum(1).clamp(max=n - 1, min=0)[:, None]
    before = torch.where(k > 0, cdf.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(k, dtype=p.dtype))
    inside = ((0.5 - before) / p.gather(1, k).clamp(min=1e-12)).clamp(0, 1)
    width = float(centres[1] - centres[0])
    return (centres[k[:, 0]] - width / 2 + inside[:, 0] * width).float()


def paired(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """MAE of each and the mean paired difference of absolute errors (b - a) with its standard error."""
    d = np.abs(b - ref) - np.abs(a - ref)
    diff, se = mean_and_se(d)
    return {
        "n": len(ref),
        "mae_mean_readout": round(float(np.abs(a - ref).mean()), 4),
        "mae_median_readout": round(float(np.abs(b - ref).mean()), 4),
        "median_minus_mean": round(diff, 4),
        "standard_error": round(se, 4),
        "bias_mean_readout": round(float((a - ref).mean()), 3),
        "bias_median_readout": round(float((b - ref).mean()), 3),
    }


def both_readouts(predictor, table, cache_dir) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(mean readout, median readout) per image, from the same forward passes."""
    from boneage.evaluation import evaluate

    model = predictor.model
    original = model.to_months
    medians: list[np.ndarray] = []

    def to_months(out: torch.Tensor) -> torch.Tensor:
        medians.append(median_months(out, model.age_centres).cpu().numpy())
        return original(out)

    model.to_months = to_months
    try:
        rep = evaluate(predictor, table, cache_dir=cache_dir, progress=False)
    finally:
        del model.to_months
    v = len(predictor.views)
    median = np.concatenate([m.reshape(v, -1).mean(0) for m in medians])
    return rep.predictions["predicted"].to_numpy(float), median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("src/boneage/assets/model.safetensors"))
    ap.add_argument("--config", type=Path, default=Path("configs/bundled-v0.9.yaml"), help="gives the split")
    ap.add_argument("--holdout", type=Path, default=Path("../shared/data/rsna-bone-age-sample"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import pandas as pd

    from boneage.bundle import run_split
    from boneage.config import load_config
    from boneage.inference import Predictor
    from boneage.labels import read_labels

    torch.set_num_threads(2)
    cfg = load_config(args.config)
    predictor = Predictor.load(args.model, runtime="torch")
    if not predictor.model.age_bins:
        raise SystemExit(f"error: {args.model}: a one-output head has no distribution to read")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"model": str(args.model), "views": len(predictor.views)}
    sets = {
        "validation_split": (run_split(cfg)[1], cfg.data.cache_dir),
        "holdout_native": (read_labels(args.holdout / "labels.csv", args.holdout / "images"), None),
    }
    for name, (table, cache) in sets.items():
        t0 = time.perf_counter()
        mean, median = both_readouts(predictor, table, cache)
        ref = table["boneage"].to_numpy(float)
        result[name] = {**paired(mean, median, ref), "seconds": round(time.perf_counter() - t0, 1)}
        pd.DataFrame(
            {"id": table["id"].astype(str), "boneage": ref, "male": table["male"].to_numpy(bool),
             "mean_readout": mean.round(3), "median_readout": median.round(3)}
        ).to_csv(args.out / f"preds_{name}.csv", index=False)
        print(name, json.dumps(result[name]), flush=True)
        if name == "validation_split":
            r = result[name]
            adopt = r["mae_median_readout"] < r["mae_mean_readout"] and (
                r["median_minus_mean"] <= -2 * r["standard_error"]
            )
            result["decision"] = "median adopted" if adopt else "mean kept"
    (args.out / "readout.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
