"""How many source pixels the hand has in the 299 px training copies, and how much of a padded input is bars.

    python benchmarks/crop_geometry.py --n 500 --out benchmarks/results/crop_geometry.json

Why: the bundled model's input is 299 px, but its hand crop comes out of a 299 px squashed copy, so the detail
it can use is capped by the crop box's size in that copy, not by the input size. The same boxes give the share
of a letterboxed (``preprocess.fit: pad``) input that is black bars. Training ids and held-out ids (the
1,001 of the native sample) are measured separately, ``--n`` random ids of each (seed 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from boneage.preprocess import hand_box

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def boxes(paths: list[Path]) -> np.ndarray:
    """(height, width) of the hand's crop box in each image."""
    out = []
    for p in paths:
        t, b, left, r = hand_box(np.asarray(Image.open(p).convert("L")))
        out.append((b - t, r - left))
    return np.array(out, dtype=float)


def padding(hw: np.ndarray) -> np.ndarray:
    """Share of a square letterboxed input that is black bars, for each (height, width) crop box."""
    return 1 - hw.min(axis=1) / hw.max(axis=1)


def summary(hw: np.ndarray) -> dict:
    long_side, bars = hw.max(axis=1), padding(hw)
    pct = [10, 50, 90]
    return {
        "n": len(hw),
        "long_side_px": {"mean": round(float(long_side.mean()), 1),
                         **{f"p{q}": float(np.percentile(long_side, q)) for q in pct}},
        "share_long_side_below_299": round(float((long_side < 299).mean()), 3),
        "padding_share": {"mean": round(float(bars.mean()), 3),
                          "se": round(float(bars.std(ddof=1) / np.sqrt(len(hw))), 4),
                          **{f"p{q}": round(float(np.percentile(bars, q)), 3) for q in pct}},
        "taller_than_wide": round(float((hw[:, 0] > hw[:, 1]).mean()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    folder = args.data / "rsna-bone-age-299"
    labels = pd.read_csv(folder / "labels.csv")
    held = set(pd.read_csv(args.data / "rsna-bone-age-sample" / "labels.csv")["id"])
    result = {}
    for name, ids in (("training_ids", labels[~labels["id"].isin(held)]["id"]),
                      ("heldout_ids", labels[labels["id"].isin(held)]["id"])):
        chosen = ids.sample(min(args.n, len(ids)), random_state=1)
        result[name] = summary(boxes([folder / "images" / f"{i}.jpg" for i in chosen]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
