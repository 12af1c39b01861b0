"""Measure an equal-weight ensemble of bundled models, under the rule in docs/results/ensemble/RULE.md.

    python benchmarks/ensemble_check.py \
        --member v0.6 src/boneage/assets/model.safetensors docs/results/bundled-v0.6/preds_native.csv \
        --member mnv2 ~/.cache/boneage/runs/bundled-mnv2/best.ckpt - \
        --config configs/bundled-mnv2.yaml --out docs/results/ensemble

Each member (a bundle or a checkpoint) predicts the validation split (training ids, 299 px copies, 6-view
TTA) and the held-out ids' 299 px copies here; its native-PNG predictions through ``Predictor.predict``'s own
file reading come from the member's bundle report (``preds_native.csv``) or, given ``-``, are measured here
the same way, so the ensemble's native figure is the mean of two measured ``predict``-path runs.
The choice uses the validation split only; the held-out figures are reported, never used to choose.
Writes ``ensemble.json`` and the per-image ``preds_<split>.csv`` of every member and of the mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

MARGIN_MONTHS = 0.10  # the rule: the ensemble must beat the better member by this much on the split


def ensemble_table(by_member: dict[str, pd.DataFrame], split: str) -> pd.DataFrame:
    """Every member's prediction and their mean on the ids all members answered, sorted by id. The members
    must agree on each shared id's reference age (``align_predictions``, the ship rule's check): members
    that answered other images under the same ids would otherwise be averaged silently."""
    from boneage.evaluation import align_predictions

    names = list(by_member)
    ref, aligned = align_predictions([(f"{name} ({split})", p) for name, p in by_member.items()])
    ids = sorted(ref.index)
    first = by_member[names[0]].loc[ids]
    table = pd.DataFrame({"id": ids, "boneage": ref.loc[ids].to_numpy(), "male": first["male"]})
    for k, name in enumerate(names):
        table[name] = aligned.loc[ids, k].to_numpy(float)
    table["ensemble"] = table[names].mean(axis=1)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--member",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "MODEL", "NATIVE_PREDS_CSV"),
        help="a bundle or checkpoint and its predict-path predictions of the native PNGs ('-': measure them)",
    )
    ap.add_argument("--config", type=Path, required=True, help="a run config giving the split and images")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ensemble"))
    args = ap.parse_args()

    from boneage.bundle import holdout_tables, run_split
    from boneage.config import load_config
    from boneage.errors import BoneAgeInputError
    from boneage.evaluation import evaluate, metrics
    from boneage.inference import Predictor

    cfg = load_config(args.config)  # as training read it: presets applied
    tables = {"val_split": run_split(cfg)[1]}
    tables["holdout_299"], native = holdout_tables(cfg, None)
    args.out.mkdir(parents=True, exist_ok=True)

    preds: dict[str, dict[str, pd.DataFrame]] = {split: {} for split in [*tables, "holdout_native"]}
    seconds: dict[str, float] = {}
    for name, bundle, native_csv in args.member:
        predictor = Predictor.load(Path(bundle).expanduser(), runtime="auto")
        t0 = time.perf_counter()
        for split, table in tables.items():
            rep = evaluate(predictor, table, cache_dir=cfg.data.cache_dir, progress=False)
            preds[split][name] = rep.predictions.set_index("id")
        seconds[name] = round(time.perf_counter() - t0, 1)
        if native_csv == "-":  # measure it here, as the bundle report does: read and preprocess each file
            assert native is not None, "no native-aspect files for the held-out ids"
            rep = evaluate(predictor, native, progress=False)
            rep.predictions.to_csv(args.out / f"preds_native_{name}.csv", index=False)
            preds["holdout_native"][name] = rep.predictions.set_index("id")
        else:
            preds["holdout_native"][name] = pd.read_csv(native_csv, dtype={"id": str}).set_index("id")
        print(f"{name}: {seconds[name]} s", flush=True)

    result: dict[str, object] = {"members": [m[0] for m in args.member], "seconds_per_member": seconds}
    for split, by_member in preds.items():
        try:
            table = ensemble_table(by_member, split)
        except BoneAgeInputError as exc:
            raise SystemExit(f"error: {exc}") from None
        table.to_csv(args.out / f"preds_{split}.csv", index=False)
        names = list(by_member)
        ref, male = table["boneage"].to_numpy(float), table["male"].to_numpy(bool)
        result[split] = {
            "n": len(table),
            **{name: round(float(np.mean(np.abs(table[name] - ref))), 3) for name in [*names, "ensemble"]},
            "mean_abs_member_difference": round(
                float(np.mean(np.abs(table[names[0]] - table[names[-1]]))), 3
            ),
            "ensemble_metrics": metrics(table["ensemble"].to_numpy(), ref, male),
        }
    val = result["val_split"]
    assert isinstance(val, dict)
    best_member = min(val[n] for n in result["members"])  # type: ignore[union-attr]
    result["rule"] = {
        "best_member_val_mae": best_member,
        "ensemble_val_mae": val["ensemble"],
        "margin_months": MARGIN_MONTHS,
        "adopt": bool(val["ensemble"] <= best_member - MARGIN_MONTHS),
    }
    (args.out / "ensemble.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "members"}, indent=2, default=str)[:3000])


if __name__ == "__main__":
    main()
