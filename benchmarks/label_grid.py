"""How coarse the RSNA labels are: the share on atlas-like standard ages, and what rounding to them costs.

    python benchmarks/label_grid.py --out benchmarks/results/label_grid.json

Readers of the RSNA 2017 films mostly picked a Greulich & Pyle standard rather than an age in between, so
the labels sit on a grid of about 30 values per sex. A grid value is taken to be one used by at least 0.5%
of that sex's labels. If a reader rounds the age they see to the nearest grid value, a label on the grid
is off by up to half a gap on either side; with the seen age spread evenly over that cell, the expected
absolute rounding error of a label at g (gaps a below, b above) is (a^2 + b^2) / (4 (a + b)). That is the
floor of rounding alone for a model that saw every hand as the reader did; the readers' disagreement
(not measurable without repeated reads) comes on top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def rounding_error(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Expected |seen age - label| for labels on ``grid`` (sorted), the seen age uniform over its cell;
    the end cells are taken as symmetric (the gap on their inner side on both sides)."""
    gaps = np.diff(grid)
    below = np.concatenate([[gaps[0]], gaps])
    above = np.concatenate([gaps, [gaps[-1]]])
    per_value = (below**2 + above**2) / (4 * (below + above))
    return per_value[np.searchsorted(grid, values)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=Path("../shared/data/rsna-bone-age-299/labels.csv"))
    ap.add_argument("--min-share", type=float, default=0.005)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    table = pd.read_csv(args.labels)
    result: dict[str, object] = {"labels": str(args.labels), "n": len(table), "min_share": args.min_share}
    errors = []
    for male, group in table.groupby("male"):
        ages = group["boneage"].to_numpy(float)
        share = group["boneage"].value_counts(normalize=True).sort_index()
        grid = np.asarray(share[share >= args.min_share].index, dtype=float)
        on = np.isin(ages, grid)
        err = rounding_error(grid, ages[on])
        errors.append(np.concatenate([err, np.zeros((~on).sum())]))  # off-grid labels: taken as exact
        result["male" if male else "female"] = {
            "n": len(ages),
            "distinct_values": int(share.size),
            "grid": [int(g) for g in grid],
            "share_on_grid": round(float(on.mean()), 4),
            "median_gap_months": float(np.median(np.diff(grid))),
            "rounding_mae_months": round(float(errors[-1].mean()), 3),
        }
    result["share_multiple_of_6"] = round(float((table["boneage"] % 6 == 0).mean()), 4)
    result["rounding_mae_months"] = round(float(np.concatenate(errors).mean()), 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in {"male", "female"}}, indent=2))
    for sex in ("female", "male"):
        print(sex, {k: v for k, v in result[sex].items() if k != "grid"})


if __name__ == "__main__":
    main()
