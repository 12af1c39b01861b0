"""Per-image, paired comparison of the crop fit (pad vs stretch) over the runs of grids 7b and 7c.

    python benchmarks/fit_paired.py --grid runs/cpu-fit-wide --grid runs/cpu-fit-split7 \
        --out docs/results/cpu-fit-split7/paired.json

Why: the grids' rule compares four run-level MAEs, whose seed noise (0.25 months on 2,275 ids) hides a
gain of a few tenths. Scoring every run's last checkpoint image by image on its own selection split (single
view, as training logged it) gives the paired difference |error|(stretch) - |error|(pad), averaged over
seeds, with a standard error over images; and it asks the mechanism: if stretching helps because it gives
the hand the pixels that padding wastes, the gain should grow with the padding share of the image (measured
with ``hand_box`` on the 299 px copy). The held-out ids are scored the same way and reported, never used to
choose.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from crop_geometry import boxes, padding  # a sibling script: the same crop boxes as the geometry figures

from boneage.evaluation import mean_and_se  # the paired arithmetic the ship rule uses


def padding_share(paths: pd.Series) -> np.ndarray:
    """Share of a square letterboxed input that is padding, from the crop box of each 299 px copy."""
    return padding(boxes(list(paths)))


def abs_errors(predictor, table: pd.DataFrame, cache_dir: str | None) -> pd.Series:
    """|error| per id, single view, through the run's own preprocessing cache."""
    from boneage.evaluation import evaluate

    p = evaluate(predictor, table, cache_dir=cache_dir, progress=False).predictions
    return p.set_index("id")["error"].abs()


def paired(abs_err: dict[str, pd.Series], pad: np.ndarray) -> dict:
    """Mean over seeds of each arm's |error| per image, then the paired difference and its link to padding."""
    arm = {a: pd.concat([v for k, v in abs_err.items() if k.startswith(a)], axis=1).mean(axis=1)
           for a in ("pad", "stretch")}
    d = (arm["stretch"] - arm["pad"]).to_numpy()
    n = len(d)
    diff, se = mean_and_se(d)
    slope = np.polyfit(pad, d, 1)[0]
    q = np.quantile(pad, [1 / 3, 2 / 3])
    by_third = []
    for m in (pad <= q[0], (pad > q[0]) & (pad <= q[1]), pad > q[1]):
        third_diff, third_se = mean_and_se(d[m])
        by_third.append({"padding_mean": round(float(pad[m].mean()), 3), "n": int(m.sum()),
                         "diff": round(third_diff, 3), "se": round(third_se, 3)})
    return {
        "n": n,
        "mae_pad": round(float(arm["pad"].mean()), 3),
        "mae_stretch": round(float(arm["stretch"].mean()), 3),
        "diff_stretch_minus_pad": round(diff, 3),
        "diff_se": round(se, 3),
        "diff_per_10pct_padding": round(float(slope * 0.1), 3),
        "corr_diff_padding": round(float(np.corrcoef(pad, d)[0, 1]), 3),
        "diff_by_padding_third": by_third,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, action="append", required=True, help="a grid's runs folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from boneage.bundle import holdout_tables, run_config_for, run_split
    from boneage.inference import Predictor

    result: dict = {}
    held_err: dict[str, pd.Series] = {}
    held_pad = None
    for grid in args.grid:
        runs = sorted(p for p in grid.iterdir() if (p / "last.ckpt").is_file())
        cfg = run_config_for(runs[0] / "last.ckpt")
        val = run_split(cfg)[1]
        held = holdout_tables(cfg, None)[0]
        errs: dict[str, pd.Series] = {}
        for run in runs:
            rcfg = run_config_for(run / "last.ckpt")
            assert rcfg.data.seed == cfg.data.seed and rcfg.data.val_fraction == cfg.data.val_fraction
            predictor = Predictor.load(run / "last.ckpt", tta=False)
            errs[run.name] = abs_errors(predictor, val, rcfg.data.cache_dir)
            held_err[f"{run.name}@{grid.name}"] = abs_errors(predictor, held, rcfg.data.cache_dir)
        pad = padding_share(val["path"])
        result[grid.name] = {"split_seed": cfg.data.seed, "runs": [r.name for r in runs], **paired(errs, pad)}
        if held_pad is None:
            held_pad = padding_share(held["path"])
    result["holdout_all_runs (recorded, chooses nothing)"] = paired(held_err, held_pad)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
