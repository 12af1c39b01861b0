"""Two runs of one grid compared image by image: each run's last checkpoint on the same ids, single view.

    python benchmarks/paired_runs.py runs/cpu-detail/src192-in256 runs/cpu-detail/src299-in256 \
        --out docs/results/cpu-detail/paired.json

Why: a grid's rule compares run-level MAEs, and one run per variant on 569 validation ids carries a noise of
a few tenths of a month. Scoring both runs on the same images gives the paired difference |error|(B) -
|error|(A) with a standard error over images, which tells a real tie from a lucky one (seed noise is not in
it). Both runs must share the validation split; each is scored through its own preprocessing. The held-out
ids are scored the same way and recorded; they choose nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from fit_paired import abs_errors  # a sibling script: the same scoring

from boneage.evaluation import mean_and_se  # the same paired arithmetic as the ship rule


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """The paired difference B - A over common ids and its standard error, unrounded: what a rule decides
    on (``difference`` rounds the same figures for the record)."""
    a, b = a.align(b, join="inner")
    return mean_and_se((b - a).to_numpy(float))


def difference(a: pd.Series, b: pd.Series) -> dict:
    """MAE of each run and the paired difference B - A (negative: B is better) over their common ids."""
    a, b = a.align(b, join="inner")
    diff, se = paired(a, b)
    return {
        "n": len(a),
        "mae_a": round(float(a.mean()), 3),
        "mae_b": round(float(b.mean()), 3),
        "diff_b_minus_a": round(diff, 3),
        "diff_se": round(se, 3),
        "corr_abs_errors": round(float(np.corrcoef(a, b)[0, 1]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from boneage.bundle import holdout_tables, run_config_for, run_split
    from boneage.inference import Predictor

    cfgs = [run_config_for(r / "last.ckpt") for r in (args.run_a, args.run_b)]
    split = [(c.data.seed, c.data.val_fraction, c.data.labels) for c in cfgs]
    assert split[0] == split[1], f"the runs were validated on different splits: {split}"
    val = run_split(cfgs[0])[1]
    held = holdout_tables(cfgs[0], None)[0]
    errs: dict[str, list[pd.Series]] = {"validation": [], "held-out": []}
    for run, cfg in zip((args.run_a, args.run_b), cfgs, strict=True):
        predictor = Predictor.load(run / "last.ckpt", tta=False)
        errs["validation"].append(abs_errors(predictor, val, cfg.data.cache_dir))
        errs["held-out"].append(abs_errors(predictor, held, cfg.data.cache_dir))
    result = {
        "a": str(args.run_a),
        "b": str(args.run_b),
        "validation split": difference(*errs["validation"]),
        "held-out ids (recorded, chooses nothing)": difference(*errs["held-out"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
