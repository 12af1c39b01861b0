"""Look for the same radiograph under two ids in the 12,375 training copies.

    python benchmarks/duplicate_radiographs.py --out benchmarks/results/duplicate_radiographs.json

Why: a film stored twice would do two things. If one copy is among the 1,001 held-out sample ids and the
other among the training ids, the held-out figures would be partly a memory test. If the two copies carry
their own labels, the difference between them is a repeated read: the readers' disagreement, which the
label grid (``label_grid.py``) could not measure. Each image becomes a 48 x 48 thumbnail with its mean
removed and unit norm; every pair's correlation is computed (76 million pairs, a few seconds). Two copies
of one film, even re-encoded, correlate near 1; different hands that merely look alike at 48 px stay
below. The check is calibrated on a known duplicate: each held-out id's native-aspect PNG against its own
299 px JPEG copy (another file and encoding of one film). A second film of the same child, taken another
day, is not what this finds: at 48 px the whole frame's layout (collimation, markers) dominates; nor is a
copy stored mirrored or turned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def thumbnails(paths: list[Path], side: int = 48) -> np.ndarray:
    """One row per image: the greyscale thumbnail, mean removed, unit length, so a dot product is a
    correlation that ignores exposure and contrast differences."""
    def one(p: Path) -> np.ndarray:
        return np.asarray(Image.open(p).convert("L").resize((side, side), Image.BILINEAR), np.float32).ravel()

    x = np.stack([one(p) for p in paths])
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
    return x


Pair = tuple[int, int, float]


def scan(z: np.ndarray, threshold: float, block: int = 2000) -> tuple[list[Pair], np.ndarray]:
    """One pass over all pairs, in row blocks so the 12k x 12k matrix is never held at once: the index pairs
    (i < j) whose correlation exceeds ``threshold``, most similar first, and each image's highest
    correlation with any other image (how close different films come at this scale)."""
    found = []
    nearest = np.empty(len(z), np.float32)
    cols = np.arange(len(z))
    for start in range(0, len(z), block):
        c = z[start : start + block] @ z.T
        rows = np.arange(c.shape[0]) + start
        c[rows - start, rows] = -1.0  # no self-pairs
        nearest[rows] = c.max(axis=1)
        upper = c > threshold
        upper &= rows[:, None] < cols[None, :]  # each pair once
        for i, j in np.argwhere(upper):
            found.append((start + int(i), int(j), float(c[i, j])))
    return sorted(found, key=lambda t: -t[2]), nearest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/rsna-bone-age-299"))
    ap.add_argument("--sample", type=Path, default=Path("../shared/data/rsna-bone-age-sample"))
    ap.add_argument("--report-above", type=float, default=0.95, help="list pairs above this correlation")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/duplicate_radiographs.json"))
    args = ap.parse_args()

    labels = pd.read_csv(args.data / "labels.csv", dtype={"id": str})
    held_ids = pd.read_csv(args.sample / "labels.csv", dtype={"id": str})["id"].tolist()
    held = set(held_ids)
    z = thumbnails([args.data / "images" / f"{i}.jpg" for i in labels["id"]])
    pairs, best = scan(z, args.report_above)
    rows = [
        {
            "id_a": labels["id"].iat[i],
            "id_b": labels["id"].iat[j],
            "correlation": round(c, 4),
            "boneage_a": int(labels["boneage"].iat[i]),
            "boneage_b": int(labels["boneage"].iat[j]),
            "same_sex": bool(labels["male"].iat[i] == labels["male"].iat[j]),
            "held_out": [labels["id"].iat[k] in held for k in (i, j)],
        }
        for i, j, c in pairs
    ]
    # the known duplicates: each held-out film's native PNG and its own 299 px copy
    native = thumbnails([args.sample / "images" / f"{i}.png" for i in held_ids])
    copy = thumbnails([args.data / "images" / f"{i}.jpg" for i in held_ids])
    own = (native * copy).sum(axis=1)
    result = {
        "images": len(z),
        "pairs_above": {str(t): sum(r["correlation"] > t for r in rows) for t in (0.95, 0.97, 0.99, 0.995)},
        "known_duplicates_native_vs_copy": {
            "n": len(own),
            "min": round(float(own.min()), 4),
            "quantile_0.01": round(float(np.quantile(own, 0.01)), 4),
            "median": round(float(np.median(own)), 4),
        },
        "nearest_partner_correlation_quantiles": {
            q: round(float(np.quantile(best, float(q))), 4) for q in ("0.5", "0.99", "0.999", "1.0")
        },
        "pairs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=2))
    for r in rows[:10]:
        print(r)


if __name__ == "__main__":
    main()
