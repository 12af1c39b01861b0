"""How much of the hand's crop the background-removal silhouette keeps, on the 299 px training copies.

    python benchmarks/silhouette_share.py --n 500 --out benchmarks/results/silhouette_share.json

Why: ``preprocess.background: remove`` (grid 10) blanks what lies outside ``hand_silhouette``. Its grid can
only say whether it helped; this says whether it did what it claims: a silhouette found on nearly every
copy, keeping the hand with its soft tissue (about half of a crop box whose corners are background), and
how often it falls back to keeping every pixel (``None``) or takes the whole crop (a grey plate, or a
collimator edge joined to the hand), where removal changes nothing. Also, from the same silhouettes: how
bright the hand ends up under the bundled contrast stretch (0.5-99.5 percentiles of the whole crop), whose
top a bright lead marker can set, leaving the hand dim (its 95th percentile below 0.6 of the range).
Random training ids (seed 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.io import read_radiograph
from boneage.preprocess import Preprocess, hand_box, hand_silhouette, percentile_stretch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "rsna-bone-age-299"


def shares(paths: list[Path]) -> list[tuple[float, float] | None]:
    """Per image: the share of its crop box inside the silhouette, and the 95th percentile of the hand's
    pixels after the bundled contrast stretch (None: no silhouette found)."""
    bundled = Preprocess()  # the contrast settings every model here uses (PreprocessSpec's defaults)
    out: list[tuple[float, float] | None] = []
    for path in paths:
        frame = read_radiograph(path).pixels
        top, bottom, left, right = hand_box(frame)
        crop = np.asarray(frame[top:bottom, left:right], dtype=np.float32)
        mask = hand_silhouette(crop)
        if mask is None:
            out.append(None)
            continue
        stretched = percentile_stretch(crop, bundled.low_percentile, bundled.high_percentile)
        out.append((float(mask.mean()), float(np.percentile(stretched[mask], 95))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    labels = pd.read_csv(DATA / "labels.csv").sample(args.n, random_state=1)
    rows = shares([DATA / "images" / f"{i}.jpg" for i in labels["id"]])
    found = pd.DataFrame([r for r in rows if r is not None], columns=["share", "hand_p95"])
    quantiles = (0.0, 0.1, 0.5, 0.9, 1.0)
    result = {
        "images": len(rows),
        "no_silhouette": sum(r is None for r in rows),
        "whole_crop_kept (share > 0.98)": int((found["share"] > 0.98).sum()),
        "share_kept_quantiles": {str(q): round(float(found["share"].quantile(q)), 3) for q in quantiles},
        "hand_p95_after_contrast_quantiles": {
            str(q): round(float(found["hand_p95"].quantile(q)), 3) for q in quantiles
        },
        "dim_hands (hand_p95 < 0.6)": int((found["hand_p95"] < 0.6).sum()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
