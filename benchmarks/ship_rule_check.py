"""Apply a bundled-model candidate's ship rule: its 6-view TTA MAE on the validation split against a bar.

    python benchmarks/ship_rule_check.py --model ~/.cache/boneage/runs/bundled-v0.7/last.ckpt \
        --config configs/bundled-v0.7.yaml --out docs/results/bundled-v0.7/ship_rule.json

Only the validation split (training ids never trained on) is scored, so the decision cannot lean on the
1,001 held-out ids; those are scored afterwards (``bundled_model_report.py``, ``ensemble_check.py``), for
the record. The bar is the incumbent's figure measured the same way
(``docs/results/ensemble/ensemble.json`` for v0.6), written in the candidate's config (``ship.bar``, with
``ship.checkpoint``) before it trained; ``--bar`` may repeat it, never change it.
Per-image predictions go to ``preds_val_split.csv`` beside the JSON, so the candidate can be compared with
the incumbent image by image (a paired difference); a rule with ``ship.paired_with`` applies that
difference itself (``boneage.bundle.paired_with_incumbent``); with ``ship.paired_with`` and no bar it is a
go/no-go gate for a line's first stage, decided by the paired difference alone. ``--record-only`` scores a
model that has no ship rule (an old bundle) the same way, and takes no decision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the candidate: a checkpoint or a bundle")
    ap.add_argument("--config", type=Path, required=True, help="its run config (gives the split)")
    ap.add_argument("--bar", type=float, default=None, help="the config's ship.bar, repeated (months)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the decision (JSON)")
    ap.add_argument("--record-only", action="store_true", help="score without a rule: no bar, no decision")
    args = ap.parse_args()

    from boneage.bundle import run_split, ship_bar, ship_decision
    from boneage.config import load_config
    from boneage.errors import BoneAgeInputError
    from boneage.evaluation import evaluate
    from boneage.inference import Predictor

    cfg = load_config(args.config)  # as training read it: presets applied
    if args.record_only and args.bar is not None:
        raise BoneAgeInputError("--record-only takes no decision, so no --bar", args.model)
    if not args.record_only:
        ship_bar(cfg, args.model, args.bar)  # a wrong bar or checkpoint fails here, before minutes of scoring
    table = run_split(cfg)[1]
    predictor = Predictor.load(args.model.expanduser(), runtime="auto")
    t0 = time.perf_counter()
    rep = evaluate(predictor, table, cache_dir=cfg.data.cache_dir, progress=False)
    mae = float(rep.metrics["mae_months"])
    decision = (
        {"mae": round(mae, 3), "ship": None, "decision": "none: recorded only"}
        if args.record_only
        else ship_decision(cfg, args.model, mae, args.bar, predictions=rep.predictions)
    )
    result = {
        "model": str(args.model),
        "config": str(args.config),
        "split": "validation split (training ids, 299 px copies), 6-view TTA",
        "n": len(table),
        **decision,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rep.predictions.to_csv(args.out.with_name("preds_val_split.csv"), index=False)  # for paired comparisons
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from boneage.errors import BoneAgeInputError

    try:
        main()
    except BoneAgeInputError as exc:  # a wrong bar, checkpoint or file: one line, exit 1
        raise SystemExit(f"error: {exc}") from None
