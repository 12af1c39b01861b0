"""The bundled model's out-of-distribution check against a battery of inputs that are not PA left-hand
radiographs, and its false-refusal rate on real held-out hands.

    python benchmarks/ood_battery.py --out benchmarks/results/ood_battery

Every battery image is written to a PNG and sent through ``load_predictor().predict`` (the engine the CLI,
batch and web use): "refused" means a one-line BoneAgeInputError, "warned" a warning on the prediction,
"passed" a bone age with no caveat (a failure of the check). Real hands: the 1,001 held-out native-aspect
radiographs of ../shared/data/rsna-bone-age-sample (never trained on), scored with the same density.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-bone-age-sample"


def _u8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-9)
    return (x * 255).astype(np.uint8)


def synthetic_battery(rng: np.random.Generator, h: int = 1000, w: int = 800) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out: dict[str, np.ndarray] = {}
    for i in range(3):
        out[f"noise-uniform-{i}"] = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out[f"noise-gaussian-{i}"] = _u8(rng.normal(0, 1, (h, w)))
    for i in range(3):
        img = np.zeros((h, w), np.uint8)
        for _ in range(1 + 20 * i):
            y, x = rng.integers(0, h), rng.integers(0, w)
            img[y : y + 3, x : x + 3] = 255
        out[f"blank-with-specks-{i}"] = img
    out["blank-white"] = np.full((h, w), 255, np.uint8)
    out["blank-grey"] = np.full((h, w), 128, np.uint8)
    out["gradient-horizontal"] = _u8(xx)
    out["gradient-vertical"] = _u8(yy)
    out["gradient-radial"] = _u8(-np.hypot(yy - 0.5, xx - 0.4))
    out["stripes-vertical"] = _u8(np.sin(xx * 60) > 0)
    out["stripes-horizontal"] = _u8(np.sin(yy * 45) > 0)
    out["stripes-diagonal"] = _u8(np.sin((xx + yy) * 50))
    out["checkerboard"] = _u8((np.floor(xx * 16) + np.floor(yy * 16)) % 2)
    for i, lines in enumerate((30, 60)):
        page = Image.new("L", (w, h), 255)
        draw = ImageDraw.Draw(page)
        for k in range(lines):
            words = " ".join(
                "".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(9)
            )
            draw.text((30, 10 + k * (h - 20) // lines), words, fill=0)
        out[f"text-page-{i}"] = np.asarray(page)
        out[f"text-page-inverted-{i}"] = 255 - np.asarray(page)
    for i in range(2):  # chest-like: bright body, two dark lungs, a spine, ribs
        img = np.full((h, w), 0.75) + rng.normal(0, 0.02, (h, w))
        for cx in (0.28, 0.52):
            lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
            img[lung] = 0.25 + 0.05 * i
        img[np.abs(xx - 0.4) < 0.025] = 0.95
        for r in range(8):
            img[
                (np.abs(yy - 0.25 - r * 0.065 - 0.03 * np.sin(xx * 6)) < 0.008) & (np.abs(xx - 0.4) < 0.3)
            ] = 0.7
        img[(xx < 0.05) | (xx > 0.75)] = 0.05
        out[f"chest-like-{i}"] = _u8(img)
    skull = np.where(np.abs(np.hypot((yy - 0.5) / 0.45, (xx - 0.4) / 0.35) - 0.9) < 0.05, 1.0, 0.1)
    out["skull-like"] = _u8(skull + rng.normal(0, 0.03, (h, w)))
    limb = np.full((h, w), 0.1)
    for cx in (0.33, 0.45):  # forearm-like: two long parallel bones
        limb[(np.abs(xx - cx) < 0.03) & (yy > 0.1) & (yy < 0.9)] = 0.9
    out["forearm-like"] = _u8(limb + rng.normal(0, 0.03, (h, w)))
    blobs = np.zeros((h, w))
    for _ in range(12):
        cy, cx, s = rng.random(), rng.random() * 0.8, 0.03 + rng.random() * 0.1
        blobs += np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / s**2))
    out["smooth-blobs"] = _u8(blobs)
    return out


def rotated_hands(ids: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for image_id in ids:
        img = np.asarray(Image.open(SAMPLE / "images" / f"{image_id}.png").convert("L"))
        out[f"hand-{image_id}-rot90"] = np.rot90(img, 1)
        out[f"hand-{image_id}-rot270"] = np.rot90(img, 3)
        out[f"hand-{image_id}-rot180"] = np.rot90(img, 2)
        out[f"hand-{image_id}-upside-down"] = img[::-1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ood_battery"))
    ap.add_argument("--hands", type=int, default=5, help="real hands to rotate")
    args = ap.parse_args()

    from boneage.data.labels import read_labels
    from boneage.errors import BoneAgeInputError
    from boneage.ood import rotation_ratios, turned
    from boneage.predict import load_predictor, oriented_pixels

    # the engine `boneage predict` and the web app use by default
    predictor = load_predictor(args.checkpoint)
    plain = load_predictor(args.checkpoint, tta=False)
    assert predictor.ood is not None, "this bundle has no OOD density"
    labels = read_labels(SAMPLE / "labels.csv", SAMPLE / "images")
    rng = np.random.default_rng(0)
    hand_ids = labels["id"].astype(str).tolist()[:: max(1, len(labels) // args.hands)][: args.hands]
    battery = {**synthetic_battery(rng), **rotated_hands(hand_ids)}
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, img in battery.items():
            path = Path(tmp) / f"{name}.png"
            Image.fromarray(img).save(path)
            row = {
                "input": name,
                "kind": name.split("-")[0] if not name.startswith("hand-") else "rotated hand",
            }
            try:
                pred = predictor.predict(path, "female")
                row.update(
                    outcome="warned" if pred.warnings else "passed",
                    bone_age_months=round(pred.bone_age_months, 1),
                    ood_score=round(pred.ood_score or float("nan"), 2),
                    detail=" | ".join(pred.warnings),
                )
            except BoneAgeInputError as exc:
                row.update(outcome="refused", detail=str(exc).split(": ", 1)[-1])
                try:
                    rad = plain.prepare(path)[0]
                except BoneAgeInputError:  # refused while reading (e.g. a blank frame): no features
                    row["ood_score"] = float("nan")
                else:  # the pooled score the refusal rule judged (of the image remade as a training copy)
                    score = plain.refusal_scores(oriented_pixels(rad))[0]
                    row["ood_score"] = round(float("nan") if score is None else score, 2)
            rows.append(row)
    table = pd.DataFrame(rows)
    # real held-out hands (never trained on): how many would be refused?
    from boneage.data.io import read_radiograph

    prepared, pooled, texture = [], [], []
    for p in labels["path"]:  # one read per file: the inputs of every check, as predict makes them
        rad = read_radiograph(p)
        prepared.append(plain.prepare(rad)[1])
        score, texture_score = plain.refusal_scores(oriented_pixels(rad))
        pooled.append(np.nan if score is None else score)
        texture.append(np.nan if texture_score is None else texture_score)
    images, texture_scores = np.stack(prepared), np.asarray(texture, dtype=float)
    copy_scores = np.asarray(pooled, dtype=float)  # what the refusal rule judges
    male = labels["male"].to_numpy(bool)
    feats = plain.predict_arrays(images, male, features=True)[3]
    scores = plain.ood.score(feats)  # of the model's own input: what the orientation rule compares
    probe = plain.ood.orientation
    texture_density = plain.ood.texture
    refused_pooled = plain.ood.refuses(copy_scores)
    refused_texture = (
        texture_density.refuses(texture_scores)
        if texture_density is not None
        else np.zeros(len(scores), bool)
    )
    refused = refused_pooled | refused_texture
    ratios = rotation_ratios(scores, plain.ood_scores(turned(images), np.tile(male, 4)))
    rotated = ~refused & plain.ood.looks_turned(feats, ratios)  # the rule predict applies
    orientation = {"rotation_ratio": np.round(ratios, 4)}
    if probe is not None:
        orientation["upright_probability"] = np.round(probe.upright_probability(feats), 4)
    flagged = int(refused.sum() + rotated.sum())
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "battery.csv", index=False)
    real = {
        "id": labels["id"],
        "ood_score": np.round(copy_scores, 4),
        "ood_input_score": np.round(scores, 4),
        "ood_texture_score": np.round(texture_scores, 4),
        **orientation,
    }
    pd.DataFrame(real).to_csv(args.out / "real_hands.csv", index=False)
    summary = {
        "threshold": round(plain.ood.threshold, 3),
        "orientation_check": "probe" if probe is not None else "density ratio",
        "orientation_limit": round(probe.limit if probe is not None else plain.ood.rotation_ratio, 3),
        "battery_images": len(table),
        "battery_refused": int((table["outcome"] == "refused").sum()),
        "battery_warned": int((table["outcome"] == "warned").sum()),
        "battery_passed": int((table["outcome"] == "passed").sum()),
        "passed_inputs": table.loc[table["outcome"] == "passed", "input"].tolist(),
        "real_hands": len(labels),
        "texture_threshold": round(texture_density.threshold, 3) if texture_density is not None else None,
        "real_hands_refused": int(refused.sum()),
        "real_hands_refused_by_pooled_density": int(refused_pooled.sum()),
        "real_hands_refused_by_texture_density": int(refused_texture.sum()),
        "real_hands_warned_rotated": int(rotated.sum()),
        "real_hands_refused_ids": labels.loc[refused, "id"].astype(str).tolist(),
        "real_hands_warned_ids": labels.loc[rotated, "id"].astype(str).tolist(),
        "real_hands_flagged": flagged,
        "real_hands_flagged_rate": round(flagged / len(labels), 4),
        "real_hand_score_p50_p99_max": [
            round(float(np.nanquantile(copy_scores, q)), 3) for q in (0.5, 0.99, 1.0)
        ],
        "real_hand_input_score_p50_p99_max": [
            round(float(np.quantile(scores, q)), 3) for q in (0.5, 0.99, 1.0)
        ],
        "real_hand_texture_score_p50_p99_max": [
            round(float(np.nanquantile(texture_scores, q)), 3) for q in (0.5, 0.99, 1.0)
        ]
        if texture_density is not None
        else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table.groupby(["kind", "outcome"]).size().to_string())
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
