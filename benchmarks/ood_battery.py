"""The bundled model's out-of-distribution check against a battery of inputs that are not PA left-hand
radiographs as the model expects them, and its false-flag rate on real held-out hands.

    python benchmarks/ood_battery.py --out benchmarks/results/ood_battery

Every battery image is written to a file (PNG, or DICOM for the MONOCHROME1 case) and sent through
``load_predictor().predict`` (the engine the CLI, batch and web use): "refused" means a one-line
BoneAgeInputError, "warned" a caution on the prediction (the image may not be what the model expects: no
advanced/delayed flag is shown), "corrected" a negative assessed inverted back (with a note), "passed" a bone
age with no caution (a failure of the check for every input here). The battery: synthetic non-hands, real
held-out hands turned, and (issue #43 item 5) real held-out hands altered five ways: inverted (a negative),
stored as MONOCHROME1 DICOM without inverting the pixels (the model sees a negative), cropped to the wrist,
shuffled in 128 px blocks and transposed. Real hands: the 1,001 held-out native-aspect radiographs of
../shared/data/rsna-bone-age-sample (never trained on), each through the same ``predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "rsna-bone-age-sample"


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


def _read_hand(image_id: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLE / "images" / f"{image_id}.png").convert("L"))


def wrist_crop(img: np.ndarray) -> np.ndarray:
    """The lower 38% of the hand's box: carpals, distal radius and ulna, metacarpal bases; no fingers."""
    from boneage.data.preprocess import hand_box

    top, bottom, left, right = hand_box(img.astype(np.float32))
    return img[top + int(0.62 * (bottom - top)) : bottom, left:right]


def block_shuffle(img: np.ndarray, rng: np.random.Generator, block: int = 128) -> np.ndarray:
    """The image cut into ``block`` px squares (the ragged edge dropped) and the squares shuffled."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    tiles = img[:h, :w].reshape(h // block, block, w // block, block).swapaxes(1, 2).reshape(-1, block, block)
    tiles = tiles[rng.permutation(len(tiles))]
    return tiles.reshape(h // block, w // block, block, block).swapaxes(1, 2).reshape(h, w)


ALTERATIONS = ("inverted", "monochrome1-unconverted", "wrist-crop", "shuffled-128px", "transposed")


def altered_hands(ids: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each hand altered every way of ``ALTERATIONS`` (issue #43 item 5); the MONOCHROME1 case holds the
    hand's own pixels, written by the tests' ``write_dicom`` to a file that says they are inverted."""
    out = {}
    for image_id in ids:
        img = _read_hand(image_id)
        out[f"altered-{image_id}-inverted"] = 255 - img
        out[f"altered-{image_id}-monochrome1-unconverted"] = img
        out[f"altered-{image_id}-wrist-crop"] = wrist_crop(img)
        out[f"altered-{image_id}-shuffled-128px"] = block_shuffle(img, rng)
        out[f"altered-{image_id}-transposed"] = np.ascontiguousarray(img.T)
    return out


def _kind(name: str) -> str:
    if name.startswith("hand-"):
        return "rotated hand"
    if name.startswith("altered-"):
        return name.split("-", 2)[2]
    return name.split("-")[0]


def _outcome(pred) -> str:
    """A prediction's outcome: a caution says the image may not be what the model expects."""
    if pred.cautions:
        return "warned"
    return "corrected" if pred.inverted else "passed"


def _refusal_detail(exc: Exception) -> str:
    return str(exc).split(": ", 1)[-1]


def _refused_by(detail: str) -> str:
    """Every check a refusal names, joined by "+"."""
    named = [
        check
        for needle, check in (
            ("image features are far", "pooled density"),
            ("fine image texture", "texture density"),
            ("may be a negative", "polarity"),
            ("almost uniform", "uniform image"),
        )
        if needle in detail
    ]
    return "+".join(named) or "other"


def _caution_kinds(cautions: list[str]) -> str:
    """Every check that warned, joined by "+"."""
    named = [
        check
        for needle, check in (
            ("rotated or upside down", "orientation"),
            ("whole left hand", "whole hand"),
            ("unstable across test-time views", "views' spread"),
        )
        if any(needle in text for text in cautions)
    ]
    return "+".join(named) or ("other" if cautions else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="bundle (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ood_battery"))
    ap.add_argument("--hands", type=int, default=5, help="real hands to rotate")
    ap.add_argument("--altered", type=int, default=20, help="real hands to alter each way (issue #43 item 5)")
    ap.add_argument("--real", type=int, default=0, help="only the first N real hands (0: all 1,001)")
    args = ap.parse_args()

    from boneage.data.labels import read_labels
    from boneage.errors import BoneAgeInputError
    from boneage.predict import load_predictor

    sys.path.insert(0, str(ROOT / "tests"))  # the tests' DICOM writer, so both send the reader the same files
    from conftest import write_dicom

    # the engine `boneage predict` and the web app use by default
    predictor = load_predictor(args.checkpoint)
    assert predictor.ood is not None, "this bundle has no OOD density"
    labels = read_labels(SAMPLE / "labels.csv", SAMPLE / "images")
    rng = np.random.default_rng(0)
    all_ids = labels["id"].astype(str).tolist()
    hand_ids = all_ids[:: max(1, len(labels) // args.hands)][: args.hands]
    # a different spread of hands for the alterations (offset so they are not the turned ones)
    altered_ids = all_ids[7 :: max(1, len(labels) // args.altered)][: args.altered]
    battery = {**synthetic_battery(rng), **rotated_hands(hand_ids), **altered_hands(altered_ids, rng)}
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, img in battery.items():
            if name.endswith("monochrome1-unconverted"):
                # the header says 0 = white while the pixels are stored bone-bright: a negative to the model
                path = write_dicom(Path(tmp) / f"{name}.dcm", img, photometric="MONOCHROME1", PatientID="OOD")
            else:
                path = Path(tmp) / f"{name}.png"
                Image.fromarray(img).save(path)
            row = {"input": name, "kind": _kind(name)}
            try:
                pred = predictor.predict(path, "female")
                row.update(
                    outcome=_outcome(pred),
                    bone_age_months=round(pred.bone_age_months, 1),
                    ood_score=round(pred.ood_score or float("nan"), 2),
                    detail=" | ".join(pred.warnings),
                )
            except BoneAgeInputError as exc:
                row.update(outcome="refused", detail=_refusal_detail(exc))
            rows.append(row)
    battery_seconds = time.perf_counter() - started
    table = pd.DataFrame(rows)

    # real held-out hands (never trained on), each through predict: how many are refused or warned?
    real_rows = []
    real = labels if args.real <= 0 else labels.iloc[: args.real]
    for image_id, path, male in zip(real["id"], real["path"], real["male"], strict=True):
        row = {"id": image_id}
        try:
            pred = predictor.predict(path, "male" if male else "female")
        except BoneAgeInputError as exc:
            detail = _refusal_detail(exc)
            row.update(outcome="refused", check=_refused_by(detail), detail=detail)
        else:
            check = "polarity" if pred.inverted else ""
            row.update(
                outcome=_outcome(pred),
                check=_caution_kinds(pred.cautions) or check,
                bone_age_months=round(pred.bone_age_months, 1),
                uncertainty_months=round(pred.uncertainty_months, 2),
                ood_score=round(pred.ood_score or float("nan"), 4),
                detail=" | ".join(pred.warnings),
            )
        real_rows.append(row)
    real_table = pd.DataFrame(real_rows)
    seconds = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "battery.csv", index=False)
    real_table.to_csv(args.out / "real_hands.csv", index=False)

    def counts(frame: pd.DataFrame) -> dict[str, int]:
        return {k: int((frame["outcome"] == k).sum()) for k in ("refused", "warned", "corrected", "passed")}

    refused = real_table[real_table["outcome"] == "refused"]
    warned = real_table[real_table["outcome"] == "warned"]
    corrected = real_table[real_table["outcome"] == "corrected"]
    flagged = len(refused) + len(warned)
    density = predictor.ood
    probe, texture_density = density.orientation, density.texture
    summary = {
        "threshold": round(density.threshold, 3),
        "texture_threshold": round(texture_density.threshold, 3) if texture_density is not None else None,
        "orientation_check": "probe" if probe is not None else "density ratio",
        "orientation_limit": round(probe.limit if probe is not None else density.rotation_ratio, 3),
        "battery_images": len(table),
        "battery_refused": int((table["outcome"] == "refused").sum()),
        "battery_warned": int((table["outcome"] == "warned").sum()),
        "battery_corrected": int((table["outcome"] == "corrected").sum()),
        "battery_passed": int((table["outcome"] == "passed").sum()),
        "passed_inputs": table.loc[table["outcome"] == "passed", "input"].tolist(),
        "battery_by_kind": {kind: counts(group) for kind, group in table.groupby("kind")},
        "altered_hands_per_alteration": len(altered_ids),
        "altered_hand_ids": altered_ids,
        "real_hands": len(real_table),
        **{f"real_hands_{k}": v for k, v in counts(real_table).items()},
        "real_hands_refused_by": {k: int(v) for k, v in refused["check"].value_counts().items()},
        "real_hands_warned_by": {k: int(v) for k, v in warned["check"].value_counts().items()},
        "real_hands_refused_ids": refused["id"].astype(str).tolist(),
        "real_hands_warned_ids": warned["id"].astype(str).tolist(),
        "real_hands_corrected_ids": corrected["id"].astype(str).tolist(),
        "real_hands_flagged": flagged,
        "real_hands_flagged_rate": round(flagged / max(1, len(real_table)), 4),
        "battery_seconds": round(battery_seconds, 1),
        "seconds": round(seconds, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table.groupby(["kind", "outcome"]).size().to_string())
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
